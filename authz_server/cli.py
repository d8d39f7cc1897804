"""Command line: ``authz-server serve | validate | version``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from authz_server import __version__, config
from authz_server.errors import ConfigError
from authz_server.log import setup_logging

log = logging.getLogger("authz_server.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authz-server",
        description="Envoy external authorization server: JWT + Istio-style policies.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC Check server and the HTTP side port")
    serve.add_argument("--config", required=True, help="YAML file or directory of *.yaml")
    serve.add_argument(
        "--listen",
        help="gRPC address, host:port or unix:/path (default: server.listen, 0.0.0.0:9001)",
    )
    serve.add_argument(
        "--http-listen", help="HTTP side port host:port (default: server.httpListen, 0.0.0.0:9090)"
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument(
        "--log-format", default="json", choices=["json", "text"], help="log lines (default json)"
    )

    validate = sub.add_parser("validate", help="check a configuration; print ok or every problem")
    validate.add_argument("--config", required=True, help="YAML file or directory of *.yaml")

    sub.add_parser("version", help="print the version")
    return parser


def _load(path: str) -> config.Settings | None:
    try:
        return config.load(path)
    except ConfigError as exc:
        print(f"invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"authz-server {__version__}")
        return 0
    if args.command == "validate":
        settings = _load(args.config)
        if settings is None:
            return 1
        for warning in settings.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print("ok")
        return 0

    setup_logging(args.log_level, args.log_format)
    settings = _load(args.config)
    if settings is None:
        return 1
    for warning in settings.warnings:
        log.warning("%s", warning)
    from authz_server.server import serve  # noqa: PLC0415 (keeps `validate` free of grpc)

    return serve(
        settings,
        listen=args.listen or settings.server.listen,
        http_listen=args.http_listen or settings.server.http_listen,
        config_path=Path(args.config),
    )
