"""``python -m bench.soak``: run the soak, write its summary and PNG, exit 1 if a criterion
was missed (2 on bad arguments)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.soak.report import write_results
from bench.soak.run import RELOAD_AT, RESULTS, ROTATE_AT, SoakOptions, run_soak


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument(
        "--minutes",
        type=float,
        default=float(os.environ.get("SOAK_MINUTES", "5")),
        help="how long the load runs (default: $SOAK_MINUTES or 5)",
    )
    parser.add_argument("--seconds", type=float, help="the same in seconds (wins over --minutes)")
    parser.add_argument("--door", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--rate", type=float, default=500.0, help="requests/s in total")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--sample-interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory")
    parser.add_argument("--name", help="file names (default: soak, or soak-http for --door http)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = SoakOptions(
            seconds=args.seconds if args.seconds is not None else args.minutes * 60,
            door=args.door,
            rate=args.rate,
            connections=args.connections,
            sample_interval=args.sample_interval,
            output=args.output,
            name=args.name or ("soak" if args.door == "grpc" else "soak-http"),
        )
    except ValueError as error:
        print(f"python -m bench.soak: {error}", file=sys.stderr)
        return 2
    print(
        f"soak: {options.seconds:g} s through Envoy ({options.door} door) at {options.rate:g}"
        f" req/s; key rotation at {ROTATE_AT * options.seconds:.0f} s, reload at"
        f" {RELOAD_AT * options.seconds:.0f} s",
        flush=True,
    )
    result = run_soak(options)
    summary, image, passed = write_results(result)
    print(summary.read_text())
    print(f"wrote {summary} and {image}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
