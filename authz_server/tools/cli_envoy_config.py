"""``authz-server envoy-config``: print an Envoy bootstrap that puts Envoy in front of an API and
asks this server about every request (`envoy_config.render_bootstrap`, the template `make run`
and the end-to-end tests use), for the addresses, door and TLS given on the command line.

Kept out of ``cli`` so the command's flags and their checks live together; ``cli`` only adds the
subcommand and calls `run`.
"""

from __future__ import annotations

import argparse
import ipaddress
import shlex
import sys

from authz_server.config import load as config
from authz_server.config import specs
from authz_server.errors import ConfigError
from authz_server.tools.envoy_config import AuthzTls, output_headers, render_bootstrap

COMMAND = "envoy-config"
_PROG = f"authz-server {COMMAND}"


class UsageError(ValueError):
    """A flag's value cannot be used; the message names the flag."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``envoy-config`` subcommand and its flags to ``sub``."""
    parser = sub.add_parser(
        COMMAND,
        help="print an Envoy bootstrap (YAML) that asks this server about every request "
        "before routing to your API (exit 2 on a bad flag)",
        description="Print an Envoy v3 bootstrap: one listener (--listen) whose ext_authz filter "
        "asks authz-server (--authz-address, through --door) before routing every request to "
        "--upstream. Envoy fails closed: if the server cannot answer within --timeout, the "
        "client gets 503. Run it with `envoy -c FILE`; check it with `envoy --mode validate -c "
        "FILE`.",
    )
    parser.add_argument(
        "--listen", required=True, metavar="HOST:PORT", help="where Envoy listens for clients"
    )
    parser.add_argument(
        "--upstream",
        required=True,
        metavar="HOST:PORT",
        help="your API, where allowed requests go (a host name becomes a DNS cluster)",
    )
    parser.add_argument(
        "--authz-address",
        required=True,
        metavar="HOST:PORT|unix:/PATH",
        help="authz-server's door as Envoy reaches it: its gRPC port (--door grpc) or its HTTP "
        "door (--door http, the server's --http-authz-listen)",
    )
    parser.add_argument(
        "--door",
        choices=["grpc", "http"],
        default="grpc",
        help="how Envoy asks: ext_authz over gRPC (default) or Envoy's HTTP protocol",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="the server's configuration (YAML file or directory), checked; required with "
        "--door http: Envoy passes on to the upstream only the identity headers it sets, and "
        "uses its server.httpAuthz.pathPrefix",
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        default=9901,
        help="Envoy's admin port, on 127.0.0.1 only (default 9901)",
    )
    parser.add_argument(
        "--timeout",
        default="1s",
        help="how long Envoy waits for the server's answer before a 503 (default 1s)",
    )
    parser.add_argument(
        "--authz-tls-ca-file",
        metavar="FILE",
        help="call the gRPC door over TLS, verifying the server's certificate with this CA "
        "bundle (a path on Envoy's side)",
    )
    parser.add_argument(
        "--authz-tls-server-name",
        metavar="NAME",
        help="the name (SNI) the server's certificate must carry "
        "(default: the host of --authz-address)",
    )
    parser.add_argument(
        "--authz-tls-cert-file",
        metavar="FILE",
        help="Envoy's client certificate, for a server that requires one (mTLS)",
    )
    parser.add_argument(
        "--authz-tls-key-file", metavar="FILE", help="the private key of --authz-tls-cert-file"
    )


def host_port(value: str, flag: str) -> tuple[str, int]:
    """Return (host, port) of "host:port" or "[v6]:port". Raises UsageError naming ``flag``."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"{flag} {value!r}: {host!r} is not an IPv6 address") from None
    if not sep or not host or not port.isdecimal():
        raise UsageError(f"{flag} {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    if ":" in host and not value.startswith("["):
        raise UsageError(f"{flag} {value!r}: write an IPv6 address in brackets, [::1]:8080")
    if not 0 < int(port) < 65536:
        raise UsageError(f"{flag} {value!r}: the port must be 1-65535")
    return host, int(port)


def _tls(args: argparse.Namespace) -> AuthzTls | None:
    given = [args.authz_tls_server_name, args.authz_tls_cert_file, args.authz_tls_key_file]
    if args.authz_tls_ca_file is None:
        if any(given):
            raise UsageError("--authz-tls-* flags need --authz-tls-ca-file (TLS to the server)")
        return None
    if args.door != "grpc":
        raise UsageError("--authz-tls-ca-file: only the gRPC door speaks TLS (--door grpc)")
    if (args.authz_tls_cert_file is None) != (args.authz_tls_key_file is None):
        raise UsageError("--authz-tls-cert-file and --authz-tls-key-file go together")
    name = args.authz_tls_server_name
    if name is None:
        if args.authz_address.startswith("unix:"):
            raise UsageError("--authz-tls-server-name is required with a unix: --authz-address")
        name = host_port(args.authz_address, "--authz-address")[0]
    try:
        return AuthzTls(
            ca_file=args.authz_tls_ca_file,
            server_name=name,
            cert_file=args.authz_tls_cert_file,
            key_file=args.authz_tls_key_file,
        )
    except ValueError as exc:
        raise UsageError(f"--authz-tls-server-name: {exc}") from None


def _from_config(args: argparse.Namespace) -> tuple[list[str], str, bool]:
    """(identity headers the upstream may receive, path prefix, whether Envoy adds the
    connection's attributes: `httpAuthz.attributeHeaders`) for the HTTP door, from --config;
    nothing for the gRPC door (which still refuses a bad --config rather than ignore it).
    Raises UsageError (--door http without --config), ConfigError."""
    if args.config is None:
        if args.door == "http":
            raise UsageError(
                "--door http needs --config: Envoy passes on to the upstream only the identity "
                "headers the configuration sets, and must use its server.httpAuthz.pathPrefix"
            )
        return [], "", False
    settings = config.load(args.config)
    if args.door != "http":
        return [], "", False
    return (
        output_headers([p.spec for p in settings.providers]),
        settings.server.http_authz.path_prefix,
        settings.server.http_authz.attribute_headers,
    )


# The flags the header comment repeats, in this order, when given.
_SHOWN_FLAGS = (
    "listen",
    "upstream",
    "authz_address",
    "door",
    "config",
    "admin_port",
    "timeout",
    "authz_tls_ca_file",
    "authz_tls_server_name",
    "authz_tls_cert_file",
    "authz_tls_key_file",
)


def _command_line(args: argparse.Namespace) -> str:
    """The command that makes this bootstrap again, every flag spelt out."""
    words = ["authz-server", COMMAND]
    for name in _SHOWN_FLAGS:
        value = getattr(args, name)
        if value is not None:
            words += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join(words)


def render(args: argparse.Namespace) -> str:
    """Return the bootstrap YAML for the parsed flags, headed by a comment with the command that
    makes it. Raises UsageError (a flag) or ConfigError (--config)."""
    listen_host, listen_port = host_port(args.listen, "--listen")
    try:
        ipaddress.ip_address(listen_host)
    except ValueError:
        raise UsageError(
            f"--listen {args.listen!r}: Envoy listens on an IP address "
            "(0.0.0.0, 127.0.0.1, [::]), not a host name"
        ) from None
    upstream_host, upstream_port = host_port(args.upstream, "--upstream")
    if not 0 < args.admin_port < 65536:
        raise UsageError(f"--admin-port {args.admin_port}: the port must be 1-65535")
    try:
        timeout = specs.parse_duration(
            float(args.timeout) if args.timeout.isdecimal() else args.timeout
        )
    except ValueError as exc:
        raise UsageError(f"--timeout {args.timeout!r}: {exc}") from None
    if timeout <= 0:
        raise UsageError(f"--timeout {args.timeout!r}: must be more than 0")
    tls = _tls(args)
    headers, path_prefix, attribute_headers = _from_config(args)
    try:
        bootstrap = render_bootstrap(
            listen_host=listen_host,
            listen_port=listen_port,
            admin_port=args.admin_port,
            authz_address=args.authz_address,
            authz_timeout_s=timeout,
            upstream_host=upstream_host,
            upstream_port=upstream_port,
            door=args.door,
            upstream_headers=headers,
            path_prefix=path_prefix,
            authz_tls=tls,
            attribute_headers=attribute_headers,
        )
    except ValueError as exc:
        raise UsageError(str(exc).replace("authz_address", "--authz-address")) from None
    return (
        f"# Envoy bootstrap made by: {_command_line(args)}\n"
        f"# Envoy asks authz-server ({args.door} door, {args.authz_address}) about every request\n"
        "# and fails closed (503 when it cannot answer). Check: envoy --mode validate -c FILE\n"
        + bootstrap
    )


def run(args: argparse.Namespace) -> int:
    """Print the bootstrap; exit 0, or 2 with the problem on stderr."""
    try:
        print(render(args), end="")
    except UsageError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"{_PROG}: invalid configuration {args.config}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    return 0


__all__ = ["COMMAND", "UsageError", "add_parser", "host_port", "render", "run"]
