"""The docs cannot drift: their YAML loads, their JSON parses, their links resolve, the
walkthrough shows the repo's files verbatim, and the reference names every configuration
field, command-line flag and reason the code knows."""

from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from authz_server import cli, config, errors

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
# Docs that show configurations (each must show at least one), and every doc a user reads.
CONFIG_DOCS = [README, WALKTHROUGH, REFERENCE]
DOCS = [*CONFIG_DOCS, TROUBLESHOOTING, CHANGELOG]
_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)
_JSON_BLOCK = re.compile(r"```json\n(.*?)```", re.DOTALL)
_FILE_HEADER = re.compile(r"^# file: (\S+)\n")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
OURS = {"AuthzConfig", "RequestAuthentication", "AuthorizationPolicy"}


def yaml_blocks(path: Path) -> list[str]:
    return _BLOCK.findall(path.read_text())


def _is_server_config(block: str) -> bool:
    documents = [d for d in yaml.safe_load_all(block) if isinstance(d, dict)]
    kinds = {d.get("kind") for d in documents}
    custom = any((d.get("spec") or {}).get("action") == "CUSTOM" for d in documents)
    return bool(kinds) and kinds <= OURS and not custom


def _load_block(block: str, path: Path) -> config.Settings:
    header = _FILE_HEADER.match(block)
    if header:  # a file of the repo, loaded from where it lives (relative paths work)
        return config.load(ROOT / header.group(1))
    path.write_text(block)
    return config.load(path)


@pytest.mark.parametrize("doc", CONFIG_DOCS, ids=lambda p: p.name)
def test_every_doc_that_teaches_configuration_shows_some(doc: Path) -> None:
    blocks = [b for b in yaml_blocks(doc) if _is_server_config(_FILE_HEADER.sub("", b))]
    assert blocks, f"{doc.name} shows no configuration"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_server_config_in_the_docs_is_accepted_by_the_server(
    doc: Path, tmp_path: Path
) -> None:
    for index, block in enumerate(yaml_blocks(doc)):
        documents = list(yaml.safe_load_all(_FILE_HEADER.sub("", block)))  # all YAML parses
        assert documents, f"{doc.name}: an empty YAML block"
        if _is_server_config(_FILE_HEADER.sub("", block)):
            settings = _load_block(block, tmp_path / f"block{index}.yaml")
            assert settings.providers or settings.policies


def test_every_yaml_block_of_the_reference_is_a_whole_configuration() -> None:
    """The reference shows no fragments: each example can be saved and run as it is."""
    for block in yaml_blocks(REFERENCE):
        assert _is_server_config(block), f"not a whole configuration:\n{block[:200]}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_json_in_the_docs_parses(doc: Path) -> None:
    for block in _JSON_BLOCK.findall(doc.read_text()):
        for line in block.strip().splitlines():  # JSON lines, as the logs are written
            json.loads(line)


def test_every_yaml_in_the_walkthrough_is_a_file_of_the_repo_verbatim() -> None:
    blocks = yaml_blocks(WALKTHROUGH)
    assert len(blocks) >= 4
    for block in blocks:
        header = _FILE_HEADER.match(block)
        assert header, f"walkthrough YAML without a '# file: PATH' line:\n{block[:200]}"
        path = ROOT / header.group(1)
        assert path.is_file(), f"{header.group(1)} is not in the repo"
        assert block[header.end() :].strip() == path.read_text().strip(), (
            f"the walkthrough's copy of {header.group(1)} differs from the file"
        )


def _config_models() -> list[type[BaseModel]]:
    """Every public pydantic model of the configuration, found rather than listed, so a model
    added tomorrow is checked too."""
    return [
        model
        for name, model in inspect.getmembers(config, inspect.isclass)
        if issubclass(model, BaseModel)
        and model.__module__ == config.__name__
        and not name.startswith("_")
    ]


def _documented_names(markdown: str) -> set[str]:
    """Names a reference documents: in the first cell of a table row, or in a heading (as
    `` `a.b[].c` ``, every dotted part counts)."""
    places = re.findall(r"^\|([^|\n]*)\|", markdown, re.MULTILINE)
    places += re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    names: set[str] = set()
    for place in places:
        for code in re.findall(r"`([^`]+)`", place):
            names.update(part for part in re.split(r"[.\[\]: ]+", code) if part)
    return names


def test_the_reference_names_every_field_of_every_configuration_model() -> None:
    documented = _documented_names(REFERENCE.read_text())
    models = _config_models()
    names = {m.__name__ for m in models}
    assert {"AuthzConfigDoc", "ServerSpec", "ProviderSpec", "PolicySpec"} <= names
    assert {"DecisionLogSpec", "TokenCacheSpec", "Source", "Operation", "Condition"} <= names
    missing = [
        f"{model.__name__}.{field.alias or to_camel(name)}"
        for model in models
        for name, field in model.model_fields.items()
        if (field.alias or to_camel(name)) not in documented
    ]
    assert not missing, f"docs/reference.md does not name: {', '.join(missing)}"


def test_the_reference_documents_the_durations_and_the_files_read() -> None:
    reference = REFERENCE.read_text()
    for example in ("`2s`", "`500ms`", "`1h30m`", "A bare number", "`*.yml`"):
        assert example in reference
    assert config.parse_duration("1h30m") == 5400.0
    assert config.parse_duration("500ms") == 0.5
    assert config.parse_duration(2) == 2.0


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _flags(sub)
        flags |= {o for o in action.option_strings if o.startswith("--") and o != "--help"}
    return flags


def test_the_reference_names_every_command_line_flag() -> None:
    reference = REFERENCE.read_text()
    flags = _flags(cli._parser())
    assert {"--config", "--log-format", "--token-file", "--claim", "--ttl"} <= flags
    missing = sorted(f for f in flags if f not in reference)
    assert not missing, f"docs/reference.md does not name: {', '.join(missing)}"


def test_the_reference_lists_every_reason() -> None:
    reference = REFERENCE.read_text()
    reasons = [
        value
        for name, value in vars(errors).items()
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z_]+", value)
    ]
    assert len(reasons) >= 14
    missing = [r for r in reasons if f"| `{r}` |" not in reference]
    assert not missing, f"docs/reference.md's reasons table lacks: {', '.join(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_grpcurl_is_shown_as_the_venvs_binary(doc: Path) -> None:
    for match in re.finditer(r"(\S*)grpcurl -", doc.read_text()):
        assert match.group(1).endswith(".venv/bin/"), f"{doc.name}: {match.group(0)!r}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_between_the_docs_resolves(doc: Path) -> None:
    for target in _LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        assert path.exists(), f"{doc.name}: broken link {target}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: no heading for {target}"
