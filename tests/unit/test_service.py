"""Decisions of the core, from configuration to Decision: statuses, reasons, headers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.responses import Decision
from authz_server.service import AuthorizationService, Engine, header_twins
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config

POLICIES = """
policies:
  - name: read
    rules:
      - from: [{source: {requestPrincipals: ["*"]}}]
        to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
  - name: admins-write
    rules:
      - to: [{operation: {methods: ["POST"]}}]
        when: [{key: "request.auth.claims[groups]", values: ["admin"]}]
  - name: no-internal
    action: DENY
    rules:
      - to: [{operation: {paths: ["/api/internal*"]}}]
"""


# Every request allowed, said explicitly: providers without any policy are refused.
ALLOW_ALL = "policies: [{name: allow-all, rules: [{}]}]"


def provider_yaml(key: SigningKey, extra: str = "") -> str:
    jwks = json.dumps(json.dumps(devkeys.jwks(key)))
    return f"""
  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {jwks}
    outputClaimToHeaders:
      - {{header: x-user, claim: sub}}
      - {{header: x-groups, claim: groups}}
      - {{header: x-tenant, claim: org.tenant}}
    {extra}
"""


def make_service(
    tmp_path: Path, clock: Clock, providers: str, server: str = "", policies: str = POLICIES
) -> AuthorizationService:
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        + (f"server:\n{server}\n" if server else "")
        + f"providers:{providers}\n{policies}"
    )
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    return AuthorizationService(engine)


@pytest.fixture
def service(tmp_path: Path, clock: Clock, rsa_key: SigningKey) -> AuthorizationService:
    return make_service(tmp_path, clock, provider_yaml(rsa_key))


def request(
    token: str | None = None, method: str = "GET", path: str = "/api/orders", **headers: str
) -> RequestAttributes:
    all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    return RequestAttributes(method=method, path=path, host="api.test", headers=all_headers)


def test_allowed_request_sets_identity_headers_and_strips_the_token(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    decision = service.check(request(make_token(groups=["dev", "ops"], org={"tenant": "t1"})))
    assert decision.allowed and decision.status == 200
    assert dict(decision.headers_to_set) == {
        "x-user": "alice",
        "x-groups": "dev,ops",
        "x-tenant": "t1",
    }
    assert "authorization" in decision.headers_to_remove
    assert decision.policy == "read"
    assert decision.metadata is not None and decision.metadata["principal"] == f"{ISSUER}/alice"


def test_missing_token_is_401_with_bearer_challenge(service: AuthorizationService) -> None:
    decision = service.check(request())
    assert (decision.status, decision.reason) == (401, errors.MISSING_CREDENTIALS)
    assert dict(decision.response_headers)["www-authenticate"] == 'Bearer realm="authz-server"'
    assert json.loads(decision.body) == {"error": "unauthorized", "reason": "missing_credentials"}


def test_missing_token_can_be_istio_style_403(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey
) -> None:
    service = make_service(tmp_path, clock, provider_yaml(rsa_key), "  missingTokenStatus: 403")
    decision = service.check(request())
    assert (decision.status, decision.reason) == (403, errors.NO_ALLOW_POLICY_MATCHED)
    assert "www-authenticate" not in dict(decision.response_headers)


def test_invalid_token_is_401_even_where_policy_would_allow_anonymous(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    service = make_service(tmp_path, clock, provider_yaml(rsa_key), policies=ALLOW_ALL)
    assert service.check(request()).allowed
    decision = service.check(request(make_token(exp=int(clock.now) - 3600)))
    assert (decision.status, decision.reason) == (401, errors.TOKEN_EXPIRED)
    challenge = dict(decision.response_headers)["www-authenticate"]
    assert 'error="invalid_token"' in challenge and 'error_description="token expired"' in challenge


def test_authenticated_but_not_allowed_is_403(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    decision = service.check(request(make_token(groups=["dev"]), method="POST"))
    assert (decision.status, decision.reason) == (403, errors.NO_ALLOW_POLICY_MATCHED)
    assert decision.principal == f"{ISSUER}/alice"
    assert json.loads(decision.body)["error"] == "forbidden"


def test_deny_policy_wins_and_is_named(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    decision = service.check(request(make_token(), path="/api/internal/debug"))
    assert (decision.status, decision.reason, decision.policy) == (
        403,
        errors.POLICY_DENIED,
        "no-internal",
    )


def test_client_sent_identity_headers_are_removed_for_anonymous_requests(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey
) -> None:
    service = make_service(tmp_path, clock, provider_yaml(rsa_key), policies=ALLOW_ALL)
    decision = service.check(request(x_user="root", x_groups="admin"))
    assert decision.allowed
    assert {"x-user", "x-groups", "x-tenant"} <= set(decision.headers_to_remove)
    assert decision.headers_to_set == ()


def test_output_header_for_an_absent_claim_is_removed_not_left_to_the_client(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    decision = service.check(request(make_token(), x_groups="admin"))
    assert "x-groups" in decision.headers_to_remove
    assert "x-groups" not in dict(decision.headers_to_set)
    assert set(decision.headers_to_remove).isdisjoint(dict(decision.headers_to_set))


def test_forward_original_token_keeps_the_header_and_payload_is_output(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    extra = "forwardOriginalToken: true\n    outputPayloadToHeader: x-jwt-payload"
    service = make_service(tmp_path, clock, provider_yaml(rsa_key, extra))
    token = make_token()
    decision = service.check(request(token))
    assert "authorization" not in decision.headers_to_remove
    assert dict(decision.headers_to_set)["x-jwt-payload"] == token.split(".")[1]


def test_tokens_from_custom_header_param_and_cookie(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    extra = (
        "fromHeaders: [{name: X-Api-Token, prefix: 'Token '}]\n"
        "    fromParams: [jwt]\n    fromCookies: [session]"
    )
    service = make_service(tmp_path, clock, provider_yaml(rsa_key, extra))
    token = make_token()
    assert service.check(request(x_api_token=f"Token {token}")).allowed
    assert service.check(request(path=f"/api/orders?a=1&jwt={token}")).allowed
    assert service.check(request(cookie=f"theme=dark; session={token}")).allowed
    # Istio's default locations are not read once a provider names its own.
    assert service.check(request(token)).reason == errors.MISSING_CREDENTIALS
    assert service.check(request(path=f"/api?access_token={token}")).reason == (
        errors.MISSING_CREDENTIALS
    )


def test_default_locations_are_bearer_header_and_access_token_param(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    token = make_token()
    assert service.check(request(path=f"/api/orders?access_token={token}")).allowed
    assert service.check(
        RequestAttributes(method="GET", path="/api/x", headers={"authorization": f"bearer {token}"})
    ).allowed
    basic = service.check(request(authorization="Basic YWxhZGRpbjpvcGVuc2VzYW1l"))
    assert basic.reason == errors.MISSING_CREDENTIALS


def test_token_from_an_issuer_no_provider_knows_is_401(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    decision = service.check(request(make_token(iss="https://other.test")))
    assert (decision.status, decision.reason) == (401, errors.INVALID_ISSUER)


def test_issuer_selects_the_provider_among_several(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    second = (
        provider_yaml(ec_key)
        .replace("name: main", "name: partner")
        .replace(ISSUER, "https://partner.test")
    )
    service = make_service(tmp_path, clock, provider_yaml(rsa_key) + second)
    partner = ec_key.sign(claims_for(clock.now, iss="https://partner.test"))
    decision = service.check(request(partner))
    assert decision.allowed and decision.provider == "partner"
    # A partner-issued token signed with the main issuer's key is not the partner's.
    forged = rsa_key.sign(claims_for(clock.now, iss="https://partner.test"))
    assert service.check(request(forged)).status == 401


def test_presence_required_refuses_anonymous_requests(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey
) -> None:
    service = make_service(
        tmp_path, clock, provider_yaml(rsa_key, "presence: REQUIRED"), policies=ALLOW_ALL
    )
    assert service.check(request()).reason == errors.MISSING_CREDENTIALS


def test_every_token_present_must_be_valid(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    service = make_service(
        tmp_path,
        clock,
        provider_yaml(
            rsa_key,
            "fromParams: [jwt]\n    fromHeaders: [{name: authorization, prefix: 'Bearer '}]",
        ),
    )
    good, expired = make_token(), make_token(exp=int(clock.now) - 3600)
    assert service.check(request(good, path=f"/api/x?jwt={expired}")).status == 401


def test_unexpected_exception_fails_closed(
    service: AuthorizationService, make_token: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*_: Any) -> Decision:
        raise RuntimeError("boom")

    monkeypatch.setattr(service.engine.policies, "evaluate", explode)
    decision = service.check(request(make_token()))
    assert not decision.allowed
    assert (decision.status, decision.reason) == (500, errors.INTERNAL_ERROR)


def test_provider_with_no_keys_is_503_for_its_tokens_only(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    down = """
  - name: down
    issuer: https://down.test
    jwksUri: http://127.0.0.1:9/jwks.json
    timeout: 200ms
"""
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        f"providers:{provider_yaml(rsa_key)}{down}\n{ALLOW_ALL}\n"
    )
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    engine.caches["main"].refresh()
    assert not engine.caches["down"].refresh()
    service = AuthorizationService(engine)
    down_token = ec_key.sign(claims_for(clock.now, iss="https://down.test"))
    decision = service.check(request(down_token))
    assert (decision.status, decision.reason) == (503, errors.JWKS_UNAVAILABLE)
    assert service.check(request(rsa_key.sign(claims_for(clock.now)))).allowed


def test_header_values_with_control_characters_are_not_output(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    decision = service.check(request(make_token(sub="alice\r\nx-admin: true")))
    assert decision.allowed
    assert "x-user" not in dict(decision.headers_to_set)
    assert "x-user" in decision.headers_to_remove


def test_the_same_token_in_two_headers_is_stripped_from_both(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    extra = "fromHeaders: [{name: authorization, prefix: 'Bearer '}, {name: x-jwt}]"
    service = make_service(tmp_path, clock, provider_yaml(rsa_key, extra))
    token = make_token()
    decision = service.check(request(token, x_jwt=token))
    assert decision.allowed
    assert {"authorization", "x-jwt"} <= set(decision.headers_to_remove)


def test_header_twins_of_identity_headers_are_removed(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey
) -> None:
    service = make_service(tmp_path, clock, provider_yaml(rsa_key), policies=ALLOW_ALL)
    decision = service.check(
        RequestAttributes(path="/", headers={"x_user": "root", "x_other": "kept"})
    )
    assert "x_user" in decision.headers_to_remove
    assert "x_other" not in decision.headers_to_remove


def test_every_other_spelling_of_a_header_is_its_twin() -> None:
    assert sorted(header_twins("x-jwt-groups")) == [
        "x-jwt_groups",
        "x_jwt-groups",
        "x_jwt_groups",
    ]
    assert header_twins("x_groups") == ["x-groups"]  # the other direction too
    assert header_twins("xuser") == []
    assert len(header_twins("a-b-c-d-e-f-g-h-i", limit=64)) == 64


def test_twins_of_underscored_output_headers_and_of_token_headers_are_removed_unsent(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey
) -> None:
    # An output header spelled with an underscore: a client-sent `x-groups: admins` would
    # reach a CGI-style upstream as x_groups. A token read from `x-jwt`: a client-sent
    # `x_jwt` would reach it as that header, never verified.
    extra = """outputPayloadToHeader: x_claims
    fromHeaders: [{name: x-jwt}]"""
    service = make_service(tmp_path, clock, provider_yaml(rsa_key, extra), policies=ALLOW_ALL)
    token = rsa_key.sign(claims_for(clock.now))
    decision = service.check(RequestAttributes(path="/", headers={"x-jwt": token}))
    assert decision.allowed
    removed = set(decision.headers_to_remove)
    assert {"x-claims", "x_jwt", "x_user", "x_groups"} <= removed
    assert "x_claims" not in removed and dict(decision.headers_to_set)["x_claims"]
    assert "x-jwt" in removed  # the token itself (forwardOriginalToken is false)


def test_token_in_a_query_parameter_with_an_escaped_name_is_refused(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    # Never passed on unverified; and since Envoy removes parameters by their exact name, a
    # valid one would reach the upstream: refused either way.
    for token in (make_token(), make_token(exp=1)):
        decision = service.check(request(path=f"/api/orders?x=1&access%5Ftoken={token}"))
        assert (decision.status, decision.reason) == (401, errors.AMBIGUOUS_QUERY)
    assert service.check(request(path=f"/api/orders?x=%20&access_token={make_token()}")).allowed


def test_check_command_explains_a_decision_without_printing_the_token(
    tmp_path: Path,
    rsa_key: SigningKey,
    make_token: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from authz_server import cli

    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        f"providers:{provider_yaml(rsa_key)}\n{POLICIES}"
    )
    path = write_config(tmp_path, text)
    token_file = tmp_path / "token"
    token = make_token(groups=["dev"])
    token_file.write_text(token)
    argv = ["check", "--json", "--config", str(path), "--path", "/api/orders?page=2"]
    assert cli.main([*argv, "--token-file", str(token_file)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert (result["decision"], result["policy"]) == ("allow", "read")
    verdicts = {p["name"]: (p["action"], p["matched"], p["decided"]) for p in result["policies"]}
    assert verdicts == {
        "no-internal": ("DENY", False, False),
        "read": ("ALLOW", True, True),
        "admins-write": ("ALLOW", False, False),
    }
    assert result["tokens"][0]["principal"] == f"{ISSUER}/alice"
    assert token not in out and token.split(".")[2] not in out

    assert cli.main([*argv, "--method", "POST", "--token-file", str(token_file)]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["reason"] == errors.NO_ALLOW_POLICY_MATCHED
    why = {p["name"]: p["rules"][0]["failed"] for p in result["policies"]}
    assert why["read"] == [{"field": "to.operation.methods", "wanted": ["GET"], "had": "POST"}]
    # A claim's value stays out of the trace unless asked for.
    assert why["admins-write"] == [
        {"field": "when[request.auth.claims[groups]]", "wanted": ["admin"], "hidden": True}
    ]
    assert cli.main(argv) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == errors.MISSING_CREDENTIALS


def test_a_missing_required_claim_is_named_in_the_challenge_never_its_value(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    required = "requiredClaims: {tenant: acme, email_verified: true}"
    service = make_service(tmp_path, clock, provider_yaml(rsa_key, required))
    cases = [
        ({"email_verified": True}, "required claim 'tenant' missing"),
        (
            {"tenant": "evil-corp", "email_verified": True},
            "required claim 'tenant' does not have the required value",
        ),
        ({"tenant": "acme"}, "required claim 'email_verified' missing"),
    ]
    for claims, description in cases:
        decision = service.check(request(make_token(**claims)))
        assert (decision.status, decision.reason) == (401, errors.MISSING_CLAIM)
        challenge = dict(decision.response_headers)["www-authenticate"]
        assert f'error_description="{description}"' in challenge
        assert "evil-corp" not in challenge and "evil-corp" not in decision.body
    assert service.check(request(make_token(tenant="acme", email_verified=True))).allowed


def test_a_token_without_exp_names_the_exp_claim(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    decision = service.check(request(make_token(exp=None)))
    challenge = dict(decision.response_headers)["www-authenticate"]
    assert "error_description=\"required claim 'exp' missing\"" in challenge


def test_a_repeating_caller_gets_the_removals_its_own_request_needs(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    # Allows are reused per caller: what one request carried must not leak into the next.
    token = make_token(groups=["dev"])
    plain = service.check(request(token))
    forged = service.check(
        RequestAttributes(
            method="GET",
            host="api.test",
            path="/api/orders",
            headers={"authorization": f"Bearer {token}", "x_user": "root"},
        )
    )
    again = service.check(request(token))
    assert plain.allowed and forged.allowed and again.allowed
    # Every underscore spelling of an identity header is removed whether the request carried
    # one or not, so the removals never depend on what one request sent.
    assert "x_user" in forged.headers_to_remove
    assert forged.headers_to_remove == plain.headers_to_remove == again.headers_to_remove
    assert dict(again.headers_to_set)["x-user"] == "alice"
    other = service.check(request(make_token(sub="bob", groups=["dev"])))
    assert dict(other.headers_to_set)["x-user"] == "bob"


@pytest.mark.parametrize(
    "groups",
    [["eng", "x,admins"], ["eng", " admins"], ["eng", ""], ["eng", {"role": "admin"}]],
    ids=["comma", "space", "empty", "object"],
)
def test_a_list_claim_that_would_split_differently_gives_no_header_and_is_counted(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, groups: list[object]
) -> None:
    from prometheus_client import CollectorRegistry

    from authz_server.ops.metrics import Metrics

    service = make_service(tmp_path, clock, provider_yaml(rsa_key), policies=ALLOW_ALL)
    registry = CollectorRegistry()
    service.metrics = Metrics(registry)
    token = rsa_key.sign(claims_for(clock.now, groups=groups))
    for _ in range(2):
        decision = service.check(request(token))
        assert decision.allowed
        assert "x-groups" not in dict(decision.headers_to_set)  # not "eng,x,admins"
        assert "x-groups" in decision.headers_to_remove  # nor the client's copy
    assert (
        registry.get_sample_value("authz_identity_headers_withheld_total", {"header": "x-groups"})
        == 2
    )  # every request, though the allow is built once


@pytest.mark.parametrize("sub", [" root ", "root ", "\troot", "root\u00a0"])
def test_a_string_claim_with_spaces_at_either_end_gives_no_header_and_is_counted(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, sub: str
) -> None:
    # The policies see " root "; the upstream would read "root" (header values are trimmed).
    from prometheus_client import CollectorRegistry

    from authz_server.ops.metrics import Metrics

    service = make_service(tmp_path, clock, provider_yaml(rsa_key), policies=ALLOW_ALL)
    registry = CollectorRegistry()
    service.metrics = Metrics(registry)
    decision = service.check(request(rsa_key.sign(claims_for(clock.now, sub=sub))))
    assert decision.allowed
    assert "x-user" not in dict(decision.headers_to_set)
    assert "x-user" in decision.headers_to_remove  # nor the client's copy
    assert (
        registry.get_sample_value("authz_identity_headers_withheld_total", {"header": "x-user"})
        == 1
    )
    inner = service.check(request(rsa_key.sign(claims_for(clock.now, sub="ro ot"))))
    assert dict(inner.headers_to_set)["x-user"] == "ro ot"  # a space inside is kept


def test_a_list_claim_of_plain_strings_is_joined_with_commas(
    service: AuthorizationService, make_token: Callable[..., str]
) -> None:
    decision = service.check(request(make_token(groups=["eng", "ops"])))
    assert dict(decision.headers_to_set)["x-groups"] == "eng,ops"


# ------------------------------------------------- more than one token, foreign schemes


@pytest.mark.parametrize(
    "where",
    ["header and query", "two query values", "two cookie values", "header and cookie"],
)
def test_two_distinct_tokens_in_one_request_are_refused_as_ambiguous(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, where: str
) -> None:
    extra = "fromHeaders: [{name: authorization, prefix: 'Bearer '}]\n"
    extra += "    fromParams: [access_token]\n    fromCookies: [session]"
    service = make_service(tmp_path, clock, provider_yaml(rsa_key, extra))
    alice = rsa_key.sign(claims_for(clock.now, sub="alice"))
    mallory = rsa_key.sign(claims_for(clock.now, sub="mallory"))
    headers: dict[str, str] = {}
    path = "/api/orders"
    if where == "header and query":
        headers["authorization"] = f"Bearer {alice}"
        path += f"?access_token={mallory}"
    elif where == "two query values":
        path += f"?access_token={alice}&access_token={mallory}"
    elif where == "two cookie values":
        headers["cookie"] = f"session={alice}; session={mallory}"
    else:
        headers["authorization"] = f"Bearer {alice}"
        headers["cookie"] = f"session={mallory}"
    decision = service.check(RequestAttributes(method="GET", path=path, headers=headers))
    assert (decision.status, decision.reason) == (401, "ambiguous_credentials")
    assert (
        'error_description="more than one token"'
        in dict(decision.response_headers)["www-authenticate"]
    )
    # The same token in two places is one principal: allowed.
    same = RequestAttributes(
        method="GET",
        path=f"/api/orders?access_token={alice}",
        headers={"authorization": f"Bearer {alice}"},
    )
    assert service.check(same).allowed


@pytest.mark.parametrize("value", ["Token abc", "Bearer\tabc", "Basic YWxpY2U6cHc="])
def test_a_token_header_under_another_scheme_is_stripped_before_the_upstream(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, value: str
) -> None:
    policies = "policies: [{name: public, rules: [{to: [{operation: {paths: ['/public/*']}}]}]}]"
    service = make_service(tmp_path, clock, provider_yaml(rsa_key), policies=policies)
    decision = service.check(
        RequestAttributes(path="/public/info", headers={"authorization": value})
    )
    assert decision.allowed and decision.principal is None  # anonymous: not our token
    assert "authorization" in decision.headers_to_remove  # and not passed on either


def test_forward_original_token_keeps_only_the_header_that_held_the_token(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey
) -> None:
    extra = "forwardOriginalToken: true"
    service = make_service(tmp_path, clock, provider_yaml(rsa_key, extra))
    token = rsa_key.sign(claims_for(clock.now))
    kept = service.check(request(token))
    assert kept.allowed and "authorization" not in kept.headers_to_remove


def test_a_query_parameter_that_held_the_token_is_removed_unless_forwarded(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey
) -> None:
    token = rsa_key.sign(claims_for(clock.now))
    query = RequestAttributes(method="GET", path=f"/api/orders?page=2&access_token={token}")
    service = make_service(tmp_path, clock, provider_yaml(rsa_key))
    decision = service.check(query)
    assert decision.allowed and decision.query_params_to_remove == ("access_token",)
    assert service.check(request(token)).query_params_to_remove == ()  # a header token
    (tmp_path / "f").mkdir()
    forwarding = make_service(
        tmp_path / "f", clock, provider_yaml(rsa_key, "forwardOriginalToken: true")
    )
    assert forwarding.check(query).query_params_to_remove == ()


def test_a_token_cookie_is_taken_out_of_the_cookie_header_before_the_upstream(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey
) -> None:
    service = make_service(tmp_path, clock, provider_yaml(rsa_key, "fromCookies: [session]"))
    token = rsa_key.sign(claims_for(clock.now))

    def check(cookie: str) -> Decision:
        return service.check(
            RequestAttributes(method="GET", path="/api/orders", headers={"cookie": cookie})
        )

    mixed = check(f"theme=dark; session={token}; lang=en")
    assert mixed.allowed and mixed.principal == f"{ISSUER}/alice"
    assert dict(mixed.headers_to_set)["cookie"] == "theme=dark; lang=en"
    assert "cookie" not in mixed.headers_to_remove
    alone = check(f"session={token}")
    assert alone.allowed and "cookie" in alone.headers_to_remove
    assert "cookie" not in dict(alone.headers_to_set)
    # Read with spaces around its name, the token cookie is taken out all the same; a comma
    # elsewhere stays as sent.
    spaced = check(f"prefs=a,b;  session = {token} ; lang=en")
    assert spaced.allowed and dict(spaced.headers_to_set)["cookie"] == "prefs=a,b; lang=en"


@pytest.mark.parametrize(
    ("cookie", "query", "reason"),
    [
        ("a=1,session={token}", "", "ambiguous_cookie"),
        ("session={token},a=1", "", "ambiguous_cookie"),
        ("", "x=1;access_token={token}", "ambiguous_query"),
        ("", "access_token={token};x=1", "ambiguous_query"),
    ],
)
def test_a_token_location_upstreams_read_two_ways_is_refused(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, *, cookie: str, query: str, reason: str
) -> None:
    locations = "fromCookies: [session]\n    fromParams: [access_token]"
    service = make_service(tmp_path, clock, provider_yaml(rsa_key, locations))
    token = rsa_key.sign(claims_for(clock.now))
    decision = service.check(
        RequestAttributes(
            path=f"/api/orders?{query.format(token=token)}",
            headers={"cookie": cookie.format(token=token)} if cookie else {},
        )
    )
    assert (decision.status, decision.reason) == (401, reason)


def test_a_parameter_configured_with_capitals_is_refused_in_another_case(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey
) -> None:
    service = make_service(
        tmp_path, clock, provider_yaml(rsa_key, "fromParams: [Token]"), policies=ALLOW_ALL
    )
    token = rsa_key.sign(claims_for(clock.now))

    def check(query: str) -> tuple[int, str]:
        decision = service.check(RequestAttributes(path=f"/api/orders?{query}"))
        return decision.status, decision.reason

    assert check(f"Token={token}") == (200, "allowed")
    assert check(f"token={token}") == (401, errors.AMBIGUOUS_QUERY)
    assert check("token=abc") == (401, errors.AMBIGUOUS_QUERY)  # a query all in lower case
    assert check("page=2") == (200, "allowed")
