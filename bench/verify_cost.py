"""Cold-path cost of one JWT verification next to a minimal cryptography-only verification.

For RS256, ES256 and EdDSA, all in one run, per-call CPU (time.process_time, best of --rounds
rounds of --calls calls; every round runs each variant once, in turn, A/B/A/B, since the
machine is noisy):
  cold        TokenVerifier.verify without a cache: decode, header checks, key lookup,
              signature, claims
  minimal     the same token with cryptography alone: split, base64url-decode the signature,
              public_key.verify with the key object built once (ES256: r||s -> DER with
              encode_dss_signature), plus json.loads of the payload
  ratio       cold / minimal (issue 3's target: <= 1.3)
  hit         TokenVerifier.verify with a TokenCache, same token (digest, LRU get, time checks)
  check-hit   AuthorizationService.check on RequestAttributes, the token in the cache
  check-miss  the same, never cached: that service has tokenCache.maxEntries 1 and alternates
              two tokens, so every Check digests, misses, verifies, stores and evicts
--breakdown adds the parts of the cold path, each timed alone: decode_segments, the key's
verify function (python-jose's key object for RS256/ES256) on pre-decoded input, the bare
public_key.verify on the same input, and _check_claims.
--profile runs cProfile over --calls RS256 cold verifications and prints the top functions.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import json
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import AUDIENCE, ISSUER, Variant, bench_config, interleaved
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from authz_server import config, devkeys
from authz_server.attributes import RequestAttributes
from authz_server.config import Provider
from authz_server.service import AuthorizationService, Engine, make_cache
from authz_server.specs import ProviderSpec
from authz_server.token_cache import TokenCache
from authz_server.tokens import ProviderRuntime, TokenVerifier, decode_segments

KINDS = {"RS256": "RSA", "ES256": "EC-P256", "EdDSA": "Ed25519"}


def claims(sub: str = "alice") -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "sub": sub,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 3600,
        "groups": ["dev"],
    }


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def runtime(key: devkeys.SigningKey) -> ProviderRuntime:
    """A provider with an inline JWKS, loaded (as tests/unit/test_tokens.py builds one)."""
    spec = ProviderSpec(issuer=ISSUER, audiences=[AUDIENCE], jwks=json.dumps(devkeys.jwks(key)))
    provider = Provider(spec=spec, name="bench", origin="bench")
    cache = make_cache(provider)
    assert cache.refresh()
    return ProviderRuntime.build(provider, cache)


def minimal_verifier(key: devkeys.SigningKey, alg: str, token: str) -> Callable[[], object]:
    """cryptography alone: split, decode the signature, verify, json.loads the payload."""
    public: Any = key.private_key.public_key()
    if alg == "RS256":
        pad, digest = padding.PKCS1v15(), hashes.SHA256()

        def check(data: bytes, sig: bytes) -> None:
            public.verify(sig, data, pad, digest)

    elif alg == "ES256":
        ecdsa = ec.ECDSA(hashes.SHA256())

        def check(data: bytes, sig: bytes) -> None:
            if len(sig) != 64:
                raise ValueError("bad ES256 signature length")
            der = encode_dss_signature(
                int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            )
            public.verify(der, data, ecdsa)

    else:

        def check(data: bytes, sig: bytes) -> None:
            public.verify(sig, data)

    def minimal() -> object:
        signing_input, _, sig_segment = token.rpartition(".")
        check(signing_input.encode("ascii"), b64url_decode(sig_segment))
        return json.loads(b64url_decode(signing_input.partition(".")[2]))

    return minimal


def breakdown(
    alg: str, key: devkeys.SigningKey, token: str, provider: ProviderRuntime
) -> list[Variant]:
    """The parts of the cold path, each alone, on input decoded once."""
    verifier = TokenVerifier()
    header, payload, segments = decode_segments(token)
    keyset = provider.keys.keyset
    assert keyset is not None
    ours = keyset.by_kid[header["kid"]].verifiers[alg]
    data = f"{segments[0]}.{segments[1]}".encode("ascii")
    sig = b64url_decode(segments[2])
    public: Any = key.private_key.public_key()
    if alg == "RS256":
        pad, digest = padding.PKCS1v15(), hashes.SHA256()

        def raw() -> object:
            return public.verify(sig, data, pad, digest)

    elif alg == "ES256":
        ecdsa = ec.ECDSA(hashes.SHA256())
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))

        def raw() -> object:
            return public.verify(der, data, ecdsa)

    else:

        def raw() -> object:
            return public.verify(sig, data)

    assert ours(data, sig)
    return [
        ("  decode_segments", lambda: decode_segments(token)),
        ("  key verify fn", lambda: ours(data, sig)),
        ("  bare verify", raw),
        ("  _check_claims", lambda: verifier._check_claims(provider, payload, segments[1])),
    ]


def services(tmp: Path, key: devkeys.SigningKey, tag: str) -> dict[str, AuthorizationService]:
    """A Check service whose cache keeps the token ("hit") and one that never does ("miss")."""
    jwks_file = tmp / f"jwks-{tag}.json"
    jwks_file.write_text(json.dumps(devkeys.jwks(key)))
    out = {}
    for name, max_entries in (("hit", 10_000), ("miss", 1)):
        path = tmp / f"config-{tag}-{name}.yaml"
        text = bench_config(
            server=f"{{tokenCache: {{maxEntries: {max_entries}}}}}", jwks_file=jwks_file.name
        )
        path.write_text(text)
        engine = Engine.build(config.load(path))
        for cache in engine.caches.values():
            assert cache.refresh()
        out[name] = AuthorizationService(engine)
    return out


def request_for(token: str) -> Callable[[], RequestAttributes]:
    headers = {"authorization": f"Bearer {token}", "user-agent": "bench", "x-request-id": "abc"}

    def make() -> RequestAttributes:
        return RequestAttributes(
            method="GET", host="api.bench", path="/api/orders?page=2", headers=headers
        )

    return make


def bench_alg(
    alg: str, tmp: Path, args: argparse.Namespace
) -> tuple[dict[str, float], list[Variant]]:
    key = devkeys.generate_key(KINDS[alg], kid=f"bench-{alg}")
    token = key.sign(claims())
    other = key.sign(claims("bob"))
    provider = runtime(key)
    providers = [provider]  # one list: the token cache is scoped by id(providers)

    cold_verifier = TokenVerifier()
    hit_verifier = TokenVerifier(cache=TokenCache())
    minimal = minimal_verifier(key, alg, token)
    assert cold_verifier.verify(token, providers).subject == "alice"
    assert minimal()["sub"] == "alice"  # type: ignore[index]
    hit_verifier.verify(token, providers)

    svc = services(tmp, key, alg)
    hit_request, miss_requests = request_for(token), (request_for(token), request_for(other))
    assert svc["hit"].check(hit_request()).allowed
    flip = [0]

    def check_miss() -> object:
        flip[0] ^= 1
        return svc["miss"].check(miss_requests[flip[0]]())

    for _ in range(4):
        assert check_miss().allowed  # type: ignore[attr-defined]
    misses = svc["miss"].engine.token_cache.misses

    variants: list[Variant] = [
        ("cold", lambda: cold_verifier.verify(token, providers)),
        ("minimal", minimal),
        ("hit", lambda: hit_verifier.verify(token, providers)),
        ("check-hit", lambda: svc["hit"].check(hit_request())),
        ("check-miss", check_miss),
    ]
    if args.breakdown:
        variants += breakdown(alg, key, token, provider)
    best = interleaved(variants, args.calls, args.rounds)
    miss_cache = svc["miss"].engine.token_cache
    assert miss_cache.hits == 0 and miss_cache.misses > misses, "check-miss must always miss"
    return best, variants


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.calls < 1 or args.rounds < 1:
        parser.error("--calls and --rounds must be positive")

    print(f"us CPU per call, best of {args.rounds} rounds x {args.calls} calls, interleaved")
    columns = ("cold", 7), ("minimal", 8), ("ratio", 6), ("hit", 6), ("chk-hit", 8), ("chk-miss", 9)
    print(f"{'alg':<6} " + " ".join(f"{name:>{width}}" for name, width in columns))
    with tempfile.TemporaryDirectory() as tmp:
        details: list[tuple[str, dict[str, float]]] = []
        for alg in KINDS:
            best, _ = bench_alg(alg, Path(tmp), args)
            us = {name: value * 1e6 for name, value in best.items()}
            print(
                f"{alg:<6} {us['cold']:7.1f} {us['minimal']:8.1f} "
                f"{us['cold'] / us['minimal']:6.2f} {us['hit']:6.1f} "
                f"{us['check-hit']:8.1f} {us['check-miss']:9.1f}"
            )
            details.append((alg, us))
        if args.breakdown:
            print("breakdown (each part alone, us CPU per call):")
            for alg, us in details:
                parts = "  ".join(f"{n.strip()} {v:.1f}" for n, v in us.items() if n[0] == " ")
                print(f"{alg:<6} {parts}")
        if args.profile:
            key = devkeys.generate_key("RSA", kid="bench-profile")
            token = key.sign(claims())
            providers = [runtime(key)]
            verifier = TokenVerifier()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                verifier.verify(token, providers)
            profiler.disable()
            print(f"cProfile, RS256 cold path, {args.calls} calls:")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
