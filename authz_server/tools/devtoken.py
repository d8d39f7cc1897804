"""``authz-server token``: a development tool to try a configuration with tokens of one's own.

``init_keys`` makes a key pair in a directory (the private key as PEM, readable by its owner
only, and the public half as a JWKS file a provider's ``jwksFile`` can point at);
``provider_document`` is the configuration that trusts it; ``mint`` signs a token with the
claims asked for, bound to a DPoP key or a client certificate when asked (``confirmation``);
``dpop_proof`` makes the proof a DPoP request carries. Signing is `devkeys`' (``cryptography``
alone).

NOT for production: the private key is written unencrypted, nothing rotates it, and anyone
who can read the file can mint tokens the configuration accepts.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from authz_server.credentials import binding
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey

__all__ = [
    "DEFAULT_DIR",
    "DEFAULT_ISSUER",
    "ISSUER_FILE",
    "JWKS_FILE",
    "KINDS",
    "PRIVATE_KEY_FILE",
    "DevKeyFiles",
    "DevTokenError",
    "confirmation",
    "dpop_proof",
    "init_keys",
    "load_signing_key",
    "mint",
    "parse_claims",
    "provider_document",
    "record_issuer",
    "recorded_issuer",
]

# What `--kind` accepts: the key kinds the server verifies with their default algorithm
# (RSA 2048 → RS256, EC P-256 → ES256, Ed25519 → EdDSA).
KINDS = {"RSA": "RSA", "EC": "EC-P256", "Ed25519": "Ed25519"}
PRIVATE_KEY_FILE = "private.pem"
JWKS_FILE = "jwks.json"
# The issuer `token init` printed the provider with, so that `token mint` signs for it unless
# told otherwise (one place to say it, not two that must agree).
ISSUER_FILE = "issuer.txt"
# Where `token init` writes and `token mint` reads when no directory is given.
DEFAULT_DIR = Path("dev-keys")
# NOTE: `.invalid` is reserved (RFC 2606): this issuer can never be a real identity provider.
DEFAULT_ISSUER = "https://dev-issuer.invalid"
# Members of a public JWK that identify the key itself (RFC 7638), not its metadata.
_KEY_MEMBERS = ("kty", "crv", "n", "e", "x", "y")


class DevTokenError(Exception):
    """A request the tool cannot carry out; the message says what to change."""


@dataclass(frozen=True)
class DevKeyFiles:
    """Where ``init_keys`` put the key pair, and the kid tokens name."""

    private_key: Path
    jwks: Path
    kid: str


def init_keys(
    directory: Path, *, kind: str = "RSA", kid: str | None = None, force: bool = False
) -> DevKeyFiles:
    """Make a key pair of ``kind`` (a key of `KINDS`) in ``directory``.

    Writes ``private.pem`` (mode 0600) and ``jwks.json`` (the public key only). Returns the
    absolute paths and the kid (the key's RFC 7638 thumbprint unless ``kid`` is given).
    Raises DevTokenError on an unknown kind, or if the files exist and ``force`` is false
    (replacing a key silently would invalidate every token minted with it).
    """
    if kind not in KINDS:
        raise DevTokenError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kid is not None and not kid.strip():
        raise DevTokenError("--kid must not be empty")
    directory = directory.resolve()
    private_path, jwks_path = directory / PRIVATE_KEY_FILE, directory / JWKS_FILE
    existing = [p for p in (private_path, jwks_path) if p.exists()]
    if existing and not force:
        raise DevTokenError(
            f"{existing[0]} already exists: tokens minted with that key would stop verifying; "
            "choose another --dir, or pass --force to replace the key"
        )
    key = devkeys.generate_key(KINDS[kind], kid=kid)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in existing:
        path.unlink()
    # NOTE: created with mode 0600 in one step, so the key is never readable by others, not
    # even for the moment between a write and a chmod.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_pem())
    jwks_path.write_text(json.dumps(devkeys.jwks(key), indent=2) + "\n")
    return DevKeyFiles(private_key=private_path, jwks=jwks_path, kid=key.kid)


def provider_document(files: DevKeyFiles, issuer: str = DEFAULT_ISSUER, name: str = "dev") -> str:
    """An AuthzConfig document (YAML with explanatory comments) whose one provider trusts the
    key in ``files``: save it beside your policies, or paste the provider into your own."""
    document = {
        "apiVersion": "authz-server/v1",
        "kind": "AuthzConfig",
        "providers": [{"name": name, "issuer": issuer, "jwksFile": str(files.jwks)}],
    }
    mint_command = shlex.join(
        ("authz-server", "token", "mint", "--key", str(files.private_key.parent),
         "--sub", "alice", "--claim", 'groups=["admin"]')
    )  # fmt: skip
    return (
        "# Development keys from `authz-server token init`: NOT for production.\n"
        f"# Private key (keep it to yourself): {files.private_key}\n"
        f"# Public key set (what the server reads): {files.jwks} (kid {files.kid})\n"
        "# Save this document next to your policies (a directory of *.yaml files is one\n"
        "# configuration), or paste the provider into the `providers:` of your AuthzConfig.\n"
        + yaml.safe_dump(document, sort_keys=False)
        + f"# Then mint a token (for issuer {issuer}, recorded beside the key):\n"
        f"#   {mint_command}\n"
    )


def record_issuer(files: DevKeyFiles, issuer: str) -> None:
    """Write ``issuer`` beside the key, for ``token mint`` to sign for by default."""
    (files.private_key.parent / ISSUER_FILE).write_text(issuer + "\n")


def recorded_issuer(key_path: Path) -> str:
    """The issuer ``token init`` recorded beside the key at ``key_path`` (a PEM file or its
    directory). Raises DevTokenError when there is none, saying to pass --issuer."""
    directory = key_path if key_path.is_dir() else key_path.parent
    try:
        issuer = (directory / ISSUER_FILE).read_text().strip()
    except OSError:
        issuer = ""
    if not issuer:
        raise DevTokenError(
            f"--issuer: none given and no {ISSUER_FILE} beside the key in {directory} "
            "(`token init` writes it): pass --issuer, the provider's issuer"
        )
    return issuer


def load_signing_key(path: Path, kid: str | None = None, flag: str = "--key") -> SigningKey:
    """The private key at ``path`` (a PEM file, or a directory holding ``private.pem``).

    Its kid is ``kid`` if given; else the kid the key has in the ``jwks.json`` beside it, so
    that tokens name the key the server knows; else its RFC 7638 thumbprint. Raises
    DevTokenError if the file is missing or is not an unencrypted private key.
    """
    if path.is_dir():
        path = path / PRIVATE_KEY_FILE
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise DevTokenError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    try:
        key = devkeys.load_pem_key(pem)
    except (ValueError, TypeError) as exc:
        raise DevTokenError(f"{flag} {path}: not an unencrypted PEM private key ({exc})") from None
    chosen = kid or _kid_in_key_set(key, path.parent / JWKS_FILE)
    return SigningKey(kind=key.kind, kid=chosen or key.kid, private_key=key.private_key)


def _kid_in_key_set(key: SigningKey, jwks_path: Path) -> str | None:
    try:
        keys = json.loads(jwks_path.read_text()).get("keys", [])
    except (OSError, ValueError, AttributeError):
        return None
    ours = {m: v for m, v in key.public_jwk().items() if m in _KEY_MEMBERS}
    for jwk in keys if isinstance(keys, list) else []:
        if isinstance(jwk, dict) and {m: jwk.get(m) for m in ours} == ours:
            kid = jwk.get("kid")
            return kid if isinstance(kid, str) and kid else None
    return None


def parse_claims(pairs: Iterable[str]) -> dict[str, Any]:
    """``["k=v", ...]`` → claims. A value that parses as JSON is that JSON (``true``, ``42``,
    ``["a","b"]``, ``{"x":1}``, ``"42"`` for the string), anything else is the string itself;
    ``null`` removes the claim (e.g. ``exp=null`` for a token without expiry). Raises
    DevTokenError on a pair without ``=`` or an empty name."""
    claims: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise DevTokenError(f"--claim {pair!r}: expected NAME=VALUE, e.g. groups='[\"admin\"]'")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        claims[name.strip()] = value
    return claims


def mint(
    key: SigningKey,
    *,
    issuer: str,
    subject: str | None = None,
    audiences: Iterable[str] = (),
    claims: Mapping[str, Any] | None = None,
    ttl: float = 3600.0,
    alg: str | None = None,
    now: float | None = None,
) -> str:
    """A signed token: ``iss``, ``sub`` (if given), ``aud`` (one audience as a string, several
    as a list), ``iat`` now and ``exp`` ``ttl`` seconds later; ``claims`` are applied last, so
    they may replace any of these, and a ``None`` value removes one. Raises DevTokenError if
    ``alg`` does not fit the key."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {"iss": issuer}
    if subject is not None:
        payload["sub"] = subject
    audience_list = list(audiences)
    if audience_list:
        payload["aud"] = audience_list[0] if len(audience_list) == 1 else audience_list
    payload["iat"] = issued
    payload["exp"] = issued + int(ttl)
    for name, value in (claims or {}).items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    try:
        return key.sign(payload, alg=alg)
    except ValueError as exc:
        raise DevTokenError(f"--alg {alg}: {exc}") from None


def confirmation(
    dpop_key: SigningKey | None = None, certificate_file: Path | None = None
) -> dict[str, str]:
    """The ``cnf`` claim (RFC 7800) binding a token to ``dpop_key`` (``jkt``: its RFC 7638
    thumbprint, RFC 9449) and/or to the certificate in ``certificate_file`` (``x5t#S256``:
    SHA-256 of its DER, RFC 8705). Raises DevTokenError for an unreadable certificate."""
    cnf: dict[str, str] = {}
    if dpop_key is not None:
        cnf["jkt"] = dpop_key.thumbprint()
    if certificate_file is not None:
        try:
            der = binding.certificate_der_from_pem(certificate_file.read_text())
        except OSError as exc:
            raise DevTokenError(
                f"--cert-file {certificate_file}: cannot read it ({exc.strerror})"
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise DevTokenError(f"--cert-file {certificate_file}: {exc}") from None
        cnf["x5t#S256"] = binding.certificate_thumbprint(der)
    return cnf


def dpop_proof(key: SigningKey, *, method: str, url: str, token: str | None = None) -> str:
    """A DPoP proof (RFC 9449 4.2) signed with ``key`` for ``method`` and ``url`` (absolute,
    without query or fragment), issued now, with ``ath`` of ``token`` when given. Raises
    DevTokenError for a URL a server would not compare."""
    try:
        binding.normalize_htu(url)
    except ValueError as exc:
        raise DevTokenError(
            f"--url {url!r}: {exc} (the proof's htu is the URL without it)"
        ) from None
    return devkeys.dpop_proof(key, method=method.upper(), url=url, access_token=token)
