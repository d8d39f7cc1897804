"""TLS on the gRPC listener: the PEM files read and checked, and server credentials that
re-read them when they change on disk.

``read_material`` checks the files (each certificate and key parses, the key matches the
certificate) and raises ``TlsFileError`` naming the file that is wrong. ``CertificateReloader``
hands grpcio a fetcher it calls before every TLS handshake: a few ``stat`` calls say whether a
file changed (its inode, size or times, so the atomic ``..data`` symlink swap of a Kubernetes
Secret volume counts), and only then are the files read again. A new set that fails the checks
is logged and the last good one stays in force; connections already open are never touched.
Every listener sharing the files (the gRPC port, the Explain API's own port) has a fetcher of
its own: a new set read at a handshake on one listener is handed to each of the others at its
next handshake, so no port keeps a retired certificate or client CA.
Nothing here logs key material.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("authz_server.tls")

__all__ = ["CertificateReloader", "TlsFileError", "TlsFiles", "TlsMaterial", "read_material"]


@dataclass(frozen=True)
class TlsFiles:
    """Where the listener's certificate chain, private key and (mTLS) client CA bundle are."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate signed by the client CA."""
        return self.client_ca_file is not None


class TlsFileError(ValueError):
    """The TLS files cannot be used. ``problems`` holds (attribute of TlsFiles, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{name}: {message}" for name, message in problems))


@dataclass(frozen=True, repr=False)
class TlsMaterial:
    """The PEM bytes handed to grpcio, and what a log line may say about them."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    serial: int
    not_after: str

    def __repr__(self) -> str:  # never the key
        return f"TlsMaterial(serial={self.serial:x}, not_after={self.not_after})"

    def describe(self) -> str:
        """For log lines: which certificate this is."""
        return f"certificate serial {self.serial:x}, valid until {self.not_after}"


def _read(path: Path, name: str, problems: list[tuple[str, str]]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        problems.append((name, f"cannot read {path}: {exc.strerror or exc}"))
        return None


def _certificates(
    data: bytes, path: Path, name: str, problems: list[tuple[str, str]]
) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        problems.append(
            (name, f"{path} holds no PEM certificate (expected '-----BEGIN CERTIFICATE-----')")
        )
        return []


def _private_key(
    data: bytes, path: Path, problems: list[tuple[str, str]]
) -> PrivateKeyTypes | None:
    # NOTE: messages are ours, never the library's: nothing of the key may reach a log.
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        problems.append(("key_file", f"{path} is encrypted: give the key without a passphrase"))
    except (ValueError, UnsupportedAlgorithm):
        problems.append(
            (
                "key_file",
                f"{path} holds no usable PEM private key "
                "(expected '-----BEGIN ... PRIVATE KEY-----')",
            )
        )
    return None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def read_material(files: TlsFiles) -> TlsMaterial:
    """Read and check the files. Returns TlsMaterial; raises TlsFileError listing every problem
    (unreadable, not PEM, an encrypted key, a key that does not match the certificate)."""
    problems: list[tuple[str, str]] = []
    cert_pem = _read(files.cert_file, "cert_file", problems)
    key_pem = _read(files.key_file, "key_file", problems)
    ca_pem = (
        _read(files.client_ca_file, "client_ca_file", problems)
        if files.client_ca_file is not None
        else None
    )
    chain = (
        _certificates(cert_pem, files.cert_file, "cert_file", problems)
        if cert_pem is not None
        else []
    )
    key = _private_key(key_pem, files.key_file, problems) if key_pem is not None else None
    if chain and key is not None and _spki(chain[0].public_key()) != _spki(key.public_key()):
        problems.append(
            (
                "key_file",
                f"{files.key_file} does not match the certificate in {files.cert_file} "
                "(the first certificate of the chain must be the key's)",
            )
        )
    if ca_pem is not None and files.client_ca_file is not None:
        _certificates(ca_pem, files.client_ca_file, "client_ca_file", problems)
    if problems or cert_pem is None or key_pem is None:
        raise TlsFileError(problems)
    leaf = chain[0]
    return TlsMaterial(
        cert_chain=cert_pem,
        private_key=key_pem,
        client_ca=ca_pem,
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc.isoformat(),
    )


# What says a file changed: device, inode (a symlink swap points at a new file), size, and
# modification and change times (an in-place rewrite). None: the file cannot be stat'ed.
_Stamp = tuple[int, int, int, int, int] | None


def _stamp(path: Path | None) -> _Stamp:
    if path is None:
        return None
    try:
        st = os.stat(path)  # follows symlinks: the ..data swap shows as a new inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stamps(files: TlsFiles) -> tuple[_Stamp, ...]:
    return (_stamp(files.cert_file), _stamp(files.key_file), _stamp(files.client_ca_file))


class _ListenerFetcher:
    """What one listener was handed: grpcio asks ``fetch`` before each of its handshakes."""

    def __init__(self, reloader: CertificateReloader, generation: int) -> None:
        self._reloader = reloader
        self._generation = generation  # of the material this listener serves

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The configuration of material newer than this listener's (read now if the files
        changed), else None (keep the current). Never raises: grpcio would fail the handshake."""
        try:
            generation, material = self._reloader.current()
            if generation == self._generation:
                return None
            self._generation = generation
            return CertificateReloader._configuration(material)
        except Exception:  # a bug here must not take the listener down
            log.error(
                "TLS files: unexpected error while checking them; keeping the current certificate",
                exc_info=True,
            )
            return None


class CertificateReloader:
    """The TLS files of one or more listeners: ``credentials`` gives each listener a fetcher
    that grpcio asks before each handshake, which returns new material when the files changed
    and pass the checks (once per listener), else None (keep the current)."""

    def __init__(self, files: TlsFiles) -> None:
        """Reads the files now. Raises TlsFileError if they cannot be used."""
        self.files = files
        self._lock = threading.Lock()
        self._seen = _stamps(files)
        self.material = read_material(files)
        # (generation, material), replaced whole: the generation is bumped with every new
        # material, and each listener's fetcher compares it with the one it serves.
        self._state = (0, self.material)
        self.reloads = 0
        self.failures = 0
        self._own = _ListenerFetcher(self, 0)  # what ``fetch`` hands out (one listener's view)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for ``add_secure_port``, one per listener; with a client CA, a
        client certificate signed by it is required."""
        import grpc  # noqa: PLC0415 (specs imports this module; `validate` needs no grpc)

        generation, material = self._state
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(material),
            _ListenerFetcher(self, generation).fetch,
            require_client_authentication=self.files.mutual,
        )

    def current(self) -> tuple[int, TlsMaterial]:
        """(generation, material) in force, read again first when the files changed: cheap
        when nothing did (three stats)."""
        stamps = _stamps(self.files)
        if stamps != self._seen:
            with self._lock:  # handshakes on several threads and ports: one reads the files
                if stamps != self._seen:
                    self._reload(stamps)
        return self._state

    @staticmethod
    def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        import grpc  # noqa: PLC0415

        return grpc.ssl_server_certificate_configuration(
            [(material.private_key, material.cert_chain)], root_certificates=material.client_ca
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """As a listener's fetcher (one listener's view: new material once, then None)."""
        return self._own.fetch()

    def _reload(self, stamps: tuple[_Stamp, ...]) -> None:
        """Read the files (under the lock): new material bumps the generation."""
        try:
            material = read_material(self.files)
        except TlsFileError as exc:
            # A file still being written reads as broken: look again at the next handshake,
            # and only report a set of files that stayed as they were while we read them.
            if _stamps(self.files) == stamps:
                self._seen = stamps
                self.failures += 1
                log.error(
                    "TLS files changed but cannot be used; still serving %s: %s",
                    self.material.describe(),
                    exc,
                )
            return
        if _stamps(self.files) != stamps:
            return  # changed while being read: the next handshake reads them again
        self._seen = stamps
        if material == self.material:
            return  # touched, not changed
        self.material = material
        self._state = (self._state[0] + 1, material)
        self.reloads += 1
        log.info("TLS files reloaded: now serving %s", material.describe())
