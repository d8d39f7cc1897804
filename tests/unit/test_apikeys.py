"""API keys: the keys file, its reload, and keys deciding requests like tokens do."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.credentials import apikeys
from authz_server.credentials.apikeys import ApiKeysFileSource, KeysFileError, parse_keys_file
from authz_server.errors import AuthenticationError, ConfigError
from authz_server.service import AuthorizationService, Engine
from authz_server.tools.devkeys import SigningKey
from tests.helpers import Clock, write_config
from tests.unit.test_service import provider_yaml

ISSUER = "apikeys.example.com"
ACME_KEY = "acme-key-0123456789abcdefghijklmnopqrstuv"
OTHER_KEY = "other-key-0123456789abcdefghijklmnopqrstu"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = f"""
keys:
  - sub: partner-acme
    sha256: {sha(ACME_KEY)}
    claims: {{scope: "orders.read orders.list", groups: [partners]}}
  - sub: partner-old
    sha256: {sha(OTHER_KEY)}
    expires: 2020-01-01T00:00:00Z
"""

CONFIG = f"""apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: partner-keys
    issuer: {ISSUER}
    apiKeys: {{file: keys.yaml}}
    fromHeaders: [{{name: x-api-key}}]
    outputClaimToHeaders:
      - {{header: x-partner, claim: sub}}
      - {{header: x-groups, claim: groups}}
policies:
  - name: partners-read
    rules:
      - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
        when: [{{key: "request.auth.claims[scope]", values: ["orders.read"]}}]
"""


def make(tmp_path: Path, clock: Clock, text: str = CONFIG, keys: str = KEYS) -> Engine:
    (tmp_path / "keys.yaml").write_text(keys)
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    return engine


def get(**headers: str) -> RequestAttributes:
    return RequestAttributes(
        method="GET",
        path="/orders",
        host="api.test",
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


def test_a_known_key_is_allowed_with_its_claims_as_headers_and_the_key_stripped(
    tmp_path: Path, clock: Clock
) -> None:
    service = AuthorizationService(make(tmp_path, clock))
    decision = service.check(get(x_api_key=ACME_KEY, x_partner="spoofed"))
    assert decision.allowed, decision.reason
    assert dict(decision.headers_to_set) == {"x-partner": "partner-acme", "x-groups": "partners"}
    assert "x-api-key" in decision.headers_to_remove
    assert decision.principal == f"{ISSUER}/partner-acme"
    assert decision.provider == "partner-keys"


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("unknown-key-0123456789abcdefghijklmnop", errors.UNKNOWN_API_KEY),
        (OTHER_KEY, errors.API_KEY_EXPIRED),
        ("short", errors.MALFORMED_API_KEY),
        ("key with spaces 0123456789abcdef", errors.MALFORMED_API_KEY),
        # Compared whole, never by prefix: the key with a character more or less is unknown.
        (ACME_KEY[:-1], errors.UNKNOWN_API_KEY),
        (ACME_KEY + "x", errors.UNKNOWN_API_KEY),
    ],
)
def test_unknown_expired_and_malformed_keys_are_401_with_their_reason(
    tmp_path: Path, clock: Clock, key: str, reason: str
) -> None:
    decision = AuthorizationService(make(tmp_path, clock)).check(get(x_api_key=key))
    assert (decision.status, decision.reason) == (401, reason)
    www = dict(decision.response_headers)["www-authenticate"]
    assert 'error="invalid_token"' in www and key not in www


def test_a_key_in_a_header_the_provider_does_not_read_is_ignored(
    tmp_path: Path, clock: Clock
) -> None:
    decision = AuthorizationService(make(tmp_path, clock)).check(
        get(authorization=f"Bearer {ACME_KEY}")
    )
    assert (decision.status, decision.reason) == (401, errors.MISSING_CREDENTIALS)


def test_an_api_key_and_a_jwt_share_a_header_each_verified_by_its_kind(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    head, policies = CONFIG.replace("fromHeaders: [{name: x-api-key}]", "").split("policies:")
    text = head + provider_yaml(rsa_key) + "policies:" + policies
    text += '      - from: [{source: {requestPrincipals: ["*"]}}]\n'
    service = AuthorizationService(make(tmp_path, clock, text))
    by_key = service.check(get(authorization=f"Bearer {ACME_KEY}"))
    assert by_key.allowed and by_key.principal == f"{ISSUER}/partner-acme"
    by_jwt = service.check(get(authorization=f"Bearer {make_token()}"))
    assert by_jwt.allowed and by_jwt.provider == "main"
    # A JWT-looking token that is not a JWT is no JWT error: it is an unknown key.
    fake = service.check(get(authorization="Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.abc"))
    assert (fake.status, fake.reason) == (401, errors.UNKNOWN_API_KEY)
    # A JWT of our issuer that fails verification stays a JWT failure.
    forged = make_token()[:-4] + "AAAA"
    assert service.check(get(authorization=f"Bearer {forged}")).reason == errors.INVALID_SIGNATURE


def test_two_different_credentials_in_one_request_are_ambiguous(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    text = (
        CONFIG.split("policies:", maxsplit=1)[0]
        + provider_yaml(rsa_key)
        + "policies: [{name: any, rules: [{}]}]\n"
    )
    service = AuthorizationService(make(tmp_path, clock, text))
    decision = service.check(get(x_api_key=ACME_KEY, authorization=f"Bearer {make_token()}"))
    assert (decision.status, decision.reason) == (401, errors.AMBIGUOUS_CREDENTIALS)


def test_the_keys_file_is_reread_when_it_changes_and_a_bad_one_keeps_the_last_good_keys(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make(tmp_path, clock)
    service = AuthorizationService(engine)
    cache = engine.caches["partner-keys"]
    keys_file = tmp_path / "keys.yaml"
    new_key = apikeys.new_key()
    keys_file.write_text(KEYS + f"  - sub: partner-new\n    sha256: {sha(new_key)}\n")
    os.utime(keys_file, ns=(1, 1))  # a new signature even within one mtime tick
    assert cache.source.changed()
    cache.tick()
    assert service.check(get(x_api_key=new_key)).principal == f"{ISSUER}/partner-new"
    failures = cache.fetches["failure"]
    with caplog.at_level(logging.WARNING):
        keys_file.write_text(KEYS + f"  - sub: dup\n    sha256: {sha(ACME_KEY)}\n")
        os.utime(keys_file, ns=(2, 2))
        cache.tick()
    assert cache.fetches["failure"] == failures + 1
    assert "duplicate" in caplog.text and ACME_KEY not in caplog.text
    # The last good keys still answer.
    assert service.check(get(x_api_key=new_key)).principal == f"{ISSUER}/partner-new"
    assert service.check(get(x_api_key=ACME_KEY)).principal == f"{ISSUER}/partner-acme"


def test_a_keys_file_with_a_duplicate_hash_is_refused_naming_both_entries() -> None:
    raw = (
        f"keys:\n  - {{sub: a, sha256: {sha(ACME_KEY)}}}\n"
        f"  - {{sub: b, sha256: {sha(ACME_KEY).upper()}}}\n"  # one key, however spelt
    )
    with pytest.raises(KeysFileError) as caught:
        parse_keys_file(raw.encode(), provider="p", issuer=ISSUER)
    assert caught.value.problems == [("keys[1].sha256", "duplicate: the same key as keys[0]")]


@pytest.mark.parametrize(
    ("entry", "where", "says"),
    [
        ("{sub: a, sha256: abc}", "keys[0].sha256", "64 hex digits"),
        ("{sha256: " + "a" * 64 + "}", "keys[0].sub", "required"),
        ("{sub: a, sha256: " + "a" * 64 + ", claims: {sub: b}}", "keys[0].claims", "sub"),
        (
            "{sub: a, sha256: " + "a" * 64 + ", expires: 2027-01-01T00:00:00}",
            "keys[0].expires",
            "time zone",
        ),
        ("{sub: a, sha256: " + "a" * 64 + ", key: plaintext}", "keys[0].key", "unknown field"),
    ],
)
def test_a_bad_keys_file_is_refused_at_load_with_the_place_of_each_problem(
    tmp_path: Path, entry: str, where: str, says: str
) -> None:
    (tmp_path / "keys.yaml").write_text(f"keys:\n  - {entry}\n")
    with pytest.raises(ConfigError) as caught:
        config.load(write_config(tmp_path, CONFIG))
    [problem] = caught.value.problems
    assert problem.path == "providers[0].apiKeys.file"
    assert where in problem.message and says in problem.message


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("    jwksUri: https://idp.example.com/jwks\n", "remove jwksUri"),
        ("    audiences: [x]\n", "checks no audiences"),
        ("    outputPayloadToHeader: x-payload\n", "remove outputPayloadToHeader"),
    ],
)
def test_an_api_keys_provider_with_jwt_fields_is_refused(
    tmp_path: Path, extra: str, says: str
) -> None:
    (tmp_path / "keys.yaml").write_text(KEYS)
    text = CONFIG.replace("    apiKeys:", extra + "    apiKeys:")
    with pytest.raises(ConfigError) as caught:
        config.load(write_config(tmp_path, text))
    assert any(says in p.message and p.path == "providers[0]" for p in caught.value.problems)


def test_two_api_keys_providers_reading_one_header_are_refused(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(KEYS)
    second = """  - name: more-keys
    issuer: other.example.com
    apiKeys: {file: keys.yaml}
    fromHeaders: [{name: X-Api-Key}]
"""
    text = CONFIG.replace("policies:", second + "policies:")
    with pytest.raises(ConfigError) as caught:
        config.load(write_config(tmp_path, text))
    [problem] = caught.value.problems
    assert problem.path == "providers[1]" and "'x-api-key'" in problem.message


def test_new_key_is_256_bits_url_safe_and_its_entry_loads(tmp_path: Path) -> None:
    key = apikeys.new_key()
    assert len(key) == 43 and all(c.isalnum() or c in "-_" for c in key)
    assert apikeys.new_key() != key
    entry = apikeys.key_entry("partner", key, {"groups": ["a"]}, "2030-01-01T00:00:00Z")
    assert key not in entry
    table = parse_keys_file(("keys:\n" + entry).encode(), provider="p", issuer=ISSUER)
    assert table.lookup(key, 0.0).claims["groups"] == ["a"]


def test_the_source_reads_the_file_it_names(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(KEYS)
    table, _ = ApiKeysFileSource(path, provider="p", issuer=ISSUER).load(frozenset(), "x")
    assert isinstance(table, apikeys.ApiKeyTable) and len(table.by_digest) == 2


def test_apikey_new_prints_the_key_once_and_an_entry_holding_only_its_hash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from authz_server import cli

    assert cli.main(["apikey", "new", "--sub", "acme", "--claim", 'groups=["partners"]']) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert len(key) == 43 and key not in err
    table = parse_keys_file(
        f"keys:\n{err.split(':', 1)[1].split(chr(10), 1)[1]}".encode(), provider="p", issuer=ISSUER
    )
    assert table.lookup(key, 0.0).principal == f"{ISSUER}/acme"
    assert cli.main(["apikey", "new", "--sub", "acme", "--claim", "iss=x"]) == 2
    assert capsys.readouterr().out == ""


def test_an_api_key_meets_dry_run_audit_presence_and_twin_removal_as_a_jwt_does(
    tmp_path: Path, clock: Clock
) -> None:
    text = (
        CONFIG.replace(
            "    fromHeaders: [{name: x-api-key}]",
            "    fromHeaders: [{name: x-api-key}]\n    presence: REQUIRED",
        )
        + f"""  - name: would-block-acme
    action: DENY
    dryRun: true
    rules: [{{from: [{{source: {{requestPrincipals: ["{ISSUER}/partner-acme"]}}}}]}}]
  - name: watch-partners
    action: AUDIT
    rules: [{{when: [{{key: "request.auth.claims[groups]", values: [partners]}}]}}]
"""
    )
    service = AuthorizationService(make(tmp_path, clock, text))
    decision = service.check(get(x_api_key=ACME_KEY))
    assert decision.allowed and decision.policy == "partners-read"
    assert decision.dry_run == (("would-block-acme", "deny"),)
    assert decision.audited == ("watch-partners",)
    assert {"x-api-key", "x_api_key", "x_partner"} <= set(decision.headers_to_remove)
    missing = service.check(get())
    assert (missing.status, missing.reason) == (401, errors.MISSING_CREDENTIALS)


def test_the_keys_file_is_among_the_files_a_reload_watches(tmp_path: Path) -> None:
    # A configuration refused for a keys file not there yet is tried again when it appears.
    referenced: list[Path] = []
    with pytest.raises(ConfigError):
        config.load(write_config(tmp_path, CONFIG), referenced=referenced)
    assert tmp_path / "keys.yaml" in referenced


def _table_of(*keys: str, expires: str | None = None) -> apikeys.ApiKeyTable:
    entries = "".join(
        f"  - sub: s{i}\n    sha256: {sha(key)}\n"
        + (f"    expires: {expires}\n" if expires else "")
        for i, key in enumerate(keys)
    )
    return parse_keys_file(f"keys:\n{entries}".encode(), provider="p", issuer=ISSUER)


def test_keys_of_the_shortest_and_longest_lengths_are_looked_up_and_one_past_is_malformed() -> None:
    shortest, longest = "k" * apikeys.MIN_KEY_CHARS, "k" * apikeys.MAX_KEY_CHARS
    table = _table_of(shortest, longest)
    assert table.lookup(shortest, 0).claims["sub"] == "s0"
    assert table.lookup(longest, 0).claims["sub"] == "s1"
    for key in (shortest[1:], longest + "k"):
        with pytest.raises(AuthenticationError) as caught:
            table.lookup(key, 0)
        assert caught.value.reason == errors.MALFORMED_API_KEY


def test_a_key_is_refused_from_the_second_it_expires() -> None:
    key = "k" * 20
    table = _table_of(key, expires="2027-06-30T00:00:00Z")
    at = 1_814_313_600.0  # 2027-06-30T00:00:00Z
    assert table.lookup(key, at - 1).claims["sub"] == "s0"
    with pytest.raises(AuthenticationError) as caught:
        table.lookup(key, at)
    assert caught.value.reason == errors.API_KEY_EXPIRED


def test_the_entry_printed_for_a_new_key_keeps_its_expiry() -> None:
    key = apikeys.new_key()
    entry = apikeys.key_entry("s0", key, {}, expires="2027-06-30T00:00:00Z")
    table = parse_keys_file(b"keys:\n" + entry.encode(), provider="p", issuer=ISSUER)
    with pytest.raises(AuthenticationError) as caught:
        table.lookup(key, 1_814_313_600.0)
    assert caught.value.reason == errors.API_KEY_EXPIRED


@pytest.mark.parametrize(
    "body", [b"{}", b"keys: 3", b"- a\n- b\n"], ids=["no-keys", "not-list", "list"]
)
def test_a_keys_file_without_a_keys_list_is_refused_saying_so(body: bytes) -> None:
    with pytest.raises(KeysFileError, match="`keys` list"):
        parse_keys_file(body, provider="p", issuer=ISSUER)


def test_a_keys_identity_carries_its_issuer_subject_expiry_and_audiences_as_claims() -> None:
    # A policy reads them as a token's claims: a DENY on one of them must see it.
    one, two = "a" * 20, "b" * 20
    body = (
        f"keys:\n  - sub: s1\n    sha256: {sha(one)}\n    expires: 2027-06-30T00:00:00Z\n"
        f"    claims: {{aud: [orders, 3, billing]}}\n"
        f"  - sub: s2\n    sha256: {sha(two)}\n    claims: {{aud: orders}}\n"
    )
    table = parse_keys_file(body.encode(), provider="p", issuer=ISSUER)
    first = table.lookup(one, 0)
    assert (first.claims["iss"], first.claims["sub"]) == (ISSUER, "s1")
    assert first.claims["exp"] == 1_814_313_600
    assert first.audiences == ("orders", "billing")
    assert table.lookup(two, 0).audiences == ("orders",)


def test_a_keys_file_names_every_bad_entry_not_only_the_first() -> None:
    good = sha("g" * 20)
    body = (
        "keys:\n"
        "  - not-a-mapping\n"
        f"  - {{sub: '', sha256: {sha('c' * 20)}}}\n"
        f"  - {{sub: 7, sha256: {sha('d' * 20)}}}\n"
        f"  - {{sub: s4, sha256: {good}}}\n"
        f"  - {{sub: s5, sha256: {good}}}\n"
        f"  - {{sub: s6, sha256: {sha('e' * 20)}, claims: [a, b]}}\n"
        f"  - {{sub: s7, sha256: {sha('f' * 20)}, claims: text}}\n"
        "  - {sub: s8, sha256: not-hex}\n"
    )
    with pytest.raises(KeysFileError) as caught:
        parse_keys_file(body.encode(), provider="p", issuer=ISSUER)
    assert [path for path, _ in caught.value.problems] == [
        "keys[0]",
        "keys[1].sub",
        "keys[2].sub",
        "keys[4].sha256",
        "keys[5].claims",
        "keys[6].claims",
        "keys[7].sha256",
    ]
