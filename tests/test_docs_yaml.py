"""Every exporter configuration shown in README.md and docs/ is one the exporter takes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from exporter.config import parse_config

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK_RE = re.compile(r"^```ya?ml\n(.*?)^```", re.MULTILINE | re.DOTALL)
EXPORTER_KEYS = {"providers", "host", "health", "global"}
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
KEY_FILE_RE = re.compile(r"^(\s*api_key_file:\s*)(\S+)", re.MULTILINE)


def exporter_blocks() -> list[tuple[str, str]]:
    """(where, text) of every YAML block whose top-level keys are the exporter's.

    Blocks of Prometheus, Alertmanager or Compose files have other top-level keys, and
    rule snippets are lists: they are not the exporter's and are left to their own tests.
    """
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in BLOCK_RE.finditer(text):
            block = match.group(1)
            line = text.count("\n", 0, match.start()) + 1
            try:
                value = yaml.safe_load(ENV_RE.sub("x", block))
            except yaml.YAMLError:
                value = {"providers": "unparsable: the exporter's parser will say why"}
            if isinstance(value, dict) and value and set(value) <= EXPORTER_KEYS:
                found.append((f"{document.relative_to(REPO)}:{line}", block))
    return found


BLOCKS = exporter_blocks()


def test_the_docs_show_exporter_configurations() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize(("where", "block"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_every_configuration_in_the_docs_parses(
    where: str, block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ENV_RE.findall(block):
        monkeypatch.setenv(name, "sk-from-the-environment")
    key = tmp_path / "key"
    key.write_text("sk-from-a-file\n")
    # Key files named in the docs (/run/secrets/...) do not exist here: read a real one.
    block = KEY_FILE_RE.sub(lambda m: m.group(1) + str(key), block)
    config = parse_config(block, where)
    assert config.providers or config.host.enabled
