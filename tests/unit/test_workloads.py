"""Scoping: with workloads declared, each request is decided with only the policies and
providers that apply to its workload, as Istio scopes them by namespace and selector."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.doors.explain_api import to_response
from authz_server.errors import ConfigError
from authz_server.explain import explain
from authz_server.policy.workloads import (
    IstioScope,
    TargetRef,
    Workload,
    WorkloadIndex,
    istio_selection,
)
from authz_server.service import AuthorizationService, Engine
from authz_server.tools.devkeys import SigningKey, jwks
from tests.helpers import AUDIENCE, ISSUER

WORKLOADS = [
    Workload("orders", "shop", {"app": "orders"}, {"workload": "orders"}, gateway_refs=("edge",)),
    Workload("payments", "shop", {"app": "payments", "tier": "pci"}, {"workload": "payments"}),
    Workload("ledger", "finance", {"app": "ledger", "tier": "pci"}, service_refs=("ledger",)),
]


def selected(scope: IstioScope) -> set[str]:
    names, problems = istio_selection(scope, WORKLOADS, "istio-system")
    assert problems == []
    return set(names)


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        # The root namespace without a selector: the whole mesh.
        (IstioScope("istio-system"), {"orders", "payments", "ledger"}),
        # The root namespace with a selector: matching workloads of every namespace.
        (IstioScope("istio-system", {"tier": "pci"}), {"payments", "ledger"}),
        # A namespace without a selector: every workload of that namespace.
        (IstioScope("shop"), {"orders", "payments"}),
        # A namespace with a selector: its matching workloads only...
        (IstioScope("shop", {"tier": "pci"}), {"payments"}),
        # ...never a matching workload of another namespace.
        (IstioScope("shop", {"app": "ledger"}), set()),
        (IstioScope("elsewhere"), set()),
        # targetRefs through the workloads' gatewayRefs / serviceRefs, in the ref's namespace.
        (IstioScope("shop", None, (TargetRef("Gateway", "edge"),)), {"orders"}),
        (IstioScope("shop", None, (TargetRef("Service", "ledger", "finance"),)), {"ledger"}),
    ],
)
def test_istio_scoping_table(scope: IstioScope, expected: set[str]) -> None:
    assert selected(scope) == expected


@pytest.mark.parametrize(
    ("scope", "field", "message"),
    [
        (IstioScope(None), "metadata.namespace", "required once workloads are declared"),
        (
            IstioScope("shop", None, (TargetRef("Gateway", "nowhere"),)),
            "spec.targetRefs[0]",
            "no declared workload in namespace 'shop' lists 'nowhere' in its gatewayRefs",
        ),
        (
            IstioScope("shop", {"app": "orders"}, (TargetRef("Gateway", "edge"),)),
            "spec.selector",
            "selector and targetRefs cannot both be set",
        ),
        (
            IstioScope("shop", None, (TargetRef("HTTPRoute", "r"),)),
            "spec.targetRefs[0].kind",
            "only Gateway and Service are supported",
        ),
    ],
)
def test_scopes_that_cannot_be_resolved_are_refused_not_ignored(
    scope: IstioScope, field: str, message: str
) -> None:
    _, problems = istio_selection(scope, WORKLOADS, "istio-system")
    assert len(problems) == 1
    assert problems[0][0] == field
    assert message in problems[0][1]


def test_a_request_is_recognised_by_extensions_then_principal_then_host() -> None:
    index = WorkloadIndex(
        [
            Workload("orders", "shop", context_extensions={"workload": "orders"}),
            Workload(
                "orders-v2", "shop", context_extensions={"workload": "orders", "version": "v2"}
            ),
            Workload(
                "payments",
                "shop",
                destination_principals=("spiffe://cluster.local/ns/shop/sa/payments",),
            ),
            Workload("web", "web", hosts=("www.example.com", "*.static.example.com")),
        ]
    )

    def find(**fields: Any) -> str | None:
        found = index.identify(RequestAttributes(**fields))
        return None if found is None else found.name

    assert find(context_extensions={"workload": "orders"}) == "orders"
    # The workload listing the most context extensions wins.
    assert find(context_extensions={"version": "v2", "workload": "orders"}) == "orders-v2"
    assert find(context_extensions={"workload": "orders", "version": "v3"}) == "orders"
    assert find(destination_principal="spiffe://cluster.local/ns/shop/sa/payments") == "payments"
    assert find(host="WWW.example.com.:8443") == "web"
    assert find(host="img.static.example.com") == "web"
    # Context extensions come first, whatever the host says.
    assert find(host="www.example.com", context_extensions={"workload": "orders"}) == "orders"
    assert find(host="other.example.com", context_extensions={"workload": "nope"}) is None


def test_the_host_decides_only_where_no_context_extensions_and_no_spiffe_id_were_sent() -> None:
    index = WorkloadIndex(
        [
            Workload("orders", "shop", context_extensions={"workload": "orders"}),
            Workload(
                "payments",
                "shop",
                destination_principals=("spiffe://cluster.local/ns/shop/sa/payments",),
            ),
            Workload("web", "web", hosts=("www.example.com",)),
        ]
    )

    def find(**fields: Any) -> str | None:
        found = index.identify(RequestAttributes(host="www.example.com", **fields))
        return None if found is None else found.name

    # A route that said something no workload lists, a sidecar no workload lists: unknown,
    # whatever host the client names.
    assert find(context_extensions={"workload": "billing"}) is None
    assert find(destination_principal="spiffe://cluster.local/ns/shop/sa/billing") is None
    assert find(destination_principal="spiffe://cluster.local/ns/shop/sa/payments") == "payments"
    # Nothing sent (a gateway, the HTTP door, a plaintext request), or only the name of the
    # certificate a TLS gateway served (no workload identity): the host decides.
    assert find() == "web"
    assert find(destination_principal="www.example.com") == "web"


# --------------------------------------------------------------------------- end to end


def _config(tmp_path: Path, *documents: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


def _native(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "authz-server/v1", "kind": "AuthzConfig", **fields}


def _istio(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


MESH = [
    _native(
        workloads=[
            {
                "name": "orders",
                "namespace": "shop",
                "labels": {"app": "orders"},
                "contextExtensions": {"workload": "orders"},
                "destinationPrincipals": ["spiffe://cluster.local/ns/shop/sa/orders"],
            },
            {
                "name": "reports",
                "namespace": "shop",
                "labels": {"app": "reports"},
                "contextExtensions": {"workload": "reports"},
                "hosts": ["reports.example.com:*"],
            },
        ]
    ),
    # A mesh-wide provider, and one only the reports workload accepts.
    _istio(
        "RequestAuthentication",
        "main",
        "istio-system",
        {"jwtRules": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwksUri": "file:jwks"}]},
    ),
    _istio(
        "RequestAuthentication",
        "partners",
        "shop",
        {
            "selector": {"matchLabels": {"app": "reports"}},
            "jwtRules": [{"issuer": "https://partners.test", "jwksUri": "file:jwks"}],
        },
    ),
    # orders: only admins; reports: no ALLOW policy of its own, so it allows.
    _istio(
        "AuthorizationPolicy",
        "orders-admins",
        "shop",
        {
            "selector": {"matchLabels": {"app": "orders"}},
            "rules": [{"when": [{"key": "request.auth.claims[groups]", "values": ["admin"]}]}],
        },
    ),
    _istio(
        "AuthorizationPolicy",
        "reports-no-delete",
        "shop",
        {
            "selector": {"matchLabels": {"app": "reports"}},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}],
        },
    ),
]


def _with_keys(key: SigningKey) -> list[dict[str, Any]]:
    """MESH with ``key``'s public JWKS inline in every jwtRule (Istio's ``jwks``)."""
    documents = json.loads(json.dumps(MESH))
    for document in documents:
        for rule in document.get("spec", {}).get("jwtRules", []):
            rule.pop("jwksUri")
            rule["jwks"] = json.dumps(jwks(key))
    return documents


@pytest.fixture
def mesh(tmp_path: Path, rsa_key: SigningKey) -> AuthorizationService:
    settings = config.load(_config(tmp_path, *_with_keys(rsa_key)))
    engine = Engine.build(settings)
    for cache in engine.caches.values():
        assert cache.refresh()
    return AuthorizationService(engine)


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_a_policy_for_one_workload_never_decides_another(
    mesh: AuthorizationService, make_token: Callable[..., str]
) -> None:
    def status(workload: str, method: str = "GET", **claims: Any) -> tuple[int, str]:
        request = RequestAttributes(
            method=method,
            path="/x",
            headers=_bearer(make_token(**claims)),
            context_extensions={"workload": workload},
        )
        decision = mesh.check(request)
        return decision.status, decision.reason

    assert status("orders", groups=["admin"]) == (200, "allowed")
    assert status("orders", groups=["dev"]) == (403, errors.NO_ALLOW_POLICY_MATCHED)
    # orders' ALLOW policy does not make reports an allow-list; orders' callers are not
    # refused DELETE by reports' DENY policy.
    assert status("reports", groups=["dev"]) == (200, "allowed")
    assert status("reports", "DELETE", groups=["admin"]) == (403, errors.POLICY_DENIED)
    assert status("orders", "DELETE", groups=["admin"]) == (200, "allowed")
    # No workload recognised: fail closed.
    assert status("billing", groups=["admin"]) == (403, errors.UNKNOWN_WORKLOAD)


def test_a_provider_scoped_to_one_workload_is_an_unknown_issuer_elsewhere(
    mesh: AuthorizationService, make_token: Callable[..., str]
) -> None:
    partner = make_token(iss="https://partners.test", aud=None)
    by_host = RequestAttributes(host="reports.example.com:443", headers=_bearer(partner))
    on_orders = RequestAttributes(
        headers=_bearer(partner), context_extensions={"workload": "orders"}
    )

    assert mesh.check(by_host).status == 200
    denied = mesh.check(on_orders)
    assert (denied.status, denied.reason) == (401, errors.INVALID_ISSUER)


def test_unknown_workloads_can_be_decided_with_every_policy(
    tmp_path: Path, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    documents = _with_keys(rsa_key)
    documents[0]["scoping"] = {"unknownWorkload": "allPolicies"}
    engine = Engine.build(config.load(_config(tmp_path, *documents)))
    for cache in engine.caches.values():
        cache.refresh()
    service = AuthorizationService(engine)
    unknown = RequestAttributes(method="DELETE", headers=_bearer(make_token(groups=["admin"])))

    # Every policy: the orders ALLOW matches, but the reports DENY on DELETE comes first.
    assert service.check(unknown).reason == errors.POLICY_DENIED


def test_explain_names_the_workload_and_the_policies_in_scope(
    mesh: AuthorizationService, make_token: Callable[..., str]
) -> None:
    request = RequestAttributes(
        headers=_bearer(make_token(groups=["dev"])), context_extensions={"workload": "orders"}
    )

    result = explain(mesh.engine, request)

    assert result["workload"]["name"] == "orders"
    assert result["workload"]["policies_in_scope"] == ["shop/orders-admins"]
    assert [p["name"] for p in result["policies"]] == ["shop/orders-admins"]
    assert result["workload"]["providers_in_scope"] == [ISSUER]
    # The Explain API carries it too.
    assert to_response(result).workload.policies_in_scope == ["shop/orders-admins"]
    unknown = explain(mesh.engine, RequestAttributes(context_extensions={"workload": "x"}))
    assert (unknown["reason"], unknown["workload"]["unknown"]) == (errors.UNKNOWN_WORKLOAD, "deny")
    assert to_response(unknown).workload.unknown == "deny"


def _problems(tmp_path: Path, *documents: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.load(_config(tmp_path, *documents))
    return [f"{p.path}: {p.message}" for p in caught.value.problems]


def test_workloads_that_cannot_be_told_apart_or_recognised_are_refused(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        _native(
            workloads=[
                {"name": "a", "hosts": ["api.example.com"]},
                {"name": "b", "hosts": ["API.example.com:*"]},
                {"name": "c"},
                {"name": "a", "contextExtensions": {"w": "a"}},
            ],
            policies=[
                {"name": "p", "appliesTo": {"workloads": ["a", "typo"]}, "rules": [{}]},
            ],
        ),
    )

    assert problems == [
        "workloads[1].hosts: the same host as workload 'a': ambiguous",
        "workloads[2]: no request could be recognised as this workload: give it "
        "contextExtensions, destinationPrincipals or hosts",
        "workloads[3].name: duplicate workload name 'a'",
        "policies[0].appliesTo.workloads[1]: no workload named 'typo'",
    ]


def test_scoping_fields_without_workloads(tmp_path: Path) -> None:
    # An appliesTo with nothing to select among would be ignored, widening the policy.
    problems = _problems(
        tmp_path,
        _native(policies=[{"name": "p", "appliesTo": {"namespaces": ["shop"]}, "rules": [{}]}]),
    )
    assert problems == [
        "policies[0].appliesTo: needs workloads: declare the workloads it selects among "
        "(without them every policy applies everywhere)"
    ]
    # An Istio selector, as before workloads existed: applied everywhere, with a warning.
    settings = config.load(
        _config(
            tmp_path,
            _istio("AuthorizationPolicy", "p", "shop", {"selector": {"matchLabels": {"a": "b"}}}),
        )
    )
    assert settings.policy_scopes == {}
    assert any(
        "spec.selector is ignored: no workloads are declared" in w for w in settings.warnings
    )


def test_a_selector_that_selects_no_workload_is_reported(tmp_path: Path) -> None:
    settings = config.load(
        _config(
            tmp_path,
            _native(workloads=[{"name": "a", "namespace": "shop", "hosts": ["a.test"]}]),
            _istio("AuthorizationPolicy", "p", "shop", {"selector": {"matchLabels": {"x": "y"}}}),
        )
    )

    assert settings.policy_scopes == {"shop/p": frozenset()}
    assert any("applies to no declared workload" in w for w in settings.warnings)


def test_the_most_specific_wildcard_host_wins_and_ties_go_to_the_first_declared() -> None:
    index = WorkloadIndex(
        [
            Workload("any-api", "web", hosts=("*.example.com",)),
            Workload("inner-api", "web", hosts=("*.api.example.com",)),
            Workload("a-c", "web", context_extensions={"a": "1", "c": "3"}),
            Workload("b-d", "web", context_extensions={"b": "2", "d": "4"}),
        ]
    )

    def find(**fields: Any) -> str | None:
        found = index.identify(RequestAttributes(**fields))
        return None if found is None else found.name

    # Declared after the broader wildcard, still chosen: its suffix is longer.
    assert find(host="x.api.example.com") == "inner-api"
    assert find(host="x.example.com") == "any-api"
    # Both sets present: the first declared, whatever order Envoy sends the map in.
    both = [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]
    assert find(context_extensions=dict(both)) == "a-c"
    assert find(context_extensions=dict(reversed(both))) == "a-c"


def test_one_issuer_trusted_in_two_namespaces_is_verified_for_each_workload(
    tmp_path: Path, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    # Istio's common layout: each namespace has its own RequestAuthentication for the same
    # IdP; they become two providers, `ISSUER` and `ISSUER#2`, each in one workload's scope.
    rule = {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks": json.dumps(jwks(rsa_key))}
    documents = [
        _native(
            workloads=[
                {"name": "a", "namespace": "ns-a", "hosts": ["a.example.com"]},
                {"name": "b", "namespace": "ns-b", "hosts": ["b.example.com"]},
            ]
        ),
        _istio("RequestAuthentication", "idp", "ns-a", {"jwtRules": [rule]}),
        _istio("RequestAuthentication", "idp", "ns-b", {"jwtRules": [rule]}),
        _istio(
            "AuthorizationPolicy",
            "signed-in",
            "istio-system",
            {"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]},
        ),
    ]
    engine = Engine.build(config.load(_config(tmp_path, *documents)))
    for cache in engine.caches.values():
        assert cache.refresh()
    service = AuthorizationService(engine)
    token = make_token()

    for host in ("a.example.com", "b.example.com", "a.example.com"):
        decision = service.check(RequestAttributes(host=host, headers=_bearer(token)))
        assert (host, decision.status) == (host, 200)


@pytest.mark.parametrize("host", ["api.*", "*", "foo*", "a b"])
def test_a_workload_host_that_could_never_match_is_refused(tmp_path: Path, host: str) -> None:
    problems = _problems(tmp_path, _native(workloads=[{"name": "w", "hosts": [host]}]))

    assert len(problems) == 1
    assert problems[0].startswith("workloads[0].hosts: ")
    assert f"{host!r}: a host is a name, `*.` and a suffix" in problems[0]


def test_validate_warns_of_workloads_the_http_door_could_never_recognise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from authz_server import cli

    document = _native(
        server={"httpAuthz": {"listen": "127.0.0.1:0"}},
        workloads=[
            {"name": "routed", "contextExtensions": {"workload": "routed"}},
            {"name": "hosted", "hosts": ["api.example.com"]},
        ],
        policies=[{"name": "p", "rules": [{}]}],
    )

    assert cli.main(["validate", "--config", str(_config(tmp_path, document))]) == 0

    warnings = capsys.readouterr().err.splitlines()
    assert [w for w in warnings if "HTTP door" in w] == [
        "warning: workload 'routed' lists no hosts: the HTTP door receives no context "
        "extensions and no destination principal, so its requests through that door are an "
        "unknown workload (scoping.unknownWorkload)"
    ]


def test_a_workload_recognised_by_its_principal_can_be_explained_over_grpc(
    mesh: AuthorizationService,
) -> None:
    from authz_server.doors.explain_api import to_attributes
    from authz_server.v1 import explain_pb2

    over_grpc = explain_pb2.ExplainRequest(
        request=explain_pb2.HttpRequest(
            destination_principal="spiffe://cluster.local/ns/shop/sa/orders"
        )
    )

    result = explain(mesh.engine, to_attributes(over_grpc))

    assert result["workload"]["name"] == "orders"
    assert result["workload"]["policies_in_scope"] == ["shop/orders-admins"]


@pytest.mark.parametrize(
    ("workloads", "warned"),
    [
        # Sidecars (destination principals) beside a workload recognised by its host.
        (
            [
                {"name": "orders", "destinationPrincipals": ["spiffe://td/ns/shop/sa/orders"]},
                {"name": "web", "hosts": ["www.example.com"]},
            ],
            "workload 'web' is recognised by its hosts while 'orders' are sidecars",
        ),
        # A sidecar's workload recognised by its Service name alone (k8s/istio-http).
        (
            [{"name": "orders", "hosts": ["orders.shop.svc.cluster.local", "orders:8080"]}],
            "workload 'orders' is recognised by host 'orders.shop.svc.cluster.local', a "
            "Kubernetes Service name",
        ),
        ([{"name": "bare", "hosts": ["orders"]}], "recognised by host 'orders', a Kubernetes"),
        # Gateways: public names, or context extensions first.
        ([{"name": "api", "hosts": ["api.example.com", "*.partners.example.com"]}], None),
        ([{"name": "ip", "hosts": ["10.0.0.1", "10.0.0.1:8080"]}], None),
        (
            [{"name": "routed", "contextExtensions": {"w": "r"}, "hosts": ["routed.shop.svc"]}],
            None,
        ),
    ],
)
def test_validate_warns_where_the_client_would_pick_a_sidecars_scope_by_host(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    workloads: list[dict[str, Any]],
    warned: str | None,
) -> None:
    from authz_server import cli

    document = _native(workloads=workloads, policies=[{"name": "p", "rules": [{}]}])

    assert cli.main(["validate", "--config", str(_config(tmp_path, document))]) == 0

    warnings = [w for w in capsys.readouterr().err.splitlines() if "Host header" in w]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0], warnings
        assert "workloads[" in warnings[0] and ".hosts: " in warnings[0]
