"""What the soak sends and what each request must get back.

The identity provider has two signing keys, ``k1`` (published from the start) and ``k2``
(published at the rotation), and the soak holds a third key it never publishes (``stranger``)
for forged signatures and unknown key ids. Every request is built before the run, as the bytes
of an HTTP/1.1 GET, in pools per kind and signing key; a `Phase` says which kinds may be sent
now and which status each one must get, so the expected status of every request is known
before it is sent.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey

ISSUER = "https://idp.soak.test"
AUDIENCE = "orders-api"
HOST = "api.soak.test"

# Share of each kind in the mix (per 100 requests while every kind is sent).
WEIGHTS = {
    "valid": 48,  # a few callers, again and again: token cache hits
    "valid_new": 20,  # many callers cycled through a smaller token cache: misses and evictions
    "refused": 8,  # valid token, a policy refuses it
    "bad_signature": 8,
    "expired": 8,
    "unknown_kid": 4,
    "invoices": 4,  # a path the reload opens: 403 before it, 200 after
    "retired_key": 4,  # signed by k1 after k1 left the key set (sent only then)
}
DESCRIPTIONS = {
    "valid": "valid token, one of a few callers (cache hits), GET /orders/N",
    "valid_new": "valid token, one of many callers cycled past the token cache (misses)",
    "refused": "valid token of a `guest` caller: the ALLOW policy wants group `dev`",
    "bad_signature": "valid claims and kid, signed by a key the IdP never published",
    "expired": "signed by the IdP's key, `exp` an hour ago",
    "unknown_kid": "signed by an unpublished key under a kid the IdP never had",
    "invoices": "valid token, GET /invoices/N: refused until the reload allows it",
    "retired_key": "valid token signed by k1 after the rotation removed k1",
}
# Pool sizes per signing key. The token cache of the soak's configuration holds
# TOKEN_CACHE_ENTRIES: `valid_new` cycles through more callers than that.
TOKEN_CACHE_ENTRIES = 500
POOL_SIZES = {"valid": 50, "valid_new": 800, "refused": 20, "bad_signature": 20, "expired": 20}
UNKNOWN_KIDS = 50


@dataclass(frozen=True)
class Phase:
    """Which keys sign the tokens sent now, and what the kinds that change over the run get.

    ``invoices`` None: GET /invoices is not sent (a reload is under way). ``retired``: k1 has
    left the key set and the server has let it go; k1's tokens are sent and must get 401.
    """

    name: str
    signing: tuple[str, ...]
    invoices: int | None
    retired: bool = False


START = Phase("k1", signing=("k1",), invoices=403)


def expected_status(kind: str, phase: Phase) -> int | None:
    """The status a request of ``kind`` must get in ``phase``; None: not sent in ``phase``."""
    if kind in ("valid", "valid_new"):
        return 200
    if kind == "refused":
        return 403
    if kind in ("bad_signature", "expired", "unknown_kid"):
        return 401
    if kind == "invoices":
        return phase.invoices
    if kind == "retired_key":
        return 401 if phase.retired else None
    raise ValueError(f"unknown kind {kind!r}")


def _request(path: str, token: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
        "User-Agent: authz-soak\r\n\r\n"
    ).encode("ascii")


@dataclass
class Idp:
    """The identity provider's keys and every request of the run, prebuilt."""

    keys: dict[str, SigningKey]
    stranger: SigningKey
    # (kind, kid) -> requests; unknown_kid's pool is under kid "".
    pools: dict[tuple[str, str], list[bytes]] = field(default_factory=dict)

    @classmethod
    def create(cls, now: float, lifetime_s: float) -> Idp:
        """Keys k1 and k2 (ES256), and requests whose valid tokens live ``lifetime_s``."""
        keys = {kid: devkeys.generate_key("EC-P256", kid=kid) for kid in ("k1", "k2")}
        idp = cls(keys, devkeys.generate_key("EC-P256", kid="stranger"))
        exp = int(now + lifetime_s)
        for kid, key in keys.items():
            for kind, size in POOL_SIZES.items():
                idp.pools[kind, kid] = [
                    idp._build(kind, kid, key, index=index, now=int(now), exp=exp)
                    for index in range(size)
                ]
            idp.pools["invoices", kid] = [
                _request(f"/invoices/{index}", _token(key, f"user-{index}", ["dev"], now, exp))
                for index in range(POOL_SIZES["valid"])
            ]
        idp.pools["unknown_kid", ""] = [
            _request(
                f"/orders/{index}",
                idp.stranger.sign(
                    _claims(f"user-{index}", ["dev"], now, exp), kid=f"unknown-{index}"
                ),
            )
            for index in range(UNKNOWN_KIDS)
        ]
        return idp

    def _build(
        self, kind: str, kid: str, key: SigningKey, *, index: int, now: int, exp: int
    ) -> bytes:
        path = f"/orders/{index % 100}"
        if kind == "valid":
            return _request(path, _token(key, f"user-{index}", ["dev"], now, exp))
        if kind == "valid_new":
            return _request(path, _token(key, f"new-{index}", ["dev"], now, exp))
        if kind == "refused":
            return _request(path, _token(key, f"guest-{index}", ["guest"], now, exp))
        if kind == "bad_signature":
            claims = _claims(f"user-{index}", ["dev"], now, exp)
            return _request(path, self.stranger.sign(claims, kid=kid))
        if kind == "expired":
            return _request(path, _token(key, f"user-{index}", ["dev"], now - 7200, now - 3600))
        raise ValueError(f"no pool for kind {kind!r}")

    def jwks(self, *kids: str) -> dict[str, list[dict[str, str]]]:
        """The JWK Set publishing the public halves of ``kids``."""
        return devkeys.jwks(*(self.keys[kid] for kid in kids))

    def probe(self, kind: str, kid: str) -> bytes:
        """One request of ``kind`` signed by ``kid`` (its pool's first) for the driver's probes."""
        return self.pools[kind, kid][0]


def _claims(sub: str, groups: list[str], iat: float, exp: int) -> dict[str, object]:
    return {
        "iss": ISSUER,
        "sub": sub,
        "aud": AUDIENCE,
        "iat": int(iat),
        "exp": exp,
        "groups": groups,
        "scope": "orders:read",
    }


def _token(key: SigningKey, sub: str, groups: list[str], iat: float, exp: int) -> str:
    return key.sign(_claims(sub, groups, iat, exp))


class Mix:
    """Picks the next request: kinds in a shuffled deck of `WEIGHTS` (seeded, so two runs send
    the same sequence), skipping the kinds ``phase`` does not send; each kind's pool in turn,
    alternating between the signing keys of the phase."""

    def __init__(self, idp: Idp, seed: int = 11) -> None:
        deck = [kind for kind, weight in WEIGHTS.items() for _ in range(weight)]
        random.Random(seed).shuffle(deck)  # noqa: S311 (the same order every run; no secret)
        self._idp = idp
        self._deck: Iterator[str] = itertools.cycle(deck)
        self._turns: dict[tuple[str, str], int] = {}
        self._key_turn = 0

    def pick(self, phase: Phase) -> tuple[str, bytes, int]:
        """(kind, request bytes, expected status) of the next request to send in ``phase``."""
        while True:
            kind = next(self._deck)
            expected = expected_status(kind, phase)
            if expected is not None:
                return kind, self._next_request(kind, phase), expected

    def _next_request(self, kind: str, phase: Phase) -> bytes:
        if kind == "unknown_kid":
            kid = ""
        elif kind == "retired_key":
            kind, kid = "valid", "k1"
        else:
            self._key_turn += 1
            kid = phase.signing[self._key_turn % len(phase.signing)]
        pool = self._idp.pools[kind, kid]
        turn = self._turns.get((kind, kid), 0)
        self._turns[kind, kid] = turn + 1
        return pool[turn % len(pool)]
