"""A fleet: 50 providers discovered through /targets and scraped through /probe by a real
Prometheus that runs the bundle's rules."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.helpers import Running, config_of, provider_yaml, running
from tests.prometheus_server import prometheus, query, until
from tests.standins import StandIn, llamacpp_routes, ollama_routes, openai_routes, vllm_routes

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "configuration.md"
RULES = ROOT / "prometheus" / "rules"
PROVIDERS = 50
# Stand-ins of every kind, in turn: (kind, routes, the url's suffix).
KINDS = (
    ("vllm", vllm_routes, ""),
    ("llamacpp", llamacpp_routes, ""),
    ("ollama", ollama_routes, ""),
    ("openai", openai_routes, "/v1"),
)


@asynccontextmanager
async def fleet() -> AsyncIterator[Running]:
    """An exporter configured with PROVIDERS stand-ins of every kind."""
    async with AsyncExitStack() as stack:
        providers = []
        for index in range(PROVIDERS):
            kind, routes, suffix = KINDS[index % len(KINDS)]
            server = await stack.enter_async_context(StandIn(routes()))
            cluster = "eu-1" if index % 2 else "us-1"
            labels = f"{{cluster: {cluster}}}"
            providers.append(
                provider_yaml(f"{kind}-{index:02d}", kind, server.url + suffix, labels=labels)
            )
        yield await stack.enter_async_context(running(config_of(*providers)))


def documented_job() -> dict[str, Any]:
    """The docs' job that probes every configured provider found through /targets."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOCS.read_text(), re.MULTILINE | re.DOTALL)
    for block in blocks:
        document = yaml.safe_load(block)
        if isinstance(document, dict) and "scrape_configs" in document:
            job: dict[str, Any] = document["scrape_configs"][0]
            if job.get("http_sd_configs"):
                return job
    raise AssertionError("docs/configuration.md shows no http_sd job")


async def test_fifty_providers_each_a_target_of_their_own(tmp_path: Path) -> None:
    async with fleet() as exporter:
        host_port = exporter.url.split("//", 1)[1].rstrip("/")
        job = documented_job()
        job["scrape_interval"] = job["scrape_timeout"] = "2s"
        job["http_sd_configs"][0] |= {
            "url": f"http://{host_port}/targets",
            "refresh_interval": "1s",
        }
        job["relabel_configs"][-1]["replacement"] = host_port
        config = {
            "global": {"evaluation_interval": "1s"},
            "rule_files": [str(path) for path in sorted(RULES.glob("*.yml"))],
            "scrape_configs": [job],
        }
        result = await asyncio.to_thread(observe, config, tmp_path)
    ups, rules, per_provider, panels = result
    assert len(ups) == PROVIDERS and set(ups.values()) == {1.0}, ups
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert rules and unhealthy == []
    # One series per provider, never two merged: the provider label is each target's own.
    for expr, series in per_provider.items():
        assert sorted(series) == sorted(ups), expr
    # The Overview's queries: where a result names providers, never one provider twice among
    # series whose other labels are equal; and some query (the provider table's) lists each
    # of the 50 exactly once.
    listed_all = False
    for (panel, expr), results in panels.items():
        seen: dict[tuple[tuple[str, str], ...], list[str]] = {}
        for series in results:
            labels = series["metric"]
            if "provider" not in labels:
                continue
            rest = tuple(
                sorted((k, v) for k, v in labels.items() if k not in ("provider", "instance"))
            )
            seen.setdefault(rest, []).append(labels["provider"])
        for rest, providers in seen.items():
            assert len(providers) == len(set(providers)), (panel, expr, rest)
        named = [p for providers in seen.values() for p in providers]
        listed_all = listed_all or sorted(named) == sorted(ups)
    assert listed_all, "no Overview query lists every provider once"


def overview_queries() -> list[tuple[str, str]]:
    """(panel, expression) of every query of the Overview dashboard."""
    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "llm-overview.json").read_text())
    found = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((panel.get("title", ""), target["expr"]))
    return found


def substitute(expr: str) -> str:
    """A query as Grafana sends it with every variable at All."""
    values = {"__rate_interval": "30s", "__interval": "2s", "__range": "30s"}
    values |= {"cluster": ".*", "job": ".*", "instance": ".*", "provider": ".+", "model": ".+"}
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr


def observe(
    config: dict[str, Any], work: Path
) -> tuple[
    dict[str, float],
    list[dict[str, Any]],
    dict[str, list[str]],
    dict[tuple[str, str], list[dict[str, Any]]],
]:
    """Run Prometheus until every provider was scraped and every rule evaluated twice; then
    what it holds: up per provider, the rules' health, and per-provider series."""
    with prometheus(config, work) as base:

        def all_up() -> dict[str, float] | None:
            found = {r["metric"]["instance"]: float(r["value"][1]) for r in query(base, "up")}
            return found if len(found) == PROVIDERS and set(found.values()) == {1.0} else None

        ups = until(all_up, f"{PROVIDERS} targets up", 90)

        def evaluated() -> list[dict[str, Any]] | None:
            try:
                groups = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
            except (httpx.TransportError, KeyError, ValueError):
                return None
            rules = [rule for group in groups for rule in group["rules"]]
            done = rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules)
            return rules if done else None

        until(evaluated, "every rule evaluated", 30)
        rules = until(evaluated, "every rule evaluated again", 30)
        per_provider = {
            expr: [r["metric"]["provider"] for r in query(base, expr)]
            for expr in (
                "probe_success",
                "llm_provider_up",
                'sum by (provider, instance) (llm_exporter_scrape_success{cluster=~".*"})',
            )
        }
        panels = {
            (panel, expr): query(base, substitute(expr)) for panel, expr in overview_queries()
        }
        return ups, rules, per_provider, panels
