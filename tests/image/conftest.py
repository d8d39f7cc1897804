"""The image tests (`make image-test`, not `make test`: pyproject's addopts ignore this folder
unless it is named) share the e2e session's check that no token reaches a server's output,
and end with the image's size and its venv layer's."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.conftest import no_token_reaches_server_output
from tests.image.container import ENGINE, IMAGE

__all__ = ["no_token_reaches_server_output"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the size of the image and of each layer that adds something (from `history`)."""
    result = subprocess.run(
        [ENGINE, "history", "--format", "json", IMAGE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        layers = json.loads(result.stdout)
    except json.JSONDecodeError:
        return  # no image (the build failed) or an engine without this format: nothing to say
    terminalreporter.section(f"{IMAGE}: sizes")
    total = sum(int(layer.get("size", 0)) for layer in layers)
    terminalreporter.write_line(f"{total / 1e6:8.1f} MB  the image")
    for layer in reversed(layers):
        if int(layer.get("size", 0)) > 0:
            what = " ".join(str(layer.get("CreatedBy", "")).split())[:90]
            terminalreporter.write_line(f"{int(layer['size']) / 1e6:8.1f} MB  {what}")
