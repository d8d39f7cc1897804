"""`make soak`: sustained load through a real Envoy for minutes, with a key rotation at the
identity provider and a configuration reload in the middle; every answer checked against the
status known for it in advance, the server sampled from /proc, and a markdown summary with a
PNG written to bench/results/ (soak.md, soak.png).

Run from the repository root: ``python -m bench.soak [--minutes 5] [--door grpc|http]``.

- `traffic`: keys, the prebuilt requests of every kind, the expected status per phase
- `load`: the asyncio HTTP/1.1 load generator and its record of every answer
- `samples`: RSS, threads, fds and CPU of the server from /proc
- `run`: processes, load and the timeline of changes -> `SoakResult`
- `report`: the verdicts (the pass criteria), the markdown and the PNG
"""

from bench.soak.report import Verdict, markdown, plot, verdicts, write_results
from bench.soak.run import SoakOptions, SoakResult, discard_workdir, run_soak

__all__ = [
    "SoakOptions",
    "SoakResult",
    "Verdict",
    "discard_workdir",
    "markdown",
    "plot",
    "run_soak",
    "verdicts",
    "write_results",
]
