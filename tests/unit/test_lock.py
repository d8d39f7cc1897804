"""The lock (requirements/*.txt) is what `make install`, CI and the image install: it must pin
every dependency pyproject.toml names, at a version pyproject allows, with hashes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)")


def locked(name: str) -> dict[str, str]:
    """Returns {canonical name: version} of a lock file; every pin must carry a hash."""
    text = (ROOT / "requirements" / name).read_text()
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", text):
        match = PIN.match(block)
        if match:
            assert "--hash=sha256:" in block, f"{name}: {match.group(1)} is pinned without a hash"
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        ("runtime.txt", PYPROJECT["dependencies"]),
        ("dev.txt", PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["dev"]),
        (
            "mutate.txt",
            PYPROJECT["dependencies"]
            + PYPROJECT["optional-dependencies"]["dev"]
            + PYPROJECT["optional-dependencies"]["mutate"],
        ),
    ],
)
def test_the_lock_pins_every_dependency_at_a_version_pyproject_allows(
    lock: str, requirements: list[str]
) -> None:
    pins = locked(lock)
    for line in requirements:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is in pyproject.toml, not in requirements/{lock}: make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={pins[name]}, outside pyproject's "
            f"{requirement.specifier}: make lock"
        )


@pytest.mark.parametrize(
    ("smaller", "larger"), [("runtime.txt", "dev.txt"), ("dev.txt", "mutate.txt")]
)
def test_each_set_is_the_one_below_it_and_more(smaller: str, larger: str) -> None:
    below, above = locked(smaller), locked(larger)
    differing = {n: (v, above.get(n)) for n, v in below.items() if above.get(n) != v}
    assert not differing, f"{smaller} and {larger} disagree: {differing}; make lock"
