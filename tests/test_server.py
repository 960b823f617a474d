"""The HTTP endpoints: /metrics formats, /health, /-/healthy, /-/ready, /-/reload and /."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from exporter.config import load_config
from exporter.server import scrape_deadline
from tests.helpers import config_of, parse, provider_yaml, running
from tests.standins import StandIn, closed_port, delayed, json_reply, ollama_routes

NO_HOST = "host:\n  enabled: false\n"


async def test_health_is_healthy_json_with_every_component() -> None:
    async with StandIn(ollama_routes()) as server:
        config = config_of(provider_yaml("ollama", "ollama", server.url), rest=NO_HOST)
        async with running(config) as exporter:
            response = await exporter.http.get("/health")
    assert response.status_code == 200
    document = response.json()
    assert document["status"] == "healthy"
    assert set(document["components"]) == {"provider/ollama", "connection", "resources"}
    provider = document["components"]["provider/ollama"]
    assert provider["status"] == "healthy"
    assert provider["details"]["models"] == 2
    assert datetime.fromisoformat(document["last_check"]).tzinfo is not None


async def test_health_is_503_when_unhealthy_and_200_when_degraded() -> None:
    dead = provider_yaml("dead", "ollama", f"http://127.0.0.1:{closed_port()}")
    # A known 50 ms answer against a 20 ms threshold: degraded on any machine, however fast.
    slow_version = delayed(0.05, json_reply({"version": "0.5.1"}))
    async with StandIn(ollama_routes(**{"/api/version": slow_version})) as server:
        alive = provider_yaml("alive", "ollama", server.url)
        async with running(config_of(dead, rest=NO_HOST)) as exporter:
            unhealthy = await exporter.http.get("/health")
        slow = "health:\n  response_time: {degraded: 20ms, unhealthy: 10s}\n"
        async with running(config_of(alive, rest=NO_HOST + slow)) as exporter:
            degraded = await exporter.http.get("/health")
            scrape = await exporter.scrape()
    assert unhealthy.status_code == 503
    assert unhealthy.json()["status"] == "unhealthy"
    assert unhealthy.json()["components"]["connection"]["reason"] == (
        "1 of 1 providers unreachable: dead"
    )
    assert degraded.status_code == 200
    assert degraded.json()["status"] == "degraded"
    assert degraded.json()["components"]["provider/alive"]["reason"].startswith("responds in")
    states = scrape.all("llm_health_status", component="provider", provider="alive")
    assert {labels["state"]: value for labels, value in states} == {
        "healthy": 0,
        "degraded": 1,
        "unhealthy": 0,
    }
    assert scrape.value("llm_health_status", component="overall", state="degraded") == 1


async def test_liveness_readiness_and_landing_page() -> None:
    async with StandIn(ollama_routes()) as server:
        config = config_of(provider_yaml("ollama", "ollama", server.url), rest=NO_HOST)
        async with running(config) as exporter:
            healthy = await exporter.http.get("/-/healthy")
            not_ready = await exporter.http.get("/-/ready")
            before = await exporter.http.get("/")
            await exporter.scrape()
            ready = await exporter.http.get("/-/ready")
            after = await exporter.http.get("/")
    assert healthy.status_code == 200
    assert not_ready.status_code == 503
    assert ready.status_code == 200
    assert "not collected yet" in before.text
    assert 'href="metrics"' in after.text and 'href="health"' in after.text
    assert "<td>ollama</td>" in after.text and "<td>healthy</td>" in after.text


async def test_openmetrics_and_gzip_when_asked() -> None:
    async with StandIn(ollama_routes()) as server:
        config = config_of(provider_yaml("ollama", "ollama", server.url), rest=NO_HOST)
        async with running(config) as exporter:
            openmetrics = await exporter.http.get(
                "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
            )
            raw = await exporter.http.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")
    assert raw.headers.get("content-encoding") == "gzip"
    assert parse(raw.text).value("llm_provider_up", provider="ollama") == 1


async def test_reload_swaps_a_valid_config_and_keeps_the_running_one_otherwise(
    tmp_path: Path,
) -> None:
    async with StandIn(ollama_routes()) as first, StandIn(ollama_routes()) as second:
        file = tmp_path / "llm-exporter.yml"
        one = provider_yaml("one", "ollama", first.url)
        two = provider_yaml("two", "ollama", second.url)
        file.write_text(f"providers:\n{one}\n{NO_HOST}")
        async with running(load_config(file), config_path=file) as served:
            before = await served.scrape()
            file.write_text(f"providers:\n{one}\n{two}\n{NO_HOST}")
            swapped = await served.http.post("/-/reload")
            after = await served.scrape()
            file.write_text("providers:\n  - name: broken\n    kind: nonsense\n")
            refused = await served.http.post("/-/reload")
            kept = await served.scrape()
            wrong_method = await served.http.get("/-/reload")
    assert before.value("llm_provider_up", provider="two") is None
    assert swapped.status_code == 200
    assert after.value("llm_provider_up", provider="two") == 1
    assert after.value("llm_exporter_config_last_reload_successful") == 1
    assert refused.status_code == 500
    assert refused.text.startswith(f"config error: {file}:3: providers[0].kind: unknown kind")
    assert kept.value("llm_provider_up", provider="two") == 1
    assert kept.value("llm_exporter_config_last_reload_successful") == 0
    assert wrong_method.status_code == 405


def test_scrape_deadline_follows_prometheus_less_the_margin() -> None:
    config = config_of(rest="global:\n  scrape_timeout: 7s\n  scrape_timeout_margin: 500ms\n")
    assert scrape_deadline("10", config) == 9.5
    assert scrape_deadline(None, config) == 6.5
    assert scrape_deadline("not a number", config) == 6.5
    assert scrape_deadline("nan", config) == 6.5
    assert scrape_deadline("0.2", config) == 0.1
