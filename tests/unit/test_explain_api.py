"""The Explain API's wire format: an ExplainRequest becomes the request ``check`` would decide,
and every key of the explanation lands in the ExplainResponse field of that name, unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import json_format

from authz_server.attributes import CONTEXT_EXTENSIONS, RequestAttributes
from authz_server.config import load as config
from authz_server.doors.explain_api import NoSubjectError, to_attributes, to_response
from authz_server.explain import explain, request_attributes
from authz_server.service import Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from authz_server.v1 import explain_pb2
from tests.helpers import AUDIENCE, ISSUER, write_config

CONFIG = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksFile: jwks.json
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
policies:
  - name: no-internal
    action: DENY
    rules: [{{to: [{{operation: {{paths: ["/api/internal*"]}}}}]}}]
  - name: writers
    rules:
      - to: [{{operation: {{methods: ["POST"]}}}}]
        when:
          - {{key: "request.auth.claims[groups]", values: ["writers"]}}
          - {{key: "request.context_extensions[tenant]", values: ["acme"]}}
      - from: [{{source: {{ipBlocks: ["10.0.0.0/8"]}}}}]
      - when: [{{key: "request.auth.claims[level]", values: ["9"]}}]
  - name: readers
    rules: [{{to: [{{operation: {{methods: ["GET"]}}}}]}}]
  - name: watch-all
    action: AUDIT
    rules: [{{}}]
  - name: future-lockdown
    action: DENY
    dryRun: true
    rules: [{{to: [{{operation: {{paths: ["/api/*"]}}}}]}}]
"""


@pytest.fixture
def engine(tmp_path: Path, rsa_key: SigningKey) -> Iterator[Engine]:
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(rsa_key)))
    built = Engine.build(config.load(write_config(tmp_path, CONFIG)))
    for cache in built.caches.values():
        assert cache.refresh()
    yield built
    built.close()


def _without_defaults(value: Any, key: str = "") -> Any:
    """``value`` as protobuf's JSON prints it: fields holding their default value are left
    out, except inside the values of ``had`` and ``claims`` (google.protobuf Value/Struct)."""
    if key in ("had", "claims"):
        return value
    if isinstance(value, dict):
        return {
            k: _without_defaults(v, k)
            for k, v in value.items()
            if k in ("had", "claims") or v not in (None, False, 0, "", [], {})
        }
    if isinstance(value, list):
        return [_without_defaults(item) for item in value]
    return value


def test_every_key_of_the_explanation_reaches_the_response_unchanged(
    engine: Engine, make_token: Callable[..., str]
) -> None:
    token = make_token(groups=["writers"], level=3, profile={"team": "core", "ok": True})
    request = RequestAttributes(
        method="POST",
        path="/api/orders",
        headers={"authorization": f"Bearer {token}", "x-user": "forged"},
        unknown=frozenset({CONTEXT_EXTENSIONS}),  # as the HTTP door sends it: fails closed
    )
    result = explain(engine, request, show_claims=True)
    # Every kind of entry is there: a verified token with claims, a claim value, an unknown
    # attribute, "had": null, AUDIT and dry-run verdicts, a denial's headers.
    text = json.dumps(result)
    for needle in ('"claims"', '"had": 3', '"unknown"', '"had": null', '"audited": ["watch-all"]'):
        assert needle in text
    assert result["dry_run"] == {"future-lockdown": "deny"}

    allowed = explain(engine, request_attributes(headers=dict(request.headers)), show_claims=True)
    assert allowed["headers_to_set"] == {"x-user": "alice"}

    for explained in (result, allowed):
        response = to_response(explained)

        printed = json_format.MessageToDict(response, preserving_proto_field_name=True)
        assert printed == _without_defaults(explained)
        assert token not in str(response)


def test_a_key_the_proto_does_not_know_is_refused_not_dropped() -> None:
    with pytest.raises(json_format.ParseError, match="verdict"):
        to_response({"decision": "allow", "verdict": "yes"})


def test_the_fields_describe_the_request_as_check_would() -> None:
    message = explain_pb2.ExplainRequest(
        request=explain_pb2.HttpRequest(
            method="post",
            host="api.example.com",
            path="/api/orders?page=2",
            headers={"Authorization": "Bearer abc", "X-Tenant": "acme"},
            source_ip="10.1.2.3",
            context_extensions={"tenant": "acme"},
        )
    )

    attributes = to_attributes(message)

    expected = request_attributes(
        method="POST",
        host="api.example.com",
        path="/api/orders?page=2",
        headers={"authorization": "Bearer abc", "x-tenant": "acme"},
        source_ip="10.1.2.3",
        context_extensions={"tenant": "acme"},
    )
    assert vars(attributes) == vars(expected)


def test_empty_method_and_path_mean_get_and_root() -> None:
    attributes = to_attributes(explain_pb2.ExplainRequest(request=explain_pb2.HttpRequest()))
    assert (attributes.method, attributes.path, attributes.normalized_path) == ("GET", "/", "/")


def test_a_check_request_is_read_as_the_grpc_door_reads_it() -> None:
    ctx = attribute_context_pb2.AttributeContext
    check = external_auth_pb2.CheckRequest(
        attributes=ctx(
            source=ctx.Peer(principal="spiffe://cluster.local/ns/shop/sa/web"),
            request=ctx.Request(http=ctx.HttpRequest(method="DELETE", path="/api/x")),
            context_extensions={"tenant": "acme"},
            tls_session=ctx.TLSSession(sni="api.example.com"),
        )
    )

    attributes = to_attributes(explain_pb2.ExplainRequest(check_request=check))

    assert attributes.method == "DELETE"
    assert attributes.peer_principal == "spiffe://cluster.local/ns/shop/sa/web"
    assert attributes.sni == "api.example.com"
    assert dict(attributes.context_extensions) == {"tenant": "acme"}


def test_a_request_naming_nothing_to_explain_is_refused_with_both_ways_named() -> None:
    with pytest.raises(NoSubjectError, match=r"`request`.*`check_request`"):
        to_attributes(explain_pb2.ExplainRequest(show_claims=True))
