"""Verification keys: a provider's key set and its refreshes (``keyset``), and where a provider's
keys come from (``sources``: a JWKS URL or file, inline keys, an API keys file, an IdP)."""
