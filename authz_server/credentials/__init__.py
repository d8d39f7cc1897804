"""Credentials: where a request carries one (``extract``), and how each kind is verified into an
``Identity``: JWTs (``jwt``, cached by ``token_cache``), opaque tokens (``introspection``), API
keys (``apikeys``), the choice between them (``verification``), and sender constraints (DPoP and
certificate ``binding``, with the proof ``replay`` cache)."""
