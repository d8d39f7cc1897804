"""The token attack catalogue, decided by the real decision core with real keys: every forged,
confused or malformed token gets a 401 with its reason, never an allow, never an exception.

Each case is a request an attacker can send; the expected reason is what a client sees in the
JSON body and in `WWW-Authenticate`. test_attacks_e2e.py sends a sample of them through a real
Envoy to both doors.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import b64url_encode
from tests.e2e.harness import JWKSServer
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config

NOT_UTF8 = bytes([0xFF, 0xFE])
# The order of the group of P-256: a signature value r or s must be in [1, n-1].
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def segment(obj: object) -> str:
    return b64url_encode(json.dumps(obj, separators=(",", ":")).encode())


def raw_token(header: object, payload: object, signature: bytes = b"sig") -> str:
    return f"{segment(header)}.{segment(payload)}.{b64url_encode(signature)}"


def hs_token(alg: str, secret: bytes, claims: dict[str, object], kid: str) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{segment({'alg': alg, 'kid': kid})}.{segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


class World:
    """Two keys the provider trusts (RSA and EC P-256), one Ed25519 key, and a decision core."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.rsa = devkeys.generate_key("RSA", kid="rsa")
        self.ec = devkeys.generate_key("EC-P256", kid="ec")
        self.ed = devkeys.generate_key("Ed25519", kid="ed")
        self.attacker = devkeys.generate_key("RSA", kid="rsa")  # the same kid, another key
        jwks = json.dumps(json.dumps(devkeys.jwks(self.rsa, self.ec, self.ed)))
        text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {jwks}
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
policies:
  - name: signed-in
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
        engine = Engine.build(config.load(write_config(tmp_path, text)), clock=self.clock)
        for cache in engine.caches.values():
            assert cache.refresh()
        self.service = AuthorizationService(engine)

    def claims(self, **overrides: object) -> dict[str, object]:
        return claims_for(self.clock.now, **overrides)

    def check(self, token: str) -> tuple[int, str]:
        decision = self.service.check(
            RequestAttributes(
                method="GET", path="/api", headers={"authorization": f"Bearer {token}"}
            )
        )
        return decision.status, decision.reason


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("attacks"))


def _pem(world: World) -> bytes:
    return world.rsa.public_pem()


def _der(world: World) -> bytes:
    key = serialization.load_pem_public_key(world.rsa.public_pem())
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ec_signature(world: World, r: int, s: int, size: int = 32) -> str:
    signing_input = f"{segment({'alg': 'ES256', 'kid': 'ec'})}.{segment(world.claims())}"
    return f"{signing_input}.{b64url_encode(r.to_bytes(size, 'big') + s.to_bytes(size, 'big'))}"


def _ec_der(world: World) -> str:
    signing_input = f"{segment({'alg': 'ES256', 'kid': 'ec'})}.{segment(world.claims())}"
    private = world.ec.private_key
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    from cryptography.hazmat.primitives import hashes

    der = private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    assert utils.decode_dss_signature(der)  # DER: a SEQUENCE of two INTEGERs, not 64 bytes
    assert len(der) != 64
    return f"{signing_input}.{b64url_encode(der)}"


def _with_signature(token: str, change: Callable[[bytes], bytes]) -> str:
    head, _, signature = token.rpartition(".")
    return f"{head}.{b64url_encode(change(devkeys.b64url_decode(signature)))}"


def _flip(data: bytes) -> bytes:
    return data[:10] + bytes([data[10] ^ 0x01]) + data[11:]


Case = tuple[str, Callable[[World], str], str]

CASES: list[Case] = [
    # --- alg none, in every spelling
    *[
        (f"alg {alg!r}", lambda w, a=alg: raw_token({"alg": a}, w.claims(), b""), "unsupported_algorithm")
        for alg in ("none", "None", "NONE", "nOnE")
    ],
    ("alg none with a signature", lambda w: raw_token({"alg": "none", "kid": "rsa"}, w.claims()), "unsupported_algorithm"),
    ("alg missing", lambda w: raw_token({"kid": "rsa"}, w.claims()), "unsupported_algorithm"),
    ("alg a number", lambda w: raw_token({"alg": 256, "kid": "rsa"}, w.claims()), "unsupported_algorithm"),
    # --- HMAC with the public key as the secret (key confusion)
    *[
        (f"{alg} with the RSA public key as {form}", lambda w, a=alg, f=make: hs_token(a, f(w), w.claims(), "rsa"), "unsupported_algorithm")
        for alg in ("HS256", "HS384", "HS512")
        for form, make in (
            ("PEM", _pem),
            ("DER", _der),
            ("JWK", lambda w: json.dumps(w.rsa.public_jwk()).encode()),
        )
    ],
    # --- alg that does not fit the key, or outside the allow-list
    ("ES256 header on the RSA key", lambda w: w.rsa.sign(w.claims(), alg="RS256", headers={"alg": "ES256"}), "unsupported_algorithm"),
    ("RS256 header on the EC key", lambda w: w.ec.sign(w.claims(), alg="ES256", headers={"alg": "RS256"}), "unsupported_algorithm"),
    ("EdDSA header on the RSA key", lambda w: raw_token({"alg": "EdDSA", "kid": "rsa"}, w.claims()), "unsupported_algorithm"),
    ("HS256 not in the allow-list", lambda w: hs_token("HS256", b"x" * 32, w.claims(), "nokid"), "unsupported_algorithm"),
    # --- keys the token brings along (never trusted, never fetched: see the e2e test)
    ("embedded jwk of the attacker", lambda w: w.attacker.sign(w.claims(), headers={"jwk": w.attacker.public_jwk()}), "invalid_signature"),
    ("x5c chain", lambda w: w.attacker.sign(w.claims(), headers={"x5c": ["MIIBIjAN"]}), "invalid_signature"),
    # --- kid games
    *[
        (f"kid {name}", lambda w, k=kid: w.attacker.sign(w.claims(), kid=k), reason)
        for name, kid, reason in (
            ("path traversal", "../../../../etc/passwd", "unknown_kid"),
            ("SQL", "' OR '1'='1' --", "unknown_kid"),
            ("shell", "$(reboot); `id`", "unknown_kid"),
            ("4 KB", "k" * 4096, "unknown_kid"),
            ("10 KB (past maxTokenBytes)", "k" * 10_240, "malformed_token"),
            ("NUL byte", "rsa\x00", "unknown_kid"),
        )
    ],
    *[
        (f"kid {name}", lambda w, k=kid: w.attacker.sign(w.claims(), headers={"kid": k}), "malformed_token")
        for name, kid in (("a number", 5), ("an object", {"a": 1}), ("a list", ["rsa"]), ("true", True))
    ],
    ("kid null", lambda w: w.attacker.sign(w.claims(), headers={"kid": None}), "invalid_signature"),
    # --- ECDSA signature values
    ("ES256 r = s = 0", lambda w: _ec_signature(w, 0, 0), "invalid_signature"),
    ("ES256 r = n", lambda w: _ec_signature(w, P256_N, 1), "invalid_signature"),
    ("ES256 s = n", lambda w: _ec_signature(w, 1, P256_N), "invalid_signature"),
    ("ES256 r, s >= 2^256", lambda w: _ec_signature(w, 2**256 - 1, 2**256 - 1), "invalid_signature"),
    ("ES256 DER instead of r||s", _ec_der, "invalid_signature"),
    ("ES256 truncated", lambda w: _with_signature(w.ec.sign(w.claims()), lambda b: b[:-1]), "invalid_signature"),
    ("ES256 padded", lambda w: _with_signature(w.ec.sign(w.claims()), lambda b: b + b"\x00"), "invalid_signature"),
    ("ES256 in 66-byte halves", lambda w: _ec_signature(w, 1, 1, 66), "invalid_signature"),
    # --- RSA and EdDSA signatures
    ("RS256 truncated", lambda w: _with_signature(w.rsa.sign(w.claims()), lambda b: b[:-2]), "invalid_signature"),
    ("RS256 stripped", lambda w: w.rsa.sign(w.claims()).rpartition(".")[0] + ".", "invalid_signature"),
    ("RS256 bit flipped", lambda w: _with_signature(w.rsa.sign(w.claims()), _flip), "invalid_signature"),
    ("RS256 by another key, same kid", lambda w: w.attacker.sign(w.claims()), "invalid_signature"),
    ("EdDSA 63 bytes", lambda w: _with_signature(w.ed.sign(w.claims()), lambda b: b[:-1]), "invalid_signature"),
    ("EdDSA 65 bytes", lambda w: _with_signature(w.ed.sign(w.claims()), lambda b: b + b"\x00"), "invalid_signature"),
    # --- malformed structure
    ("two segments", lambda w: w.rsa.sign(w.claims()).rpartition(".")[0], "malformed_token"),
    ("four segments", lambda w: w.rsa.sign(w.claims()) + ".x", "malformed_token"),
    ("a JWE (five segments)", lambda w: "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d", "malformed_token"),
    ("not base64url", lambda w: "e30.!!!.c2ln", "malformed_token"),
    ("base64 padding", lambda w: w.rsa.sign(w.claims()).replace(".", "=.", 1), "malformed_token"),
    ("whitespace inside", lambda w: w.rsa.sign(w.claims()).replace(".", ". ", 1), "malformed_token"),
    ("non-UTF-8 payload", lambda w: segment({"alg": "RS256"}) + "." + b64url_encode(NOT_UTF8) + ".c2ln", "malformed_token"),
    ("payload a JSON array", lambda w: raw_token({"alg": "RS256", "kid": "rsa"}, [1, 2]), "malformed_token"),
    ("payload a JSON string", lambda w: raw_token({"alg": "RS256", "kid": "rsa"}, "sub"), "malformed_token"),
    ("header a JSON number", lambda w: raw_token(7, w.claims()), "malformed_token"),
    ("10k-deep nesting", lambda w: f"{segment({'alg': 'RS256'})}.{b64url_encode(b'[' * 10_000 + b']' * 10_000)}.c2ln", "malformed_token"),
    ("crit header", lambda w: w.rsa.sign(w.claims(), headers={"crit": ["exp"]}), "malformed_token"),
    ("oversized (past maxTokenBytes)", lambda w: w.rsa.sign(w.claims(pad="x" * 9000)), "malformed_token"),
    # --- claims of the wrong type or value, signed for real
    *[
        (f"{claim} {label}", lambda w, c=claim, v=value: w.rsa.sign(w.claims(**{c: v})), "malformed_token")
        for claim in ("exp", "nbf", "iat")
        for label, value in (("a string", "2000000000"), ("true", True), ("1e308", 1e308), ("a list", [1]))
    ],
    ("exp negative", lambda w: w.rsa.sign(w.claims(exp=-1)), "token_expired"),
    ("exp a float in the past", lambda w: w.rsa.sign(w.claims(exp=w.clock.now - 3600.5)), "token_expired"),
    ("aud an empty list", lambda w: w.rsa.sign(w.claims(aud=[])), "invalid_audience"),
    ("aud a number", lambda w: w.rsa.sign(w.claims(aud=7)), "malformed_token"),
    ("aud another audience", lambda w: w.rsa.sign(w.claims(aud="someone-else")), "invalid_audience"),
    ("iss with a trailing slash", lambda w: w.rsa.sign(w.claims(iss=ISSUER + "/")), "invalid_issuer"),
    ("iss in upper case", lambda w: w.rsa.sign(w.claims(iss=ISSUER.upper())), "invalid_issuer"),
    ("iss missing", lambda w: w.rsa.sign({k: v for k, v in w.claims().items() if k != "iss"}), "invalid_issuer"),
    ("cty JWT (a nested token)", lambda w: w.rsa.sign(w.claims(), headers={"cty": "JWT"}), "allowed"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "reason"), CASES, ids=[c[0] for c in CASES])
def test_every_attack_is_refused_with_its_reason(
    world: World,
    case: str,
    make: Callable[[World], str],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = make(world)
    status, got = world.check(token)
    if reason == "allowed":
        # A `cty: JWT` header is only a hint: the payload is still this signed JSON object,
        # never a token inside to be unwrapped and trusted.
        assert (status, got) == (200, "allowed")
    else:
        assert (status, got) == (401, reason), case
    assert not [r for r in caplog.records if r.exc_info], "no traceback for an attack"


def test_duplicate_keys_in_a_signed_payload_are_malformed(world: World) -> None:
    # Parsers disagree on which of two `sub` keys wins: a signed token must mean one thing.
    header = segment({"alg": "RS256", "kid": "rsa"})
    body = json.dumps(world.claims())[:-1] + ', "sub": "admin"}'
    token = world.rsa.sign(world.claims())  # for its shape only
    private = world.rsa.private_key
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    assert isinstance(private, rsa.RSAPrivateKey)
    signing_input = f"{header}.{b64url_encode(body.encode())}"
    signature = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    token = f"{signing_input}.{b64url_encode(signature)}"
    assert world.check(token) == (401, "malformed_token")


def test_jku_and_x5u_are_never_fetched(world: World) -> None:
    with JWKSServer(devkeys.jwks(world.attacker)) as lure:
        for header in ({"jku": lure.jwks_url}, {"x5u": lure.jwks_url}):
            token = world.attacker.sign(world.claims(), headers=header)
            assert world.check(token) == (401, "invalid_signature")
        assert lure.fetch_count() == 0
