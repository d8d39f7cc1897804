"""authz-server: an Envoy external authorization server (JWT + Istio-style policies)."""

__version__ = "0.1.0"
