"""The llamacpp adapter against llama.cpp's own server, and against its recorded shapes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from exporter.client import ConnectionStats, ProviderClient, Reply
from exporter.errors import ProviderError
from llamacpp_server import LlamaCppServer, free_port
from tests.helpers import config_of, parse, provider_yaml, running, watch_queue
from tests.standins import StandIn, json_reply, llamacpp_routes


async def chat(client: httpx.AsyncClient, max_tokens: int) -> dict[str, int]:
    """One real chat completion; returns its usage."""
    response = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens},
    )
    response.raise_for_status()
    usage: dict[str, int] = response.json()["usage"]
    return usage


async def own_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """llama.cpp's own /metrics, as name -> value."""
    scrape = parse((await client.get("/metrics")).text)
    return {name: value for name, _, value in scrape.samples}


async def test_up_with_its_model_listed(llama_server: LlamaCppServer) -> None:
    config = config_of(provider_yaml("local", "llamacpp", llama_server.url))
    async with running(config) as exporter:
        scrape = await exporter.scrape()
    assert scrape.value("llm_provider_up", provider="local", kind="llamacpp") == 1
    assert scrape.value("llm_provider_ready", provider="local") == 1
    assert scrape.value("llm_exporter_scrape_success", provider="local") == 1
    assert scrape.value("llm_model_loaded", provider="local", model="tiny-llama") == 1
    assert scrape.value("llm_model_context_tokens", provider="local", model="tiny-llama") == 256
    assert scrape.value("llm_slots", provider="local", state="idle") == 4


async def test_token_counters_equal_llamacpps_own(llama_server: LlamaCppServer) -> None:
    config = config_of(provider_yaml("local", "llamacpp", llama_server.url))
    async with (
        running(config) as exporter,
        httpx.AsyncClient(base_url=llama_server.url, timeout=30) as client,
    ):
        before = await exporter.scrape()
        usages = [await chat(client, max_tokens=12) for _ in range(5)]
        after = await exporter.scrape()
        truth = await own_metrics(client)

    def delta(token_type: str) -> float:
        labels = {"provider": "local", "model": "tiny-llama", "type": token_type}
        return (after.value("llm_tokens_total", **labels) or 0) - (
            before.value("llm_tokens_total", **labels) or 0
        )

    assert delta("output") == sum(u["completion_tokens"] for u in usages) == 5 * 12
    output = after.value("llm_tokens_total", provider="local", type="output")
    assert output == truth["llamacpp:tokens_predicted_total"]
    # Input tokens mean what OpenTelemetry means: every prompt token, evaluated or reused
    # from the slot's cache (llama.cpp's own prompt_tokens_total counts the evaluated ones).
    assert (
        after.value("llm_tokens_total", provider="local", type="input")
        == truth["llamacpp:prompt_tokens_total"] + truth["llamacpp:prompt_tokens_cached_total"]
    )
    assert (
        after.value("llm_input_tokens_cached_total", provider="local")
        == truth["llamacpp:prompt_tokens_cached_total"]
    )
    assert delta("input") == sum(u["prompt_tokens"] for u in usages)


async def test_waiting_series_shows_the_queue(larger_model: Path) -> None:
    """One slot, four concurrent requests: three wait, and the exporter shows it."""
    with LlamaCppServer(larger_model, parallel=1) as server:
        config = config_of(provider_yaml("one-slot", "llamacpp", server.url))
        async with (
            running(config) as exporter,
            httpx.AsyncClient(base_url=server.url, timeout=120) as client,
        ):
            requests = [asyncio.create_task(chat(client, max_tokens=40)) for _ in range(4)]
            seen = await watch_queue(
                exporter,
                "one-slot",
                requests,
                until=lambda running, waiting: running == 1 and waiting >= 2,
            )
    assert any(running == 1 and 2 <= waiting <= 3 for running, waiting in seen), seen
    assert max(running for running, _ in seen) <= 1, seen


async def test_stopped_server_is_down_within_one_scrape(tiny_model: Path) -> None:
    async with StandIn(llamacpp_routes()) as other:
        with LlamaCppServer(tiny_model) as server:
            config = config_of(
                provider_yaml("local", "llamacpp", server.url),
                provider_yaml("other", "llamacpp", other.url),
            )
            async with running(config) as exporter:
                assert (await exporter.scrape()).value("llm_provider_up", provider="local") == 1
                server.stop()
                scrape = await exporter.scrape()
                health = await exporter.http.get("/health")
    assert scrape.value("llm_provider_up", provider="local") == 0
    assert scrape.value("llm_exporter_scrape_success", provider="local") == 0
    assert (
        scrape.value(
            "llm_provider_requests_total", provider="local", endpoint="/health", outcome="connect"
        )
        == 1
    )
    assert scrape.value("llm_model_loaded", provider="local") is None  # its models are gone
    assert scrape.value("llm_provider_up", provider="other") == 1
    assert scrape.value("llm_model_loaded", provider="other", model="tiny-llama") == 1
    assert health.status_code == 503
    assert health.json()["components"]["provider/local"]["status"] == "unhealthy"


async def test_many_polls_on_keepalive_connections_raise_no_false_alarm(
    llama_server: LlamaCppServer,
) -> None:
    """llama-server closes a keep-alive connection after 100 requests; that is not a failure."""
    # Counted below are the collections' own requests: the model watcher is not running.
    config = config_of(
        provider_yaml("local", "llamacpp", llama_server.url, lifecycle="{watch: false}")
    )
    async with running(config) as exporter:
        for _ in range(50):  # 250 requests over a handful of pooled connections
            await exporter.exporter.collect()
        scrape = await exporter.scrape()
    outcomes = {labels["outcome"] for labels, _ in scrape.all("llm_provider_requests_total")}
    assert outcomes == {"success"}
    assert sum(v for _, v in scrape.all("llm_provider_requests_total")) == 255


async def test_api_key_is_sent_where_the_server_requires_it(tiny_model: Path) -> None:
    with LlamaCppServer(tiny_model, api_key="sk-test-123") as server:
        good = config_of(provider_yaml("keyed", "llamacpp", server.url, api_key="sk-test-123"))
        bad = config_of(provider_yaml("keyless", "llamacpp", server.url))
        async with running(good) as with_key:
            scrape_with_key = await with_key.scrape()
        async with running(bad) as without_key:
            scrape_without_key = await without_key.scrape()
    assert scrape_with_key.value("llm_exporter_scrape_success", provider="keyed") == 1
    assert scrape_with_key.value("llm_tokens_total", provider="keyed", type="output") == 0
    assert "sk-test-123" not in scrape_with_key.text
    assert scrape_without_key.value("llm_exporter_scrape_success", provider="keyless") == 0
    failed = scrape_without_key.all("llm_provider_requests_total", outcome="http_4xx")
    assert {labels["endpoint"] for labels, _ in failed} >= {"/metrics"}


async def test_loading_server_is_up_but_not_ready() -> None:
    loading = json_reply(
        {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, 503
    )
    async with StandIn(llamacpp_routes(**{"/health": loading})) as server:
        async with running(config_of(provider_yaml("loading", "llamacpp", server.url))) as exporter:
            scrape = await exporter.scrape()
            health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_provider_up", provider="loading") == 1
    assert scrape.value("llm_provider_ready", provider="loading") == 0
    assert health["components"]["provider/loading"]["status"] == "degraded"


async def test_older_metric_set_maps_onto_the_same_series() -> None:
    """A llama-server from a real deployment, with the older 11-series /metrics."""
    async with StandIn(llamacpp_routes(metrics="llamacpp_metrics_older.txt")) as server:
        async with running(config_of(provider_yaml("old", "llamacpp", server.url))) as exporter:
            scrape = await exporter.scrape()
    assert scrape.value("llm_tokens_total", provider="old", type="input") == 18292
    assert scrape.value("llm_tokens_total", provider="old", type="output") == 1406
    assert (
        scrape.value("llm_token_processing_seconds_total", provider="old", type="output") == 41.827
    )
    assert scrape.value("llm_tokens_per_second", provider="old", type="output") == 33.6147
    assert scrape.value("llm_exporter_scrape_success", provider="old") == 1


@pytest.mark.parametrize("missing", ["/slots", "/metrics"])
async def test_disabled_optional_endpoint_is_not_a_failure(missing: str) -> None:
    """llama-server without --slots or --metrics answers 501; its series are just absent."""
    off = json_reply({"error": {"code": 501, "message": "This server does not support it"}}, 501)
    async with StandIn(llamacpp_routes(**{missing: off})) as server:
        async with running(config_of(provider_yaml("lean", "llamacpp", server.url))) as exporter:
            scrape = await exporter.scrape()
            health = (await exporter.http.get("/health")).json()
            page = (await exporter.http.get("/")).text
    assert scrape.value("llm_exporter_scrape_success", provider="lean") == 1
    # Not offered is no failure: no error ratio for llama-server's default flags.
    assert scrape.value("llm_provider_requests_total", endpoint=missing, outcome="unsupported") == 1
    assert scrape.all("llm_provider_requests_total", provider="lean", outcome="http_5xx") == []
    verdict = health["components"]["provider/lean"]
    assert verdict["status"] == "healthy"
    # Said, not hidden behind a plain "up" and empty panels.
    metrics_off = "engine metrics off: start llama-server with --metrics"
    assert (metrics_off in verdict["reason"]) == (missing == "/metrics")
    assert (metrics_off in page) == (missing == "/metrics")
    assert scrape.value("llm_model_loaded", provider="lean") == 1
    if missing == "/slots":
        assert scrape.value("llm_slots", provider="lean", state="idle") is None
        assert scrape.value("llm_tokens_total", provider="lean", type="output") == 360
    else:
        assert scrape.value("llm_tokens_total", provider="lean", type="output") is None
        assert scrape.value("llm_slots", provider="lean", state="idle") == 4


async def test_a_disabled_endpoint_is_asked_again_after_a_minute_or_a_restart() -> None:
    """Regression: an optional endpoint was left alone for 300 s after one 404 or 501."""
    now = [0.0]
    metrics_on = False

    async def metrics(request: web.Request) -> web.Response:
        if metrics_on:
            return web.Response(text="llamacpp:tokens_predicted_total 7\n")
        return web.Response(status=501, text="not supported")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    port = free_port()
    config = config_of(provider_yaml("llama", "llamacpp", f"http://127.0.0.1:{port}"))
    async with ProviderClient(
        config.providers[0], ConnectionStats(), clock=lambda: now[0]
    ) as client:
        runner = await serve_on(app, port)
        assert await client.fetch("/metrics", size, optional=True) is None
        metrics_on = True
        now[0] = 30.0
        assert await client.fetch("/metrics", size, optional=True) is None  # not asked yet
        now[0] = 61.0
        assert await client.fetch("/metrics", size, optional=True) == 34
        metrics_on = False
        assert await client.fetch("/metrics", size, optional=True) is None  # 501: left alone
        # The server is restarted, now with --metrics: asked again at once, not in a minute.
        await runner.cleanup()
        with pytest.raises(ProviderError):
            await client.fetch("/health", size)
        metrics_on = True
        runner = await serve_on(app, port)
        assert await client.fetch("/metrics", size, optional=True) == 34
        await runner.cleanup()


def size(reply: Reply) -> int:
    """How many bytes the body has."""
    return len(reply.body)


async def serve_on(app: web.Application, port: int) -> web.AppRunner:
    """Serve an app on a given 127.0.0.1 port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    return runner
