"""TLS on the gRPC listener: ``server.tls`` and ``server.grpc`` in the configuration (every bad
file named by its field), the ``--tls-*`` flags, and the reloader that re-reads rotated files."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub

from authz_server import cli
from authz_server.config import load as config
from authz_server.errors import ConfigError
from authz_server.ops.tls import CertificateReloader, TlsFileError, TlsFiles, read_material
from authz_server.server import AuthzServer, grpc_options
from tests.certs import CertificateAuthority, Leaf
from tests.helpers import write_config

DATA = Path(__file__).resolve().parent.parent / "data"
POLICY = """
policies:
  - name: anyone
    rules: [{}]
"""


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def leaf(ca: CertificateAuthority) -> Leaf:
    return ca.issue("server", server=True)


def _config(directory: Path, tls: str, extra: str = "") -> Path:
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
server:
  tls: {tls}
{extra}
{POLICY}"""
    return write_config(directory, text)


def _problems(path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as raised:
        config.load(path)
    return {problem.path: problem.message for problem in raised.value.problems}


def _tls_files(directory: Path, ca: CertificateAuthority, leaf: Leaf) -> TlsFiles:
    cert, key = leaf.write(directory, "tls")
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    return TlsFiles(cert, key, directory / "ca.crt")


# ------------------------------------------------------------------------- configuration


def test_tls_paths_are_read_relative_to_the_config_file(
    tmp_path: Path, ca: CertificateAuthority, leaf: Leaf
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    _tls_files(certs, ca, leaf)
    path = _config(
        tmp_path,
        "{certFile: certs/tls.crt, keyFile: certs/tls.key, clientCaFile: certs/ca.crt}",
    )

    tls = config.load(path).server.tls

    assert tls is not None
    files = tls.files()
    assert files == TlsFiles(certs / "tls.crt", certs / "tls.key", certs / "ca.crt")
    assert files.mutual
    assert read_material(files).serial == leaf.serial


def test_the_reference_example_finds_its_files_beside_it() -> None:
    tls = config.load(DATA / "config_tls.yaml").server.tls

    assert tls is not None
    assert tls.files() == TlsFiles(
        DATA / "tls" / "tls.crt", DATA / "tls" / "tls.key", DATA / "tls" / "ca.crt"
    )


def test_without_tls_the_listener_is_plaintext_and_limits_keep_grpcio_defaults(
    tmp_path: Path,
) -> None:
    server = config.load(write_config(tmp_path, f"apiVersion: authz-server/v1\nkind: "
                                      f"AuthzConfig\n{POLICY}")).server  # fmt: skip
    assert server.tls is None
    assert dict(grpc_options(server.grpc)) == {
        "grpc.max_receive_message_length": 4 << 20,
        "grpc.max_metadata_size": 8 << 10,
        "grpc.absolute_max_metadata_size": 8 << 10,
    }


def test_missing_files_are_named_by_their_field(tmp_path: Path) -> None:
    path = _config(tmp_path, "{certFile: nope.crt, keyFile: nope.key, clientCaFile: nope.pem}")

    problems = _problems(path)

    assert set(problems) == {
        "server.tls.certFile",
        "server.tls.keyFile",
        "server.tls.clientCaFile",
    }
    assert problems["server.tls.certFile"] == (
        f"cannot read {tmp_path / 'nope.crt'}: No such file or directory"
    )


def test_files_that_are_not_pem_are_named_by_their_field(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("hello\n")
    (tmp_path / "key.pem").write_text(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    )
    (tmp_path / "ca.pem").write_bytes(b"\x00\x01binary")
    path = _config(tmp_path, "{certFile: cert.pem, keyFile: key.pem, clientCaFile: ca.pem}")

    problems = _problems(path)

    assert "holds no PEM certificate" in problems["server.tls.certFile"]
    assert "holds no usable PEM private key" in problems["server.tls.keyFile"]
    assert "holds no PEM certificate" in problems["server.tls.clientCaFile"]


def test_a_key_that_does_not_match_the_certificate_is_refused(
    tmp_path: Path, ca: CertificateAuthority, leaf: Leaf
) -> None:
    other = ca.issue("other", server=True)
    Leaf(leaf.cert_pem, other.key_pem).write(tmp_path, "tls")
    path = _config(tmp_path, "{certFile: tls.crt, keyFile: tls.key}")

    problems = _problems(path)

    assert list(problems) == ["server.tls.keyFile"]
    assert "does not match the certificate in" in problems["server.tls.keyFile"]


def test_an_encrypted_key_is_refused_with_a_hint(tmp_path: Path, leaf: Leaf) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    Leaf(leaf.cert_pem, encrypted).write(tmp_path, "tls")
    path = _config(tmp_path, "{certFile: tls.crt, keyFile: tls.key}")

    assert "is encrypted" in _problems(path)["server.tls.keyFile"]


def test_tls_needs_a_certificate_and_a_key(tmp_path: Path) -> None:
    problems = _problems(_config(tmp_path, "{certFile: tls.crt, cafile: x}"))

    assert problems == {
        "server.tls.keyFile": "Field required",
        "server.tls.cafile": "unknown field",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("maxReceiveMessageBytes", 1024),  # below Envoy's largest header block
        ("maxConcurrentStreams", 0),
        ("maxMetadataBytes", 100),
    ],
)
def test_grpc_limits_out_of_bounds_are_named(tmp_path: Path, field: str, value: int) -> None:
    path = write_config(
        tmp_path,
        f"apiVersion: authz-server/v1\nkind: AuthzConfig\nserver:\n  grpc: {{{field}: {value}}}\n"
        f"{POLICY}",
    )

    assert list(_problems(path)) == [f"server.grpc.{field}"]


def test_grpc_limits_map_to_grpc_options(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "apiVersion: authz-server/v1\nkind: AuthzConfig\nserver:\n  grpc: "
        "{maxReceiveMessageBytes: 65536, maxConcurrentStreams: 16, maxMetadataBytes: 2048}\n"
        f"{POLICY}",
    )

    assert dict(grpc_options(config.load(path).server.grpc)) == {
        "grpc.max_receive_message_length": 65536,
        "grpc.max_concurrent_streams": 16,
        "grpc.max_metadata_size": 2048,
        "grpc.absolute_max_metadata_size": 2048,
    }


# ------------------------------------------------------------------------- command line


def _flags(*argv: str) -> TlsFiles | None:
    args = cli._parser().parse_args(["serve", "--config", "c.yaml", *argv])
    return cli._tls_from_flags(args)


def test_tls_flags_name_the_flag_whose_file_cannot_be_used(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")

    with pytest.raises(ValueError, match=r"--tls-cert-file: .* holds no PEM certificate") as raised:
        _flags("--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "k"))

    assert "--tls-key-file: cannot read" in str(raised.value)


def test_tls_flags_replace_the_configuration_and_go_in_pairs(
    tmp_path: Path, ca: CertificateAuthority, leaf: Leaf
) -> None:
    files = _tls_files(tmp_path, ca, leaf)
    assert _flags() is None
    assert _flags(
        "--tls-cert-file", str(files.cert_file), "--tls-key-file", str(files.key_file),
        "--tls-client-ca-file", str(files.client_ca_file),
    ) == files  # fmt: skip
    with pytest.raises(ValueError, match="--tls-cert-file and --tls-key-file go together"):
        _flags("--tls-client-ca-file", str(files.client_ca_file))


# ---------------------------------------------------------------------- the listener


def test_tls_without_a_client_ca_serves_any_client_that_trusts_the_server(
    tmp_path: Path, ca: CertificateAuthority, leaf: Leaf
) -> None:
    leaf.write(tmp_path, "tls")
    settings = config.load(_config(tmp_path, "{certFile: tls.crt, keyFile: tls.key}"))
    server = AuthzServer(settings, listen="127.0.0.1:0", http_listen=None)
    server.start()
    try:
        address = f"127.0.0.1:{server.grpc_port}"

        def health(channel: grpc.Channel) -> grpc.StatusCode:
            with channel:
                try:
                    HealthStub(channel).Check(HealthCheckRequest(), timeout=5)
                except grpc.RpcError as error:
                    return error.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        trusting = grpc.ssl_channel_credentials(ca.cert_pem)
        assert health(grpc.secure_channel(address, trusting)) == grpc.StatusCode.OK
        assert health(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=1)


# ------------------------------------------------------------------------------ rotation


def test_unchanged_files_are_not_read_again(
    tmp_path: Path, ca: CertificateAuthority, leaf: Leaf
) -> None:
    reloader = CertificateReloader(_tls_files(tmp_path, ca, leaf))

    assert reloader.fetch() is None
    assert reloader.fetch() is None
    assert (reloader.reloads, reloader.material.serial) == (0, leaf.serial)


def test_replaced_files_are_served_at_the_next_handshake(
    tmp_path: Path, ca: CertificateAuthority, leaf: Leaf
) -> None:
    files = _tls_files(tmp_path, ca, leaf)
    reloader = CertificateReloader(files)
    renewed = ca.issue("server", server=True)

    renewed.write(tmp_path, "tls")

    assert reloader.fetch() is not None
    assert (reloader.reloads, reloader.material.serial) == (1, renewed.serial)
    assert reloader.fetch() is None  # and only once


def _kubernetes_volume(
    directory: Path, generation: str, ca: CertificateAuthority, leaf: Leaf
) -> None:
    """Write files the way the kubelet updates a Secret volume: a new timestamped directory,
    then one atomic rename of the ``..data`` symlink; the visible names link through it."""
    target = directory / f"..{generation}"
    target.mkdir()
    (target / "tls.crt").write_bytes(leaf.cert_pem)
    (target / "tls.key").write_bytes(leaf.key_pem)
    (target / "ca.crt").write_bytes(ca.cert_pem)
    (directory / "..data_tmp").symlink_to(target.name)
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def test_a_kubernetes_secret_volume_update_is_picked_up(
    tmp_path: Path, ca: CertificateAuthority, leaf: Leaf
) -> None:
    _kubernetes_volume(tmp_path, "2024_01", ca, leaf)
    files = TlsFiles(tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt")
    reloader = CertificateReloader(files)
    renewed = ca.issue("server", server=True)

    _kubernetes_volume(tmp_path, "2024_02", ca, renewed)
    for old in (tmp_path / "..2024_01").iterdir():
        old.unlink()  # the kubelet removes the old generation

    assert reloader.fetch() is not None
    assert reloader.material.serial == renewed.serial


def test_a_bad_new_file_keeps_the_last_good_certificate_and_logs_no_key(
    tmp_path: Path,
    ca: CertificateAuthority,
    leaf: Leaf,
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = _tls_files(tmp_path, ca, leaf)
    reloader = CertificateReloader(files)
    renewed = ca.issue("server", server=True)

    renewed.write(tmp_path, "tls")
    files.key_file.write_bytes(leaf.key_pem)  # the old key beside the new certificate
    with caplog.at_level(logging.INFO, logger="authz_server.tls"):
        assert reloader.fetch() is None
        assert reloader.fetch() is None  # reported once, not at every handshake
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        files.key_file.write_bytes(renewed.key_pem)  # the rotation completes
        assert reloader.fetch() is not None

    assert len(errors) == 1
    assert "does not match the certificate" in errors[0].getMessage()
    assert f"still serving certificate serial {leaf.serial:x}" in errors[0].getMessage()
    assert reloader.material.serial == renewed.serial
    for pem in (leaf.key_pem, renewed.key_pem):
        body = b"".join(pem.splitlines()[1:-1]).decode()
        for record in caplog.records:
            assert body[:16] not in record.getMessage()


def test_a_vanished_file_keeps_the_last_good_certificate(
    tmp_path: Path, ca: CertificateAuthority, leaf: Leaf
) -> None:
    files = _tls_files(tmp_path, ca, leaf)
    reloader = CertificateReloader(files)

    files.cert_file.unlink()

    assert reloader.fetch() is None
    assert (reloader.failures, reloader.material.serial) == (1, leaf.serial)


def test_read_material_lists_every_problem(tmp_path: Path) -> None:
    with pytest.raises(TlsFileError) as raised:
        read_material(TlsFiles(tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    assert [name for name, _ in raised.value.problems] == [
        "cert_file",
        "key_file",
        "client_ca_file",
    ]


def test_the_explain_api_on_its_own_port_speaks_tls_too(
    tmp_path: Path, ca: CertificateAuthority, leaf: Leaf
) -> None:
    from authz_server.v1 import explain_pb2, explain_pb2_grpc

    leaf.write(tmp_path, "tls")
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
server:
  tls: {{certFile: tls.crt, keyFile: tls.key}}
  explain: {{enabled: true, listen: "127.0.0.1:0"}}
{POLICY}"""
    server = AuthzServer(
        config.load(write_config(tmp_path, text)), listen="127.0.0.1:0", http_listen=None
    )
    server.start()
    try:
        address = f"127.0.0.1:{server.explain_port}"

        def explain(channel: grpc.Channel) -> grpc.StatusCode:
            with channel:
                try:
                    stub = explain_pb2_grpc.ExplainStub(channel)
                    stub.Explain(explain_pb2.ExplainRequest(), timeout=5)
                except grpc.RpcError as error:
                    return error.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        # Over TLS the call arrives (and is refused for its empty request); in clear it never does.
        trusting = grpc.ssl_channel_credentials(ca.cert_pem)
        assert explain(grpc.secure_channel(address, trusting)) == grpc.StatusCode.INVALID_ARGUMENT
        assert explain(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=1)


def _grpc_code(call: Callable[[grpc.Channel], object], channel: grpc.Channel) -> grpc.StatusCode:
    with channel:
        try:
            call(channel)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _presented_serial(port: int, client: Leaf) -> int:
    """The serial of the certificate ``port`` presents to a client holding ``client``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # whatever it presents, read it
    with tempfile.TemporaryDirectory() as directory:
        context.load_cert_chain(*client.write(Path(directory), "client"))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), 5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.parametrize("first", ["explain", "check"])
def test_a_rotation_reaches_every_listener_whichever_handshakes_first(
    tmp_path: Path, ca: CertificateAuthority, leaf: Leaf, first: str
) -> None:
    # The gRPC port and the Explain API's port share the files: a new certificate and client
    # CA read at a handshake on one must reach the other too (a retired CA stays trusted
    # there otherwise, and renewed client certificates are refused).
    from authz_server.v1 import explain_pb2, explain_pb2_grpc

    _tls_files(tmp_path, ca, leaf)
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
server:
  tls: {{certFile: tls.crt, keyFile: tls.key, clientCaFile: ca.crt}}
  explain: {{enabled: true, listen: "127.0.0.1:0"}}
{POLICY}"""
    server = AuthzServer(
        config.load(write_config(tmp_path, text)), listen="127.0.0.1:0", http_listen=None
    )
    server.start()
    ports = {"check": server.grpc_port, "explain": server.explain_port}

    def call(port: str, root: CertificateAuthority, client: Leaf) -> grpc.StatusCode:
        credentials = grpc.ssl_channel_credentials(root.cert_pem, client.key_pem, client.cert_pem)
        channel = grpc.secure_channel(f"127.0.0.1:{ports[port]}", credentials)
        if port == "check":
            stub = HealthStub(channel)
            return _grpc_code(lambda _: stub.Check(HealthCheckRequest(), timeout=5), channel)
        explain = explain_pb2_grpc.ExplainStub(channel)
        # An empty request is refused once it arrives: INVALID_ARGUMENT means "got in".
        code = _grpc_code(
            lambda _: explain.Explain(explain_pb2.ExplainRequest(), timeout=5), channel
        )
        return grpc.StatusCode.OK if code == grpc.StatusCode.INVALID_ARGUMENT else code

    old_client = ca.issue("old-client", server=False)
    try:
        assert {call(port, ca, old_client) for port in ports} == {grpc.StatusCode.OK}
        new_ca = CertificateAuthority("the next CA")
        renewed, new_client = new_ca.issue("server", server=True), new_ca.issue("c", server=False)
        renewed.write(tmp_path, "tls")
        (tmp_path / "ca.crt").write_bytes(new_ca.cert_pem)

        assert call(first, new_ca, new_client) == grpc.StatusCode.OK  # one port reads the files
        other = "check" if first == "explain" else "explain"
        assert _presented_serial(ports[other], new_client) == renewed.serial
        assert call(other, new_ca, new_client) == grpc.StatusCode.OK
        assert call(other, new_ca, old_client) == grpc.StatusCode.UNAVAILABLE  # CA retired
        assert server.certificates is not None
        assert (server.certificates.reloads, server.certificates.failures) == (1, 0)
    finally:
        server.stop(grace=1)
