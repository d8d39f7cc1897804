"""attributes: the door-neutral request model and the views policies are judged on."""

from __future__ import annotations

import inspect
import ipaddress

import pytest

from authz_server.attributes import SOURCE_IP, RequestAttributes, normalize_path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("", "/"),
        ("/api/users", "/api/users"),
        ("/api/users/", "/api/users/"),
        # query string and fragment never take part in the path
        ("/admin?x=1", "/admin"),
        ("/admin?next=/public", "/admin"),
        ("/admin#frag", "/admin"),
        ("/admin?q=a#frag", "/admin"),
        # dot segments (RFC 3986 5.2.4)
        ("/api/../admin", "/admin"),
        ("/api/./admin", "/api/admin"),
        ("/a/b/../../admin", "/admin"),
        ("/../admin", "/admin"),
        ("/../../../admin", "/admin"),
        ("/api/..", "/"),
        ("/api/.", "/api/"),
        ("/api/v1/..", "/api/"),
        ("/api/...", "/api/..."),
        ("/api/..hidden", "/api/..hidden"),
        ("/api/.well-known/x", "/api/.well-known/x"),
        ("../admin", "/admin"),
        ("admin", "/admin"),
        # repeated slashes merge
        ("//admin", "/admin"),
        ("/api//admin///x", "/api/admin/x"),
        ("/api/..//admin", "/admin"),
        # percent-encoded unreserved characters are decoded (RFC 3986 6.2.2.2)
        ("/%41dmin", "/Admin"),
        ("/%61dmin", "/admin"),
        ("/%7Euser", "/~user"),
        ("/%7euser", "/~user"),
        ("/a%2Db%5Fc%2E", "/a-b_c."),
        ("/api/%2e%2e/admin", "/admin"),
        ("/api/%2E%2E/admin", "/admin"),
        ("/api/.%2e/admin", "/admin"),
        ("/api/%2e/admin", "/api/admin"),
        ("/%30%39", "/09"),
        # reserved or non-ASCII escapes stay encoded, so an encoded slash is not a separator
        ("/api%2F..%2Fadmin", "/api%2F..%2Fadmin"),
        ("/api%2f..%2fadmin", "/api%2f..%2fadmin"),
        ("/a%20b", "/a%20b"),
        ("/a%3Fb", "/a%3Fb"),
        ("/a%25b", "/a%25b"),
        ("/%252e%252e/admin", "/%252e%252e/admin"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/bad%zz", "/bad%zz"),
        ("/trailing%", "/trailing%"),
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


def test_normalized_path_and_host_are_views_of_the_request() -> None:
    request = RequestAttributes(host="API.Example.COM", path="/x/../Admin?y=1")
    assert request.normalized_path == "/Admin"
    assert request.host_lower == "api.example.com"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/p", {}),
        ("/p?", {}),
        ("/p?a=1&b=two", {"a": ["1"], "b": ["two"]}),
        ("/p?a=1&a=2", {"a": ["1", "2"]}),
        ("/p?token=a%2Eb%20c", {"token": ["a.b c"]}),
        ("/p?flag&x=", {"flag": [""], "x": [""]}),
        ("/p?a=1#b=2", {"a": ["1"]}),
        ("/p?x=1;access_token=t", {"x": ["1"], "access_token": ["t"]}),
        ("/p?a=1;a=2&b=3", {"a": ["1", "2"], "b": ["3"]}),
    ],
)
def test_query_params_keep_every_value_decoded(path: str, expected: dict[str, list[str]]) -> None:
    assert RequestAttributes(path=path).query_params == expected


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("", {}),
        ("session=abc", {"session": ["abc"]}),
        ("a=1; b=2;c=3", {"a": ["1"], "b": ["2"], "c": ["3"]}),
        ("a=1; a=2", {"a": ["1", "2"]}),
        ('jwt="quoted"', {"jwt": ["quoted"]}),
        ("novalue; =x; ok=1", {"ok": ["1"]}),
        ("k=v=w", {"k": ["v=w"]}),
        ("a=1,session=t", {"a": ["1"], "session": ["t"]}),  # two Cookie headers, joined
        ("a=1; session =t", {"a": ["1"], "session": ["t"]}),
        ("  session\t= t ;x=1", {"session": ["t"], "x": ["1"]}),
        ("session=t, session=u", {"session": ["t", "u"]}),
        ("Session=t; SESSION=u", {"session": ["t", "u"]}),  # as ASP.NET matches names
    ],
)
def test_cookies_keep_every_value(cookie: str, expected: dict[str, list[str]]) -> None:
    assert RequestAttributes(headers={"cookie": cookie}).cookies == expected


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("a=1; session=t", set()),
        ("prefs=a,b; session=t", {"prefs"}),
        ("a=1,session=t", {"a", "session"}),
        ("session=t,x=1; b=2", {"session", "x"}),
        ("session =t,", {"session"}),
    ],
)
def test_cookies_beside_a_comma_are_those_upstreams_read_two_ways(
    cookie: str, expected: set[str]
) -> None:
    assert RequestAttributes(headers={"cookie": cookie}).cookies_beside_comma == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/p?a=1&access_token=t", set()),
        ("/p?x=1;access_token=t", {"x", "access_token"}),
        ("/p?access_token=t;x=1&y=2", {"access_token", "x"}),
        ("/p?access%5Ftoken=t;", {"access_token"}),
    ],
)
def test_query_names_beside_a_semicolon_are_those_upstreams_read_two_ways(
    path: str, expected: set[str]
) -> None:
    assert RequestAttributes(path=path).query_names_beside_semicolon == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        (" 10.1.2.3 ", "10.1.2.3"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("", None),
        ("not-an-ip", None),
        ("10.1.2.3:8080", None),
    ],
)
def test_source_and_destination_addresses_parse_or_are_none(raw: str, expected: str | None) -> None:
    request = RequestAttributes(source_ip=raw, destination_ip=raw)
    want = None if expected is None else ipaddress.ip_address(expected)
    assert request.source_address == want
    assert request.destination_address == want


@pytest.mark.parametrize(
    ("xff", "hops", "expected"),
    [
        # no header: the direct peer
        (None, 0, "192.0.2.10"),
        (None, 1, "192.0.2.10"),
        ("", 0, "192.0.2.10"),
        # hops=0: the rightmost entry (appended by our own Envoy); what the client wrote
        # to the left of it is never believed
        ("203.0.113.7", 0, "203.0.113.7"),
        ("6.6.6.6, 203.0.113.7", 0, "203.0.113.7"),
        ("6.6.6.6,203.0.113.7", 0, "203.0.113.7"),
        # hops=1: one trusted proxy appended the rightmost entry; the client is next to it
        ("6.6.6.6, 203.0.113.7, 10.0.0.5", 1, "203.0.113.7"),
        ("203.0.113.7, 10.0.0.5", 1, "203.0.113.7"),
        ("2001:db8::7, 10.0.0.5", 1, "2001:db8::7"),
        # fewer entries than trusted hops + 1: Envoy falls back to the direct peer, never to a
        # client-controlled leftmost entry
        ("6.6.6.6", 1, "192.0.2.10"),
        ("6.6.6.6, 10.0.0.5", 2, "192.0.2.10"),
        # an entry that is not an address: the direct peer too
        ("garbage", 0, "192.0.2.10"),
        ("203.0.113.7, unknown", 0, "192.0.2.10"),
        # empty items are ignored
        ("203.0.113.7, , ", 0, "203.0.113.7"),
    ],
)
def test_remote_address_from_x_forwarded_for(xff: str | None, hops: int, expected: str) -> None:
    headers = {} if xff is None else {"x-forwarded-for": xff}
    request = RequestAttributes(source_ip="192.0.2.10", headers=headers, trusted_proxy_hops=hops)
    assert request.remote_address == ipaddress.ip_address(expected)


def test_remote_address_is_none_without_header_or_peer() -> None:
    assert RequestAttributes().remote_address is None


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("", None),
        (
            "spiffe://cluster.local/ns/foo/sa/bar",
            ("cluster.local/ns/foo/sa/bar", "cluster.local", "foo", "bar"),
        ),
        (
            "cluster.local/ns/foo/sa/bar",
            ("cluster.local/ns/foo/sa/bar", "cluster.local", "foo", "bar"),
        ),
        (
            "spiffe://example.org/ns/prod/sa/api/extra",
            ("example.org/ns/prod/sa/api/extra", "example.org", "prod", "api"),
        ),
        # not Kubernetes-shaped: principal and trust domain only
        ("spiffe://example.org/workload/x", ("example.org/workload/x", "example.org", "", "")),
        ("spiffe://example.org", ("example.org", "example.org", "", "")),
    ],
)
def test_peer_identity_from_spiffe_uri(
    peer: str, expected: tuple[str, str, str, str] | None
) -> None:
    assert RequestAttributes(peer_principal=peer).peer_identity == expected


def test_defaults_are_empty_mappings() -> None:
    request = RequestAttributes()
    assert request.headers == {}
    assert request.context_extensions == {}
    assert request.method == "GET"
    assert request.normalized_path == "/"


def test_the_http_doors_constructor_makes_what_init_makes_with_every_other_field_default() -> None:
    """``of_http`` sets only what the HTTP door knows: every other field must read exactly as
    ``__init__`` leaves it (a field added to ``__init__`` without its class default fails)."""
    headers = {"host": "api.test", "x-forwarded-for": "10.0.0.9"}
    unknown = frozenset({SOURCE_IP})
    fast = RequestAttributes.of_http("POST", "api.test", "/a?b=1", headers, unknown)
    slow = RequestAttributes(
        method="POST", host="api.test", path="/a?b=1", headers=headers, door="http",
        unknown=unknown,
    )  # fmt: skip
    fields = [
        name for name in inspect.signature(RequestAttributes.__init__).parameters if name != "self"
    ]
    assert len(fields) >= 17
    for name in fields:
        assert getattr(fast, name) == getattr(slow, name), name
    assert fast.query_params == {"b": ["1"]} and fast.remote_address == slow.remote_address
    fast.trusted_proxy_hops = 1  # set per Check by the service: on the instance, not the class
    assert RequestAttributes.of_http("GET", "", "/", {}, unknown).trusted_proxy_hops == 0
