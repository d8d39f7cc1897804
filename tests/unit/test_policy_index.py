"""policy_index: the indexed evaluation tries only the candidate rules and always decides as the
linear one does (same allowed, policy, reason, audited and dry-run verdicts)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from authz_server.attributes import RequestAttributes
from authz_server.config.specs import PolicySpec
from authz_server.doors.http import HTTP_UNKNOWN
from authz_server.identity import Identity
from authz_server.policy.compile import PolicyResult, PolicySet
from authz_server.policy.index import StringIndex, pattern_kind
from tests.helpers import identity

ISS = "https://idp.example.com"
OTHER_ISS = "https://other.example.org"
PEER = "spiffe://cluster.local/ns/foo/sa/bar"


def policy_set(specs: Sequence[Mapping[str, Any]], *, indexed: bool = True) -> PolicySet:
    return PolicySet([PolicySpec.model_validate(s) for s in specs], indexed=indexed)


def allow(name: str, **operation: Any) -> dict[str, Any]:
    return {"name": name, "rules": [{"to": [{"operation": operation}]}]}


class HostReadCountingRequest(RequestAttributes):
    """A request that counts how often the decision reads its host, to see which policies
    were evaluated: every rule on ``hosts`` reads it once, the index once in all."""

    host_reads = 0

    @property  # type: ignore[override]
    def host_forms(self) -> tuple[str, ...]:
        self.host_reads += 1
        return (self.host.lower(),)


# ------------------------------------------------------------------------------ scenarios


def test_request_for_another_host_does_not_evaluate_its_policies() -> None:
    specs = [allow(f"svc-{i}", hosts=[f"svc-{i}.example.com"]) for i in range(200)]
    indexed, linear = policy_set(specs), policy_set(specs, indexed=False)

    by_index = HostReadCountingRequest(host="svc-7.example.com")
    by_list = HostReadCountingRequest(host="svc-7.example.com")
    result = indexed.evaluate(by_index, None)
    assert result == linear.evaluate(by_list, None)
    assert result.policy == "svc-7"
    assert by_list.host_reads == 8  # the rules of svc-0 .. svc-7
    assert by_index.host_reads == 2  # the lookup, then svc-7's rule
    stranger = HostReadCountingRequest(host="unknown.example.com")
    result = indexed.evaluate(stranger, None)
    assert result == PolicyResult(False, None, "no_allow_policy_matched")
    assert stranger.host_reads == 1
    assert indexed.candidates(stranger, None) == []


@pytest.mark.parametrize("host", ["API.Example.COM", "api.example.com", "Api.Example.Com"])
@pytest.mark.parametrize("pattern", ["API.EXAMPLE.COM", "api.example.com", "*.Example.com"])
def test_mixed_case_hosts_still_match_through_the_index(host: str, pattern: str) -> None:
    specs = [allow("other", hosts=["other.example.com"]), allow("api", hosts=[pattern])]
    result = policy_set(specs).evaluate(RequestAttributes(host=host), None)
    assert (result.allowed, result.policy) == (True, "api")


def test_first_matching_policy_is_reported_across_indexed_and_unplaced_rules() -> None:
    specs = [
        allow("by-path", paths=["/orders/*"]),
        allow("everything-but-admin", notPaths=["/admin*"]),  # unplaceable
        allow("by-host", hosts=["shop.example.com"]),
    ]
    indexed = policy_set(specs)
    on_orders = RequestAttributes(host="shop.example.com", path="/orders/1")
    assert indexed.evaluate(on_orders, None).policy == "by-path"
    on_home = RequestAttributes(host="shop.example.com", path="/")
    assert indexed.evaluate(on_home, None).policy == "everything-but-admin"
    on_admin = RequestAttributes(host="shop.example.com", path="/admin")
    assert indexed.evaluate(on_admin, None).policy == "by-host"
    assert indexed.candidates(on_admin, None) == ["everything-but-admin", "by-host"]


def test_a_deny_anywhere_in_the_list_still_wins_over_an_earlier_allow() -> None:
    specs = [
        allow("api", paths=["/api/*"]),
        *(allow(f"svc-{i}", hosts=[f"svc-{i}.example.com"]) for i in range(50)),
        {
            "name": "no-debug",
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/api/{*}/debug"]}}]}],
        },
    ]
    result = policy_set(specs).evaluate(RequestAttributes(path="/api/v1/debug"), None)
    assert (result.allowed, result.policy, result.reason) == (False, "no-debug", "policy_denied")


def test_rules_that_need_a_token_are_not_tried_for_anonymous_requests() -> None:
    specs = [
        {
            "name": "members",
            "rules": [{"from": [{"source": {"requestPrincipals": [f"{ISS}/*"]}}]}],
        },
        {
            "name": "admins",
            "rules": [{"when": [{"key": "request.auth.claims[groups]", "values": ["admin"]}]}],
        },
        {
            "name": "not-banned",
            "rules": [{"when": [{"key": "request.auth.claims[banned]", "notValues": ["true"]}]}],
        },
    ]
    indexed = policy_set(specs)
    anonymous = RequestAttributes()
    assert indexed.candidates(anonymous, None) == ["not-banned"]
    assert indexed.evaluate(anonymous, None).policy == "not-banned"
    admin = identity(claims={"groups": ["admin"]})
    assert indexed.candidates(anonymous, admin) == ["members", "admins", "not-banned"]
    assert indexed.evaluate(anonymous, admin).policy == "members"


def test_a_rule_listing_several_hosts_is_found_under_each() -> None:
    specs = [
        {
            "name": "two-apis",
            "rules": [
                {"to": [{"operation": {"hosts": ["a.example.com"]}}]},
                {
                    "to": [
                        {"operation": {"hosts": ["b.example.com"], "methods": ["GET"]}},
                        {"operation": {"paths": ["/c/*"]}},
                    ]
                },
            ],
        },
    ]
    indexed = policy_set(specs)
    for host, method, path in [
        ("a.example.com", "POST", "/"),
        ("B.example.com", "GET", "/"),
        ("z.example.com", "DELETE", "/c/1"),
    ]:
        result = indexed.evaluate(RequestAttributes(host=host, method=method, path=path), None)
        assert result.policy == "two-apis", (host, method, path)
    missed = RequestAttributes(host="b.example.com", method="POST", path="/")
    assert indexed.evaluate(missed, None).allowed is False


def test_dry_run_and_audit_policies_the_index_skips_still_report() -> None:
    specs = [
        {
            "name": "would-deny-writes",
            "action": "DENY",
            "dryRun": True,
            "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}],
        },
        {
            "name": "would-allow-reads",
            "dryRun": True,
            "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
        },
        {
            "name": "audit-admin",
            "action": "AUDIT",
            "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
        },
    ]
    indexed = policy_set(specs)
    get_admin = indexed.evaluate(RequestAttributes(method="GET", path="/admin"), None)
    assert get_admin == PolicyResult(
        True,
        None,
        "allowed",
        ("audit-admin",),
        (("would-deny-writes", "allow"), ("would-allow-reads", "allow")),
    )
    post_home = indexed.evaluate(RequestAttributes(method="POST", path="/"), None)
    assert post_home == PolicyResult(
        True, None, "allowed", (), (("would-deny-writes", "deny"), ("would-allow-reads", "deny"))
    )


def test_an_allow_policy_with_no_rules_still_makes_unmatched_requests_denied() -> None:
    specs = [{"name": "nothing"}, allow("api", hosts=["api.example.com"])]
    indexed = policy_set(specs)
    assert indexed.evaluate(RequestAttributes(host="web.example.com"), None) == PolicyResult(
        False, None, "no_allow_policy_matched"
    )
    assert indexed.evaluate(RequestAttributes(host="api.example.com"), None).policy == "api"


@pytest.mark.parametrize(
    ("pattern", "value", "hit"),
    [
        ("/api", "/api", True),
        ("/api", "/api/", False),
        ("/api*", "/apiary", True),
        ("/api/*", "/api", False),
        ("*.json", "/a/b.json", True),
        ("*.json", ".json", True),
        ("*.json", "json", False),
        ("*", "x", True),
        ("*", "", False),
        ("/users/{*}/posts", "/users/7/posts", True),
        ("/users/{*}/posts", "/groups/7/posts", False),
        ("{**}", "/anything", True),
    ],
)
def test_string_index_hits_every_value_its_pattern_can_match(
    pattern: str, value: str, hit: bool
) -> None:
    index = StringIndex()
    kind, text = pattern_kind(pattern, template=True)
    index.add(kind, text, 1 << 3)
    index.freeze()
    assert index.hits(value) == (1 << 3 if hit else 0)


# ------------------------------------------------------------------------ property: same result

HOST_PATTERNS = [
    "api.example.com",
    "API.Example.com",
    "*.example.com",
    "*.EXAMPLE.COM",
    "api.*",
    "Api.*",
    "*",
    "db.internal",
    "api.example.com:8443",
    "api.example.com:*",
    "*:8443",
    "a",
    "*a",
]
METHOD_PATTERNS = ["GET", "POST", "DELETE", "*", "P*", "*T", "get"]
PATH_PATTERNS = [
    "/",
    "/api",
    "/api/*",
    "/api*",
    "/api/v1/orders",
    "/api/{*}",
    "/api/{*}/orders",
    "/api/{**}",
    "/{*}",
    "/{**}",
    "{**}",
    "*.json",
    "*/orders",
    "*",
    "/admin*",
    "/Admin",
    "/a",
    "/a/*",
]
PORTS = ["8080", "443"]
PRINCIPAL_PATTERNS = [f"{ISS}/alice", f"{ISS}/*", "*", "*/bob", f"{OTHER_ISS}/alice", "idp-*"]
CONDITIONS: dict[str, list[str]] = {
    "request.auth.claims[groups]": ["dev", "admin", "*", "ad*"],
    "request.auth.claims[scope]": ["read", "write"],
    "request.auth.claims[org][id]": ["7", "8"],
    "request.auth.claims[admin]": ["true"],
    "request.auth.principal": [f"{ISS}/alice", "*", "*/bob"],
    "request.auth.audiences": ["api", "*"],
    "request.auth.presenter": ["web", "w*"],
    "request.headers[x-tenant]": ["a", "b*", "*"],
    "request.context_extensions[team]": ["blue"],
    "source.ip": ["10.0.0.0/8", "2001:db8::/32"],
    "remote.ip": ["192.168.1.1"],
    "source.principal": ["cluster.local/ns/foo/sa/bar", "*"],
    "source.namespace": ["foo", "bar"],
    "destination.port": PORTS,
    "connection.sni": ["api.example.com", "*.example.com"],
}


def _some(pool: Sequence[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True)


@st.composite
def _fields(draw: st.DrawFn, chances: Mapping[str, tuple[int, Sequence[str]]]) -> dict[str, Any]:
    """Each field with its chance in 10, at least one: a sparse operation, source or rule."""
    fields: dict[str, Any] = {}
    for name, (chance, pool) in chances.items():
        if draw(st.integers(min_value=0, max_value=9)) < chance:
            fields[name] = draw(_some(pool))
    if not fields:
        name = draw(st.sampled_from(sorted(chances)))
        fields[name] = draw(_some(chances[name][1]))
    return fields


# Positive fields often (they are what the index files rules under), `not*` fields less.
_operations = _fields(
    {
        "hosts": (5, HOST_PATTERNS),
        "methods": (4, METHOD_PATTERNS),
        "paths": (5, PATH_PATTERNS),
        "ports": (1, PORTS),
        "notHosts": (1, HOST_PATTERNS),
        "notMethods": (1, METHOD_PATTERNS),
        "notPaths": (2, PATH_PATTERNS),
        "notPorts": (1, PORTS),
    }
)
_sources = _fields(
    {
        "requestPrincipals": (5, PRINCIPAL_PATTERNS),
        "notRequestPrincipals": (2, PRINCIPAL_PATTERNS),
        "principals": (1, ["cluster.local/ns/foo/sa/bar", "*"]),
        "namespaces": (1, ["foo", "bar"]),
        "notNamespaces": (1, ["foo"]),
        "ipBlocks": (1, ["10.0.0.0/8", "192.168.1.1"]),
        "notRemoteIpBlocks": (1, ["192.168.0.0/16"]),
    }
)


@st.composite
def _conditions(draw: st.DrawFn) -> dict[str, Any]:
    key = draw(st.sampled_from(sorted(CONDITIONS)))
    condition: dict[str, Any] = {"key": key}
    fields = draw(st.sampled_from([("values",), ("notValues",), ("values", "notValues")]))
    for field in fields:
        condition[field] = draw(_some(CONDITIONS[key]))
    return condition


@st.composite
def _rules(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly rules with `to` (what the index places), some with `from`/`when`, a few `{}`."""
    rule: dict[str, Any] = {}
    if draw(st.integers(min_value=0, max_value=9)) < 8:
        rule["to"] = [{"operation": o} for o in draw(st.lists(_operations, min_size=1, max_size=3))]
    if draw(st.integers(min_value=0, max_value=9)) < 3:
        rule["from"] = [{"source": s} for s in draw(st.lists(_sources, min_size=1, max_size=2))]
    if draw(st.integers(min_value=0, max_value=9)) < 3:
        rule["when"] = draw(st.lists(_conditions(), min_size=1, max_size=2))
    return rule


@st.composite
def _configs(draw: st.DrawFn) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for position in range(draw(st.integers(min_value=1, max_value=10))):
        spec: dict[str, Any] = {
            "name": f"p{position}",
            "action": draw(st.sampled_from(["ALLOW", "ALLOW", "DENY", "AUDIT"])),
            "dryRun": draw(st.integers(min_value=0, max_value=9)) < 2,
        }
        shape = draw(st.integers(min_value=0, max_value=19))
        if shape == 0:  # no `rules`: an ALLOW allows nothing
            pass
        elif shape == 1:
            spec["rules"] = []
        else:
            spec["rules"] = draw(st.lists(_rules(), min_size=1, max_size=3))
        specs.append(spec)
    return specs


_identities = st.one_of(
    st.none(),
    st.builds(
        identity,
        st.sampled_from(["alice", "bob", "carol"]),
        iss=st.sampled_from([ISS, OTHER_ISS, "idp-issuer"]),
        claims=st.fixed_dictionaries(
            {},
            optional={
                "groups": st.lists(st.sampled_from(["dev", "admin", "ops"]), max_size=2),
                "scope": st.sampled_from(["read", "read write", ""]),
                "org": st.fixed_dictionaries({"id": st.sampled_from([7, "8", True])}),
                "admin": st.booleans(),
            },
        ),
        audiences=st.lists(st.sampled_from(["api", "web"]), max_size=2),
        presenter=st.sampled_from([None, "web", "cli"]),
    ),
)
_requests = st.builds(
    RequestAttributes,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "get"]),
    host=st.sampled_from(
        [
            "api.example.com",
            "API.EXAMPLE.COM",
            "www.example.com",
            "example.com",
            "db.internal",
            "DB.Internal",
            "api.example.com:8443",
            "",
            "a",
            "api.internal",
        ]
    ),
    path=st.sampled_from(
        [
            "/",
            "/api",
            "/api/",
            "/api/v1/orders",
            "/api/v1/orders.json",
            "/api/x/y/orders",
            "/admin",
            "/Admin/x",
            "/a",
            "/a/b",
            "/api/../admin",
            "//api/v1/orders",
            "/x.json?y=1",
            "/%61pi/x",
        ]
    ),
    headers=st.fixed_dictionaries(
        {},
        optional={
            "x-tenant": st.sampled_from(["a", "bz", ""]),
            "x-forwarded-for": st.just("192.168.1.1"),
        },
    ),
    source_ip=st.sampled_from(["10.1.2.3", "192.168.1.1", "2001:db8::1", ""]),
    peer_principal=st.sampled_from(["", PEER, "spiffe://cluster.local/ns/bar/sa/x"]),
    destination_port=st.sampled_from([0, 8080, 443]),
    sni=st.sampled_from(["", "api.example.com"]),
    context_extensions=st.sampled_from([{}, {"team": "blue"}]),
    # The HTTP door cannot tell the peer, the destination or the SNI: clauses on them fail
    # closed, and must do so the same way whichever way the rules are found.
    unknown=st.sampled_from([frozenset(), HTTP_UNKNOWN]),
)


def _case(
    path: str = "/api/v1/orders", who: Identity | None = None, **attributes: Any
) -> tuple[RequestAttributes, Identity | None]:
    return RequestAttributes(host="api.example.com", path=path, **attributes), who


_ALICE = identity("alice", iss=ISS)
_EVERYONE = {"name": "everyone", "rules": [{}]}
# The shapes where the index can go wrong by filing a rule where a request never looks,
# tried on every run (CI's derandomized examples need not draw them):
# a `from` that mixes a token source with one an anonymous caller can match...
_MIXED_FROM = [
    {
        "name": "no-tokens-or-office",
        "action": "DENY",
        "rules": [
            {
                "from": [
                    {"source": {"requestPrincipals": ["*"]}},
                    {"source": {"ipBlocks": ["10.0.0.0/8"]}},
                ]
            }
        ],
    },
    {
        "name": "alice-or-anonymous",
        "rules": [
            {
                "from": [
                    {"source": {"requestPrincipals": [f"{ISS}/alice"]}},
                    {"source": {"notRequestPrincipals": ["*"]}},
                ],
                "to": [{"operation": {"paths": ["/api/*"]}}],
            }
        ],
    },
    _EVERYONE,
]
_MIXED_FROM_CASES = [
    _case(source_ip="10.1.2.3"),
    _case(source_ip="192.168.1.1"),
    _case(source_ip="192.168.1.1", who=_ALICE),
    _case("/admin", source_ip="192.168.1.1"),
]
# ... a DENY made of `not*` fields only (it can be filed under no key)...
_DENY_NOT_FIELDS = [
    {
        "name": "anonymous-outside-public",
        "action": "DENY",
        "rules": [
            {
                "from": [{"source": {"notRequestPrincipals": ["*"]}}],
                "to": [{"operation": {"notPaths": ["/public/*"], "notMethods": ["OPTIONS"]}}],
            }
        ],
    },
    {
        "name": "no-internal-hosts",
        "action": "DENY",
        "rules": [{"to": [{"operation": {"notHosts": ["*.example.com"], "notPorts": ["443"]}}]}],
    },
    {
        "name": "deny-all-but-alice",
        "action": "DENY",
        "rules": [{"when": [{"key": "request.auth.principal", "notValues": [f"{ISS}/alice"]}]}],
    },
    _EVERYONE,
]
_DENY_NOT_FIELDS_CASES = [
    _case(),
    _case("/public/x"),
    _case(method="OPTIONS"),
    _case(who=_ALICE),
    _case(who=identity("bob", iss=ISS)),
    _case(who=_ALICE, destination_port=443),
]
# ... and rules on what the HTTP door does not see (they fail closed: a DENY matches, an
# ALLOW does not), beside rules on what it does.
_UNSEEN = [
    {
        "name": "no-port-8080",
        "action": "DENY",
        "rules": [{"to": [{"operation": {"ports": ["8080"], "paths": ["/api/*"]}}]}],
    },
    {
        "name": "mesh-callers",
        "rules": [
            {"from": [{"source": {"principals": ["cluster.local/ns/foo/sa/bar"]}}]},
            {"when": [{"key": "connection.sni", "values": ["api.example.com"]}]},
        ],
    },
    {
        "name": "office",
        "rules": [
            {
                "from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}],
                "to": [{"operation": {"hosts": ["api.example.com"]}}],
            }
        ],
    },
    {"name": "health", "rules": [{"to": [{"operation": {"paths": ["/healthz"]}}]}]},
]
_UNSEEN_CASES = [
    _case(unknown=HTTP_UNKNOWN, door="http"),
    _case(unknown=HTTP_UNKNOWN, door="http", source_ip="10.1.2.3"),
    _case("/healthz", unknown=HTTP_UNKNOWN, door="http"),
    _case(destination_port=8080, source_ip="10.1.2.3"),
    _case(destination_port=443, source_ip="10.1.2.3"),
    _case(sni="api.example.com", peer_principal=PEER),
]


_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "suite")


@settings(
    # 300 in the suite (~10 s of CPU): this property guards every decision the index makes;
    # `make fuzz` runs it with 5,000, `make mutate` (once per mutant) with 40 besides the
    # examples below.
    max_examples={"fuzz": 5000, "mutate": 40}.get(_PROFILE, 300),
    deadline=None,
    # NOTE: CI (and each mutant) replays the same examples every run; locally each run
    # explores new ones.
    derandomize=bool(os.environ.get("CI")) or _PROFILE == "mutate",
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    specs=_configs(),
    cases=st.lists(st.tuples(_requests, _identities), min_size=1, max_size=8),
)
@example(specs=_MIXED_FROM, cases=_MIXED_FROM_CASES)
@example(specs=_DENY_NOT_FIELDS, cases=_DENY_NOT_FIELDS_CASES)
@example(specs=_UNSEEN, cases=_UNSEEN_CASES)
@example(
    specs=[*_MIXED_FROM[:-1], *_DENY_NOT_FIELDS[:-1], *_UNSEEN, _EVERYONE],
    cases=[*_MIXED_FROM_CASES, *_DENY_NOT_FIELDS_CASES, *_UNSEEN_CASES],
)
def test_indexed_evaluation_equals_linear_evaluation_and_the_trace(
    specs: list[dict[str, Any]], cases: list[tuple[RequestAttributes, Identity | None]]
) -> None:
    indexed, linear = policy_set(specs), policy_set(specs, indexed=False)
    every = (*linear.deny, *linear.allow, *linear.audit, *linear.dry_run)
    for request, who in cases:
        assert indexed.evaluate(request, who) == linear.evaluate(request, who)
        # The trace (explain) names a failing clause for exactly the rules that do not match.
        for policy in every:
            for rule in policy.rules:
                assert (rule.misses(request, who) == ()) == rule.predicate(request, who)
