"""The two front doors, side by side: each turns its wire format into ``RequestAttributes``
and a ``Decision`` back into its wire format, and holds no decision logic.

- ``grpc``: Envoy's ``envoy.service.auth.v3.Authorization/Check`` (the primary door).
- ``http``: Envoy's HTTP ext_authz protocol (``http_service``; Istio's ``envoyExtAuthzHttp``).
"""
