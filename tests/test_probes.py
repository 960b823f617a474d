"""Synthetic probes: what they record must match the provider's own numbers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from exporter.config import Config, ProbeConfig, ProbeModel
from exporter.probes import ProbeRunner, ProbeStats, schedules, targets
from exporter.providers.base import ModelSnapshot, ModelState, ProbeSpec, Residence
from llamacpp_server import LlamaCppServer
from tests.helpers import Running, Scrape, config_of, parse, provider_yaml, running
from tests.standins import (
    Handler,
    StandIn,
    ollama_chat,
    ollama_routes,
    openai_routes,
    sse_chat,
)

# Probes start at once (jitter 0) and then wait an hour: the tests run the later rounds.
ONCE = "{interval: 1h, jitter: 0, max_tokens: %d, timeout: %s%s}"


def probes(max_tokens: int = 16, timeout: str = "20s", models: str = "") -> str:
    """A probes mapping as YAML flow."""
    return ONCE % (max_tokens, timeout, f", models: {models}" if models else "")


async def first_probe(exporter: Running, provider: str) -> Scrape:
    """Scrape until the provider's first probe has finished (bounded)."""
    for _ in range(200):
        scrape = await exporter.scrape()
        if scrape.all("llm_probe_requests_total", provider=provider):
            return scrape
        await asyncio.sleep(0.05)
    raise AssertionError("no probe within 10 s")


async def probe_again(exporter: Running, provider: str) -> None:
    """One more probe round of a provider, now."""
    config = next(p for p in exporter.exporter.config.providers if p.name == provider)
    assert exporter.exporter.probes is not None and config.probes is not None
    await exporter.exporter.probes.run_once(config, config.probes)


async def test_probe_token_counts_equal_usage_and_llamacpps_counters(
    llama_server: LlamaCppServer,
) -> None:
    config = config_of(provider_yaml("local", "llamacpp", llama_server.url, probes=probes(12)))
    async with (
        running(config) as exporter,
        httpx.AsyncClient(base_url=llama_server.url) as client,
    ):
        before = parse((await client.get("/metrics")).text)
        await first_probe(exporter, "local")
        await probe_again(exporter, "local")
        await probe_again(exporter, "local")
        scrape = await exporter.scrape()
        after = parse((await client.get("/metrics")).text)

    def delta(name: str) -> float:
        return (after.value(name) or 0) - (before.value(name) or 0)

    labels = {"provider": "local", "model": "tiny-llama"}
    assert scrape.value("llm_probe_requests_total", outcome="success", **labels) == 3
    output = scrape.value("llm_probe_tokens_total", type="output", **labels)
    assert output == 3 * 12 == delta("llamacpp:tokens_predicted_total")
    prompt = delta("llamacpp:prompt_tokens_total") + delta("llamacpp:prompt_tokens_cached_total")
    assert scrape.value("llm_probe_tokens_total", type="input", **labels) == prompt
    assert scrape.value("llm_probe_duration_seconds_count", **labels) == 3
    assert scrape.value("llm_probe_time_to_first_token_seconds_count", **labels) == 3
    assert scrape.value("llm_probe_time_per_output_token_seconds_count", **labels) == 3
    assert (
        scrape.value("llm_probe_last_success_timestamp_seconds", **labels) or 0
    ) > time.time() - 60
    # The probe's requests are the exporter's own, so the connection metrics count them too.
    assert (
        scrape.value(
            "llm_provider_requests_total",
            provider="local",
            endpoint="/v1/chat/completions",
            outcome="success",
        )
        == 3
    )


async def test_probe_timings_agree_with_llamacpps_own(larger_model: Path) -> None:
    """Tokens per second within 15% of llama.cpp's timings; TTFT between its prompt time and the total."""
    with LlamaCppServer(larger_model, parallel=1) as server:
        config = config_of(provider_yaml("big", "llamacpp", server.url))
        async with running(config) as exporter:
            provider = exporter.exporter.collector.by_name["big"]
            spec = ProbeSpec("Tell me a story.", max_tokens=32, timeout=60)
            results = [await provider.probe("tiny-llama", spec) for _ in range(3)]
    for result in results:
        assert result.output_tokens == 32
        assert (
            result.tokens_per_second is not None and result.provider_tokens_per_second is not None
        )
        assert result.tokens_per_second == pytest.approx(
            result.provider_tokens_per_second, rel=0.15
        )
        assert result.provider_prompt_seconds is not None
        assert result.provider_prompt_seconds <= result.time_to_first_token <= result.duration


async def test_stall_mid_stream_is_a_timeout_and_leaves_the_histograms_alone() -> None:
    routes = openai_routes(**{"/v1/chat/completions": sse_chat(("Hello", " there"), stall_after=1)})
    async with StandIn(routes) as server:
        api = provider_yaml(
            "api", "openai", f"{server.url}/v1", probes=probes(8, "1s", "[gpt-4o-mini]")
        )
        async with running(config_of(api)) as exporter:
            started = time.monotonic()
            scrape = await first_probe(exporter, "api")
            elapsed = time.monotonic() - started
            health = (await exporter.http.get("/health")).json()
    labels = {"provider": "api", "model": "gpt-4o-mini"}
    assert scrape.value("llm_probe_requests_total", outcome="timeout", **labels) == 1
    assert scrape.value("llm_probe_requests_total", outcome="success", **labels) is None
    assert scrape.value("llm_probe_duration_seconds_count", **labels) is None
    assert scrape.value("llm_probe_time_to_first_token_seconds_count", **labels) is None
    assert (
        scrape.value(
            "llm_provider_requests_total",
            provider="api",
            endpoint="/chat/completions",
            outcome="timeout",
        )
        == 1
    )
    assert elapsed < 8
    verdict = health["components"]["provider/api"]
    assert verdict["status"] == "degraded"
    assert "probe of gpt-4o-mini failed: timeout" in verdict["reason"]


async def test_answer_without_tokens_is_an_empty_response() -> None:
    routes = openai_routes(**{"/v1/chat/completions": sse_chat((), usage=False)})
    async with StandIn(routes) as server:
        api = provider_yaml(
            "api", "openai", f"{server.url}/v1", probes=probes(8, "5s", "[gpt-4o-mini]")
        )
        async with running(config_of(api)) as exporter:
            scrape = await first_probe(exporter, "api")
    assert (
        scrape.value("llm_probe_requests_total", model="gpt-4o-mini", outcome="empty_response") == 1
    )


async def test_ollama_nanoseconds_and_load_time() -> None:
    """A first request that had to load the model reports it in nanoseconds; so do the rest.

    Unwatched, every load time a probe reports is counted as Ollama gives it (watched, only
    loads the watcher saw are: tests/test_lifecycle.py).
    """
    words = ("The", " sky", " is", " blue", ".")
    chat = ollama_chat(words, first_load_ns=6_338_219_291, later_load_ns=2_104_167)
    async with StandIn(ollama_routes(**{"/api/chat": chat})) as server:
        unwatched = "{watch: false}"
        provider = provider_yaml(
            "ollama", "ollama", server.url, probes=probes(), lifecycle=unwatched
        )
        config = config_of(provider)
        async with running(config) as exporter:
            first = await first_probe(exporter, "ollama")
            await probe_again(exporter, "ollama")
            second = await exporter.scrape()
    loaded = {"provider": "ollama", "model": "mistral:latest"}
    # Only the loaded model is probed: codellama:13b is on disk only.
    assert first.all("llm_probe_requests_total", model="codellama:13b") == []
    assert first.value("llm_model_load_duration_seconds_sum", **loaded) == 6.338219291
    assert first.value("llm_model_load_duration_seconds_bucket", le="5.12", **loaded) == 0
    assert first.value("llm_model_load_duration_seconds_bucket", le="10.24", **loaded) == 1
    assert second.value("llm_model_load_duration_seconds_sum", **loaded) == pytest.approx(
        6.340323458
    )
    assert second.value("llm_model_load_duration_seconds_bucket", le="0.01", **loaded) == 1
    assert second.value("llm_probe_tokens_total", type="output", **loaded) == 2 * len(words)
    assert second.value("llm_probe_tokens_total", type="input", **loaded) == 2 * 26


def test_targets_never_force_a_load_unless_allowed() -> None:
    models = (
        ModelSnapshot("loaded", loaded=True),
        ModelSnapshot("on-disk", loaded=False),
        ModelSnapshot("hosted", loaded=None),
    )
    everything = ProbeConfig()
    assert targets(everything, models) == ["loaded"]
    assert targets(everything, None) == []
    listed = ProbeConfig(
        models=(
            ProbeModel("loaded"),
            ProbeModel("on-disk"),
            ProbeModel("hosted"),
            ProbeModel("gone"),
        )
    )
    assert targets(listed, models) == ["loaded", "hosted"]
    allowed = ProbeConfig(
        models=(ProbeModel("on-disk", allow_load=True), ProbeModel("gone", allow_load=True))
    )
    assert targets(allowed, models) == ["on-disk", "gone"]
    capped = ProbeConfig(max_models=2)
    many = tuple(ModelSnapshot(f"m{i}", loaded=True) for i in range(5))
    assert targets(capped, many) == ["m0", "m1"]


def test_a_model_with_its_own_interval_gets_its_own_schedule() -> None:
    fast, slow = ProbeModel("fast", interval=5.0), ProbeModel("slow")
    probes = ProbeConfig(models=(fast, slow), interval=60.0, timeout=30.0)
    assert schedules(probes) == [
        ProbeConfig(models=(fast,), interval=5.0, timeout=5.0),
        ProbeConfig(models=(slow,), interval=60.0, timeout=30.0),
    ]
    only_own = ProbeConfig(models=(fast,))
    # No leftover schedule: it would probe every loaded model, which nobody asked for.
    assert schedules(only_own) == [ProbeConfig(models=(fast,), interval=5.0, timeout=5.0)]
    assert schedules(ProbeConfig()) == [ProbeConfig()]


async def test_each_schedule_runs_on_its_own_interval() -> None:
    chat = sse_chat(("Hello", "!"))
    routes = openai_routes(**{"/v1/chat/completions": chat})
    async with StandIn(routes) as server:
        models = "[{name: gpt-4o-mini, interval: 200ms}, text-embedding-3-small]"
        flow = f"{{interval: 1h, jitter: 0, timeout: 5s, models: {models}}}"
        config = config_of(provider_yaml("api", "openai", f"{server.url}/v1", probes=flow))
        async with running(config) as exporter:
            fast = 0.0
            for _ in range(100):  # until the fast model has been probed 4 times (bounded)
                scrape = await exporter.scrape()
                fast = scrape.value("llm_probe_requests_total", model="gpt-4o-mini") or 0
                if fast >= 4:
                    break
                await asyncio.sleep(0.1)
    assert fast >= 4
    assert scrape.value("llm_probe_requests_total", model="text-embedding-3-small") == 1


def raw_stream(body: bytes, content_type: str = "text/event-stream") -> Handler:
    """A streamed answer that sends these bytes."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        try:
            for start in range(0, len(body), 64 * 1024):
                await response.write(body[start : start + 64 * 1024])
        except (ConnectionError, RuntimeError):
            pass  # the exporter stopped reading, as it should
        return response

    return handle


BOMB = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("kind", "endpoint", "body"),
    [
        ("openai", "/v1/chat/completions", b"data: " + BOMB + b"\n\n"),
        ("openai", "/v1/chat/completions", b"data: " + b"x" * (4 * 1024 * 1024) + b"\n\n"),
        ("ollama", "/api/chat", BOMB + b"\n"),
    ],
    ids=["sse JSON bomb", "sse giant line", "ndjson JSON bomb"],
)
async def test_a_bomb_in_a_probe_stream_is_a_counted_failure(
    kind: str, endpoint: str, body: bytes
) -> None:
    """Regression: a giant line or a JSON bomb in a probe stream was never recorded at all."""
    routes = {**openai_routes(), **ollama_routes(), endpoint: raw_stream(body)}
    async with StandIn(routes) as server:
        url = f"{server.url}/v1" if kind == "openai" else server.url
        model = "gpt-4o-mini" if kind == "openai" else "mistral:latest"
        config = config_of(provider_yaml("p", kind, url, probes=probes(8, "5s", f"[{model}]")))
        async with running(config) as exporter:
            scrape = await first_probe(exporter, "p")
            # /health judges the latest collection: one that starts after the probe failed.
            await exporter.scrape()
            health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_probe_requests_total", model=model, outcome="invalid_response") == 1
    verdict = health["components"]["provider/p"]
    assert verdict["status"] == "degraded"
    assert f"probe of {model} failed: invalid_response" in verdict["reason"]


async def test_probe_series_of_models_that_went_away_are_forgotten() -> None:
    """Regression: loaded-model names that keep changing grew the probe series without end."""
    round_number = 0

    async def changing_ps(request: web.Request) -> web.Response:
        models = [{"name": f"m{round_number}-{i}", "size": 1} for i in range(3)]
        return web.json_response({"models": models})

    words = ("Hi", ".")
    routes = ollama_routes(**{"/api/ps": changing_ps, "/api/chat": ollama_chat(words, 1, 1)})
    now = [1_000_000.0]
    async with StandIn(routes) as server:
        config = config_of(provider_yaml("o", "ollama", server.url, max_models=5))
        async with running(config, wall_clock=lambda: now[0]) as exporter:
            provider = exporter.exporter.config.providers[0]
            runner = ProbeRunner(
                exporter.exporter.config,
                exporter.exporter.collector.by_name,
                exporter.exporter.probe_stats,
                exporter.exporter.models_of,
                wall_clock=lambda: now[0],
            )
            schedule = ProbeConfig(interval=60.0, jitter=0.0)
            for round_number in range(40):  # noqa: B007  (changing_ps reads it)
                now[0] += 60
                await runner.run_once(provider, schedule)
            scrape = await exporter.scrape()
    probed = {labels["model"] for labels, _ in scrape.all("llm_probe_requests_total")}
    # Never more than max_models, and only models probed within the last few intervals.
    assert len(probed) <= 5
    assert probed <= {f"m{r}-{i}" for r in (37, 38, 39) for i in range(3)}
    assert {"m39-0", "m39-1", "m39-2"} <= probed


def test_an_ollama_probe_asks_for_no_more_than_the_model_had_left() -> None:
    now = 1_000_000.0
    runner = ProbeRunner(Config(), {}, ProbeStats(), models_of_nothing, wall_clock=lambda: now)
    runner.stats.of("ollama", "m").last_duration = 2.0
    spec = ProbeSpec("Hi", 4, 10.0)

    def keep_alive(expires_at: float | None) -> float | None:
        state = ModelState("m", Residence.LOADED, expires_at=expires_at)
        return runner._spec(spec, "ollama", state).keep_alive

    assert keep_alive(now + 120) == 118.0  # its time left, less what its last probe took
    assert keep_alive(now + 1.5) == 1.0  # never 0: that would unload it at the probe's end
    assert keep_alive(now - 5) is None  # past its expiry: busy, its stay unknown
    assert keep_alive(None) is None
    assert keep_alive(now + 292 * 365 * 86400) == -1  # kept for ever


async def models_of_nothing(provider: str) -> None:
    return None
