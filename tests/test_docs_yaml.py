"""Every YAML block in README.md and docs/ is checked: an exporter configuration must parse.

Each ```yaml (or ```yml) block is one of:
- a whole exporter configuration: a top-level `providers`, `host`, `health` or `global`
  key. It must parse, with any ${VAR} set and any api_key_file replaced by a real file.
- a provider fragment: only keys of `providers[]` (such as a `probes:` block). It must
  parse once placed in a provider.
- another program's file, known by its top-level keys (Prometheus, its rule files,
  Alertmanager, Compose, Kubernetes) or by being a list of alerting or recording rules.
  It is left to that program's own tests.
- anything else, preceded by the line `<!-- not a whole config -->`.
A block that is none of these fails, so that no example escapes the check unnoticed.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import ProviderConfig, parse_config

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK_RE = re.compile(r"^```ya?ml[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
FRAGMENT_MARK = "<!-- not a whole config -->"
EXPORTER_KEYS = {"providers", "modules", "host", "health", "global"}
PROVIDER_KEYS = {f.name for f in fields(ProviderConfig)} | {"api_key_file"}
FOREIGN_KEYS = {
    # Prometheus and its rule files
    "scrape_configs", "rule_files", "alerting", "remote_write", "remote_read", "groups",
    # Alertmanager
    "route", "receivers", "inhibit_rules", "templates", "time_intervals",
    # Compose and Kubernetes
    "services", "volumes", "networks", "apiVersion",
}  # fmt: skip
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
KEY_FILE_RE = re.compile(r"^(\s*api_key_file:\s*)(\S+)", re.MULTILINE)


def classify(block: str, marked: bool = False) -> str:
    """ "config", "provider", "foreign", "fragment" or "unknown": what a YAML block shows."""
    try:
        value: Any = yaml.safe_load(ENV_RE.sub("x", block))
    except yaml.YAMLError:
        return "config"  # the exporter's parser says what is wrong with it
    keys = set(value) if isinstance(value, dict) else set()
    if keys & FOREIGN_KEYS:
        return "foreign"
    if (
        isinstance(value, list)
        and value
        and all(isinstance(rule, dict) and ("alert" in rule or "record" in rule) for rule in value)
    ):
        return "foreign"
    if (
        isinstance(value, list)
        and value
        and all(isinstance(group, dict) and "targets" in group for group in value)
    ):
        return "foreign"  # a Prometheus file_sd target list
    if keys & EXPORTER_KEYS:
        return "config"
    if keys and keys <= PROVIDER_KEYS:
        return "provider"
    return "fragment" if marked else "unknown"


def yaml_blocks() -> list[tuple[str, str, str]]:
    """(where, what, text) of every YAML block of the documents."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in BLOCK_RE.finditer(text):
            before = text[: match.start()].rstrip().rsplit("\n", 1)[-1].strip()
            where = f"{document.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}"
            block = match.group(1)
            found.append((where, classify(block, before == FRAGMENT_MARK), block))
    return found


BLOCKS = yaml_blocks()
CHECKED = [(where, what, block) for where, what, block in BLOCKS if what != "foreign"]


def test_the_docs_show_exporter_configurations() -> None:
    assert sum(what == "config" for _, what, _ in BLOCKS) >= 5


@pytest.mark.parametrize(("where", "what", "block"), CHECKED, ids=[c[0] for c in CHECKED])
def test_every_configuration_in_the_docs_parses(
    where: str, what: str, block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if what == "fragment":
        pytest.skip(f"marked {FRAGMENT_MARK}")
    assert what != "unknown", (
        f"{where}: a YAML block that is neither an exporter configuration, a provider's keys"
        f" nor a known program's file: fix it, or mark it with {FRAGMENT_MARK} before it"
    )
    for name in ENV_RE.findall(block):
        monkeypatch.setenv(name, "sk-from-the-environment")
    key = tmp_path / "key"
    key.write_text("sk-from-a-file\n")
    # Key files named in the docs (/run/secrets/...) do not exist here: read a real one.
    block = KEY_FILE_RE.sub(lambda m: m.group(1) + str(key), block)
    if what == "provider":
        block = in_a_provider(block)
    config = parse_config(block, where)
    assert config.providers or config.host.enabled


def in_a_provider(fragment: str) -> str:
    """A whole configuration holding the fragment's keys in its one provider."""
    keys = textwrap.dedent(fragment)
    given = set(yaml.safe_load(ENV_RE.sub("x", keys)))
    required = {"name": "documented", "kind": "ollama", "url": "http://localhost:11434"}
    body = "".join(f"{key}: {value}\n" for key, value in required.items() if key not in given)
    return "providers:\n  - " + textwrap.indent(body + keys, "    ")[4:]


@pytest.mark.parametrize(
    ("block", "what"),
    [
        ("providers:\n  - name: a\n", "config"),
        ("global:\n  scrape_timeout: 10s\n", "config"),
        ("providers: [\n", "config"),
        ("provider:\n  - name: a\n", "unknown"),  # a misspelt configuration is not skipped
        ("    probes:\n      interval: 1m\n", "provider"),
        ("global:\n  scrape_interval: 15s\nscrape_configs: []\n", "foreign"),
        ("- alert: Down\n  expr: up == 0\n", "foreign"),
        ("route:\n  receiver: team\n", "foreign"),
        ("services:\n  exporter: {}\n", "foreign"),
    ],
    ids=["providers", "global", "unparsable", "misspelt", "probes", "prometheus", "rules",
         "alertmanager", "compose"],
)  # fmt: skip
def test_blocks_are_told_apart_by_their_keys(block: str, what: str) -> None:
    assert classify(block) == what
    assert classify(block, marked=True) == ("fragment" if what == "unknown" else what)
