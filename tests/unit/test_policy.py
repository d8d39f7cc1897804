"""policy: Istio AuthorizationPolicy semantics, compiled to predicates and evaluated."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.config.specs import PolicySpec, Rule
from authz_server.identity import DEFAULT_SPACE_DELIMITED, Identity
from authz_server.policy.compile import (
    PolicyResult,
    PolicySet,
    compile_rule,
    request_principal_matcher,
    string_matcher,
)
from tests.helpers import identity

DATA = Path(__file__).resolve().parent.parent / "data"
ISS = "https://idp.example.com"
PEER = "spiffe://cluster.local/ns/foo/sa/bar"


def request(**fields: Any) -> RequestAttributes:
    return RequestAttributes(**fields)


def matches(
    rule: Mapping[str, Any],
    req: RequestAttributes | None = None,
    who: Identity | None = None,
) -> bool:
    compiled = compile_rule(Rule.model_validate(rule))
    req = req or RequestAttributes()
    matched = compiled.predicate(req, who)
    # The trace walks the same clauses: it finds a failing clause exactly when the rule fails.
    assert (compiled.misses(req, who) == ()) == matched
    return matched


def operation(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


def source(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> Any:
    condition: dict[str, Any] = {"key": key}
    if values is not None:
        condition["values"] = values
    if not_values is not None:
        condition["notValues"] = not_values
    return {"when": [condition]}


def policies(*specs: Mapping[str, Any]) -> PolicySet:
    return PolicySet([PolicySpec.model_validate(s) for s in specs])


# ----------------------------------------------------------------------- string matching


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("abc", "abc", True),
        ("abc", "abcd", False),
        ("abc", "ABC", False),
        ("abc", "", False),
        ("abc*", "abc", True),
        ("abc*", "abcd", True),
        ("abc*", "xabc", False),
        ("*abc", "abc", True),
        ("*abc", "xabc", True),
        ("*abc", "abcx", False),
        ("*", "x", True),
        # presence means "not empty"
        ("*", "", False),
        # a `*` in the middle is a literal character, not a wildcard
        ("a*c", "abc", False),
        ("a*c", "a*c", True),
    ],
)
def test_string_matcher(pattern: str, value: str, expected: bool) -> None:
    assert string_matcher(pattern)(value) is expected


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("Example.COM", "example.com", True),
        ("*.Example.com", "api.example.com", True),
        ("API.*", "api.internal", True),
        ("*", "x", True),
    ],
)
def test_string_matcher_ignoring_case_lowers_the_pattern(
    pattern: str, value: str, expected: bool
) -> None:
    assert string_matcher(pattern, ignore_case=True)(value) is expected


# ---------------------------------------------------------------------------- operations


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/admin", "/admin", True),
        ("/admin", "/admin/", False),
        ("/admin", "/Admin", False),
        ("/admin", "/admin?debug=1", True),
        ("/admin", "/admin#top", True),
        ("/api/*", "/api/users/1", True),
        ("/api/*", "/api/", True),
        ("/api/*", "/api", False),
        ("/api*", "/api", True),
        ("/api*", "/apiary", True),
        ("*.json", "/a/b/c.json", True),
        ("*.json", "/a/b/c.json?x=.html", True),
        ("*.json", "/a/b/c.html?x=.json", False),
        ("*/info", "/svc/info", True),
        ("*", "/anything/at/all", True),
        ("*", "/", True),
        # templates: {*} is exactly one segment, {**} the rest
        ("/users/{*}", "/users/42", True),
        ("/users/{*}", "/users/42/posts", False),
        ("/users/{*}", "/users/", False),
        ("/users/{*}", "/users", False),
        ("/users/{*}/posts", "/users/42/posts", True),
        ("/users/{*}/posts", "/users/42/x/posts", False),
        ("/users/{*}/posts", "/users//posts", False),
        ("/{*}/admin", "/x/admin", True),
        ("/{*}/admin", "/x/y/admin", False),
        ("/{*}/{*}", "/a/b", True),
        ("/{*}/{*}", "/a/b/c", False),
        ("/files/{**}", "/files/a/b/c.txt", True),
        ("/files/{**}", "/files/", True),
        ("/files/{**}", "/files", False),
        ("/files/{**}", "/filesystem/x", False),
        ("/v1/{*}/files/{**}", "/v1/acme/files/a/b", True),
        ("/v1/{*}/files/{**}", "/v1/acme/other/a/b", False),
        ("/users/{*}", "/users/42?expand=all", True),
        # template literals are literal, not regular expressions
        ("/a.b/{*}", "/axb/1", False),
        ("/a.b/{*}", "/a.b/1", True),
        # the path is judged after normalization, as the upstream will resolve it
        ("/admin", "/api/../admin", True),
        ("/admin", "//admin", True),
        ("/admin", "/./admin", True),
        ("/admin", "/%61dmin", True),
        ("/admin", "/api/%2e%2e/admin", True),
        ("/Admin", "/%41dmin", True),
        ("/admin", "/api%2F..%2Fadmin", False),
        ("/api%2F..%2Fadmin", "/api%2F..%2Fadmin", True),
        ("/users/{*}", "/users/a%2Fb", True),
        ("/v1/{**}", "/v1/../admin", False),
    ],
)
def test_paths(pattern: str, path: str, expected: bool) -> None:
    assert matches(operation(paths=[pattern]), request(path=path)) is expected


@pytest.mark.parametrize(
    "path",
    [
        "/admin",
        "/admin/users",
        "/api/../admin",
        "/api/v1/../../admin/x",
        "//admin",
        "///admin//users",
        "/./admin",
        "/%61dmin",
        "/%61%64%6d%69%6e/x",
        "/api/%2e%2e/admin",
        "/api/%2E%2e/admin",
        "/admin?x=/public",
    ],
)
def test_deny_on_a_path_is_not_bypassed_by_unnormalized_spellings(path: str) -> None:
    rules = policies(
        {"name": "no-admin", "action": "DENY", "rules": [operation(paths=["/admin*"])]}
    )
    result = rules.evaluate(request(path=path), None)
    assert (result.allowed, result.reason, result.policy) == (False, "policy_denied", "no-admin")


@pytest.mark.parametrize(
    ("patterns", "path", "expected"),
    [
        (["/public*"], "/private", True),
        (["/public*"], "/public/x", False),
        (["/public*"], "/x/../public/a", False),
        (["/a", "/b"], "/b", False),
        (["/a", "/b"], "/c", True),
    ],
)
def test_not_paths(patterns: list[str], path: str, expected: bool) -> None:
    assert matches(operation(notPaths=patterns), request(path=path)) is expected


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.Example.COM", True),
        ("API.EXAMPLE.COM", "api.example.com", True),
        ("api.example.com", "www.example.com", False),
        ("*.example.com", "Api.Example.Com", True),
        ("*.example.com", "example.com", False),
        ("api.*", "API.internal", True),
        ("*", "anything", True),
        ("*", "", False),
        # Unlike Istio (which compares the authority as sent and tells users to add
        # `host:*`), a name matches with any port and with a trailing dot: safer for DENY.
        ("api.example.com", "api.example.com:8443", True),
        ("api.example.com", "api.example.com.", True),
        ("api.example.com", "API.example.com.:80", True),
        ("api.example.com:*", "api.example.com:8443", True),
        ("api.example.com:*", "api.example.com", False),
        ("api.example.com:8443", "api.example.com.:8443", True),
        ("api.example.com", "api.example.com:x", False),  # not a port: the name as sent
        ("[::1]", "[::1]:8080", True),
        ("::1", "::1", True),
    ],
)
def test_hosts_compare_case_insensitively(pattern: str, host: str, expected: bool) -> None:
    assert matches(operation(hosts=[pattern]), request(host=host)) is expected


@pytest.mark.parametrize(
    ("patterns", "host", "expected"),
    [
        (["*.internal"], "DB.Internal", False),
        (["*.internal"], "api.example.com", True),
    ],
)
def test_not_hosts_compare_case_insensitively(
    patterns: list[str], host: str, expected: bool
) -> None:
    assert matches(operation(notHosts=patterns), request(host=host)) is expected


@pytest.mark.parametrize(
    ("field", "patterns", "method", "expected"),
    [
        ("methods", ["GET"], "GET", True),
        ("methods", ["GET"], "POST", False),
        ("methods", ["GET"], "get", False),
        ("methods", ["GET", "HEAD"], "HEAD", True),
        ("methods", ["*"], "PATCH", True),
        ("notMethods", ["DELETE"], "GET", True),
        ("notMethods", ["DELETE"], "DELETE", False),
        ("notMethods", ["DELETE", "PUT"], "PUT", False),
    ],
)
def test_methods(field: str, patterns: list[str], method: str, expected: bool) -> None:
    assert matches(operation(**{field: patterns}), request(method=method)) is expected


@pytest.mark.parametrize(
    ("field", "patterns", "port", "expected"),
    [
        ("ports", ["8080"], 8080, True),
        ("ports", ["8080"], 9090, False),
        ("ports", ["8080", "9090"], 9090, True),
        # the destination port is unknown: a positive field cannot match
        ("ports", ["8080"], 0, False),
        ("notPorts", ["8080"], 8080, False),
        ("notPorts", ["8080"], 9090, True),
        ("notPorts", ["8080"], 0, True),
    ],
)
def test_ports_are_the_destination_port(
    field: str, patterns: list[str], port: int, expected: bool
) -> None:
    assert matches(operation(**{field: patterns}), request(destination_port=port)) is expected


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/orders", True),
        ("POST", "/orders", False),
        ("GET", "/users", False),
        ("POST", "/users", False),
    ],
)
def test_fields_of_an_operation_are_anded(method: str, path: str, expected: bool) -> None:
    rule = operation(methods=["GET"], paths=["/orders"])
    assert matches(rule, request(method=method, path=path)) is expected


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/orders", True),
        ("POST", "/users", True),
        ("POST", "/orders", False),
        ("GET", "/users", False),
    ],
)
def test_several_to_operations_are_ored(method: str, path: str, expected: bool) -> None:
    rule = {
        "to": [
            {"operation": {"methods": ["GET"], "paths": ["/orders"]}},
            {"operation": {"methods": ["POST"], "paths": ["/users"]}},
        ]
    }
    assert matches(rule, request(method=method, path=path)) is expected


# ------------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    ("pattern", "iss", "sub", "expected"),
    [
        (f"{ISS}/alice", ISS, "alice", True),
        (f"{ISS}/alice", ISS, "bob", False),
        (f"{ISS}/alice", "https://other.example.com", "alice", False),
        ("*", ISS, "alice", True),
        # like Istio, `*` wants both an issuer and a subject
        ("*", ISS, "", False),
        (f"{ISS}/*", ISS, "alice", True),
        (f"{ISS}/*", ISS, "", False),
        # split on the last `/`: the issuer must be exactly the part before it
        (f"{ISS}/*", f"{ISS}/tenant-b", "alice", False),
        (f"{ISS}/*", f"{ISS}.evil.com", "alice", False),
        (f"{ISS}/svc-*", ISS, "svc-billing", True),
        (f"{ISS}/svc-*", ISS, "user-1", False),
        ("*/alice", ISS, "alice", True),
        ("*/alice", "https://other.example.com", "alice", True),
        ("*/alice", ISS, "mallory/alice", False),
        ("*/alice", ISS, "malice", False),
        ("*.example.com/alice", ISS, "alice", True),
        ("*.example.com/alice", "https://example.org", "alice", False),
        # issuers with a path (Azure AD, Auth0 tenants) split on the last `/` too
        (
            "https://login.example.com/tenant/v2.0/alice",
            "https://login.example.com/tenant/v2.0",
            "alice",
            True,
        ),
        ("https://login.example.com/tenant/v2.0/alice", "https://login.example.com", "x", False),
        # no `/` at all: `*x` is a subject suffix, `x*` an issuer prefix, `x` never matches
        ("*ice", ISS, "alice", True),
        ("*ice", ISS, "bob", False),
        ("idp-*", "idp-issuer", "alice", True),
        ("idp-*", "other", "alice", False),
        ("idp-issuer", "idp-issuer", "alice", False),
    ],
)
def test_request_principal_patterns(pattern: str, iss: str, sub: str, expected: bool) -> None:
    assert request_principal_matcher(pattern)(iss, sub) is expected
    assert matches(source(requestPrincipals=[pattern]), None, identity(sub, iss=iss)) is expected


@pytest.mark.parametrize("pattern", ["*", f"{ISS}/*", "*/alice", f"{ISS}/alice"])
def test_request_principals_never_match_an_anonymous_request(pattern: str) -> None:
    assert matches(source(requestPrincipals=[pattern]), None, None) is False


def test_request_principals_list_is_ored() -> None:
    rule = source(requestPrincipals=[f"{ISS}/alice", f"{ISS}/bob"])
    assert matches(rule, None, identity("bob")) is True
    assert matches(rule, None, identity("carol")) is False


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        (None, True),
        (identity("alice"), False),
    ],
)
def test_not_request_principals_star_matches_anonymous_requests(
    who: Identity | None, expected: bool
) -> None:
    assert matches(source(notRequestPrincipals=["*"]), None, who) is expected


def test_not_request_principals_excludes_only_the_named_principal() -> None:
    rule = source(notRequestPrincipals=[f"{ISS}/mallory"])
    assert matches(rule, None, identity("mallory")) is False
    assert matches(rule, None, identity("alice")) is True
    assert matches(rule, None, None) is True


@pytest.mark.parametrize(
    ("fields", "peer", "expected"),
    [
        ({"principals": ["cluster.local/ns/foo/sa/bar"]}, PEER, True),
        ({"principals": ["cluster.local/ns/foo/sa/bar"]}, "cluster.local/ns/foo/sa/bar", True),
        ({"principals": ["cluster.local/ns/foo/sa/baz"]}, PEER, False),
        ({"principals": ["cluster.local/ns/foo/*"]}, PEER, True),
        ({"principals": ["*/sa/bar"]}, PEER, True),
        ({"principals": ["*"]}, PEER, True),
        ({"principals": ["*"]}, "", False),
        ({"principals": ["cluster.local/ns/foo/sa/bar"]}, "", False),
        ({"notPrincipals": ["cluster.local/ns/foo/sa/bar"]}, PEER, False),
        ({"notPrincipals": ["cluster.local/ns/foo/sa/bar"]}, "", True),
        ({"notPrincipals": ["*"]}, "", True),
        ({"namespaces": ["foo"]}, PEER, True),
        ({"namespaces": ["fo*"]}, PEER, True),
        ({"namespaces": ["other"]}, PEER, False),
        ({"namespaces": ["*"]}, "", False),
        ({"namespaces": ["foo"]}, "spiffe://example.org/workload/x", False),
        ({"notNamespaces": ["foo"]}, PEER, False),
        ({"notNamespaces": ["other"]}, PEER, True),
        ({"notNamespaces": ["foo"]}, "", True),
        ({"serviceAccounts": ["foo/bar"]}, PEER, True),
        ({"serviceAccounts": ["foo/baz"]}, PEER, False),
        ({"serviceAccounts": ["other/bar"]}, PEER, False),
        ({"serviceAccounts": ["foo/bar"]}, "", False),
        ({"serviceAccounts": ["foo/bar"]}, "spiffe://example.org/workload/x", False),
        ({"notServiceAccounts": ["foo/bar"]}, PEER, False),
        ({"notServiceAccounts": ["foo/bar"]}, "spiffe://cluster.local/ns/foo/sa/qux", True),
        ({"trustDomains": ["cluster.local"]}, PEER, True),
        ({"trustDomains": ["*.local"]}, PEER, True),
        ({"trustDomains": ["example.org"]}, PEER, False),
        ({"trustDomains": ["cluster.local"]}, "", False),
        ({"notTrustDomains": ["example.org"]}, PEER, True),
        ({"notTrustDomains": ["cluster.local"]}, PEER, False),
    ],
)
def test_peer_identity_fields(fields: dict[str, list[str]], peer: str, expected: bool) -> None:
    assert matches(source(**fields), request(peer_principal=peer)) is expected


@pytest.mark.parametrize(
    ("field", "blocks", "source_ip", "expected"),
    [
        ("ipBlocks", ["10.0.0.0/8"], "10.1.2.3", True),
        ("ipBlocks", ["10.1.2.3"], "10.1.2.3", True),
        ("ipBlocks", ["10.1.2.4"], "10.1.2.3", False),
        ("ipBlocks", ["192.168.0.0/16", "10.0.0.0/8"], "10.1.2.3", True),
        ("ipBlocks", ["192.168.0.0/16"], "10.1.2.3", False),
        ("ipBlocks", ["2001:db8::/32"], "2001:db8::5", True),
        ("ipBlocks", ["2001:db8::5"], "2001:db8::5", True),
        ("ipBlocks", ["2001:db8::/32"], "2001:db9::5", False),
        ("ipBlocks", ["10.0.0.0/8"], "2001:db8::5", False),
        ("ipBlocks", ["::/0"], "10.1.2.3", False),
        ("ipBlocks", ["0.0.0.0/0"], "10.1.2.3", True),
        ("ipBlocks", ["10.0.0.0/8"], "", False),
        ("notIpBlocks", ["10.0.0.0/8"], "10.1.2.3", False),
        ("notIpBlocks", ["10.0.0.0/8"], "192.168.1.1", True),
        ("notIpBlocks", ["10.0.0.0/8"], "", True),
    ],
)
def test_ip_blocks_match_the_direct_peer(
    field: str, blocks: list[str], source_ip: str, expected: bool
) -> None:
    req = request(source_ip=source_ip, headers={"x-forwarded-for": "10.9.9.9"})
    assert matches(source(**{field: blocks}), req) is expected


@pytest.mark.parametrize(
    ("field", "xff", "hops", "expected"),
    [
        # hops=0: our Envoy appended the client's address last
        ("remoteIpBlocks", "198.51.100.9", 0, True),
        ("remoteIpBlocks", "192.0.2.1", 0, False),
        # a forged leftmost entry never counts
        ("remoteIpBlocks", "198.51.100.9, 192.0.2.1", 0, False),
        ("remoteIpBlocks", "192.0.2.1, 198.51.100.9", 0, True),
        # hops=1: a trusted load balancer appended its view of the client before Envoy's entry
        ("remoteIpBlocks", "198.51.100.9, 10.0.0.5", 1, True),
        ("remoteIpBlocks", "198.51.100.9, 192.0.2.1, 10.0.0.5", 1, False),
        ("remoteIpBlocks", "198.51.100.9, 10.0.0.5", 0, False),
        # too few entries for the trusted hops: the direct peer (10.0.0.2) decides
        ("remoteIpBlocks", "198.51.100.9", 1, False),
        ("notRemoteIpBlocks", "198.51.100.9", 0, False),
        ("notRemoteIpBlocks", "192.0.2.1", 0, True),
        ("notRemoteIpBlocks", "198.51.100.9, 192.0.2.1", 0, True),
    ],
)
def test_remote_ip_blocks_use_x_forwarded_for(
    field: str, xff: str, hops: int, expected: bool
) -> None:
    req = request(source_ip="10.0.0.2", headers={"x-forwarded-for": xff}, trusted_proxy_hops=hops)
    assert matches(source(**{field: ["198.51.100.0/24"]}), req) is expected


def test_remote_ip_blocks_without_x_forwarded_for_use_the_direct_peer() -> None:
    rule = source(remoteIpBlocks=["10.0.0.0/8"])
    assert matches(rule, request(source_ip="10.0.0.2")) is True
    assert matches(rule, request(source_ip="192.0.2.1")) is False


@pytest.mark.parametrize(
    ("who", "source_ip", "expected"),
    [
        (identity("alice"), "10.1.2.3", True),
        (identity("alice"), "192.0.2.1", False),
        (None, "10.1.2.3", False),
        (None, "192.0.2.1", False),
    ],
)
def test_fields_of_a_source_are_anded(who: Identity | None, source_ip: str, expected: bool) -> None:
    rule = source(requestPrincipals=["*"], ipBlocks=["10.0.0.0/8"])
    assert matches(rule, request(source_ip=source_ip), who) is expected


@pytest.mark.parametrize(
    ("who", "peer", "expected"),
    [
        (identity("alice"), "", True),
        (None, PEER, True),
        (identity("alice"), PEER, True),
        (None, "", False),
    ],
)
def test_several_from_sources_are_ored(who: Identity | None, peer: str, expected: bool) -> None:
    rule = {
        "from": [
            {"source": {"requestPrincipals": ["*"]}},
            {"source": {"namespaces": ["foo"]}},
        ]
    }
    assert matches(rule, request(peer_principal=peer), who) is expected


# ---------------------------------------------------------------------------------- when

GROUPS = {"groups": ["admin", "dev"]}
SCOPE = {"scope": "orders:read orders:write"}
REALM = {"realm_access": {"roles": ["user", "admin"]}}
ANONYMOUS = None


@pytest.mark.parametrize(
    ("claim", "values", "not_values", "claims", "expected"),
    [
        # list claim: any element
        ("[groups]", ["admin"], None, GROUPS, True),
        ("[groups]", ["dev", "ops"], None, GROUPS, True),
        ("[groups]", ["ops"], None, GROUPS, False),
        ("[groups]", ["adm*"], None, GROUPS, True),
        ("[groups]", ["*"], None, GROUPS, True),
        ("[groups]", None, ["admin"], GROUPS, False),
        ("[groups]", None, ["ops"], GROUPS, True),
        ("[groups]", ["*"], None, {"groups": []}, False),
        # string claim
        ("[email]", ["*@example.com"], None, {"email": "a@example.com"}, True),
        ("[email]", ["*@example.com"], None, {"email": "a@example.com.evil"}, False),
        ("[iss]", [ISS], None, {}, True),
        ("[sub]", ["alice"], None, {}, True),
        # nested claims
        ("[realm_access][roles]", ["admin"], None, REALM, True),
        ("[realm_access][roles]", ["ops"], None, REALM, False),
        ("[realm_access][roles]", ["*"], None, {"realm_access": "flat"}, False),
        ("[realm_access][roles]", ["*"], None, {"realm_access": {}}, False),
        ("[realm_access][roles]", None, ["admin"], {"realm_access": {}}, True),
        ("[a][b][c]", ["deep"], None, {"a": {"b": {"c": "deep"}}}, True),
        ("[a][b]", ["*"], None, {"a": {"b": {"c": "deep"}}}, False),
        # scope and permission strings are space-separated lists
        ("[scope]", ["orders:write"], None, SCOPE, True),
        ("[scope]", ["orders:*"], None, SCOPE, True),
        ("[scope]", ["orders:read orders:write"], None, SCOPE, False),
        ("[scope]", ["profile"], None, {"scope": "  profile\torders:read "}, True),
        ("[scope]", None, ["admin"], SCOPE, True),
        ("[scope]", None, ["orders:write"], SCOPE, False),
        ("[scope]", ["write"], None, {"scope": ["read", "write"]}, True),
        ("[permission]", ["delete"], None, {"permission": "read delete"}, True),
        # other string claims are split only when the provider says so (next test)
        ("[roles]", ["a"], None, {"roles": "a b"}, False),
        ("[roles]", ["a b"], None, {"roles": "a b"}, True),
        # numbers and booleans match their JSON text
        ("[blocked]", ["true"], None, {"blocked": True}, True),
        ("[blocked]", ["True"], None, {"blocked": True}, False),
        ("[blocked]", ["1"], None, {"blocked": True}, False),
        ("[blocked]", ["true"], None, {"blocked": False}, False),
        ("[blocked]", ["false"], None, {"blocked": False}, True),
        ("[blocked]", ["true"], None, {"blocked": "true"}, True),
        ("[blocked]", None, ["true"], {"blocked": False}, True),
        ("[level]", ["42"], None, {"level": 42}, True),
        ("[level]", ["4*"], None, {"level": 42}, True),
        ("[level]", ["42"], None, {"level": 43}, False),
        ("[ratio]", ["1.5"], None, {"ratio": 1.5}, True),
        ("[ids]", ["7"], None, {"ids": [1, 7]}, True),
        ("[flags]", ["true"], None, {"flags": ["x", True]}, True),
        # objects (and objects or lists inside lists) never match
        ("[addr]", ["*"], None, {"addr": {"c": "x"}}, False),
        ("[addr]", ["{*"], None, {"addr": {"c": "x"}}, False),
        ("[items]", ["*"], None, {"items": [{"a": 1}, ["b"]]}, False),
        ("[nothing]", ["*"], None, {"nothing": None}, False),
        # absent claims and anonymous requests: a positive field never, a negative one always
        ("[missing]", ["*"], None, {}, False),
        ("[missing]", None, ["*"], {}, True),
        ("[groups]", ["admin"], None, ANONYMOUS, False),
        ("[groups]", None, ["admin"], ANONYMOUS, True),
        # values AND notValues
        ("[groups]", ["dev*"], ["dev-blocked"], {"groups": ["dev-1"]}, True),
        ("[groups]", ["dev*"], ["dev-blocked"], {"groups": ["dev-1", "dev-blocked"]}, False),
        ("[groups]", ["dev*"], ["dev-blocked"], {"groups": ["ops"]}, False),
    ],
)
def test_when_on_claims(
    claim: str,
    values: list[str] | None,
    not_values: list[str] | None,
    claims: dict[str, Any] | None,
    expected: bool,
) -> None:
    who = None if claims is None else identity(claims=claims)
    assert matches(when(f"request.auth.claims{claim}", values, not_values), None, who) is expected


def test_provider_space_delimited_claims_are_split() -> None:
    rule = when("request.auth.claims[roles]", ["editor"])
    split = DEFAULT_SPACE_DELIMITED | {"roles"}
    assert matches(rule, None, identity(claims={"roles": "viewer editor"})) is False
    assert matches(rule, None, identity(claims={"roles": "viewer editor"}, space_delimited=split))
    # `scope` stays split whatever else the provider lists
    scoped = identity(claims={"scope": "a b"}, space_delimited=split)
    assert matches(when("request.auth.claims[scope]", ["b"]), None, scoped) is True


@pytest.mark.parametrize(
    ("key", "values", "not_values", "who", "expected"),
    [
        # request.auth.principal splits like requestPrincipals
        ("request.auth.principal", [f"{ISS}/alice"], None, identity(), True),
        ("request.auth.principal", [f"{ISS}/*"], None, identity(), True),
        ("request.auth.principal", [f"{ISS}/*"], None, identity(iss=f"{ISS}/t2"), False),
        ("request.auth.principal", ["*"], None, None, False),
        ("request.auth.principal", None, ["*"], None, True),
        ("request.auth.principal", None, [f"{ISS}/alice"], identity(), False),
        ("request.auth.principal", None, [f"{ISS}/alice"], identity("bob"), True),
        # audiences: any of the token's
        (
            "request.auth.audiences",
            ["shop-api"],
            None,
            identity(audiences=["web", "shop-api"]),
            True,
        ),
        ("request.auth.audiences", ["shop-*"], None, identity(audiences=["shop-api"]), True),
        ("request.auth.audiences", ["other"], None, identity(audiences=["shop-api"]), False),
        ("request.auth.audiences", ["*"], None, identity(audiences=[]), False),
        ("request.auth.audiences", ["*"], None, None, False),
        ("request.auth.audiences", None, ["other"], identity(audiences=["shop-api"]), True),
        # presenter: the azp claim
        ("request.auth.presenter", ["client-1"], None, identity(presenter="client-1"), True),
        ("request.auth.presenter", ["client-*"], None, identity(presenter="client-2"), True),
        ("request.auth.presenter", ["client-1"], None, identity(presenter="client-2"), False),
        ("request.auth.presenter", ["*"], None, identity(presenter=None), False),
        ("request.auth.presenter", None, ["client-1"], identity(presenter=None), True),
    ],
)
def test_when_on_identity(
    key: str,
    values: list[str] | None,
    not_values: list[str] | None,
    who: Identity | None,
    expected: bool,
) -> None:
    assert matches(when(key, values, not_values), None, who) is expected


REQ = request(
    method="GET",
    host="api.example.com",
    path="/x",
    headers={"x-foo": "bar", "x-empty": "", "x-forwarded-for": "192.0.2.1, 198.51.100.9"},
    source_ip="10.0.0.2",
    peer_principal=PEER,
    destination_ip="10.96.0.10",
    destination_port=8443,
    sni="api.example.com",
    context_extensions={"tier": "gold"},
)
BARE = request()


@pytest.mark.parametrize(
    ("key", "values", "not_values", "req", "expected"),
    [
        # headers: the name is case-insensitive, the value is not
        ("request.headers[x-foo]", ["bar"], None, REQ, True),
        ("request.headers[X-Foo]", ["bar"], None, REQ, True),
        ("request.headers[x-foo]", ["BAR"], None, REQ, False),
        ("request.headers[x-foo]", ["b*"], None, REQ, True),
        ("request.headers[x-foo]", ["*"], None, REQ, True),
        ("request.headers[x-foo]", ["*"], None, BARE, False),
        ("request.headers[x-foo]", None, ["*"], BARE, True),
        ("request.headers[x-foo]", None, ["bar"], REQ, False),
        ("request.headers[x-foo]", None, ["baz"], REQ, True),
        ("request.headers[x-foo]", None, ["baz"], BARE, True),
        ("request.headers[x-empty]", ["*"], None, REQ, False),
        # addresses are CIDR blocks
        ("source.ip", ["10.0.0.0/8"], None, REQ, True),
        ("source.ip", ["10.0.0.2"], None, REQ, True),
        ("source.ip", ["192.0.2.0/24"], None, REQ, False),
        ("source.ip", None, ["10.0.0.0/8"], REQ, False),
        ("source.ip", ["10.0.0.0/8"], None, BARE, False),
        ("remote.ip", ["198.51.100.0/24"], None, REQ, True),
        ("remote.ip", ["192.0.2.1"], None, REQ, False),
        ("remote.ip", None, ["192.0.2.1"], REQ, True),
        ("destination.ip", ["10.96.0.0/12"], None, REQ, True),
        ("destination.ip", ["10.0.0.0/16"], None, REQ, False),
        ("destination.ip", None, ["10.0.0.0/16"], REQ, True),
        ("destination.ip", ["10.96.0.0/12"], None, BARE, False),
        ("destination.port", ["8443"], None, REQ, True),
        ("destination.port", ["80", "8443"], None, REQ, True),
        ("destination.port", ["80"], None, REQ, False),
        ("destination.port", None, ["80"], REQ, True),
        ("destination.port", ["8443"], None, BARE, False),
        # the peer
        ("source.principal", ["cluster.local/ns/foo/sa/bar"], None, REQ, True),
        ("source.principal", ["*/sa/bar"], None, REQ, True),
        ("source.principal", ["cluster.local/ns/foo/sa/baz"], None, REQ, False),
        ("source.principal", ["*"], None, BARE, False),
        ("source.principal", None, ["*"], BARE, True),
        ("source.namespace", ["foo"], None, REQ, True),
        ("source.namespace", ["bar"], None, REQ, False),
        ("source.namespace", None, ["foo"], REQ, False),
        ("source.namespace", ["foo"], None, BARE, False),
        # TLS and Envoy's per-route context
        ("connection.sni", ["api.example.com"], None, REQ, True),
        ("connection.sni", ["*.example.com"], None, REQ, True),
        ("connection.sni", ["other.example.com"], None, REQ, False),
        ("connection.sni", ["*"], None, BARE, False),
        ("request.context_extensions[tier]", ["gold"], None, REQ, True),
        ("request.context_extensions[tier]", ["silver"], None, REQ, False),
        ("request.context_extensions[tier]", ["*"], None, BARE, False),
        ("request.context_extensions[tier]", None, ["silver"], REQ, True),
    ],
)
def test_when_on_request(
    key: str,
    values: list[str] | None,
    not_values: list[str] | None,
    req: RequestAttributes,
    expected: bool,
) -> None:
    assert matches(when(key, values, not_values), req) is expected


def test_when_conditions_are_anded() -> None:
    rule = {
        "when": [
            {"key": "request.auth.claims[groups]", "values": ["admin"]},
            {"key": "request.headers[x-tenant]", "values": ["acme"]},
        ]
    }
    admin = identity(claims={"groups": ["admin"]})
    assert matches(rule, request(headers={"x-tenant": "acme"}), admin) is True
    assert matches(rule, request(headers={"x-tenant": "other"}), admin) is False
    assert matches(rule, request(headers={"x-tenant": "acme"}), identity()) is False


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("who", "path", "tenant", "expected"),
    [
        (identity(), "/api/x", "acme", True),
        (None, "/api/x", "acme", False),
        (identity(), "/other", "acme", False),
        (identity(), "/api/x", "other", False),
    ],
)
def test_a_rule_needs_its_from_its_to_and_every_when(
    who: Identity | None, path: str, tenant: str, expected: bool
) -> None:
    rule = {
        **source(requestPrincipals=["*"]),
        **operation(paths=["/api/*"]),
        **when("request.headers[x-tenant]", ["acme"]),
    }
    assert matches(rule, request(path=path, headers={"x-tenant": tenant}), who) is expected


def test_an_empty_rule_matches_everything() -> None:
    assert matches({}, request(), None) is True
    assert matches({}, REQ, identity()) is True


def test_rules_of_a_policy_are_ored() -> None:
    rules = policies(
        {
            "name": "two-rules",
            "rules": [operation(paths=["/a"]), operation(paths=["/b"])],
        }
    )
    assert rules.evaluate(request(path="/b"), None).allowed is True
    assert rules.evaluate(request(path="/c"), None).allowed is False


def test_rules_with_an_empty_rule_allow_everything() -> None:
    result = policies({"name": "allow-all", "action": "ALLOW", "rules": [{}]}).evaluate(REQ, None)
    assert result == PolicyResult(True, "allow-all", "allowed")


def test_allow_policy_without_rules_allows_nothing() -> None:
    # Istio's `spec: {}`: an ALLOW policy that matches nothing, so it denies everything.
    result = policies({"name": "deny-all"}).evaluate(REQ, identity())
    assert result == PolicyResult(False, None, "no_allow_policy_matched")


def test_deny_policy_without_rules_denies_nothing() -> None:
    result = policies({"name": "empty-deny", "action": "DENY"}).evaluate(REQ, identity())
    assert result == PolicyResult(True, None, "allowed")


def test_no_policy_at_all_allows() -> None:
    assert PolicySet([]).evaluate(REQ, None) == PolicyResult(True, None, "allowed")


def test_no_allow_policy_allows_what_no_deny_policy_matches() -> None:
    rules = policies({"name": "no-admin", "action": "DENY", "rules": [operation(paths=["/admin"])]})
    assert rules.evaluate(request(path="/x"), None) == PolicyResult(True, None, "allowed")


def test_allow_policies_exist_but_none_matches_denies() -> None:
    rules = policies(
        {"name": "orders", "rules": [operation(paths=["/orders"])]},
        {"name": "users", "rules": [operation(paths=["/users"])]},
    )
    assert rules.evaluate(request(path="/admin"), None) == PolicyResult(
        False, None, "no_allow_policy_matched"
    )


def test_any_matching_allow_policy_allows_and_is_named() -> None:
    rules = policies(
        {"name": "orders", "rules": [operation(paths=["/orders"])]},
        {"name": "users", "rules": [operation(paths=["/users"])]},
    )
    assert rules.evaluate(request(path="/users"), None) == PolicyResult(True, "users", "allowed")


def test_deny_policy_wins_over_matching_allow() -> None:
    rules = policies(
        {"name": "allow-all", "rules": [{}]},
        {"name": "no-admin", "action": "DENY", "rules": [operation(paths=["/admin*"])]},
    )
    assert rules.evaluate(request(path="/admin/users"), identity()) == PolicyResult(
        False, "no-admin", "policy_denied"
    )
    assert rules.evaluate(request(path="/orders"), identity()).allowed is True


def test_first_matching_deny_policy_is_named() -> None:
    rules = policies(
        {"name": "first", "action": "DENY", "rules": [{}]},
        {"name": "second", "action": "DENY", "rules": [{}]},
    )
    assert rules.evaluate(REQ, None).policy == "first"


def test_deny_rule_on_boolean_claim_fires() -> None:
    rules = policies(
        {"name": "allow-all", "rules": [{}]},
        {
            "name": "blocked",
            "action": "DENY",
            "rules": [when("request.auth.claims[blocked]", ["true"])],
        },
    )
    blocked = identity(claims={"blocked": True})
    assert rules.evaluate(REQ, blocked) == PolicyResult(False, "blocked", "policy_denied")
    assert rules.evaluate(REQ, identity(claims={"blocked": False})).allowed is True


def test_deny_anonymous_with_not_request_principals() -> None:
    rules = policies(
        {"name": "require-jwt", "action": "DENY", "rules": [source(notRequestPrincipals=["*"])]}
    )
    assert rules.evaluate(REQ, None) == PolicyResult(False, "require-jwt", "policy_denied")
    assert rules.evaluate(REQ, identity()).allowed is True


@pytest.mark.parametrize(
    ("path", "allowed", "audited"),
    [
        ("/admin", True, ("audit-admin",)),
        ("/x", True, ()),
    ],
)
def test_audit_policy_never_changes_the_outcome_alone(
    path: str, allowed: bool, audited: tuple[str, ...]
) -> None:
    rules = policies(
        {"name": "audit-admin", "action": "AUDIT", "rules": [operation(paths=["/admin"])]}
    )
    result = rules.evaluate(request(path=path), None)
    assert (result.allowed, result.reason, result.audited) == (allowed, "allowed", audited)


def test_audit_policy_does_not_count_as_an_allow_policy() -> None:
    rules = policies(
        {"name": "audit-all", "action": "AUDIT", "rules": [{}]},
        {"name": "orders", "rules": [operation(paths=["/orders"])]},
    )
    denied = rules.evaluate(request(path="/admin"), None)
    assert denied == PolicyResult(False, None, "no_allow_policy_matched", ("audit-all",))
    allowed = rules.evaluate(request(path="/orders"), None)
    assert allowed == PolicyResult(True, "orders", "allowed", ("audit-all",))


def test_audit_is_reported_when_a_deny_policy_decides() -> None:
    rules = policies(
        {"name": "audit-all", "action": "AUDIT", "rules": [{}]},
        {"name": "deny-all", "action": "DENY", "rules": [{}]},
    )
    assert rules.evaluate(REQ, None) == PolicyResult(
        False, "deny-all", "policy_denied", ("audit-all",)
    )


def test_dry_run_deny_policy_is_not_enforced_but_reported() -> None:
    rules = policies({"name": "try-deny", "action": "DENY", "dryRun": True, "rules": [{}]})
    assert rules.evaluate(REQ, None) == PolicyResult(
        True, None, "allowed", (), (("try-deny", "deny"),)
    )


def test_dry_run_allow_policy_does_not_make_allow_policies_exist() -> None:
    rules = policies({"name": "try-allow", "dryRun": True, "rules": [operation(paths=["/orders"])]})
    # Enforced: nothing (no ALLOW policy is in force). Observed: it would deny /admin.
    assert rules.evaluate(request(path="/admin"), None) == PolicyResult(
        True, None, "allowed", (), (("try-allow", "deny"),)
    )
    assert rules.evaluate(request(path="/orders"), None) == PolicyResult(
        True, None, "allowed", (), (("try-allow", "allow"),)
    )


def test_dry_run_allow_policy_beside_an_enforced_one() -> None:
    rules = policies(
        {"name": "orders", "rules": [operation(paths=["/orders"])]},
        {"name": "try-users", "dryRun": True, "rules": [operation(paths=["/users"])]},
    )
    assert rules.evaluate(request(path="/users"), None) == PolicyResult(
        False, None, "no_allow_policy_matched", (), (("try-users", "allow"),)
    )


def test_dry_run_deny_policy_gives_a_verdict_on_every_request() -> None:
    rules = policies(
        {"name": "try-deny", "action": "DENY", "dryRun": True, "rules": [operation(paths=["/a"])]}
    )
    assert rules.evaluate(request(path="/b"), None).dry_run == (("try-deny", "allow"),)
    assert rules.evaluate(request(path="/a"), None).dry_run == (("try-deny", "deny"),)


def test_policy_set_groups_by_action() -> None:
    rules = policies(
        {"name": "a", "action": "ALLOW"},
        {"name": "d", "action": "DENY"},
        {"name": "au", "action": "AUDIT"},
        {"name": "dry", "action": "DENY", "dryRun": True},
    )
    assert [p.name for p in rules.allow] == ["a"]
    assert [p.name for p in rules.deny] == ["d"]
    assert [p.name for p in rules.audit] == ["au"]
    assert [p.name for p in rules.dry_run] == ["dry"]


# ----------------------------------------------------------------- from YAML to decision


@pytest.fixture(scope="module")
def mesh() -> PolicySet:
    return PolicySet(config.load(DATA / "config_mesh.yaml").policies)


@pytest.mark.parametrize(
    ("method", "path", "who", "expected"),
    [
        ("GET", "/healthz", None, PolicyResult(True, "shop/allow-api", "allowed")),
        ("GET", "/public/logo.png", None, PolicyResult(True, "shop/allow-api", "allowed")),
        ("POST", "/public/logo.png", None, PolicyResult(False, None, "no_allow_policy_matched")),
        ("GET", "/api/orders", None, PolicyResult(False, None, "no_allow_policy_matched")),
        (
            "GET",
            "/api/orders",
            identity(claims={"scope": "profile orders:read"}),
            PolicyResult(True, "shop/allow-api", "allowed"),
        ),
        (
            "GET",
            "/api/orders",
            identity(claims={"scope": "profile"}),
            PolicyResult(False, None, "no_allow_policy_matched"),
        ),
        (
            "GET",
            "/api/orders",
            identity(claims={"scope": "orders:read", "blocked": True}),
            PolicyResult(False, "shop/deny-blocked", "policy_denied"),
        ),
        (
            "DELETE",
            "/admin/users/1",
            identity(claims={"groups": ["admin"]}),
            PolicyResult(True, "shop/allow-api", "allowed", ("shop/audit-admin",)),
        ),
        (
            "GET",
            "/public/../admin/users",
            identity(claims={"groups": ["staff"]}),
            PolicyResult(False, None, "no_allow_policy_matched", ("shop/audit-admin",)),
        ),
    ],
)
def test_istio_yaml_from_the_mesh_decides(
    mesh: PolicySet, method: str, path: str, who: Identity | None, expected: PolicyResult
) -> None:
    assert mesh.evaluate(request(method=method, path=path), who) == expected


# ------------------------------------------------ attributes a door could not tell (HTTP)

UNKNOWN_TO_THE_HTTP_DOOR = frozenset(
    {"source.ip", "source.principal", "destination.ip", "destination.port", "connection.sni",
     "context_extensions"}
)  # fmt: skip


@pytest.mark.parametrize(
    "rule",
    [
        operation(ports=["8080"]),
        operation(not_ports=["8080"]),
        source(principals=[PEER.removeprefix("spiffe://")]),
        source(not_namespaces=["foo"]),
        source(ip_blocks=["10.0.0.0/8"]),
        source(not_ip_blocks=["10.0.0.0/8"]),
        when("destination.port", ["8080"]),
        when("connection.sni", not_values=["api.example.com"]),
        when("request.context_extensions[tenant]", ["a"]),
        when("source.principal", ["*"]),
    ],
    ids=lambda rule: str(rule)[:60],
)
def test_a_clause_on_an_attribute_the_door_cannot_tell_fails_closed(
    rule: dict[str, Any],
) -> None:
    unknowing = request(unknown=UNKNOWN_TO_THE_HTTP_DOOR, path="/x")
    deny = policies({"name": "deny", "action": "DENY", "rules": [rule]})
    allow = policies({"name": "allow", "rules": [rule]})
    # Whether the clause is positive or negated, a DENY matches and an ALLOW does not.
    assert deny.evaluate(unknowing, None).reason == "policy_denied"
    assert deny.evaluate_linear(unknowing, None).reason == "policy_denied"
    assert allow.evaluate(unknowing, None).reason == "no_allow_policy_matched"
    assert allow.evaluate_linear(unknowing, None).reason == "no_allow_policy_matched"


def test_remote_ip_blocks_still_work_through_a_door_that_has_x_forwarded_for() -> None:
    rule = source(remote_ip_blocks=["203.0.113.0/24"])
    allow = policies({"name": "allow", "rules": [rule]})
    deny = policies({"name": "deny", "action": "DENY", "rules": [rule]})
    forwarded = request(
        unknown=UNKNOWN_TO_THE_HTTP_DOOR, headers={"x-forwarded-for": "203.0.113.9"}
    )
    elsewhere = request(unknown=UNKNOWN_TO_THE_HTTP_DOOR, headers={"x-forwarded-for": "192.0.2.1"})
    without = request(unknown=UNKNOWN_TO_THE_HTTP_DOOR)
    assert allow.evaluate(forwarded, None).allowed
    assert not allow.evaluate(elsewhere, None).allowed
    assert deny.evaluate(elsewhere, None).allowed  # known, and not in the block
    # No X-Forwarded-For and no peer address: unknown, so closed either way.
    assert not allow.evaluate(without, None).allowed
    assert not deny.evaluate(without, None).allowed


def test_the_same_clauses_on_known_attributes_behave_as_before() -> None:
    known = request(destination_port=443, peer_principal=PEER, source_ip="192.0.2.1")
    deny = policies({"name": "deny", "action": "DENY", "rules": [operation(ports=["8080"])]})
    assert deny.evaluate(known, None).allowed  # port 443 is known, and not 8080


@pytest.mark.parametrize(
    "host", ["admin.example.com:80", "admin.example.com.", "Admin.Example.com.:8443"]
)
def test_a_deny_on_a_host_cannot_be_sidestepped_with_a_port_or_a_trailing_dot(host: str) -> None:
    specs = [
        {"name": "no-admin", "action": "DENY", "rules": [operation(hosts=["admin.example.com"])]},
        {"name": "not-api", "action": "DENY", "rules": [operation(not_hosts=["api.example.com"])]},
    ]
    for evaluate in (policies(*specs).evaluate, policies(*specs).evaluate_linear):
        assert evaluate(request(host=host), None).policy == "no-admin"
    # notHosts: the API host with a port is still the API host, so it is not denied.
    api = request(host="api.example.com.:443")
    assert policies(*specs[1:]).evaluate(api, None).allowed
