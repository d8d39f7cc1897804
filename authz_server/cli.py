"""Command line: ``authz-server serve | validate | check | test | token | envoy-config | version``.

``serve`` speaks in log lines (``--log-format``, JSON by default), start-up errors included, so
that a log pipeline sees every line of a pod; ``validate``, ``check``, ``test`` and ``token`` are
for a person at a terminal (or a CI job) and print plain text.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from authz_server import __version__
from authz_server.config import load as config
from authz_server.config import specs
from authz_server.credentials import apikeys
from authz_server.errors import ConfigError
from authz_server.ops.log import setup_logging
from authz_server.ops.tls import TlsFileError, TlsFiles, read_material
from authz_server.ops.workers import Supervisor, worker_count
from authz_server.tools import cli_envoy_config, devtoken

log = logging.getLogger("authz_server.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authz-server",
        description="Envoy external authorization server: JWT + Istio-style policies.",
    )
    parser.add_argument(
        "--version", action="version", version=f"authz-server {__version__}", help="the version"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC Check server and the HTTP side port")
    serve.add_argument("--config", required=True, help="YAML file or directory of *.yaml")
    serve.add_argument(
        "--listen",
        help="gRPC address, host:port or unix:/path (default: server.listen, 0.0.0.0:9001)",
    )
    serve.add_argument(
        "--metrics-listen",
        help="the side port for /metrics, /healthz and /readyz, host:port "
        "(default: server.metricsListen, 0.0.0.0:9090)",
    )
    serve.add_argument(
        "--http-listen",
        dest="deprecated_http_listen",
        help="deprecated name of --metrics-listen (warns)",
    )
    serve.add_argument(
        "--http-authz-listen",
        help="open the HTTP door (Envoy's HTTP ext_authz protocol) on host:port or unix:/path "
        "(default: server.httpAuthz.listen; neither: closed)",
    )
    serve.add_argument(
        "--tls-cert-file",
        help="serve gRPC over TLS with this PEM certificate chain (with --tls-key-file; "
        "default: server.tls.certFile)",
    )
    serve.add_argument("--tls-key-file", help="the PEM private key of --tls-cert-file")
    serve.add_argument(
        "--tls-client-ca-file",
        help="require client certificates signed by a CA in this PEM bundle (mTLS)",
    )
    serve.add_argument(
        "--workers",
        default="1",
        help="server processes sharing the gRPC port (SO_REUSEPORT), each with its own caches; "
        "'auto' = one per CPU (default 1)",
    )
    serve.add_argument(
        "--tracing",
        action="store_true",
        help="export an OpenTelemetry span per Check (as server.tracing.enabled: true); "
        "exporter, sampler and service name from the OTEL_* environment variables",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument(
        "--log-format", default="json", choices=["json", "text"], help="log lines (default json)"
    )

    validate = sub.add_parser("validate", help="check a configuration; print ok or every problem")
    validate.add_argument("--config", required=True, help="YAML file or directory of *.yaml")

    check = sub.add_parser(
        "check",
        help="decide one request offline and explain why, rule by rule (exit 0 allowed, "
        "1 denied, 2 usage or configuration error)",
        description="Load the configuration and its keys (fetching JWKS URLs, or --jwks-file), "
        "decide one request as the server would, and print the decision: each token found and "
        "what verifying it gave, then each policy, whether it matched and, for each rule, the "
        "first clause that did not. The token is never printed.",
    )
    check.add_argument("--config", required=True, help="YAML file or directory of *.yaml")
    check.add_argument("--method", default="GET")
    check.add_argument("--path", default="/", help="path with query, e.g. /api/orders?page=2")
    check.add_argument("--host", default="")
    check.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'", help="repeatable"
    )
    check.add_argument(
        "--token-file",
        type=Path,
        help="a file holding a JWT (not on the command line; '-' reads standard input), sent "
        "where its provider reads a token first (default 'Authorization: Bearer')",
    )
    check.add_argument(
        "--api-key-file",
        type=Path,
        metavar="FILE",
        help="a file holding an API key (not on the command line), sent where the first "
        "apiKeys provider reads one",
    )
    check.add_argument(
        "--introspection-response",
        type=Path,
        metavar="FILE",
        help="decide an opaque --token-file offline: the introspection answer (JSON) the IdP "
        "would give for it, instead of calling the introspection endpoint",
    )
    check.add_argument(
        "--dpop-proof",
        type=Path,
        metavar="FILE",
        help="a file holding a DPoP proof (`token dpop-proof`): sent as the DPoP header, and "
        "the --token-file token as 'Authorization: DPoP'",
    )
    check.add_argument(
        "--client-cert",
        type=Path,
        metavar="FILE",
        help="a PEM client certificate, as Envoy sends the one of the client's mTLS connection "
        "(include_peer_certificate): for certificate-bound tokens",
    )
    check.add_argument(
        "--scheme",
        default="",
        choices=["http", "https"],
        help="the scheme Envoy saw (a DPoP proof's htu names it; default http)",
    )
    check.add_argument("--source-ip", default="", help="the direct peer address")
    check.add_argument(
        "--context-extension",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ext_authz context extension, as Envoy's route would send (repeatable)",
    )
    check.add_argument(
        "--destination-principal",
        default="",
        metavar="SPIFFE_ID",
        help="the destination's mTLS identity, as an Istio sidecar sends it "
        "(spiffe://cluster.local/ns/NS/sa/SA)",
    )
    check.add_argument(
        "--jwks-file",
        type=Path,
        help="decide offline: verify tokens with the keys in this JWKS file, for every provider",
    )
    check.add_argument("--json", action="store_true", help="the full trace as JSON")
    check.add_argument(
        "--show-claims", action="store_true", help="include claim values in the trace"
    )

    test = sub.add_parser(
        "test",
        help="run policy tests: decide each case of a cases file offline and compare (exit 0 "
        "all passed, 1 some failed, 2 usage, configuration or cases file error)",
        description="Decide every case of CASES (YAML: groups of named cases, each a request, "
        "an identity and what to expect) as the server would, and print PASS or FAIL per case, "
        "with what differed and the trace of each failure, then 'N passed, M failed'. Tokens "
        "for `claims` cases are signed with throwaway keys the providers of their issuer trust "
        "instead of their key source: nothing is fetched for them.",
    )
    test.add_argument("--config", required=True, help="YAML file or directory of *.yaml")
    test.add_argument("cases", type=Path, metavar="CASES.yaml", help="the cases file")
    test.add_argument(
        "--junit-xml",
        type=Path,
        metavar="FILE",
        help="also write the results as JUnit XML (a testsuite per group) for CI systems",
    )

    _token_parser(sub)
    _apikey_parser(sub)
    cli_envoy_config.add_parser(sub)
    sub.add_parser("version", help="print the version")
    return parser


def _duration(text: str) -> float:
    try:
        return specs.parse_duration(float(text) if text.isdecimal() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _apikey_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    apikey = sub.add_parser(
        "apikey",
        help="issue API keys for an apiKeys provider",
        description="`apikey new` prints a new random key (256 bits, URL-safe) once, on "
        "stdout, and on stderr the keys-file entry to paste: the file holds only its SHA-256.",
    )
    apikey_sub = apikey.add_subparsers(dest="apikey_command", required=True)
    new = apikey_sub.add_parser("new", help="print a new key and its keys-file entry")
    new.add_argument("--sub", required=True, help="the key's subject (principal <issuer>/<sub>)")
    new.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a claim of the key (repeatable); a JSON value is JSON: groups='[\"partners\"]'",
    )
    new.add_argument(
        "--expires", metavar="DATETIME", help="when the key stops working: 2027-06-30T00:00:00Z"
    )


def _apikey(args: argparse.Namespace) -> int:
    """``apikey new``: the key on stdout (once: only its hash is kept), the entry on stderr."""
    try:
        claims = devtoken.parse_claims(args.claim)
    except devtoken.DevTokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    key = apikeys.new_key()
    entry = apikeys.key_entry(args.sub, key, claims, args.expires)
    try:
        apikeys.parse_keys_file(f"keys:\n{entry}".encode(), provider="", issuer="")
    except apikeys.KeysFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(
        "# Give the key above to its holder (it is not stored anywhere); add this entry under "
        "`keys:` in the provider's keys file:",
        file=sys.stderr,
    )
    print(entry, end="", file=sys.stderr)
    return 0


def _token_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    warning = (
        "A DEVELOPMENT TOOL: the private key is written unencrypted and anyone who can read it "
        "can mint accepted tokens. Never point a production configuration at these keys."
    )
    token = sub.add_parser(
        "token",
        help="DEVELOPMENT TOOL: make a local key pair and mint test tokens (never in production)",
        description="Try a configuration with tokens of your own: `token init` makes a key pair "
        "and the provider that trusts it, `token mint` signs tokens with the claims you give. "
        + warning,
    )
    token_sub = token.add_subparsers(dest="token_command", required=True)
    init = token_sub.add_parser(
        "init",
        help="make DIR/private.pem (0600) and DIR/jwks.json; print a provider using it",
        description="Make a key pair: DIR/private.pem (mode 0600, unencrypted) and "
        "DIR/jwks.json (the public key only). Prints an AuthzConfig document whose provider "
        "reads DIR/jwks.json (jwksFile): save it beside your policies or paste the provider "
        "into your configuration. " + warning,
    )
    init.add_argument(
        "--dir",
        type=Path,
        default=devtoken.DEFAULT_DIR,
        help=f"where to write the key files (default {devtoken.DEFAULT_DIR})",
    )
    init.add_argument(
        "--kind",
        choices=list(devtoken.KINDS),
        default="RSA",
        help="RSA (2048 bits, RS256), EC (P-256, ES256) or Ed25519 (EdDSA); default RSA",
    )
    init.add_argument("--kid", help="key id tokens carry (default: the key's RFC 7638 thumbprint)")
    init.add_argument(
        "--issuer",
        default=devtoken.DEFAULT_ISSUER,
        help=f"issuer of the printed provider (default {devtoken.DEFAULT_ISSUER})",
    )
    init.add_argument(
        "--name", default="dev", help="name of the printed provider (default dev; unique)"
    )
    init.add_argument("--force", action="store_true", help="replace keys already in DIR")

    mint = token_sub.add_parser(
        "mint",
        help="print a token signed with a key from `token init`",
        description="Print a signed JWT: iss, sub, aud, iat (now) and exp (now + --ttl), then "
        "every --claim, which may also replace those (a null value removes one). " + warning,
    )
    mint.add_argument(
        "--key",
        type=Path,
        default=devtoken.DEFAULT_DIR,
        help=f"DIR/private.pem from `token init` (or DIR; default {devtoken.DEFAULT_DIR})",
    )
    mint.add_argument(
        "--issuer",
        help="the iss claim; must equal the provider's (default: the issuer `token init` "
        f"recorded beside the key, {devtoken.ISSUER_FILE})",
    )
    mint.add_argument("--sub", help="the sub claim (the principal is ISSUER/SUB)")
    mint.add_argument(
        "--aud", action="append", default=[], help="an audience (repeatable; several make a list)"
    )
    mint.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help='repeatable; VALUE is JSON when it parses (true, 42, \'["a","b"]\', '
        "'{\"x\": 1}'), else a string; null removes the claim (exp=null: no expiry)",
    )
    mint.add_argument(
        "--ttl",
        type=_duration,
        default=3600.0,
        help="lifetime: 1h, 15m, 90s, 1h30m, or a bare number of seconds (default 1h)",
    )
    mint.add_argument("--alg", help="signing algorithm (default RS256, ES256 or EdDSA by key)")
    mint.add_argument("--kid", help="kid in the header (default: the key's kid in jwks.json)")
    mint.add_argument(
        "--dpop-key",
        type=Path,
        metavar="KEY",
        help="bind the token to this DPoP key (a PEM private key, e.g. another `token init` "
        "DIR/private.pem): cnf.jkt is its RFC 7638 thumbprint",
    )
    mint.add_argument(
        "--cert-file",
        type=Path,
        metavar="CERT",
        help='bind the token to this PEM client certificate: cnf["x5t#S256"] (RFC 8705)',
    )

    proof = token_sub.add_parser(
        "dpop-proof",
        help="print a DPoP proof (RFC 9449) for one request",
        description="Print a DPoP proof JWT signed with KEY (its public JWK in the header) for "
        "METHOD and URL, issued now, with a fresh jti and, with --token, the token's hash "
        "(ath). Send it as the DPoP header, with the token as 'Authorization: DPoP'. A proof "
        "is accepted once, within the provider's dpop.proofLifetime. " + warning,
    )
    proof.add_argument(
        "--key", required=True, type=Path, help="the DPoP private key (PEM, or a `token init` DIR)"
    )
    proof.add_argument("--method", default="GET", help="the request's method (htm; default GET)")
    proof.add_argument(
        "--url",
        required=True,
        help="the URL the client addresses, without query (htu): https://api.example.com/orders",
    )
    proof.add_argument("--token", help="the access token the proof goes with (ath)")


def _token(args: argparse.Namespace) -> int:
    try:
        if args.token_command == "init":
            files = devtoken.init_keys(args.dir, kind=args.kind, kid=args.kid, force=args.force)
            devtoken.record_issuer(files, args.issuer)
            document = devtoken.provider_document(files, issuer=args.issuer, name=args.name)
            print(document, end="")
            return 0
        if args.token_command == "dpop-proof":
            key = devtoken.load_signing_key(args.key)
            print(devtoken.dpop_proof(key, method=args.method, url=args.url, token=args.token))
            return 0
        key = devtoken.load_signing_key(args.key, kid=args.kid)
        issuer = args.issuer or devtoken.recorded_issuer(args.key)
        claims = devtoken.parse_claims(args.claim)
        dpop_key = (
            devtoken.load_signing_key(args.dpop_key, flag="--dpop-key")
            if args.dpop_key is not None
            else None
        )
        cnf = devtoken.confirmation(dpop_key, args.cert_file)
        if cnf:
            given = claims.get("cnf")
            claims["cnf"] = {**(given if isinstance(given, dict) else {}), **cnf}
        print(
            devtoken.mint(
                key,
                issuer=issuer,
                subject=args.sub,
                audiences=args.aud,
                claims=claims,
                ttl=args.ttl,
                alg=args.alg,
            )
        )
        return 0
    except devtoken.DevTokenError as exc:
        print(f"authz-server token {args.token_command}: {exc}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace, settings: config.Settings) -> int:
    import json  # noqa: PLC0415
    from urllib.parse import quote  # noqa: PLC0415

    from authz_server.credentials.binding import certificate_der_from_pem  # noqa: PLC0415
    from authz_server.credentials.extract import DPOP_LOCATION  # noqa: PLC0415
    from authz_server.explain import (  # noqa: PLC0415
        explain,
        place_token,
        provider_for_token,
        render_text,
        request_attributes,
        substitute_introspection,
        substitute_keys,
        token_location,
    )
    from authz_server.service import Engine  # noqa: PLC0415

    headers: dict[str, str] = {}
    for raw in args.header:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            print(f"--header {raw!r}: expected 'NAME: VALUE'", file=sys.stderr)
            return 2
        headers[name.strip().lower()] = value.strip()
    extensions: dict[str, str] = {}
    for raw in args.context_extension:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            print(f"--context-extension {raw!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        extensions[key] = value
    if args.token_file is not None:
        try:
            # `-`: `authz-server token mint … | authz-server check … --token-file -`.
            stdin = str(args.token_file) == "-"
            token = (sys.stdin.read() if stdin else args.token_file.read_text()).strip()
        except OSError as exc:
            print(f"--token-file {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
    proof = client_certificate = ""
    if args.dpop_proof is not None:
        try:
            proof = args.dpop_proof.read_text().strip()
        except OSError as exc:
            print(f"--dpop-proof {args.dpop_proof}: {exc.strerror}", file=sys.stderr)
            return 2
        headers["dpop"] = proof
    if args.client_cert is not None:
        try:
            pem = args.client_cert.read_text()
            certificate_der_from_pem(pem)
        except OSError as exc:
            print(f"--client-cert {args.client_cert}: {exc.strerror}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"--client-cert {args.client_cert}: {exc}", file=sys.stderr)
            return 2
        client_certificate = quote(pem, safe="")  # as Envoy sends it: URL-encoded PEM
    api_key: str | None = None
    if args.api_key_file is not None:
        try:
            api_key = args.api_key_file.read_text().strip()
        except OSError as exc:
            print(f"--api-key-file {args.api_key_file}: {exc.strerror}", file=sys.stderr)
            return 2
    answer: object = None
    if args.introspection_response is not None:
        if args.token_file is None:
            print("--introspection-response answers for the --token-file token", file=sys.stderr)
            return 2
        try:
            answer = json.loads(args.introspection_response.read_text())
        except OSError as exc:
            print(f"--introspection-response: {exc.strerror}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"--introspection-response: not JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(answer, dict):
            print("--introspection-response: expected a JSON object", file=sys.stderr)
            return 2
    engine = Engine.build(settings)
    try:
        if isinstance(answer, dict):
            substitute_introspection(engine, {token: answer})
        if args.jwks_file is not None:
            try:
                document = args.jwks_file.read_text()
                json.loads(document)
            except OSError as exc:
                print(f"--jwks-file {args.jwks_file}: {exc.strerror}", file=sys.stderr)
                return 2
            except ValueError as exc:
                print(f"--jwks-file {args.jwks_file}: not JSON: {exc}", file=sys.stderr)
                return 2
            substitute_keys(engine, document, f"--jwks-file {args.jwks_file}")
        for cache in engine.caches.values():
            if not cache.refresh():
                print(f"warning: provider {cache.provider}: {cache.last_error}", file=sys.stderr)
        path = args.path
        if args.token_file is not None:
            # Where the token's provider reads one (Authorization: Bearer unless it says).
            location = (
                DPOP_LOCATION if proof else token_location(provider_for_token(settings, token))
            )
            headers, path = place_token(headers, path, location, token)
        if api_key is not None:
            keys_provider = next((p for p in settings.providers if p.spec.kind == "apiKey"), None)
            if keys_provider is None:
                print("--api-key-file: the configuration has no apiKeys provider", file=sys.stderr)
                return 2
            headers, path = place_token(headers, path, token_location(keys_provider), api_key)
        try:
            request = request_attributes(
                method=args.method,
                host=args.host,
                path=path,
                headers=headers,
                source_ip=args.source_ip,
                context_extensions=extensions,
                destination_principal=args.destination_principal,
                scheme=args.scheme,
                client_certificate=client_certificate,
            )
        except ValueError as exc:
            print(f"--source-ip: {exc}", file=sys.stderr)
            return 2
        result = explain(engine, request, show_claims=args.show_claims)
    finally:
        engine.close()
    print(json.dumps(result, indent=2) if args.json else render_text(result))
    return 0 if result["decision"] == "allow" else 1


def _test(args: argparse.Namespace, settings: config.Settings) -> int:
    from authz_server.tools import policy_tests  # noqa: PLC0415

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    try:
        cases = policy_tests.load_cases(args.cases)
        outcomes = policy_tests.run(settings, cases, warn=warn)
    except policy_tests.CasesError as exc:
        print(f"invalid cases file {args.cases} ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    for outcome in outcomes:
        print("\n".join(policy_tests.render_outcome(outcome)))
    print(policy_tests.summary(outcomes))
    if args.junit_xml is not None:
        try:
            args.junit_xml.write_bytes(policy_tests.junit_xml(outcomes, suite=args.cases.stem))
        except OSError as exc:
            print(f"--junit-xml {args.junit_xml}: {exc.strerror}", file=sys.stderr)
            return 2
    return 0 if all(o.passed for o in outcomes) else 1


def _load(path: str) -> config.Settings | None:
    """For validate, check and test: every problem as a line of text on stderr."""
    try:
        settings = config.load(path)
    except ConfigError as exc:
        print(f"invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None
    for warning in settings.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if settings.server.http_authz.listen is not None:
        from authz_server.doors.envoy_headers import door_unknown  # noqa: PLC0415
        from authz_server.policy.compile import unknown_attribute_uses  # noqa: PLC0415
        from authz_server.policy.workloads import http_door_gaps  # noqa: PLC0415

        unknown = door_unknown(settings.server.http_authz.attribute_headers)
        for line in unknown_attribute_uses(settings.policies, unknown):
            print(f"warning: {line}", file=sys.stderr)
        for line in http_door_gaps(settings.workloads):
            print(f"warning: {line}", file=sys.stderr)
    return settings


_TLS_FLAGS = {
    "cert_file": "--tls-cert-file",
    "key_file": "--tls-key-file",
    "client_ca_file": "--tls-client-ca-file",
}


def _tls_from_flags(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS files the flags name (they replace server.tls), or None without flags.
    Raises ValueError naming the flag that is missing or whose file cannot be used."""
    given = {attr: getattr(args, f"tls_{attr}") for attr in _TLS_FLAGS}
    if not any(given.values()):
        return None
    if not given["cert_file"] or not given["key_file"]:
        raise ValueError("--tls-cert-file and --tls-key-file go together")
    files = TlsFiles(
        Path(given["cert_file"]).absolute(),
        Path(given["key_file"]).absolute(),
        Path(given["client_ca_file"]).absolute() if given["client_ca_file"] else None,
    )
    try:
        read_material(files)
    except TlsFileError as exc:
        raise ValueError(
            "; ".join(f"{_TLS_FLAGS[attr]}: {message}" for attr, message in exc.problems)
        ) from None
    return files


def _check_addresses(flags: dict[str, str | None]) -> None:
    """Raises ValueError naming the first flag whose address cannot be listened on."""
    for flag, address in flags.items():
        if address is not None and (problem := specs.listen_address_problem(address)):
            raise ValueError(f"{flag} {problem}")


def _serve(args: argparse.Namespace) -> int:
    """Every line, start-up errors included, is a log line in ``--log-format``."""
    # Before any thread exists (grpc starts some when imported): see server.serve.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    setup_logging(args.log_level, args.log_format)
    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error(
                "invalid configuration: %s",
                problem,
                extra={
                    "fields": {
                        "document": problem.document,
                        "field": problem.path,
                        "problem": problem.message,
                    }
                },
            )
        log.error(
            "not starting: %d problem(s) in the configuration %s",
            len(exc.problems),
            args.config,
            extra={"fields": {"problems": len(exc.problems)}},
        )
        return 1
    for warning in settings.warnings:
        log.warning("%s", warning)
    from authz_server.server import serve  # noqa: PLC0415 (keeps `validate` free of grpc)

    if args.deprecated_http_listen is not None:
        log.warning("--http-listen is deprecated, use --metrics-listen (the same side port)")
    listen = args.listen or settings.server.listen
    http_listen = (
        args.metrics_listen or args.deprecated_http_listen or settings.server.metrics_listen
    )
    http_authz_listen = args.http_authz_listen or settings.server.http_authz.listen
    try:
        _check_addresses(
            {
                "--listen": args.listen,
                "--metrics-listen": args.metrics_listen,
                "--http-listen": args.deprecated_http_listen,
                "--http-authz-listen": args.http_authz_listen,
            }
        )
        tls = _tls_from_flags(args)
        workers = worker_count(args.workers)
        if workers > 1:
            return Supervisor(
                workers=workers,
                config_path=Path(args.config),
                listen=listen,
                http_listen=http_listen,
                http_authz_listen=http_authz_listen,
                tls=tls,
                log_level=args.log_level,
                log_format=args.log_format,
                drain_seconds=settings.server.drain_delay + settings.server.shutdown_grace + 5,
                tracing=args.tracing,
            ).run()
        return serve(
            settings,
            listen=listen,
            http_listen=http_listen,
            config_path=Path(args.config),
            http_authz_listen=http_authz_listen,
            tls=tls,
            tracing=args.tracing,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        # A port in use, an address that does not parse: the message says what, the fields where.
        log.error(
            "exiting: %s (gRPC %s, metrics side port %s, HTTP door %s)",
            exc,
            listen,
            http_listen,
            http_authz_listen or "closed",
            extra={
                "fields": {
                    "listen": listen,
                    "metrics_listen": http_listen,
                    "http_listen": http_listen,  # the deprecated name of the same field
                    "http_authz_listen": http_authz_listen,
                }
            },
        )
        return 1
    except Exception:
        log.critical("exiting on an unexpected error", exc_info=True)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `authz-server check … | head`: the reader left; no traceback for that.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"authz-server {__version__}")
        return 0
    if args.command == "token":
        return _token(args)
    if args.command == "apikey":
        return _apikey(args)
    if args.command == cli_envoy_config.COMMAND:
        return cli_envoy_config.run(args)
    if args.command == "check":
        settings = _load(args.config)
        return 2 if settings is None else _check(args, settings)
    if args.command == "test":
        settings = _load(args.config)
        return 2 if settings is None else _test(args, settings)
    if args.command == "validate":
        settings = _load(args.config)
        if settings is None:
            return 1
        print("ok")
        return 0
    return _serve(args)
