"""The soak (`make soak`, bench/soak/) in 15 seconds: the same processes, traffic mix, key
rotation and configuration reload as the 5-minute run, judged by the same criteria; and the
criteria themselves, shown to fail on the data of a server that leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import SoakOptions, SoakResult, run_soak, verdicts, write_results
from bench.soak.load import Recorder
from bench.soak.run import Event, ServerLog
from bench.soak.samples import Sample

SMOKE_SECONDS = 15.0


@pytest.mark.e2e
def test_a_short_soak_through_envoy_with_a_key_rotation_and_a_reload_meets_every_criterion(
    tmp_path: Path,
) -> None:
    result = run_soak(SoakOptions(seconds=SMOKE_SECONDS, sample_interval=0.25, output=tmp_path))
    summary, image, passed = write_results(result)

    failed = [f"{v.name}: {v.measured}" for v in verdicts(result) if not v.passed]
    assert passed and not failed, (failed, result.recorder.unexpected, result.workdir)
    counts = result.recorder.counts
    # The rotation and the reload happened under load and the server followed both.
    assert [e.name for e in result.events if e.took_s is not None] == [
        "rotation",
        "k1 retired",
        "reload",
    ]
    assert counts["retired_key", 401, 401] > 0
    assert counts["invoices", 403, 403] > 0 and counts["invoices", 200, 200] > 0
    assert result.reloads.get("success") == 1
    assert result.recorder.unexpected_total == 0
    # Its outputs: the summary names the verdict and links the PNG, which is a PNG.
    text = summary.read_text()
    assert "**passed**" in text and f"]({image.name})" in text
    assert image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert result.workdir is None  # a passing run leaves no logs behind


def _result(
    rss: list[float],
    files: list[int],
    threads: list[int],
    sockets: list[int] | None = None,
    recorder: Recorder | None = None,
) -> SoakResult:
    """A finished 100-second gRPC-door run whose server showed these values, one sample a
    second (``files``: fds other than sockets)."""
    sockets = sockets or [3] * 100
    samples = [
        Sample(
            float(t),
            rss_mib=rss[t],
            threads=threads[t],
            fds=files[t] + sockets[t],
            sockets=sockets[t],
            cpu_s=t * 0.5,
        )
        for t in range(100)
    ]
    if recorder is None:
        recorder = Recorder(bin_s=1.0)
        recorder.record(1.0, "valid", 200, 200, 0.002)
    return SoakResult(
        options=SoakOptions(seconds=100.0),
        started="today",
        duration_s=100.0,
        recorder=recorder,
        samples=samples,
        events=[Event("reload", "config replaced", 65.0, 65.0, 65.5)],
        server_lost_at_s=None,
        server_exit=0,
        server_log=ServerLog(),
        jwks_fetches=1,
        reloads={"success": 1.0},
        envoy_stats={},
    )


FLAT = [80.0] * 100
RESOURCES = ["RSS growth", "open fds (not sockets)", "sockets", "threads"]


def _passed(result: SoakResult) -> dict[str, bool]:
    return {v.name: v.passed for v in verdicts(result)}


def test_flat_resources_pass_and_growth_past_the_limits_fails_each_criterion() -> None:
    flat = _passed(_result(FLAT, [8] * 100, [20] * 100))
    assert [flat[name] for name in [*RESOURCES, "statuses"]] == [True] * 5

    # 85 -> 99 MiB from the first window after warm-up to the last (+16%); a file, a thread
    # and a socket more every 10 s (one per reload, if it reloaded every 10 s).
    climbing = [t // 10 for t in range(100)]
    leaking = _passed(
        _result(
            [80.0 + 0.2 * t for t in range(100)],
            [8 + n for n in climbing],
            [20 + n for n in climbing],
            [3 + n for n in climbing],
        )
    )
    assert [leaking[name] for name in RESOURCES] == [False] * 4


def test_short_spikes_and_pools_growing_to_their_bound_are_not_leaks() -> None:
    spiky = [20 + (9 if t % 7 == 0 else 0) for t in range(100)]
    pool = [20 if t < 50 else 24 for t in range(100)]  # 4 waiting threads started at 50 s
    one_more_socket = [3 if t < 50 else 5 for t in range(100)]  # Envoy reconnects
    for files, threads in ((spiky, spiky), (spiky, pool)):
        passed = _passed(_result(FLAT, files, threads, one_more_socket))
        assert [passed[name] for name in RESOURCES] == [True] * 4


def test_one_unexpected_status_fails_the_run() -> None:
    recorder = Recorder(bin_s=1.0)
    recorder.record(1.0, "valid", 200, 200, 0.002)
    recorder.record(2.0, "expired", 401, 200, 0.002)
    assert not _passed(_result(FLAT, [8] * 100, [20] * 100, recorder=recorder))["statuses"]
