"""DPoP proofs (RFC 9449) and certificate binding (RFC 8705): the checks of ``binding``, each
bad proof refused with the check it failed, and the RFCs' worked examples as fixed vectors."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.credentials import binding
from authz_server.credentials.binding import DpopRules, NonceSource
from authz_server.credentials.replay import MemoryReplayCache
from authz_server.errors import AuthenticationError
from authz_server.tools.devkeys import b64url_encode, dpop_proof, generate_key
from tests.certs import CertificateAuthority

NOW = 1_800_000_000.0
URL = "https://api.example.com/orders"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
RULES = DpopRules(algorithms=frozenset({"ES256", "EdDSA", "RS256", "PS256"}), proof_lifetime=60)


def test_rfc7638_worked_example_thumbprint() -> None:
    # RFC 7638 section 3.1: optional members (alg, kid) do not change the thumbprint.
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7"
            "aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXA"
            "rwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7"
            "d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lF"
            "d2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert binding.jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_rfc9449_worked_examples_jkt_and_ath() -> None:
    # RFC 9449 section 4.2's proof key and its cnf.jkt (section 6.1), and the ath of the access
    # token of section 7.1.
    jwk = {
        "kty": "EC",
        "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
        "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA",
        "crv": "P-256",
    }
    assert binding.jwk_thumbprint(jwk) == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    assert (
        binding.access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU")
        == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    )


@pytest.mark.parametrize("kind", ["EC-P256", "Ed25519", "RSA"])
def test_a_good_proof_verifies_and_names_its_keys_thumbprint(kind: str) -> None:
    key = generate_key(kind)
    proof = dpop_proof(key, method="GET", url=URL, access_token=TOKEN, iat=NOW, jti="j1")
    verified = binding.verify_dpop_proof(
        proof,
        method="GET",
        htu=binding.normalize_htu(URL),
        access_token=TOKEN,
        now=NOW,
        rules=RULES,
    )
    assert verified.jkt == key.thumbprint()
    assert verified.jti == "j1"
    binding.check_key_binding(key.thumbprint(), verified)


def _refusal(proof: str, *, method: str = "GET", url: str = URL, now: float = NOW) -> str:
    with pytest.raises(AuthenticationError) as caught:
        binding.verify_dpop_proof(
            proof,
            method=method,
            htu=binding.normalize_htu(url),
            access_token=TOKEN,
            now=now,
            rules=RULES,
        )
    assert caught.value.reason == errors.INVALID_DPOP_PROOF
    assert caught.value.status == 401
    return caught.value.detail


KEY = generate_key("EC-P256")
OTHER = generate_key("EC-P256")


def _proof(**overrides: object) -> str:
    options: dict[str, object] = {"method": "GET", "url": URL, "access_token": TOKEN, "iat": NOW}
    options.update(overrides)
    return dpop_proof(KEY, **options)  # type: ignore[arg-type]


def _signed(header: dict[str, object], claims: dict[str, object], key: object = KEY) -> str:
    return key.sign(claims, headers=header, kid=None)  # type: ignore[attr-defined,no-any-return]


def _hmac_proof(header: dict[str, object], claims: dict[str, object]) -> str:
    signing_input = ".".join(b64url_encode(json.dumps(part).encode()) for part in (header, claims))
    mac = hmac.new(b"k" * 32, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


def _with_header(header: dict[str, object]) -> str:
    """A good proof's payload and signature under another header (checked before the signature)."""
    return b64url_encode(json.dumps(header).encode()) + "." + _proof().split(".", 1)[1]


GOOD_CLAIMS = {
    "jti": "x",
    "htm": "GET",
    "htu": URL,
    "iat": int(NOW),
    "ath": binding.access_token_hash(TOKEN),
}
PUBLIC = {k: v for k, v in KEY.public_jwk().items() if k not in ("kid", "use", "alg")}

BAD_PROOFS: dict[str, tuple[Callable[[], str], str]] = {
    "wrong htm": (lambda: _proof(method="POST"), "'htm'"),
    "other host": (lambda: _proof(url="https://evil.example.com/orders"), "'htu'"),
    "other path": (lambda: _proof(url="https://api.example.com/admin"), "'htu'"),
    "htu with query": (lambda: _proof(url=URL + "?a=1"), "'htu'"),
    "stale iat": (lambda: _proof(iat=NOW - 61), "too old"),
    "future iat": (lambda: _proof(iat=NOW + 5), "future"),
    "wrong ath": (lambda: _proof(access_token="another-token"), "'ath'"),
    "no ath": (lambda: _proof(access_token=None), "'ath'"),
    "symmetric alg": (
        lambda: _hmac_proof(
            {"alg": "HS256", "typ": "dpop+jwt", "jwk": {"kty": "oct", "k": "a2s"}}, GOOD_CLAIMS
        ),
        "'alg'",
    ),
    "alg none": (
        lambda: "eyJhbGciOiJub25lIiwidHlwIjoiZHBvcCtqd3QifQ." + _proof().split(".")[1] + ".",
        "'alg'",
    ),
    "jwk with private members": (
        lambda: _signed({"typ": "dpop+jwt", "jwk": {**PUBLIC, "d": "AAAA"}}, GOOD_CLAIMS),
        "private",
    ),
    "missing typ": (lambda: _signed({"typ": "JWT", "jwk": PUBLIC}, GOOD_CLAIMS), "'typ'"),
    "no jwk": (lambda: _signed({"typ": "dpop+jwt"}, GOOD_CLAIMS), "'jwk'"),
    "signed by another key": (
        lambda: _signed({"typ": "dpop+jwt", "jwk": PUBLIC}, GOOD_CLAIMS, OTHER),
        "signature",
    ),
    "no jti": (
        lambda: _signed(
            {"typ": "dpop+jwt", "jwk": PUBLIC}, {k: v for k, v in GOOD_CLAIMS.items() if k != "jti"}
        ),
        "'jti'",
    ),
    "not a JWS": (lambda: "not.a-proof", "well-formed"),
    "crit header": (
        lambda: _signed({"typ": "dpop+jwt", "jwk": PUBLIC, "crit": ["exp"]}, GOOD_CLAIMS),
        "'crit'",
    ),
    "alg not a string": (lambda: _with_header({"alg": ["ES256"], "typ": "dpop+jwt"}), "'alg'"),
    "empty jti": (
        lambda: _signed({"typ": "dpop+jwt", "jwk": PUBLIC}, {**GOOD_CLAIMS, "jti": ""}),
        "'jti'",
    ),
    "jti one past the limit": (
        lambda: _proof(jti="j" * (binding.MAX_JTI_CHARS + 1)),
        "'jti' is longer",
    ),
    "iat a boolean": (
        lambda: _signed({"typ": "dpop+jwt", "jwk": PUBLIC}, {**GOOD_CLAIMS, "iat": True}),
        "not a number",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PROOFS), ids=list(BAD_PROOFS))
def test_a_bad_proof_is_refused_naming_the_check(case: str) -> None:
    make, words = BAD_PROOFS[case]
    assert words in _refusal(make())


def test_a_proof_by_another_key_than_the_tokens_is_refused() -> None:
    verified = binding.verify_dpop_proof(
        _proof(),
        method="GET",
        htu=binding.normalize_htu(URL),
        access_token=TOKEN,
        now=NOW,
        rules=RULES,
    )
    with pytest.raises(AuthenticationError) as caught:
        binding.check_key_binding(OTHER.thumbprint(), verified)
    assert caught.value.reason == errors.INVALID_DPOP_PROOF


def test_an_algorithm_outside_the_providers_list_is_refused() -> None:
    rules = DpopRules(algorithms=frozenset({"EdDSA"}))
    with pytest.raises(AuthenticationError, match="alg"):
        binding.verify_dpop_proof(
            _proof(),
            method="GET",
            htu=binding.normalize_htu(URL),
            access_token=TOKEN,
            now=NOW,
            rules=rules,
        )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("HTTPS://API.example.com:443/orders", "https://api.example.com/orders"),
        ("http://api.example.com:80/a/./b/../c", "http://api.example.com/a/c"),
        ("https://api.example.com/%7Euser", "https://api.example.com/~user"),
        ("https://api.example.com", "https://api.example.com/"),
    ],
)
def test_htu_compares_after_normalisation(a: str, b: str) -> None:
    assert binding.normalize_htu(a) == binding.normalize_htu(b)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com:8443/orders",
        "http://api.example.com/orders",
        "https://api.example.com/Orders",
    ],
)
def test_htu_differs_by_port_scheme_and_path_case(url: str) -> None:
    assert binding.normalize_htu(url) != binding.normalize_htu(URL)


def test_the_request_uri_drops_the_query_and_takes_the_external_origin() -> None:
    assert binding.request_htu("http", "api:8080", "/orders?x=1") == "http://api:8080/orders"
    assert (
        binding.request_htu("http", "internal:8080", "/orders?x=1", "https://api.example.com")
        == "https://api.example.com/orders"
    )


def test_nonces_are_shared_by_every_process_with_the_secret_and_rotate() -> None:
    one, two = NonceSource(b"s" * 32, period=300), NonceSource(b"s" * 32, period=300)
    nonce = one.current(NOW)
    assert two.accepts(nonce, NOW) and two.accepts(nonce, NOW + 300)
    assert not two.accepts(nonce, NOW + 600)
    assert not NonceSource(b"t" * 32).accepts(nonce, NOW)
    assert not two.accepts(None, NOW)


def test_certificate_binding_matches_the_der_thumbprint_of_the_envoy_certificate() -> None:
    ca = CertificateAuthority()
    mine, other = ca.issue("client-a", server=False), ca.issue("client-b", server=False)
    # Envoy's attributes.source.certificate: the PEM, URL-encoded.
    der = binding.envoy_certificate_der(quote(mine.cert_pem.decode()))
    assert der == x509.load_pem_x509_certificate(mine.cert_pem).public_bytes(
        serialization.Encoding.DER
    )
    bound = binding.certificate_thumbprint(der)
    binding.check_certificate_binding(bound, bound)
    other_der = binding.certificate_der_from_pem(other.cert_pem.decode())
    for presented in (binding.certificate_thumbprint(other_der), None):
        with pytest.raises(AuthenticationError) as caught:
            binding.check_certificate_binding(bound, presented)
        assert caught.value.reason == errors.CERTIFICATE_MISMATCH


def test_cnf_of_the_wrong_shape_is_a_malformed_token() -> None:
    assert binding.token_confirmation({"cnf": {"jkt": "a"}}) == ("a", None)
    assert binding.token_confirmation({}) == (None, None)
    for cnf in ("x", {"jkt": 1}):
        with pytest.raises(AuthenticationError) as caught:
            binding.token_confirmation({"cnf": cnf})
        assert caught.value.reason == errors.MALFORMED_TOKEN


def test_the_proof_key_cache_builds_a_key_once_and_still_checks_every_signature() -> None:
    cache = binding.ProofKeyCache(max_entries=2)

    def verify(proof: str) -> binding.VerifiedProof:
        return binding.verify_dpop_proof(
            proof,
            method="GET",
            htu=binding.normalize_htu(URL),
            access_token=TOKEN,
            now=NOW,
            rules=RULES,
            key_cache=cache,
        )

    assert verify(_proof(jti="a")).jkt == KEY.thumbprint()
    assert verify(_proof(jti="b")).jkt == KEY.thumbprint()
    assert len(cache) == 1
    claims = {
        "jti": "c",
        "htm": "GET",
        "htu": URL,
        "iat": NOW,
        "ath": binding.access_token_hash(TOKEN),
    }
    jwk = {k: v for k, v in KEY.public_jwk().items() if k in ("kty", "crv", "x", "y")}
    # OTHER's signature under KEY's (cached) jwk: refused.
    forged = OTHER.sign(claims, headers={"typ": "dpop+jwt", "jwk": jwk}, kid=None)
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verify(forged)
    # KEY's jwk narrowed to another algorithm: a key of its own, refused.
    narrowed = KEY.sign(
        claims, headers={"typ": "dpop+jwt", "jwk": {**jwk, "alg": "ES384"}}, kid=None
    )
    with pytest.raises(AuthenticationError, match="not a usable public key"):
        verify(narrowed)
    # Bounded: the oldest key goes.
    for key in (generate_key("EC-P256"), generate_key("EC-P256")):
        proof = dpop_proof(key, method="GET", url=URL, access_token=TOKEN, iat=NOW)
        verify(proof)
    assert len(cache) == 2


def test_a_jti_of_the_limit_verifies() -> None:
    jti = "j" * binding.MAX_JTI_CHARS
    verified = binding.verify_dpop_proof(
        _proof(jti=jti),
        method="GET",
        htu=binding.normalize_htu(URL),
        access_token=TOKEN,
        now=NOW,
        rules=RULES,
    )
    assert verified.jti == jti


@pytest.mark.parametrize(
    ("iat", "accepted"),
    [(NOW + 5, True), (NOW + 6, False), (NOW - 65, True), (NOW - 66, False)],
    ids=["skew-ahead", "past-skew-ahead", "lifetime-and-skew-old", "one-second-older"],
)
def test_the_clock_skew_widens_the_proof_window_both_ways_to_the_second(
    iat: float, accepted: bool
) -> None:
    rules = DpopRules(algorithms=RULES.algorithms, proof_lifetime=60, clock_skew=5)

    def verify() -> binding.VerifiedProof:
        return binding.verify_dpop_proof(
            _proof(iat=iat),
            method="GET",
            htu=binding.normalize_htu(URL),
            access_token=TOKEN,
            now=NOW,
            rules=rules,
        )

    if accepted:
        assert verify().iat == iat
    else:
        with pytest.raises(AuthenticationError, match="'iat'"):
            verify()


def test_a_certificate_bound_cnf_is_read_and_a_non_string_thumbprint_is_malformed() -> None:
    # Read under another name, a certificate-bound token would pass as unbound.
    assert binding.token_confirmation({"cnf": {"x5t#S256": "t"}}) == (None, "t")
    assert binding.token_confirmation({"cnf": {"jkt": "a", "x5t#S256": "t"}}) == ("a", "t")
    with pytest.raises(AuthenticationError) as caught:
        binding.token_confirmation({"cnf": {"x5t#S256": 1}})
    assert caught.value.reason == errors.MALFORMED_TOKEN


def test_the_request_uri_keeps_the_https_scheme_and_cuts_at_the_first_query_or_fragment() -> None:
    assert binding.request_htu("https", "api.example.com", "/orders") == URL
    assert binding.request_htu("https", "api.example.com", "/orders?a=1?b") == URL
    assert binding.request_htu("https", "api.example.com", "/orders#a#b") == URL
    assert binding.request_htu("", "api.example.com", "/orders") == "http://api.example.com/orders"


def test_a_nonce_secret_of_16_bytes_is_enough_and_15_is_refused() -> None:
    assert NonceSource(b"s" * 16).current(NOW)
    with pytest.raises(ValueError, match="16 bytes"):
        NonceSource(b"s" * 15)


def test_the_ath_of_a_token_with_non_ascii_bytes_is_a_refusal_not_a_crash() -> None:
    proof = _proof()
    with pytest.raises(AuthenticationError, match="'ath'"):
        binding.verify_dpop_proof(
            proof,
            method="GET",
            htu=binding.normalize_htu(URL),
            access_token="t\u00f6ken",
            now=NOW,
            rules=RULES,
        )


def test_a_proof_stays_in_the_replay_cache_for_as_long_as_it_could_be_accepted() -> None:
    # Lifetime 60 s, skew 5 s: a proof dated NOW is accepted from NOW - 5 (its iat up to the
    # skew ahead) to NOW + 65 (up to lifetime + skew old), 70 s in all. Its jti must still be
    # remembered at the end of that span, or a replay there passes.
    rules = DpopRules(algorithms=RULES.algorithms, proof_lifetime=60, clock_skew=5)
    constraint = binding.SenderConstraint(
        provider="p",
        dpop_mode="required",
        dpop=rules,
        certificate_mode="disabled",
        trust_forwarded_client_cert=False,
    )
    elapsed = [0.0]
    replay = MemoryReplayCache(clock=lambda: elapsed[0])
    request = RequestAttributes(
        method="GET",
        scheme="https",
        host="api.example.com",
        path="/orders",
        headers={"authorization": f"DPoP {TOKEN}", "dpop": _proof()},
    )
    claims = {"cnf": {"jkt": KEY.thumbprint()}}

    def check(now: float) -> None:
        constraint.check(
            claims, token=TOKEN, presented_as_dpop=True, request=request, now=now, replay=replay
        )

    check(NOW - 5)
    elapsed[0] = 70.0
    with pytest.raises(AuthenticationError) as caught:
        check(NOW + 65)
    assert caught.value.reason == errors.DPOP_PROOF_REPLAYED
