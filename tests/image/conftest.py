"""The image tests (`make image-test`, not `make test`: pyproject's addopts ignore this folder
unless it is named) share the e2e session's check that no token reaches a server's output."""

from tests.e2e.conftest import no_token_reaches_server_output

__all__ = ["no_token_reaches_server_output"]
