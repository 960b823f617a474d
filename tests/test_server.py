"""The HTTP endpoints: /metrics formats, /health, /-/healthy, /-/ready, /-/reload and /."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from exporter.config import load_config
from exporter.server import Exporter, display_url, scrape_deadline, start_runner
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
        "the only provider is unreachable: dead"
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
    assert "<td>ollama</td>" in after.text and '<td class="healthy">healthy</td>' in after.text


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
        async with running(load_config(file), config_path=file, enable_lifecycle=True) as served:
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
    assert f"config error: {file}:3: providers[0].kind: unknown kind" in refused.text
    assert f"config error: {file}:2: providers[0].url: is required" in refused.text
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


async def test_reload_during_a_scrape_keeps_every_provider_up(tmp_path: Path) -> None:
    """Regression: a reload closed the clients a scrape in progress was using (up 0 for all)."""
    slow_version = delayed(0.3, json_reply({"version": "0.5.1"}))
    async with StandIn(ollama_routes(**{"/api/version": slow_version})) as server:
        file = tmp_path / "llm-exporter.yml"
        one = provider_yaml("one", "ollama", server.url)
        file.write_text(f"providers:\n{one}\n{NO_HOST}")
        async with running(load_config(file), config_path=file, enable_lifecycle=True) as served:
            scrapes = [asyncio.ensure_future(served.scrape()) for _ in range(3)]
            reloads = []
            for timeout in ("4s", "5s", "6s"):  # each a real change: new clients every time
                await asyncio.sleep(0.05)
                file.write_text(f"providers:\n{one}\n    timeout: {timeout}\n{NO_HOST}")
                reloads.append(await served.http.post("/-/reload"))
            during = await asyncio.gather(*scrapes)
            after = await served.scrape()
    assert [r.status_code for r in reloads] == [200, 200, 200]
    assert [s.value("llm_provider_up", provider="one") for s in during] == [1, 1, 1]
    assert after.value("llm_provider_up", provider="one") == 1
    assert after.all("llm_provider_requests_total", outcome="connect") == []


async def test_reload_is_refused_without_the_lifecycle_flag_and_cheap_when_unchanged(
    tmp_path: Path,
) -> None:
    async with StandIn(ollama_routes()) as server:
        file = tmp_path / "llm-exporter.yml"
        file.write_text(f"providers:\n{provider_yaml('one', 'ollama', server.url)}\n{NO_HOST}")
        async with running(load_config(file), config_path=file) as served:
            refused = await served.http.post("/-/reload")
            collector = served.exporter.collector
            changed = await served.exporter.reload()
            same_collector = served.exporter.collector is collector
            scrape = await served.scrape()
    assert refused.status_code == 403
    assert "--web.enable-lifecycle" in refused.text
    assert changed is False and same_collector
    assert scrape.value("llm_exporter_config_last_reload_successful") == 1


async def test_concurrent_scrapes_share_one_collection() -> None:
    """Regression: every /metrics request fanned out to every provider."""
    slow_version = delayed(0.2, json_reply({"version": "0.5.1"}))
    async with StandIn(ollama_routes(**{"/api/version": slow_version})) as server:
        config = config_of(provider_yaml("ollama", "ollama", server.url), rest=NO_HOST)
        async with running(config) as exporter:
            scrapes = await asyncio.gather(*(exporter.scrape() for _ in range(200)))
    assert all(s.value("llm_provider_up", provider="ollama") == 1 for s in scrapes)
    # 200 scrapes in one burst: a handful of collections, not 200 per endpoint.
    assert server.hits["/api/version"] <= 5, server.hits


async def test_idle_connections_are_closed_and_bounded() -> None:
    """Regression: ~1,100 idle sockets from one client exhausted the file descriptors."""
    async with StandIn(ollama_routes()) as server:
        config = config_of(provider_yaml("ollama", "ollama", server.url), rest=NO_HOST)
        exporter = Exporter(config)
        runner = await start_runner(exporter, max_connections=20, idle_timeout=0.5)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(60)]
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                answered = await http.get("/metrics")
                open_now = parse(answered.text).value("llm_exporter_http_connections")
                closed = parse(answered.text).value("llm_exporter_http_connections_closed_total")
            # Idle sockets that never send a request are closed after the idle timeout.
            reads = [reader.read() for reader, _ in idle]
            ends = await asyncio.wait_for(asyncio.gather(*reads), timeout=10)
        finally:
            for _, writer in idle:
                writer.close()
            await runner.cleanup()
            await exporter.aclose()
    assert answered.status_code == 200
    assert open_now is not None and open_now <= 20
    assert closed is not None and closed >= 40
    assert all(end == b"" for end in ends)


async def test_malformed_requests_are_counted_and_logged_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with StandIn(ollama_routes()) as server:
        config = config_of(provider_yaml("ollama", "ollama", server.url), rest=NO_HOST)
        async with running(config) as exporter:
            port = int(exporter.url.rstrip("/").rsplit(":", 1)[1])
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
                await reader.read()
                writer.close()
            scrape = await exporter.scrape()
    assert scrape.value("llm_exporter_http_bad_requests_total") == 3
    server_lines = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert server_lines and all(r.levelno == logging.DEBUG for r in server_lines)
    assert all(r.exc_info is None for r in server_lines)


async def test_landing_page_shows_the_verdict_first_and_hides_url_secrets() -> None:
    async with StandIn(ollama_routes()) as server:
        secret_path = f"{server.url}/proxy/sk-9f8e7d6c5b4a39281706"
        config = config_of(provider_yaml("ollama", "ollama", secret_path), rest=NO_HOST)
        async with running(config) as exporter:
            await exporter.scrape()
            page = (await exporter.http.get("/")).text
    assert page.index("Overall") < page.index("Providers")
    assert "sk-9f8e7d6c5b4a39281706" not in page
    assert "/proxy/***" in page
    assert "Providers (1 provider)" in page


def test_display_url_drops_userinfo_query_and_token_like_path_parts() -> None:
    assert display_url("http://user:pw@host:8080/v1?key=abc#x") == "http://host:8080/v1"
    assert display_url("https://[::1]:11434") == "https://[::1]:11434"
    assert display_url("http://h/api/0123456789abcdef") == "http://h/api/***"


async def test_health_uses_iso_timestamps_and_rounded_numbers() -> None:
    async with StandIn(ollama_routes()) as server:
        config = config_of(provider_yaml("ollama", "ollama", server.url), rest=NO_HOST)
        async with running(config) as exporter:
            document = (await exporter.http.get("/health")).json()
    details = document["components"]["provider/ollama"]["details"]
    seconds = details["response_time_seconds"]
    assert seconds == round(seconds, 4)
    assert document["components"]["connection"]["reason"] == "the provider is reachable"
    assert details["loaded_models"] == ["mistral:latest"]


async def test_headers_sent_slowly_are_cut_off_at_the_idle_timeout() -> None:
    exporter = Exporter(config_of(rest="host:\n  enabled: true\n"))
    runner = await start_runner(exporter, idle_timeout=0.5)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        try:
            while sent < 100 and not reader.at_eof():  # never the end of the headers
                await asyncio.sleep(0.1)
                writer.write(b"X")
                await writer.drain()
                sent += 1
        except ConnectionError:
            pass
        ending = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await runner.cleanup()
        await exporter.aclose()
    assert ending == b""
    # Cut off after about 0.5 s: well before the 10 s the client would have gone on.
    assert sent < 50


async def test_a_reload_of_a_hostile_file_is_refused_and_reported(tmp_path: Path) -> None:
    """Regression: deep YAML crashed the reload and left last_reload_successful at 1."""
    async with StandIn(ollama_routes()) as server:
        file = tmp_path / "llm-exporter.yml"
        file.write_text(f"providers:\n{provider_yaml('one', 'ollama', server.url)}\n{NO_HOST}")
        async with running(load_config(file), config_path=file, enable_lifecycle=True) as served:
            file.write_text("[" * 100_000 + "]" * 100_000)
            deep = await served.http.post("/-/reload")
            after_deep = await served.scrape()
            file.unlink()
            os.mkfifo(file)  # would block a reader for ever
            fifo = await served.http.post("/-/reload")
            after_fifo = await served.scrape()
    assert deep.status_code == 500 and "nested more than 32 levels deep" in deep.text
    assert after_deep.value("llm_exporter_config_last_reload_successful") == 0
    assert fifo.status_code == 500 and "not a regular file" in fifo.text
    assert after_fifo.value("llm_provider_up", provider="one") == 1


async def test_a_short_deadline_sent_by_anyone_cuts_no_one_elses_collection_short() -> None:
    """Whoever sends a tiny X-Prometheus-Scrape-Timeout-Seconds gets its own collection."""
    slow_version = delayed(0.4, json_reply({"version": "0.5.1"}))
    async with StandIn(ollama_routes(**{"/api/version": slow_version})) as server:
        config = config_of(provider_yaml("slow", "ollama", server.url), rest=NO_HOST)
        async with running(config) as exporter:
            hurried = [asyncio.ensure_future(exporter.scrape(0.01)) for _ in range(20)]
            prometheus = await exporter.scrape(10)
            cut_short = await asyncio.gather(*hurried)
            health = (await exporter.http.get("/health")).json()
    assert all(s.value("llm_provider_up", provider="slow") == 0 for s in cut_short)
    assert prometheus.value("llm_provider_up", provider="slow") == 1
    assert health["components"]["provider/slow"]["status"] != "unhealthy"


async def test_a_provider_removed_by_a_reload_leaves_no_series_behind(tmp_path: Path) -> None:
    slow_version = delayed(0.3, json_reply({"version": "0.5.1"}))
    async with StandIn(ollama_routes(**{"/api/version": slow_version})) as server:
        file = tmp_path / "llm-exporter.yml"
        kept, removed = (provider_yaml(n, "ollama", server.url) for n in ("kept", "removed"))
        file.write_text(f"providers:\n{kept}\n{removed}\n{NO_HOST}")
        async with running(load_config(file), config_path=file) as served:
            during = asyncio.ensure_future(served.scrape())
            await asyncio.sleep(0.1)  # the collection is waiting for the slow answers
            file.write_text(f"providers:\n{kept}\n{NO_HOST}")
            assert await served.exporter.reload()
            await during
            await asyncio.sleep(0.3)
            after = await served.scrape()
    assert after.all_of(provider="removed") == []
    assert after.value("llm_provider_up", provider="kept") == 1
