"""Write the Kubernetes objects made from the bundle: PrometheusRules and dashboard ConfigMaps.

    python deploy/kubernetes/generate.py          # after changing prometheus/rules or grafana/dashboards
    python deploy/kubernetes/generate.py --check  # exit 1 when the committed files are stale

One PrometheusRule per prometheus/rules/*.yml, carrying its groups unchanged, and one
ConfigMap per grafana/dashboards/*.json, carrying the file's text unchanged and labelled
for Grafana's dashboard sidecar; both into deploy/kubernetes/monitoring/, which the base
includes. Kustomize cannot read files outside its directory (without
--load-restrictor LoadRestrictionsNone, which `kubectl apply -k` does not take), so the
objects are written out here instead, and tests/test_kubernetes.py fails when they differ
from what this script would write.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "prometheus" / "rules"
DASHBOARDS = ROOT / "grafana" / "dashboards"
OUTPUT = Path(__file__).resolve().parent / "monitoring"
RULES_FILE = OUTPUT / "prometheus-rules.yaml"
DASHBOARDS_FILE = OUTPUT / "grafana-dashboards.yaml"

LABELS = {"app.kubernetes.io/name": "llm-exporter", "app.kubernetes.io/part-of": "llm-exporter"}
# What Grafana's dashboard sidecar (k8s-sidecar, as the Grafana and kube-prometheus-stack
# Helm charts run it) looks for by default, and the folder the docker-compose stack uses.
DASHBOARD_LABEL = {"grafana_dashboard": "1"}
FOLDER_ANNOTATION = {"grafana_folder": "LLM"}


def _header(sources: str) -> str:
    return (
        f"# Generated from {sources} by deploy/kubernetes/generate.py: do not edit.\n"
        "# Change the sources, then run `python deploy/kubernetes/generate.py`.\n"
    )


class _Dumper(yaml.SafeDumper):
    """Block style, keys in their order, multi-line strings as literal blocks."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def _dump(documents: list[dict[str, Any]]) -> str:
    return "".join(
        "---\n"
        + yaml.dump(
            document,
            Dumper=_Dumper,
            sort_keys=False,
            allow_unicode=True,
            width=1 << 16,  # never fold a long line: the text must come back unchanged
        )
        for document in documents
    )


def prometheus_rules() -> list[dict[str, Any]]:
    """One PrometheusRule per rule file, named after it."""
    documents = []
    for path in sorted(RULES.glob("*.yml")):
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict) or set(content) != {"groups"}:
            raise SystemExit(f"{path}: expected a rule file with `groups` only")
        documents.append(
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "PrometheusRule",
                "metadata": {"name": path.stem, "labels": dict(LABELS)},
                "spec": {"groups": content["groups"]},
            }
        )
    return documents


def dashboard_config_maps() -> list[dict[str, Any]]:
    """One ConfigMap per dashboard, its file's text under the file's name."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": f"grafana-dashboard-{path.stem}",
                "labels": {**LABELS, **DASHBOARD_LABEL},
                "annotations": dict(FOLDER_ANNOTATION),
            },
            "data": {path.name: path.read_text(encoding="utf-8")},
        }
        for path in sorted(DASHBOARDS.glob("*.json"))
    ]


def render() -> dict[Path, str]:
    """Each generated file and its text."""
    return {
        RULES_FILE: _header("prometheus/rules/*.yml") + _dump(prometheus_rules()),
        DASHBOARDS_FILE: _header("grafana/dashboards/*.json") + _dump(dashboard_config_maps()),
    }


def main(argv: list[str]) -> int:
    check = argv == ["--check"]
    if argv and not check:
        print(__doc__, file=sys.stderr)
        return 2
    stale = []
    for path, text in render().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not check:
            path.write_text(text, encoding="utf-8")
    if check and stale:
        names = ", ".join(map(str, stale))
        print(f"stale: {names}; run `python deploy/kubernetes/generate.py`", file=sys.stderr)
        return 1
    for name in stale:
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
