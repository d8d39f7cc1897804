"""API keys: a keys file of SHA-256 hashes (a mounted Secret), each with a ``sub`` and claims.

The file::

    keys:
      - sub: partner-acme
        sha256: <hex SHA-256 of the key>
        claims: {scope: "orders.read", groups: [partners]}
        expires: 2027-06-30T00:00:00Z            # optional

A presented key is hashed and its digest looked up; the key itself is never kept, logged or
compared by prefix. ``ApiKeyTable`` is the loaded file, one prebuilt ``Identity`` per key.
``ApiKeysFileSource`` is its source for the key-set lifecycle of ``jwks.JWKSCache``: re-read
when the file changes, a bad file keeps the last good table (counted and logged there).
``new_key`` makes a key for ``authz-server apikey new``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from authz_server import errors
from authz_server.errors import AuthenticationError
from authz_server.identity import DEFAULT_SPACE_DELIMITED, Identity
from authz_server.keys.keyset import JWKSCache, KeySet

# A presented key outside these bounds, or with anything but visible ASCII, is malformed:
# refused before hashing, and never looked up.
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 512
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# Claims a keys file may not set: they are the key's identity, given by `sub` and the provider.
_RESERVED_CLAIMS = frozenset({"sub", "iss", "exp"})
KEY_BYTES = 32  # 256 bits


class KeysFileError(ValueError):
    """A keys file was refused; ``problems`` lists (field path, what is wrong)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in problems))


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One issued key: its digest and the identity it stands for."""

    digest: bytes
    identity: Identity
    expires: float | None


@dataclass(frozen=True)
class ApiKeyTable(KeySet):
    """The keys of one provider, by SHA-256 digest. Holds no verification keys."""

    by_digest: Mapping[bytes, ApiKey] = field(default_factory=dict)
    may_be_empty: ClassVar[bool] = True

    def reusing(self, previous: KeySet | None) -> KeySet:
        return self

    @property
    def summary(self) -> str:
        return f"{len(self.by_digest)} API key(s)"

    def lookup(self, key: str, now: float) -> Identity:
        """The identity of the presented ``key``.

        Raises AuthenticationError: ``malformed_api_key`` (not a plausible key),
        ``unknown_api_key``, ``api_key_expired``."""
        if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS or not _VISIBLE_ASCII.fullmatch(key):
            raise AuthenticationError(
                errors.MALFORMED_API_KEY,
                f"an API key is {MIN_KEY_CHARS}-{MAX_KEY_CHARS} visible ASCII characters",
            )
        digest = hashlib.sha256(key.encode("ascii")).digest()
        entry = self.by_digest.get(digest)
        # NOTE: the dict finds the entry by the digest; the compare is constant-time anyway, so
        # that no code path ever compares key material by prefix.
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise AuthenticationError(errors.UNKNOWN_API_KEY, "no such API key")
        if entry.expires is not None and now >= entry.expires:
            raise AuthenticationError(errors.API_KEY_EXPIRED, "the API key has expired")
        return entry.identity

    def validity(self, key: str, identity: Identity, keys: JWKSCache) -> ApiKeyValidity | None:
        """The validity of ``identity``, given by ``lookup(key)`` on this table, the one
        ``keys`` holds; None if the key is not this table's (or gave another identity)."""
        entry = self.by_digest.get(hashlib.sha256(key.encode("ascii", "replace")).digest())
        if entry is None or entry.identity is not identity or keys.keyset is not self:
            return None
        return ApiKeyValidity(keys, self, entry.expires)


class ApiKeyValidity:
    """What keeps a decision resting on an API key valid (``decision_memo.CredentialValidity``):
    the table that knew the key is still the one its provider's key cache holds (a reload of
    the keys file publishes a new table, dropping or keeping the key: decided afresh), and the
    key's ``expires`` has not come."""

    __slots__ = ("expires", "keys", "table")

    def __init__(self, keys: JWKSCache, table: ApiKeyTable, expires: float | None) -> None:
        self.keys = keys
        self.table = table
        self.expires = expires

    def live(self, now: float) -> bool:
        """Whether ``lookup`` at ``now`` would give the key's identity from the same table."""
        expires = self.expires
        return self.keys.keyset is self.table and (expires is None or now < expires)

    def reused(self) -> None:
        """Nothing to count: a lookup has no cache."""


def _expiry(value: object) -> float:
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, str):
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    else:
        raise ValueError("expected a date-time like 2027-06-30T00:00:00Z")
    if moment.tzinfo is None:
        raise ValueError("needs a time zone (Z for UTC): 2027-06-30T00:00:00Z")
    return moment.timestamp()


def parse_keys_file(
    raw: bytes,
    *,
    provider: str,
    issuer: str,
    space_delimited: frozenset[str] = DEFAULT_SPACE_DELIMITED,
) -> ApiKeyTable:
    """The table of a keys file's bytes, its identities made for ``provider``/``issuer``.

    Raises KeysFileError naming every problem (field path, what is wrong): the whole file is
    refused, so that a half-read file never drops keys silently."""
    try:
        body = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise KeysFileError([("", f"not valid YAML: {exc}")]) from None
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        raise KeysFileError([("", "expected a mapping with a `keys` list")])
    unknown = sorted(str(k) for k in body if k != "keys")
    problems: list[tuple[str, str]] = [(k, "unknown field") for k in unknown]
    by_digest: dict[bytes, ApiKey] = {}
    first_at: dict[bytes, int] = {}
    for index, entry in enumerate(body["keys"]):
        where = f"keys[{index}]"
        if not isinstance(entry, dict):
            problems.append((where, "must be a mapping with sub and sha256"))
            continue
        problems.extend(
            (f"{where}.{k}", "unknown field")
            for k in sorted(map(str, entry))
            if k not in ("sub", "sha256", "claims", "expires")
        )
        sub, sha, claims = entry.get("sub"), entry.get("sha256"), entry.get("claims", {})
        if not isinstance(sub, str) or not sub:
            problems.append((f"{where}.sub", "required: a non-empty string"))
        if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
            problems.append((f"{where}.sha256", "required: the key's SHA-256 as 64 hex digits"))
            sha = None
        if not isinstance(claims, dict) or not all(isinstance(k, str) for k in claims):
            problems.append((f"{where}.claims", "must be a mapping of claim names to values"))
            claims = {}
        reserved = sorted(_RESERVED_CLAIMS.intersection(claims))
        if reserved:
            problems.append(
                (f"{where}.claims", f"{', '.join(reserved)} cannot be set here (use sub/expires)")
            )
        expires: float | None = None
        if entry.get("expires") is not None:
            try:
                expires = _expiry(entry["expires"])
            except ValueError as exc:
                problems.append((f"{where}.expires", str(exc)))
        if sha is None or not isinstance(sub, str) or not sub:
            continue
        digest = bytes.fromhex(sha)
        if digest in first_at:
            # One key, two identities: which one a request gets would be a guess.
            problems.append(
                (f"{where}.sha256", f"duplicate: the same key as keys[{first_at[digest]}]")
            )
            continue
        first_at[digest] = index
        payload: dict[str, Any] = {**claims, "iss": issuer, "sub": sub}
        if expires is not None:
            payload["exp"] = int(expires)
        aud = payload.get("aud")
        audiences: tuple[str, ...] = ()
        if isinstance(aud, str):
            audiences = (aud,)
        elif isinstance(aud, list):
            audiences = tuple(a for a in aud if isinstance(a, str))
        by_digest[digest] = ApiKey(
            digest=digest,
            identity=Identity(
                provider=provider,
                issuer=issuer,
                subject=sub,
                claims=payload,
                audiences=audiences,
                presenter=None,
                payload_segment="",
                space_delimited=space_delimited,
                credential="apiKey",
            ),
            expires=expires,
        )
    if problems:
        raise KeysFileError(problems)
    return ApiKeyTable(keys=(), by_digest=by_digest)


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)  # follows the ..data symlink a Secret mount swaps
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ApiKeysFileSource:
    """A keys file as a ``jwks.KeySource``: loads an ``ApiKeyTable``; polled for changes."""

    remote = True  # re-read in the background (it is a mounted Secret that changes)
    watched = True

    def __init__(
        self,
        path: Path,
        *,
        provider: str,
        issuer: str,
        space_delimited: frozenset[str] = DEFAULT_SPACE_DELIMITED,
    ) -> None:
        self.path = path
        self.description = str(path)
        self.provider = provider
        self.issuer = issuer
        self.space_delimited = space_delimited
        self._loaded: tuple[int, int, int] | None = None

    def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]:
        """The file's table. Raises OSError or KeysFileError (the cache keeps the last good)."""
        self._loaded = _file_signature(self.path)  # a broken file is retried when it changes
        table = parse_keys_file(
            self.path.read_bytes(),
            provider=self.provider,
            issuer=self.issuer,
            space_delimited=self.space_delimited,
        )
        return table, None

    def changed(self) -> bool:
        return _file_signature(self.path) != self._loaded


def new_key() -> str:
    """A new random API key: 256 bits, URL-safe base64 without padding (43 characters)."""
    return secrets.token_urlsafe(KEY_BYTES)


def key_digest(key: str) -> str:
    """The hex SHA-256 of ``key``, as the keys file holds it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_entry(sub: str, key: str, claims: Mapping[str, Any], expires: str | None = None) -> str:
    """The keys-file entry for ``key`` (YAML, a list item to paste under ``keys:``)."""
    entry: dict[str, Any] = {"sub": sub, "sha256": key_digest(key)}
    if claims:
        entry["claims"] = dict(claims)
    if expires:
        entry["expires"] = expires
    return yaml.safe_dump([entry], sort_keys=False, default_flow_style=False)
