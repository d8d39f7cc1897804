"""config: loading YAML that mixes AuthzConfig, RequestAuthentication and AuthorizationPolicy."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_server import cli
from authz_server.config import load as config
from authz_server.config import specs
from authz_server.config.load import Settings
from authz_server.config.specs import parse_duration
from authz_server.errors import ConfigError, ConfigProblem
from authz_server.tools import devkeys
from tests.helpers import write_config

DATA = Path(__file__).resolve().parent.parent / "data"
ISS = "https://idp.example.com"
JWKS = json.dumps(devkeys.jwks(devkeys.generate_key("EC-P256", kid="config-test")))

Doc = Mapping[str, Any]


# ------------------------------------------------------------------------------- helpers


def native(**body: Any) -> dict[str, Any]:
    return {"apiVersion": "authz-server/v1", "kind": "AuthzConfig", **body}


def provider(**fields: Any) -> dict[str, Any]:
    return {"issuer": ISS, "jwks": JWKS, **fields}


# Istio's "require a JWT": providers alone are refused (they would allow every request), so a
# test about providers gives them this policy.
REQUIRE_JWT = {
    "name": "require-jwt",
    "action": "DENY",
    "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}],
}


def istio(
    kind: str,
    spec: Any,
    *,
    name: str | None = "p",
    namespace: str | None = "shop",
    api_version: str = "security.istio.io/v1",
    **metadata: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = dict(metadata)
    if name is not None:
        meta["name"] = name
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec}


def policy_doc(spec: Any, **kwargs: Any) -> dict[str, Any]:
    return istio("AuthorizationPolicy", spec, **kwargs)


def ra_doc(*rules: Any, **kwargs: Any) -> dict[str, Any]:
    return istio("RequestAuthentication", {"jwtRules": list(rules)}, **kwargs)


def write(path: Path, *docs: Doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def load(tmp_path: Path, *docs: Doc) -> Settings:
    return config.load(write(tmp_path / "config.yaml", *docs))


def problems(tmp_path: Path, *docs: Doc) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, *docs)
    return info.value.problems


def only_problem(tmp_path: Path, *docs: Doc) -> ConfigProblem:
    found = problems(tmp_path, *docs)
    assert len(found) == 1, found
    return found[0]


def one_rule(rule: Doc) -> dict[str, Any]:
    return native(policies=[{"name": "p", "rules": [rule]}])


# -------------------------------------------------------------------------- valid inputs


def test_native_example_loads_with_every_field() -> None:
    settings = config.load(DATA / "config_native.yaml")
    server = settings.server
    assert (server.listen, server.metrics_listen, server.realm) == (
        "127.0.0.1:9001",
        "127.0.0.1:9090",
        "shop",
    )
    assert (server.missing_token_status, server.trusted_proxy_hops, server.shutdown_grace) == (
        403,
        1,
        2.0,
    )
    (local,) = settings.providers
    assert local.name == "local"
    assert local.jwks_file == DATA / "config_jwks.json"
    spec = local.spec
    assert spec.from_headers[0].name == "Authorization"
    assert spec.from_headers[0].prefix == "Bearer "
    assert (spec.from_params, spec.from_cookies) == (["access_token"], ["session"])
    assert (spec.output_claim_to_headers[0].header, spec.output_claim_to_headers[0].claim) == (
        "x-user",
        "sub",
    )
    assert spec.output_payload_to_header == "x-jwt-payload"
    assert spec.space_delimited_claims == ["roles"]
    assert spec.algorithms == ["RS256", "ES256"]
    assert (spec.clock_skew, spec.refresh_interval, spec.timeout) == (30.0, 600.0, 1.5)
    assert [(p.name, p.action, p.dry_run) for p in settings.policies] == [
        ("require-jwt", "DENY", False),
        ("shadow", "DENY", True),
    ]
    assert settings.warnings == ()
    assert settings.sources == (str(DATA / "config_native.yaml"),)


def test_istio_mesh_yaml_loads_unchanged() -> None:
    settings = config.load(DATA / "config_mesh.yaml")
    (jwt,) = settings.providers
    assert (jwt.name, jwt.spec.jwks_uri, jwt.spec.audiences) == (
        ISS,
        f"{ISS}/.well-known/jwks.json",
        ["shop-api"],
    )
    assert jwt.spec.forward_original_token is True
    assert [(p.name, p.action) for p in settings.policies] == [
        ("shop/deny-blocked", "DENY"),
        ("shop/allow-api", "ALLOW"),
        ("shop/audit-admin", "AUDIT"),
    ]
    assert any("spec.selector is ignored" in w for w in settings.warnings)
    assert any("RequestAuthentication/jwt" in w for w in settings.warnings)
    assert any("'Service' (v1) is not ours; ignored" in w for w in settings.warnings)


def test_defaults_without_a_server_section(tmp_path: Path) -> None:
    settings = load(tmp_path, native(providers=[provider()], policies=[REQUIRE_JWT]))
    assert settings.server == specs.ServerSpec()
    assert settings.server.listen == "0.0.0.0:9001"
    assert settings.server.missing_token_status == 401
    (only,) = settings.providers
    assert only.spec.algorithms == list(specs.ASYMMETRIC_ALGORITHMS)
    assert only.spec.presence == "OPTIONAL"
    assert only.origin.endswith("(AuthzConfig): providers[0]")


@pytest.mark.parametrize("text", ["", "# nothing yet\n---\n", "---\n...\n"])
def test_a_stream_with_no_documents_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    (problem,) = caught.value.problems
    assert "no configuration documents" in problem.message
    assert "allow every request" in problem.message


def test_a_directory_of_empty_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("")
    (tmp_path / "b.yml").write_text("# comment\n")
    with pytest.raises(ConfigError, match="no configuration documents"):
        config.load(tmp_path)


@pytest.mark.parametrize(
    "docs",
    [
        [native()],
        [native(server={"listen": "0.0.0.0:9001"})],
        [native(providers=[], policies=[])],
        [istio("RequestAuthentication", {})],
        [native(server={"allowEmpty": False})],
    ],
    ids=["bare", "server-only", "empty-lists", "istio-without-rules", "allow-empty-false"],
)
def test_no_providers_and_no_policies_is_refused_as_allow_all(
    tmp_path: Path, docs: list[Doc]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, *docs)
    (problem,) = caught.value.problems
    assert "no providers and no policies" in problem.message
    assert "server.allowEmpty: true" in problem.message


def test_allow_empty_accepts_an_empty_configuration_with_a_warning(tmp_path: Path) -> None:
    settings = load(tmp_path, native(server={"allowEmpty": True}))
    assert (settings.providers, settings.policies) == ((), ())
    assert settings.server.allow_empty
    (warning,) = settings.warnings
    assert "every request is allowed" in warning


def test_allow_empty_does_not_excuse_a_file_with_no_documents(tmp_path: Path) -> None:
    # The flag lives in a document: a stream with none cannot have said it.
    (tmp_path / "a.yaml").write_text("")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(native(server={"allowEmpty": True})))
    settings = config.load(tmp_path)
    assert settings.server.allow_empty
    (tmp_path / "b.yaml").write_text("")
    with pytest.raises(ConfigError, match="no configuration documents"):
        config.load(tmp_path)


def test_a_policy_alone_is_not_empty(tmp_path: Path) -> None:
    assert load(tmp_path, native(policies=[{"name": "p", "action": "DENY"}])).policies


@pytest.mark.parametrize(
    "docs",
    [
        [native(providers=[provider()])],
        [native(providers=[provider()], policies=[])],
        [ra_doc({"issuer": ISS, "jwks": JWKS})],
        [native(server={"allowEmpty": False}, providers=[provider()])],
    ],
    ids=["native", "empty-list", "istio", "allow-empty-false"],
)
def test_providers_without_any_policy_are_refused_as_allow_all(
    tmp_path: Path, docs: list[Doc]
) -> None:
    # A provider file whose policy file beside it was lost: every request would pass, with
    # or without a token.
    (problem,) = problems(tmp_path, *docs)
    assert problem.path == "policies"
    assert "1 provider(s) but no policy" in problem.message
    assert "with or without credentials" in problem.message
    assert "server.allowEmpty: true" in problem.message


def test_allow_empty_accepts_providers_without_policies_with_a_warning(tmp_path: Path) -> None:
    settings = load(tmp_path, native(server={"allowEmpty": True}, providers=[provider()]))
    assert (len(settings.providers), settings.policies) == (1, ())
    (warning,) = settings.warnings
    assert "every request is allowed, with or without credentials" in warning


@pytest.mark.parametrize(
    "policy",
    [
        REQUIRE_JWT,
        {"name": "audit", "action": "AUDIT", "rules": [{}]},
        {"name": "nothing", "action": "ALLOW"},
    ],
    ids=["deny-only", "audit-only", "allow-nothing"],
)
def test_providers_with_a_policy_of_any_action_are_valid(tmp_path: Path, policy: Doc) -> None:
    settings = load(tmp_path, native(providers=[provider()], policies=[policy]))
    assert [p.name for p in settings.policies] == [policy["name"]]
    assert settings.warnings == ()


def test_the_k8s_config_cut_before_its_policies_is_refused(tmp_path: Path) -> None:
    shipped = (DATA.parent.parent / "k8s" / "base" / "config.yaml").read_text().splitlines()
    cut = next(i for i, line in enumerate(shipped) if line.startswith("policies:"))
    path = tmp_path / "trunc.yaml"
    path.write_text("\n".join(shipped[:cut]) + "\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    (problem,) = caught.value.problems
    assert "but no policy" in problem.message
    assert config.load(DATA.parent.parent / "k8s" / "base" / "config.yaml").policies


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5s", 5.0),
        ("250ms", 0.25),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("100us", 1e-4),
        ("100µs", 1e-4),
        ("10ns", 1e-8),
        (10, 10.0),
        (0.5, 0.5),
        ("0s", 0.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5", "expected a duration"),
        ("5 s", "expected a duration"),
        ("1d", "expected a duration"),
        ("5 parsecs", "expected a duration"),
        ("", "expected a duration"),
        ("-1s", "expected a duration"),
        (-1, "cannot be negative"),
        (True, "expected a duration"),
        (None, "expected a duration"),
        ([5], "expected a duration"),
    ],
)
def test_bad_durations(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize("api_version", ["security.istio.io/v1", "security.istio.io/v1beta1"])
def test_istio_v1_and_v1beta1_are_accepted(tmp_path: Path, api_version: str) -> None:
    settings = load(
        tmp_path,
        ra_doc({"issuer": ISS, "jwks": JWKS}, api_version=api_version),
        policy_doc({"rules": [{}]}, api_version=api_version),
    )
    assert [p.name for p in settings.providers] == [ISS]
    assert [p.name for p in settings.policies] == ["shop/p"]


def test_jwks_uri_alias_of_istio(tmp_path: Path) -> None:
    settings = load(
        tmp_path, ra_doc({"issuer": ISS, "jwks_uri": f"{ISS}/jwks"}), native(policies=[REQUIRE_JWT])
    )
    assert settings.providers[0].spec.jwks_uri == f"{ISS}/jwks"


def test_jwks_uri_and_its_alias_together_are_refused(tmp_path: Path) -> None:
    problem = only_problem(
        tmp_path, ra_doc({"issuer": ISS, "jwks_uri": f"{ISS}/a", "jwksUri": f"{ISS}/b"})
    )
    assert (problem.path, problem.message) == (
        "spec.jwtRules[0]",
        "only one of jwks_uri or jwksUri can be set",
    )


def test_each_jwt_rule_becomes_a_provider(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        ra_doc(
            {"issuer": ISS, "jwksUri": f"{ISS}/jwks", "fromHeaders": [{"name": "x-jwt"}]},
            {"issuer": "https://other.example.com", "jwks": JWKS, "presence": "REQUIRED"},
        ),
        native(policies=[REQUIRE_JWT]),
    )
    assert [p.name for p in settings.providers] == [ISS, "https://other.example.com"]
    assert settings.providers[0].spec.from_headers[0].name == "x-jwt"
    assert settings.providers[1].spec.presence == "REQUIRED"
    assert settings.providers[1].origin.endswith("(RequestAuthentication/p): spec.jwtRules[1]")


def test_request_authentication_without_rules_adds_no_provider(tmp_path: Path) -> None:
    settings = load(tmp_path, istio("RequestAuthentication", {}), policy_doc({}))
    assert settings.providers == ()


@pytest.mark.parametrize(
    ("annotations", "dry_run"),
    [
        ({"istio.io/dry-run": "true"}, True),
        ({"istio.io/dry-run": "True"}, True),
        ({"istio.io/dry-run": "false"}, False),
        ({"other": "true"}, False),
        (None, False),
    ],
)
def test_dry_run_annotation(tmp_path: Path, annotations: Any, dry_run: bool) -> None:
    metadata = {} if annotations is None else {"annotations": annotations}
    settings = load(tmp_path, policy_doc({"action": "DENY", "rules": [{}]}, **metadata))
    assert settings.policies[0].dry_run is dry_run


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("selector", {"matchLabels": {"app": "api"}}),
        ("targetRef", {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}),
        ("targetRefs", [{"kind": "Service", "group": "", "name": "api"}]),
    ],
)
def test_workload_selection_is_ignored_with_a_warning(
    tmp_path: Path, field: str, value: Any
) -> None:
    settings = load(
        tmp_path,
        policy_doc({field: value, "rules": [{}]}),
    )
    assert [p.name for p in settings.policies] == ["shop/p"]
    assert any(f"spec.{field} is ignored" in w for w in settings.warnings)


def test_request_authentication_selector_is_ignored_with_a_warning(tmp_path: Path) -> None:
    spec = {
        "selector": {"matchLabels": {"app": "api"}},
        "jwtRules": [{"issuer": ISS, "jwks": JWKS}],
    }
    settings = load(tmp_path, istio("RequestAuthentication", spec), native(policies=[REQUIRE_JWT]))
    assert len(settings.providers) == 1
    assert settings.warnings and "spec.selector is ignored" in settings.warnings[0]


@pytest.mark.parametrize(
    ("api_version", "kind"),
    [
        ("v1", "Service"),
        ("v1", "ConfigMap"),
        ("apps/v1", "Deployment"),
        ("networking.istio.io/v1", "VirtualService"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ],
)
def test_kinds_of_other_api_groups_are_ignored_with_a_warning(
    tmp_path: Path, api_version: str, kind: str
) -> None:
    other = {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}, "spec": {"a": 1}}
    settings = load(tmp_path, other, native(providers=[provider()], policies=[REQUIRE_JWT]))
    assert len(settings.providers) == 1
    (warning,) = settings.warnings
    assert f"kind {kind!r} ({api_version}) is not ours; ignored" in warning


def test_policy_names_are_namespaced_like_istio(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        policy_doc({}, name="a", namespace="shop"),
        policy_doc({}, name="a", namespace="billing"),
        policy_doc({}, name="b", namespace=None),
    )
    assert [p.name for p in settings.policies] == ["shop/a", "billing/a", "b"]


def test_empty_spec_is_an_allow_policy_without_rules(tmp_path: Path) -> None:
    settings = load(tmp_path, policy_doc({}, name="deny-all"), policy_doc(None, name="nothing"))
    assert [(p.name, p.action, p.rules) for p in settings.policies] == [
        ("shop/deny-all", "ALLOW", None),
        ("shop/nothing", "ALLOW", None),
    ]


def test_bare_service_account_takes_the_policy_namespace(tmp_path: Path) -> None:
    rule = {"from": [{"source": {"serviceAccounts": ["api", "ops/cron"]}}]}
    (policy,) = load(tmp_path, policy_doc({"rules": [rule]})).policies
    assert policy.rules is not None
    assert policy.rules[0].from_ is not None
    assert policy.rules[0].from_[0].source.service_accounts == ["shop/api", "ops/cron"]


@pytest.mark.parametrize(
    "path", ["/users/{*}", "/{*}/{*}/x", "/files/{**}", "/v1/{*}/files/{**}", "/a/{**}/b", "/a*"]
)
def test_valid_path_templates(tmp_path: Path, path: str) -> None:
    settings = load(tmp_path, one_rule({"to": [{"operation": {"paths": [path]}}]}))
    assert len(settings.policies) == 1


def test_same_issuer_twice_without_names_gets_distinct_provider_names(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        ra_doc({"issuer": ISS, "jwks": JWKS}, name="a"),
        ra_doc({"issuer": ISS, "jwksUri": f"{ISS}/jwks"}, name="b"),
        native(policies=[REQUIRE_JWT]),
    )
    assert [p.name for p in settings.providers] == [ISS, f"{ISS}#2"]


# ------------------------------------------------------------------- field-path problems


@pytest.mark.parametrize(
    ("doc", "path", "message"),
    [
        # providers
        (
            native(providers=[provider(fromHeaders=[{"prefix": "Bearer "}])]),
            "providers[0].fromHeaders[0].name",
            "Field required",
        ),
        (
            native(providers=[provider(fromHeaders=[{"name": ""}])]),
            "providers[0].fromHeaders[0].name",
            "at least 1 character",
        ),
        (
            native(providers=[provider(), provider(fromHeaders=[{"name": "a", "bad": 1}])]),
            "providers[1].fromHeaders[0].bad",
            "unknown field",
        ),
        (native(providers=[provider(jwksURL="x")]), "providers[0].jwksURL", "unknown field"),
        (native(providers=[provider(issuer="")]), "providers[0].issuer", "at least 1 character"),
        (native(providers=[{"jwks": JWKS}]), "providers[0].issuer", "Field required"),
        (native(providers=[provider(name="")]), "providers[0].name", "at least 1 character"),
        (native(providers=[provider(timeout="5 parsecs")]), "providers[0].timeout", "duration"),
        (native(providers=[provider(clockSkew=-1)]), "providers[0].clockSkew", "negative"),
        (
            native(providers=[provider(refreshInterval="1d")]),
            "providers[0].refreshInterval",
            "expected a duration like '5s', '250ms' or '1h30m', got '1d'",
        ),
        (
            native(providers=[provider(refreshInterval="0s")]),
            "providers[0].refreshInterval",
            "at least 1s",
        ),
        (
            native(providers=[provider(algorithms=["RS256", "HS256"])]),
            "providers[0].algorithms",
            "HS256 needs a shared secret",
        ),
        (
            native(providers=[provider(algorithms=["HS512"])]),
            "providers[0].algorithms",
            "HS512 needs a shared secret",
        ),
        (
            native(providers=[provider(algorithms=["none"])]),
            "providers[0].algorithms",
            "'none' is never accepted",
        ),
        (
            native(providers=[provider(algorithms=[])]),
            "providers[0].algorithms",
            "at least one algorithm",
        ),
        (
            native(providers=[provider(algorithms=["RS1024"])]),
            "providers[0].algorithms[0]",
            "Input should be",
        ),
        (
            native(providers=[provider(jwksUri=f"{ISS}/jwks")]),
            "providers[0]",
            "sharedSecretFile must be set (got jwksUri, jwks)",
        ),
        (
            native(providers=[provider(jwksFile="k.json")]),
            "providers[0]",
            "sharedSecretFile must be set (got jwks, jwksFile)",
        ),
        (
            native(providers=[{"issuer": ISS}]),
            "providers[0]",
            "exactly one of jwksUri, jwks, jwksFile, discovery: true, sharedSecretFile must be set",
        ),
        (
            native(providers=[{"issuer": ISS, "jwksUri": "ftp://idp.example.com/jwks"}]),
            "providers[0].jwksUri",
            "http:// or https://",
        ),
        (
            native(providers=[{"issuer": ISS, "jwksUri": "https://"}]),
            "providers[0].jwksUri",
            "http:// or https://",
        ),
        (native(providers=[provider(jwks="not json")]), "providers[0].jwks", "not valid JSON"),
        (
            native(providers=[provider(jwks='{"keys": 1}')]),
            "providers[0].jwks",
            'must be a JSON object {"keys": [...]}',
        ),
        (
            native(providers=[provider(jwks="[1, 2]")]),
            "providers[0].jwks",
            'must be a JSON object {"keys": [...]}',
        ),
        (
            native(providers=[{"issuer": ISS, "jwksFile": "missing.json"}]),
            "providers[0].jwksFile",
            "no such file",
        ),
        (
            native(providers=[provider(outputClaimToHeaders=[{"header": "x user", "claim": "s"}])]),
            "providers[0].outputClaimToHeaders[0].header",
            "String should match pattern",
        ),
        (
            native(providers=[provider(outputClaimToHeaders=[{"header": "x-user"}])]),
            "providers[0].outputClaimToHeaders[0].claim",
            "Field required",
        ),
        (
            native(providers=[provider(outputPayloadToHeader="x:payload")]),
            "providers[0].outputPayloadToHeader",
            "String should match pattern",
        ),
        (
            native(providers=[provider(presence="SOMETIMES")]),
            "providers[0].presence",
            "Input should be 'OPTIONAL' or 'REQUIRED'",
        ),
        (native(providers=[provider(fromParams=[""])]), "providers[0].fromParams[0]", "at least"),
        # server
        (native(server={"bogus": 1}), "server.bogus", "unknown field"),
        (native(server={"threads": 0}), "server.threads", "greater than or equal to 1"),
        (native(server={"realm": 'a"b'}), "server.realm", "String should match pattern"),
        (native(server={"missingTokenStatus": 500}), "server.missingTokenStatus", "Input should"),
        (native(server={"trustedProxyHops": -1}), "server.trustedProxyHops", "greater than"),
        (native(server={"shutdownGrace": "soon"}), "server.shutdownGrace", "duration"),
        # the envelope of the native document
        (native(extra=1), "extra", "unknown field"),
        ({"apiVersion": "authz-server/v2", "kind": "AuthzConfig"}, "apiVersion", "authz-server/v1"),
        ({"apiVersion": "authz-server/v1", "kind": "Other"}, "kind", "AuthzConfig"),
        # native policies
        (
            native(policies=[{"name": "p", "action": "CUSTOM"}]),
            "policies[0].action",
            "CUSTOM delegates to an external authorizer, which is authz-server itself",
        ),
        (native(policies=[{"name": "p", "action": "allow"}]), "policies[0].action", "'ALLOW'"),
        (native(policies=[{"rules": [{}]}]), "policies[0].name", "Field required"),
        (native(policies=[{"name": "p", "dryRun": "maybe"}]), "policies[0].dryRun", "boolean"),
        (native(policies=[{"name": "p", "rule": []}]), "policies[0].rule", "unknown field"),
        (one_rule({"form": []}), "policies[0].rules[0].form", "unknown field"),
        (
            one_rule({"from": [{"source": {}}]}),
            "policies[0].rules[0].from[0].source",
            "`source` must not be empty",
        ),
        (
            one_rule({"from": [{"source": {"ipBlocks": []}}]}),
            "policies[0].rules[0].from[0].source",
            "`source` must not be empty",
        ),
        (
            one_rule({"from": [{}]}),
            "policies[0].rules[0].from[0].source",
            "Field required",
        ),
        (
            one_rule({"from": [{"source": {"ipBlock": ["10.0.0.0/8"]}}]}),
            "policies[0].rules[0].from[0].source.ipBlock",
            "unknown field",
        ),
        (
            one_rule({"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}),
            "policies[0].rules[0].from[0].source.ipBlocks",
            "'10.0.0.0/33' is not an IP address or CIDR block",
        ),
        (
            one_rule({"from": [{"source": {"notIpBlocks": ["10.0.0.300"]}}]}),
            "policies[0].rules[0].from[0].source.notIpBlocks",
            "not an IP address or CIDR block",
        ),
        (
            one_rule({"from": [{"source": {"remoteIpBlocks": ["example.com"]}}]}),
            "policies[0].rules[0].from[0].source.remoteIpBlocks",
            "not an IP address or CIDR block",
        ),
        (
            one_rule({"from": [{"source": {"notRemoteIpBlocks": ["2001:db8::g/32"]}}]}),
            "policies[0].rules[0].from[0].source.notRemoteIpBlocks",
            "not an IP address or CIDR block",
        ),
        (
            one_rule({"from": [{"source": {"principals": ["a"], "serviceAccounts": ["ns/sa"]}}]}),
            "policies[0].rules[0].from[0].source",
            "cannot set serviceAccounts with namespaces or principals",
        ),
        (
            one_rule({"from": [{"source": {"notNamespaces": ["a"], "serviceAccounts": ["n/s"]}}]}),
            "policies[0].rules[0].from[0].source",
            "cannot set serviceAccounts with namespaces or principals",
        ),
        (
            one_rule({"from": [{"source": {"namespaces": ["a"], "notServiceAccounts": ["n/s"]}}]}),
            "policies[0].rules[0].from[0].source",
            "cannot set serviceAccounts with namespaces or principals",
        ),
        (
            one_rule({"from": [{"source": {"serviceAccounts": ["api"]}}]}),
            "policies[0].rules[0].from[0].source.serviceAccounts",
            "'api' is not namespace/serviceAccount",
        ),
        (
            one_rule({"from": [{"source": {"notServiceAccounts": ["a/b/c"]}}]}),
            "policies[0].rules[0].from[0].source.notServiceAccounts",
            "'a/b/c' is not namespace/serviceAccount",
        ),
        (
            one_rule({"from": [{"source": {"serviceAccounts": ["shop/*"]}}]}),
            "policies[0].rules[0].from[0].source.serviceAccounts",
            "wildcards are not allowed",
        ),
        (
            one_rule({"from": [{"source": {"principals": [""]}}]}),
            "policies[0].rules[0].from[0].source.principals[0]",
            "at least 1 character",
        ),
        (
            one_rule({"to": [{"operation": {}}]}),
            "policies[0].rules[0].to[0].operation",
            "`operation` must not be empty",
        ),
        (
            one_rule({"to": [{"operation": {"path": ["/a"]}}]}),
            "policies[0].rules[0].to[0].operation.path",
            "unknown field",
        ),
        (
            one_rule({"to": [{"operation": {"ports": ["http"]}}]}),
            "policies[0].rules[0].to[0].operation.ports",
            "'http' is not a port number (1-65535)",
        ),
        (
            one_rule({"to": [{"operation": {"ports": ["65536"]}}]}),
            "policies[0].rules[0].to[0].operation.ports",
            "'65536' is not a port number",
        ),
        (
            one_rule({"to": [{"operation": {"notPorts": ["-1"]}}]}),
            "policies[0].rules[0].to[0].operation.notPorts",
            "'-1' is not a port number",
        ),
        (
            one_rule({"to": [{"operation": {"paths": ["/a", ""]}}]}),
            "policies[0].rules[0].to[0].operation.paths[1]",
            "at least 1 character",
        ),
        (
            one_rule({"to": [{"operation": {"paths": ["/a/{**}/{*}"]}}]}),
            "policies[0].rules[0].to[0].operation.paths",
            "'/a/{**}/{*}': {**} must be the last operator of a path template",
        ),
        (
            one_rule({"to": [{"operation": {"notPaths": ["/{**}/{**}"]}}]}),
            "policies[0].rules[0].to[0].operation.notPaths",
            "{**} must be the last operator",
        ),
        (
            one_rule({"to": [{"operation": {"paths": ["/users/id-{*}"]}}]}),
            "policies[0].rules[0].to[0].operation.paths",
            "a path template operator must be a whole segment, {*} or {**}",
        ),
        (
            one_rule({"to": [{"operation": {"paths": ["/users/{id}"]}}]}),
            "policies[0].rules[0].to[0].operation.paths",
            "a path template operator must be a whole segment",
        ),
        (
            one_rule({"to": [{"operation": {"paths": ["/a/{*"]}}]}),
            "policies[0].rules[0].to[0].operation.paths",
            "a path template operator must be a whole segment",
        ),
        (
            one_rule({"when": [{"key": "request.foo", "values": ["a"]}]}),
            "policies[0].rules[0].when[0].key",
            "unknown key 'request.foo'",
        ),
        (
            one_rule({"when": [{"key": "request.auth.claims", "values": ["a"]}]}),
            "policies[0].rules[0].when[0].key",
            "unknown key",
        ),
        (
            one_rule({"when": [{"key": "request.headers[]", "values": ["a"]}]}),
            "policies[0].rules[0].when[0].key",
            "unknown key",
        ),
        (
            one_rule({"when": [{"key": "request.auth.claims[a]x", "values": ["a"]}]}),
            "policies[0].rules[0].when[0].key",
            "unknown key",
        ),
        (
            one_rule({"when": [{"key": "destination.labels[app]", "values": ["a"]}]}),
            "policies[0].rules[0].when[0].key",
            "unknown key",
        ),
        (
            one_rule({"when": [{"values": ["a"]}]}),
            "policies[0].rules[0].when[0].key",
            "Field required",
        ),
        (
            one_rule({"when": [{"key": "request.headers[x]"}]}),
            "policies[0].rules[0].when[0]",
            "at least one of values or notValues must be set",
        ),
        (
            one_rule({"when": [{"key": "request.headers[x]", "values": [], "notValues": []}]}),
            "policies[0].rules[0].when[0]",
            "at least one of values or notValues must be set",
        ),
        (
            one_rule({"when": [{"key": "source.ip", "values": ["nope"]}]}),
            "policies[0].rules[0].when[0].values",
            "'nope' is not an IP address or CIDR block",
        ),
        (
            one_rule({"when": [{"key": "remote.ip", "notValues": ["1.2.3.4/40"]}]}),
            "policies[0].rules[0].when[0].notValues",
            "not an IP address or CIDR block",
        ),
        (
            one_rule({"when": [{"key": "destination.ip", "values": ["*"]}]}),
            "policies[0].rules[0].when[0].values",
            "not an IP address or CIDR block",
        ),
        (
            one_rule({"when": [{"key": "destination.port", "notValues": ["x"]}]}),
            "policies[0].rules[0].when[0].notValues",
            "'x' is not a port number",
        ),
        # RequestAuthentication
        (
            ra_doc({"issuer": ISS, "jwks": JWKS}, {"jwksUri": f"{ISS}/jwks"}),
            "spec.jwtRules[1].issuer",
            "Field required",
        ),
        (
            ra_doc({"issuer": ISS, "jwksFile": "k.json"}),
            "spec.jwtRules[0].jwksFile",
            "unknown field",
        ),
        (
            ra_doc({"issuer": ISS, "jwks": JWKS, "algorithms": ["RS256"]}),
            "spec.jwtRules[0].algorithms",
            "unknown field",
        ),
        (
            ra_doc({"issuer": ISS, "jwks": JWKS, "fromHeaders": [{"prefix": "Bearer "}]}),
            "spec.jwtRules[0].fromHeaders[0].name",
            "Field required",
        ),
        (
            ra_doc({"issuer": ISS, "jwks": JWKS, "timeout": "forever"}),
            "spec.jwtRules[0].timeout",
            "duration",
        ),
        (
            ra_doc({"issuer": ISS, "jwks": "{"}),
            "spec.jwtRules[0].jwks",
            "not valid JSON",
        ),
        (
            ra_doc({"issuer": ISS, "jwks": JWKS, "jwksUri": f"{ISS}/jwks"}),
            "spec.jwtRules[0]",
            "sharedSecretFile must be set (got jwksUri, jwks)",
        ),
        (ra_doc("https://idp.example.com"), "spec.jwtRules[0]", "must be a mapping"),
        (
            istio("RequestAuthentication", {"jwtRules": {"issuer": ISS}}),
            "spec.jwtRules",
            "must be a list",
        ),
        (
            istio("RequestAuthentication", {"jwtRules": [], "mtls": {}}),
            "spec.mtls",
            "unknown field",
        ),
        # AuthorizationPolicy
        (
            policy_doc({"rules": [{"from": [{"source": {"ipBlocks": ["300.0.0.0/8"]}}]}]}),
            "spec.rules[0].from[0].source.ipBlocks",
            "not an IP address or CIDR block",
        ),
        (
            policy_doc({"rules": [{"to": [{"operation": {"ports": ["0"]}}]}]}),
            "spec.rules[0].to[0].operation.ports",
            "not a port number",
        ),
        (
            policy_doc({"rules": [{"when": [{"key": "source.serviceAccount", "values": ["a"]}]}]}),
            "spec.rules[0].when[0].key",
            "unknown key 'source.serviceAccount'",
        ),
        (
            policy_doc({"action": "CUSTOM", "provider": {"name": "authz"}, "rules": [{}]}),
            "spec.action",
            "CUSTOM delegates to an external authorizer, which is authz-server itself; "
            "give authz-server the ALLOW/DENY/AUDIT policies to enforce instead",
        ),
        (policy_doc({"provider": {"name": "authz"}}), "spec.action", "CUSTOM delegates"),
        (policy_doc({"action": "REJECT"}), "spec.action", "Input should be"),
        (policy_doc({"rules": {}}), "spec.rules", "valid list"),
        (policy_doc({"rule": []}), "spec.rule", "unknown field"),
        # name and dry run come from metadata only
        (policy_doc({"name": "other", "rules": [{}]}), "spec.name", "unknown field"),
        (policy_doc({"dryRun": True, "rules": [{}]}), "spec.dryRun", "unknown field"),
        (
            policy_doc(
                {"rules": [{"from": [{"source": {"serviceAccounts": ["api"]}}]}]}, namespace=None
            ),
            "spec.rules[0].from[0].source.serviceAccounts",
            "'api' is not namespace/serviceAccount",
        ),
        # the envelope of Istio objects
        (policy_doc({}, name=None), "metadata.name", "required"),
        (policy_doc({}, name=""), "metadata.name", "required"),
        (
            {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "spec": {}},
            "metadata.name",
            "required",
        ),
        (
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "p"},
            },
            "spec",
            "required",
        ),
        (policy_doc(["rules"]), "spec", "must be a mapping"),
        (policy_doc({}) | {"data": {}}, "data", "unknown field"),
        (
            policy_doc({}, api_version="security.istio.io/v1alpha1"),
            "apiVersion",
            "expected one of security.istio.io/v1, security.istio.io/v1beta1",
        ),
        (
            istio("RequestAuthorization", {"jwtRules": []}),
            "kind",
            "unsupported kind 'RequestAuthorization'",
        ),
        ({"kind": "AuthzConfig"} | {"providers": []}, "apiVersion", "required"),
        (
            istio("AuthorizationPolicies", {}, api_version="security.istio.io/v1beta1"),
            "kind",
            "unsupported kind 'AuthorizationPolicies'",
        ),
    ],
)
def test_problem_names_its_field_path(tmp_path: Path, doc: Doc, path: str, message: str) -> None:
    problem = only_problem(tmp_path, doc)
    assert problem.path == path
    assert message in problem.message
    assert problem.document.startswith(f"{tmp_path / 'config.yaml'}#0")


def test_problem_names_the_document_kind_and_name(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        native(providers=[provider()]),
        policy_doc({"action": "REJECT"}, name="bad"),
    )
    (problem,) = found
    assert problem.document == f"{tmp_path / 'config.yaml'}#1 (AuthorizationPolicy/bad)"
    assert str(problem).startswith(f"{problem.document}: spec.action: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "a document must be a mapping"),
        ("just a string\n", "a document must be a mapping"),
    ],
)
def test_unreadable_documents(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    (problem,) = info.value.problems
    assert problem.path == ""
    assert message in problem.message


def test_a_missing_path_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.yaml")
    assert [(p.path, p.message) for p in info.value.problems] == [("", "no such file or directory")]


def test_a_directory_without_yaml_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# not config\n")
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert [p.message for p in info.value.problems] == ["no *.yaml files in this directory"]


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        native(
            server={"threads": 0},
            providers=[
                provider(algorithms=["HS256"]),
                provider(jwks="not json"),
                {"issuer": ISS, "jwksFile": "missing.json"},
            ],
            policies=[{"name": "p", "rules": [{"from": [{"source": {"ipBlocks": ["x"]}}]}]}],
        ),
        ra_doc({"jwks": JWKS}),
        policy_doc({"action": "CUSTOM"}, name="custom"),
        policy_doc({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}, name="ports"),
        istio("RequestAuthorization", {}),
    )
    assert sorted((p.document.split("#")[1][0], p.path) for p in found) == sorted(
        [
            ("0", "server.threads"),
            ("0", "providers[0].algorithms"),
            ("0", "policies[0].rules[0].from[0].source.ipBlocks"),
            # key sources are checked even though the document has other problems
            ("0", "providers[1].jwks"),
            ("0", "providers[2].jwksFile"),
            ("1", "spec.jwtRules[0].issuer"),
            ("2", "spec.action"),
            ("3", "spec.rules[0].to[0].operation.ports"),
            ("4", "kind"),
        ]
    )


def test_all_problems_of_one_rule_are_reported(tmp_path: Path) -> None:
    rule = {
        "from": [{"source": {"ipBlocks": ["x"], "notIpBlocks": ["y"]}}],
        "to": [{"operation": {"ports": ["http"]}}, {"operation": {}}],
        "when": [{"key": "nope", "values": ["a"]}, {"key": "request.headers[a]"}],
    }
    found = problems(tmp_path, policy_doc({"rules": [rule]}))
    assert [p.path for p in found] == [
        "spec.rules[0].from[0].source.ipBlocks",
        "spec.rules[0].from[0].source.notIpBlocks",
        "spec.rules[0].to[0].operation.ports",
        "spec.rules[0].to[1].operation",
        "spec.rules[0].when[0].key",
        "spec.rules[0].when[1]",
    ]


def test_duplicate_policy_names(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        native(policies=[{"name": "shop/a"}, {"name": "b"}, {"name": "b"}]),
        policy_doc({}, name="a", namespace="shop"),
    )
    assert [(p.document.split(" ")[-1], p.path, p.message) for p in found] == [
        ("(AuthzConfig)", "policies[2].name", "duplicate policy name 'b'"),
        ("(AuthorizationPolicy/a)", "metadata.name", "duplicate policy name 'shop/a'"),
    ]


def test_duplicate_provider_names(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        native(
            providers=[
                provider(name="idp"),
                provider(name="idp", issuer="https://other.example.com"),
            ]
        ),
    )
    assert [(p.path, p.message) for p in found] == [
        ("providers[1].name", "duplicate provider name 'idp'")
    ]


def test_provider_named_like_another_issuer_is_a_duplicate(tmp_path: Path) -> None:
    found = problems(
        tmp_path, ra_doc({"issuer": ISS, "jwks": JWKS}), native(providers=[provider(name=ISS)])
    )
    assert [(p.path, p.message) for p in found] == [
        ("providers[0].name", f"duplicate provider name {ISS!r}")
    ]


def test_a_server_field_set_in_two_documents_is_refused(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        native(server={"threads": 4, "realm": "a"}),
        native(server={"threads": 2, "replayCache": {"maxEntries": 500}}),
    )
    assert [(p.document.split("#")[1], p.path) for p in found] == [
        ("1 (AuthzConfig)", "server.threads")
    ]


def test_server_fields_from_several_documents_make_one_server(tmp_path: Path) -> None:
    # As k8s/components/replay-cache-redis adds a file beside the base's config.yaml.
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "password").write_text("secret\n")
    write(
        tmp_path / "config.yaml", native(server={"threads": 4, "realm": "shop", "allowEmpty": True})
    )
    write(
        tmp_path / "replay-cache.yaml",
        native(
            server={
                "replayCache": {
                    "redis": {"url": "redis://r:6379/0", "passwordFile": "redis/password"}
                }
            }
        ),
    )

    server = config.load(tmp_path).server

    assert (server.threads, server.realm) == (4, "shop")
    assert server.replay_cache.redis is not None
    assert server.replay_cache.redis.url == "redis://r:6379/0"
    assert server.replay_cache.redis.password_file == str(tmp_path / "redis" / "password")
    assert server.listen == specs.ServerSpec().listen  # unset anywhere: the default


# ----------------------------------------------------------------------- key file paths


def test_jwks_file_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "conf" / "keys" / "jwks.json"
    keys.parent.mkdir(parents=True)
    keys.write_text(JWKS)
    path = write(
        tmp_path / "conf" / "config.yaml",
        native(providers=[{"issuer": ISS, "jwksFile": "keys/jwks.json"}], policies=[REQUIRE_JWT]),
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = config.load(path)
    assert settings.providers[0].jwks_file == keys


def test_jwks_file_may_be_absolute(tmp_path: Path) -> None:
    keys = tmp_path / "jwks.json"
    keys.write_text(JWKS)
    settings = load(
        tmp_path / "sub",
        native(providers=[{"issuer": ISS, "jwksFile": str(keys)}], policies=[REQUIRE_JWT]),
    )
    assert settings.providers[0].jwks_file == keys


def test_missing_jwks_file_names_the_resolved_path(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, native(providers=[{"issuer": ISS, "jwksFile": "k.json"}]))
    assert (problem.path, problem.message) == (
        "providers[0].jwksFile",
        f"no such file: {tmp_path / 'k.json'}",
    )


def test_jwks_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    problem = only_problem(tmp_path, native(providers=[{"issuer": ISS, "jwksFile": "keys"}]))
    assert problem.path == "providers[0].jwksFile"


# --------------------------------------------------------------------------- directories


def test_directory_of_several_yaml_files(tmp_path: Path) -> None:
    write(tmp_path / "10-server.yaml", native(server={"realm": "shop"}))
    write(tmp_path / "20-authn.yml", ra_doc({"issuer": ISS, "jwks": JWKS}))
    write(tmp_path / "30-policies.yaml", policy_doc({}, name="a"), policy_doc({}, name="b"))
    # none of these is read: each would be a problem
    (tmp_path / "README.md").write_text("not: [config\n")
    write(tmp_path / ".hidden.yaml", policy_doc({"action": "REJECT"}))
    (tmp_path / "subdir.yaml").mkdir()
    settings = config.load(tmp_path)
    assert settings.warnings == ()
    assert settings.server.realm == "shop"
    assert [p.name for p in settings.providers] == [ISS]
    assert [p.name for p in settings.policies] == ["shop/a", "shop/b"]
    assert [Path(s).name for s in settings.sources] == [
        "10-server.yaml",
        "20-authn.yml",
        "30-policies.yaml",
    ]


def test_configmap_mount_layout_is_read_once(tmp_path: Path) -> None:
    # kubelet mounts a ConfigMap as `..<timestamp>/` holding the files, `..data` pointing at it,
    # and one visible symlink per key pointing through `..data`.
    version = tmp_path / "..2024_05_01_10_00_00.123"
    write(version / "authz.yaml", native(providers=[provider()]))
    write(version / "policies.yaml", policy_doc({"rules": [{}]}))
    os.symlink(version.name, tmp_path / "..data")
    for key in ("authz.yaml", "policies.yaml"):
        os.symlink(f"..data/{key}", tmp_path / key)
    settings = config.load(tmp_path)
    assert [p.name for p in settings.providers] == [ISS]
    assert [p.name for p in settings.policies] == ["shop/p"]
    assert [Path(s).name for s in settings.sources] == ["authz.yaml", "policies.yaml"]


def test_problems_in_a_directory_name_their_file(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", native(providers=[provider()]))
    write(tmp_path / "b.yaml", policy_doc({"action": "REJECT"}))
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    (problem,) = info.value.problems
    assert problem.document.startswith(f"{tmp_path / 'b.yaml'}#0")


def test_digest_follows_the_content_of_every_file(tmp_path: Path) -> None:
    for name in ("a.yaml", "b.yaml", "c.yaml"):
        write(tmp_path / name, policy_doc({}, name=name[0]))
    first = config.load(tmp_path).digest
    assert config.load(tmp_path).digest == first
    write(tmp_path / "c.yaml", policy_doc({"action": "DENY"}, name="c"))
    changed = config.load(tmp_path).digest
    assert changed != first
    assert len(changed) == 16


# --------------------------------------------------------------------------------- CLI


def test_validate_prints_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "config.yaml", native(providers=[provider()], policies=[REQUIRE_JWT]))
    assert cli.main(["validate", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("ok\n", "")


def test_validate_prints_warnings_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "--config", str(DATA / "config_mesh.yaml")]) == 0
    out, err = capsys.readouterr()
    assert out == "ok\n"
    assert "warning: " in err
    assert "spec.selector is ignored" in err


def test_validate_prints_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path / "config.yaml",
        native(providers=[provider(algorithms=["HS256"])]),
        policy_doc({"action": "CUSTOM"}),
        policy_doc({"rules": [{"when": [{"key": "nope", "values": ["a"]}]}]}, name="q"),
    )
    assert cli.main(["validate", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == "invalid configuration (3 problem(s)):"
    assert len(lines) == 4
    assert lines[1].startswith(f"  {path}#0 (AuthzConfig): providers[0].algorithms: HS256")
    assert lines[2].startswith(f"  {path}#1 (AuthorizationPolicy/p): spec.action: CUSTOM")
    assert lines[3].startswith(f"  {path}#2 (AuthorizationPolicy/q): spec.rules[0].when[0].key:")


def test_validate_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert "no such file or directory" in capsys.readouterr().err


def test_validate_needs_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["validate"])
    assert info.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_config_error_message_lists_every_problem() -> None:
    error = ConfigError([ConfigProblem("f#0", "a.b", "bad"), ConfigProblem("f#1", "", "worse")])
    assert str(error) == "f#0: a.b: bad\nf#1: worse"


def test_peer_authentication_beside_the_policies_is_ignored_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: strict}\nspec: {mtls: {mode: STRICT}}\n---\n"
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-all}\nspec: {}\n"
    )
    settings = config.load(path)
    assert any("PeerAuthentication" in w and "ignored" in w for w in settings.warnings)


def test_document_without_kind_or_api_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("metadata: {name: x}\nspec: {}\n---\napiVersion: v1\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert [(p.path, "required" in p.message) for p in caught.value.problems] == [
        ("apiVersion", True),
        ("kind", True),
    ]


@pytest.mark.parametrize(
    ("fields", "path", "message"),
    [
        ({"jwksUri": "http://idp.example.com/jwks.json"}, "jwksUri", "keys must come over https"),
        ({"discovery": True, "issuer": "http://idp.example.com"}, "", "plain http"),
    ],
)
def test_keys_over_plain_http_off_loopback_are_refused(
    tmp_path: Path, fields: dict[str, Any], path: str, message: str
) -> None:
    spec = {"issuer": "https://idp.example.com"} | fields
    text = yaml.safe_dump(
        {"apiVersion": "authz-server/v1", "kind": "AuthzConfig", "providers": [spec]}
    )
    with pytest.raises(ConfigError) as caught:
        config.load(write_config(tmp_path, text))
    [problem] = caught.value.problems
    assert problem.path == ("providers[0]." + path).rstrip(".") and message in problem.message


def test_loopback_http_key_sources_are_accepted(tmp_path: Path) -> None:
    text = yaml.safe_dump(
        {
            "apiVersion": "authz-server/v1",
            "kind": "AuthzConfig",
            "providers": [
                {"issuer": "a", "jwksUri": "http://127.0.0.1:8080/jwks.json"},
                {"issuer": "http://localhost:9000", "discovery": True},
            ],
            "policies": [REQUIRE_JWT],
        }
    )
    assert len(config.load(write_config(tmp_path, text)).providers) == 2


def test_a_ca_file_that_is_not_a_ca_bundle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    spec = {"issuer": "https://idp.example.com", "discovery": True, "caFile": "ca.pem"}
    text = yaml.safe_dump(
        {"apiVersion": "authz-server/v1", "kind": "AuthzConfig", "providers": [spec]}
    )
    with pytest.raises(ConfigError) as caught:
        config.load(write_config(tmp_path, text))
    [problem] = caught.value.problems
    assert problem.path == "providers[0].caFile" and "not a usable CA bundle" in problem.message


# ------------------------------------------------------------------ every problem at once


def test_every_bad_value_of_a_list_is_reported_at_once(tmp_path: Path) -> None:
    source = {"ipBlocks": ["10.0.0.0/8", "bad-one", "300.1.1.1"], "notIpBlocks": ["also-bad"]}
    operation = {"ports": ["80", "0", "http"], "paths": ["/a/{x}", "/{**}/{*}", "/ok/{*}"]}
    found = problems(
        tmp_path,
        policy_doc({"rules": [{"from": [{"source": source}], "to": [{"operation": operation}]}]}),
    )
    text = "\n".join(str(p) for p in found)
    for bad in (
        "'bad-one'",
        "'300.1.1.1'",
        "'also-bad'",
        "'0'",
        "'http'",
        "'/a/{x}'",
        "'/{**}/{*}'",
    ):
        assert bad in text, f"{bad} not reported in:\n{text}"
    assert "'10.0.0.0/8'" not in text and "'/ok/{*}'" not in text


def test_a_missing_key_file_and_a_duplicate_name_are_reported_with_other_problems(
    tmp_path: Path,
) -> None:
    found = problems(
        tmp_path,
        native(
            providers=[
                {"issuer": ISS, "jwksFile": "missing.json"},
                provider(issuer="https://two", clockSkew="1h"),
            ],
            policies=[
                {"name": "twice", "rules": [{"from": [{"source": {"ipBlocks": ["nope"]}}]}]},
                {"name": "twice", "rules": [{}]},
                {"name": "bad-action", "action": "MAYBE"},
            ],
        ),
        policy_doc({"rules": [{}]}, name="twice", namespace=None),
    )
    by_path = {p.path: p.message for p in found}
    assert "no such file" in by_path["providers[0].jwksFile"]
    assert "at most 300s" in by_path["providers[1].clockSkew"]
    assert "'nope'" in by_path["policies[0].rules[0].from[0].source.ipBlocks"]
    assert "policies[2].action" in by_path
    assert by_path["policies[1].name"] == "duplicate policy name 'twice'"
    assert by_path["metadata.name"] == "duplicate policy name 'twice'"


def test_a_duplicate_provider_name_is_reported_even_when_its_key_file_is_missing(
    tmp_path: Path,
) -> None:
    found = problems(
        tmp_path,
        native(
            providers=[
                provider(name="idp"),
                {"name": "idp", "issuer": "https://other", "jwksFile": "missing.json"},
            ]
        ),
    )
    assert {p.path for p in found} == {"providers[1].jwksFile", "providers[1].name"}


# ---------------------------------------------------------------- refuse what cannot work


def test_an_inline_jwks_without_keys_is_refused(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, native(providers=[provider(jwks='{"keys": []}')]))
    assert problem.path == "providers[0].jwks"
    assert "holds no keys" in problem.message


@pytest.mark.parametrize(
    ("skew", "ok"), [("5m", True), ("300s", True), ("301s", False), ("1h", False)]
)
def test_clock_skew_is_bounded_at_five_minutes(tmp_path: Path, skew: str, ok: bool) -> None:
    doc = native(providers=[provider(clockSkew=skew)], policies=[REQUIRE_JWT])
    if ok:
        assert load(tmp_path, doc).providers[0].spec.clock_skew <= 300
    else:
        (problem,) = problems(tmp_path, doc)
        assert problem.path == "providers[0].clockSkew"
        assert "at most 300s (5m)" in problem.message


# ------------------------------------------------------------- listen addresses (issue 19)


def test_http_listen_is_a_deprecated_alias_of_metrics_listen(tmp_path: Path) -> None:
    settings = load(
        tmp_path, native(server={"httpListen": "127.0.0.1:9191"}, policies=[REQUIRE_JWT])
    )
    assert settings.server.metrics_listen == "127.0.0.1:9191"
    (warning,) = settings.warnings
    assert "server.httpListen is deprecated, use server.metricsListen" in warning
    both = native(
        server={"httpListen": "127.0.0.1:1", "metricsListen": "127.0.0.1:2"},
        policies=[REQUIRE_JWT],
    )
    (problem,) = problems(tmp_path, both)
    assert problem.path == "server"
    assert "set only metricsListen" in problem.message


@pytest.mark.parametrize(
    ("address", "message"),
    [
        (":29202", "no host: write 0.0.0.0:29202 (every interface) or 127.0.0.1:29202"),
        ("29202", "expected host:port or unix:/path"),
        ("0.0.0.0:99999", "the port must be a number from 0 to 65535"),
        ("0.0.0.0:http", "the port must be a number from 0 to 65535"),
        ("::1:9001", "an IPv6 host goes in brackets: [::1]:9001"),
        ("[nope]:9001", "[nope] is not an IPv6 address"),
        ("unix:", "unix: needs a path"),
        ("my host:9001", "'my host' is not a host name or an IP address"),
    ],
)
@pytest.mark.parametrize("field", ["listen", "metricsListen", "httpAuthz.listen", "explain.listen"])
def test_a_listen_address_that_cannot_work_is_refused_naming_the_field(
    tmp_path: Path, field: str, address: str, message: str
) -> None:
    server: dict[str, Any] = {}
    head, _, tail = field.partition(".")
    server[head] = {tail: address} if tail else address
    (problem,) = problems(tmp_path, native(server=server, policies=[REQUIRE_JWT]))
    assert problem.path == f"server.{field}"
    assert message in problem.message


@pytest.mark.parametrize(
    "address", ["0.0.0.0:9001", "127.0.0.1:0", "[::]:9001", "localhost:9090", "unix:/run/a.sock"]
)
def test_listen_addresses_that_work_are_accepted(address: str) -> None:
    assert specs.listen_address_problem(address) is None


@pytest.mark.parametrize(
    ("docs", "path", "suggested"),
    [
        ([native(server={"realmm": "x"}, policies=[REQUIRE_JWT])], "server.realmm", "realm"),
        (
            [native(server={"decisionLog": {"sampleRat": 1}}, policies=[REQUIRE_JWT])],
            "server.decisionLog.sampleRat",
            "sampleRate",
        ),
        ([native(providers=[provider(audience=["a"])])], "providers[0].audience", "audiences"),
        (
            [one_rule({"to": [{"operation": {"method": ["GET"]}}]})],
            "policies[0].rules[0].to[0].operation.method",
            "methods",
        ),
        ([native(policies=[{"name": "p", "actions": "DENY"}])], "policies[0].actions", "action"),
        ([policy_doc({"actoin": "DENY"})], "spec.actoin", "action"),
        (
            [ra_doc({"issuer": ISS, "jwks": JWKS, "forwardOrignalToken": True})],
            "spec.jwtRules[0].forwardOrignalToken",
            "forwardOriginalToken",
        ),
    ],
    ids=["server", "nested", "provider", "operation", "policy", "istio-policy", "istio-jwt-rule"],
)
def test_an_unknown_field_suggests_the_closest_known_one(
    tmp_path: Path, docs: list[Doc], path: str, suggested: str
) -> None:
    found = {p.path: p.message for p in problems(tmp_path, *docs)}
    assert found[path] == f"unknown field (did you mean {suggested!r}?)"


def test_an_unknown_field_like_no_known_one_gets_no_suggestion(tmp_path: Path) -> None:
    found = {p.path: p.message for p in problems(tmp_path, native(server={"colour": "blue"}))}
    assert found["server.colour"] == "unknown field"


@pytest.mark.parametrize(
    ("docs", "where", "method", "hint"),
    [
        (
            [one_rule({"to": [{"operation": {"methods": ["GET", "DELTE"]}}]})],
            "(AuthzConfig): policies[0].rules[0].to[0].operation.methods",
            "DELTE",
            " (did you mean 'DELETE'?)",
        ),
        (
            [policy_doc({"rules": [{}, {"to": [{"operation": {"notMethods": ["PSOT"]}}]}]})],
            "(AuthorizationPolicy/p): spec.rules[1].to[0].operation.notMethods",
            "PSOT",
            " (did you mean 'POST'?)",
        ),
        (
            [one_rule({"to": [{"operation": {"methods": ["PURGE"]}}]})],
            "policies[0].rules[0].to[0].operation.methods",
            "PURGE",
            "",
        ),
        (
            [one_rule({"to": [{"operation": {"methods": ["get"]}}]})],
            "policies[0].rules[0].to[0].operation.methods",
            "get",
            " (did you mean 'GET'?)",
        ),
    ],
    ids=["native", "istio-not-methods", "no-close-one", "lower-case"],
)
def test_a_method_that_is_not_a_standard_http_method_gets_a_warning(
    tmp_path: Path, docs: list[Doc], where: str, method: str, hint: str
) -> None:
    (warning,) = load(tmp_path, *docs).warnings
    assert f"{where}: {method!r} is not a standard HTTP method{hint}" in warning


def test_standard_methods_and_wildcards_get_no_warning(tmp_path: Path) -> None:
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "*"]
    settings = load(tmp_path, one_rule({"to": [{"operation": {"methods": methods}}]}))
    assert settings.warnings == ()
