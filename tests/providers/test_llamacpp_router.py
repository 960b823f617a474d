"""The llamacpp adapter against llama-server in router mode (tests/router_standin.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from aiohttp import web

from exporter.client import ConnectionStats, ProviderClient
from exporter.errors import FailureClass, ProviderError
from exporter.providers.base import ModelControl, ModelResidency, ModelState, Residence
from exporter.providers.llamacpp import SINGLE_MODEL, LlamaCppProvider
from llamacpp_server import free_port
from tests.helpers import config_of, provider_yaml, running
from tests.router_standin import (
    BUILD,
    FAILED,
    LOADED,
    LOADING,
    SLEEPING,
    UNLOADED,
    Model,
    Router,
)
from tests.standins import Handler, StandIn, json_reply, llamacpp_routes, reply

# The recorded page's own cached prompt tokens, which the stand-in keeps for every model.
CACHED = 84


def every_state() -> Router:
    """A router with two loaded models (different numbers) and one model in each other state."""
    return Router(
        {
            "qwen3-8b": Model(
                LOADED, prompt_tokens=221, predicted_tokens=360, processing=2, busy=1
            ),
            "gemma-3-4b": Model(LOADED, prompt_tokens=1000, predicted_tokens=7, slots=2),
            "mistral-7b": Model(UNLOADED),
            "llama-3.2-1b": Model(SLEEPING),
            "phi-4": Model(LOADING),
            "broken": Model(FAILED, exit_code=1),
        }
    )


@asynccontextmanager
async def provider_for(url: str, **options: str) -> AsyncIterator[LlamaCppProvider]:
    """A llamacpp provider reading url, with its own client."""
    config = config_of(provider_yaml("router", "llamacpp", url, **options)).providers[0]
    async with ProviderClient(config, ConnectionStats()) as client:
        yield LlamaCppProvider(config, client)


def never_asked_a_model_that_was_not_loaded(router: Router) -> None:
    """No request named a model that was not loaded, and none could have loaded one."""
    named = [seen for seen in router.seen if "model" in seen.query]
    assert all(seen.state == LOADED for seen in named), named
    assert all(seen.query.get("autoload") == "false" for seen in named), named
    assert router.autoloaded == []
    assert router.woken == []
    assert [s.state for s in router.models.values()].count(LOADED) == 2  # nothing loaded


async def test_engine_series_exist_for_loaded_models_only() -> None:
    router = every_state()
    async with StandIn(router.routes()) as server:
        config = config_of(provider_yaml("router", "llamacpp", server.url))
        async with running(config) as exporter:
            for _ in range(2):
                await exporter.exporter.collect()
            scrape = await exporter.scrape()
    loaded = {labels["model"]: v for labels, v in scrape.all("llm_model_loaded", provider="router")}
    assert loaded == {
        "qwen3-8b": 1,
        "gemma-3-4b": 1,
        "mistral-7b": 0,
        "llama-3.2-1b": 0,
        "phi-4": 0,
        "broken": 0,
    }
    qwen = {"provider": "router", "model": "qwen3-8b"}
    assert scrape.value("llm_tokens_total", **qwen, type="output") == 360
    assert scrape.value("llm_tokens_total", **qwen, type="input") == 221 + CACHED
    assert scrape.value("llm_requests_running", **qwen) == 2
    assert scrape.value("llm_slots", **qwen, state="busy") == 1
    assert scrape.value("llm_slots", **qwen, state="idle") == 3
    assert scrape.value("llm_model_context_tokens", **qwen) == 4096
    gemma = {"provider": "router", "model": "gemma-3-4b"}
    assert scrape.value("llm_tokens_total", **gemma, type="output") == 7
    assert scrape.value("llm_tokens_total", **gemma, type="input") == 1000 + CACHED
    assert scrape.value("llm_slots", **gemma, state="idle") == 2
    engine_models = {labels["model"] for labels, _ in scrape.all("llm_tokens_total")}
    assert engine_models == {"qwen3-8b", "gemma-3-4b"}
    assert scrape.value("llm_provider_info", provider="router", version=BUILD) == 1
    assert scrape.value("llm_exporter_scrape_success", provider="router") == 1
    # The model goes in the query, not in the endpoint label.
    endpoints = {labels["endpoint"] for labels, _ in scrape.all("llm_provider_requests_total")}
    assert endpoints <= {"/health", "/v1/models", "/models", "/props", "/metrics", "/slots"}
    never_asked_a_model_that_was_not_loaded(router)


async def test_mode_is_learned_once_and_read_per_model() -> None:
    router = every_state()
    async with StandIn(router.routes()) as server, provider_for(server.url) as provider:
        first = await provider.snapshot()
        asked_first = [(s.path, s.query.get("model")) for s in router.seen]
        router.seen.clear()
        await provider.snapshot()
        asked_then = [(s.path, s.query.get("model")) for s in router.seen]
    assert first.up and first.ready and not first.failures
    assert sorted(asked_first) == sorted(
        [
            ("/health", None),
            ("/v1/models", None),  # the mode is told by the listing's status objects
            ("/props", None),
            ("/metrics", "qwen3-8b"),
            ("/slots", "qwen3-8b"),
            ("/metrics", "gemma-3-4b"),
            ("/slots", "gemma-3-4b"),
        ]
    )
    assert sorted(asked_then) == sorted(
        [
            ("/health", None),
            ("/models", None),
            ("/props", None),
            ("/metrics", "qwen3-8b"),
            ("/slots", "qwen3-8b"),
            ("/metrics", "gemma-3-4b"),
            ("/slots", "gemma-3-4b"),
        ]
    )


async def test_model_states_report_each_state_without_touching_a_model() -> None:
    router = every_state()
    async with StandIn(router.routes()) as server, provider_for(server.url) as provider:
        assert isinstance(provider, ModelControl)
        states = await provider.model_states()
        router.seen.clear()
        again = await provider.model_states()
        await provider.snapshot()
        await provider.model_states()
    by_name = {state.name: state for state in states}
    assert {name: s.residence for name, s in by_name.items()} == {
        "qwen3-8b": Residence.LOADED,
        "gemma-3-4b": Residence.LOADED,
        "mistral-7b": Residence.UNLOADED,
        "llama-3.2-1b": Residence.SLEEPING,
        "phi-4": Residence.LOADING,
        "broken": Residence.FAILED,
    }
    assert by_name["broken"].detail == "exit code 1"
    assert by_name["qwen3-8b"].memory_bytes == 1_000_000
    assert by_name["llama-3.2-1b"].memory_bytes is None
    assert again == states
    # Once the mode is known, a residency read is one request to the router's listing.
    assert [(s.method, s.path) for s in router.seen[:1]] == [("GET", "/models")]
    never_asked_a_model_that_was_not_loaded(router)


async def test_load_and_unload_change_the_routers_state() -> None:
    router = every_state()
    router.load_seconds = 0.2
    async with StandIn(router.routes()) as server, provider_for(server.url) as provider:
        await provider.load_model("mistral-7b", pin=True)
        assert router.models["mistral-7b"].state == LOADING
        states = {s.name: s.residence for s in await provider.model_states()}
        assert states["mistral-7b"] is Residence.LOADING
        for _ in range(100):
            if router.models["mistral-7b"].state == LOADED:
                break
            await asyncio.sleep(0.01)
        states = {s.name: s.residence for s in await provider.model_states()}
        assert states["mistral-7b"] is Residence.LOADED
        await provider.unload_model("qwen3-8b")
        assert router.models["qwen3-8b"].state == UNLOADED
        # Asked twice, the second is already done: no failure.
        await provider.load_model("mistral-7b", pin=False)
        await provider.unload_model("qwen3-8b")
        with pytest.raises(ProviderError) as unknown:
            await provider.load_model("no-such-model", pin=False)
    loads = [s for s in router.seen if s.path == "/models/load"]
    # The first loaded it, the second found it loaded, the third named no model it knows.
    assert [s.state for s in loads] == [UNLOADED, LOADED, None]
    assert unknown.value.failure is FailureClass.HTTP_4XX
    assert unknown.value.endpoint == "/models/load"
    assert router.autoloaded == []


async def test_a_failed_load_is_reported_with_its_exit_code() -> None:
    router = Router({"big": Model(UNLOADED, exit_code=137, fail_next_load=True)})
    async with StandIn(router.routes()) as server, provider_for(server.url) as provider:
        await provider.load_model("big", pin=False)
        for _ in range(100):
            if router.models["big"].state != LOADING:
                break
            await asyncio.sleep(0.01)
        states = await provider.model_states()
    assert states == (ModelState("big", Residence.FAILED, detail="exit code 137"),)


async def test_single_model_server_cannot_load_or_unload() -> None:
    async with StandIn(llamacpp_routes()) as server, provider_for(server.url) as provider:
        with pytest.raises(ProviderError) as load:
            await provider.load_model("tiny-llama", pin=True)
        with pytest.raises(ProviderError) as unload:
            await provider.unload_model("tiny-llama")
        states = await provider.model_states()
        posted = [path for path, count in server.hits.items() if path.startswith("/models")]
    assert (load.value.failure, load.value.message, load.value.endpoint) == (
        FailureClass.HTTP_4XX,
        SINGLE_MODEL,
        "/models/load",
    )
    assert (unload.value.failure, unload.value.endpoint) == (
        FailureClass.HTTP_4XX,
        "/models/unload",
    )
    assert posted == []
    assert states == (ModelState("tiny-llama", Residence.LOADED),)


async def test_single_model_states_follow_health() -> None:
    loading = json_reply(
        {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, 503
    )
    health: list[Handler] = [reply('{"status":"ok"}')]

    async def current(request: web.Request) -> web.StreamResponse:
        return await health[0](request)

    async with (
        StandIn(llamacpp_routes(**{"/health": current})) as server,
        provider_for(server.url) as provider,
    ):
        assert await provider.model_states() == (ModelState("tiny-llama", Residence.LOADED),)
        before = dict(server.hits)
        health[0] = loading
        assert await provider.model_states() == (ModelState("tiny-llama", Residence.LOADING),)
        asked = {path: server.hits[path] - before.get(path, 0) for path in server.hits}
    # Known by now: one /health per read, and the model's name as the listing said it.
    assert {path: n for path, n in asked.items() if n} == {"/health": 1}


async def test_the_mode_is_learned_again_after_the_server_went_away() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with provider_for(url) as provider:
        async with serve(every_state().routes(), port):
            routed = await provider.snapshot()
        gone = await provider.snapshot()
        async with serve(llamacpp_routes(), port):
            single = await provider.snapshot()
            states = await provider.model_states()
        with pytest.raises(ProviderError) as refused:
            await provider.model_states()
        async with serve(every_state().routes(), port):
            states_again = {s.name: s.residence for s in await provider.model_states()}
    assert {e.model for e in routed.engines} == {"qwen3-8b", "gemma-3-4b"}
    assert not gone.up
    assert [m.name for m in single.models] == ["tiny-llama"]
    assert [e.model for e in single.engines] == ["tiny-llama"]
    assert single.engines[0].output_tokens_total == 360
    assert not single.failures
    assert states == (ModelState("tiny-llama", Residence.LOADED),)
    assert refused.value.failure is FailureClass.CONNECT
    assert states_again["llama-3.2-1b"] is Residence.SLEEPING


async def test_a_model_unloaded_between_listing_and_read_is_no_failure() -> None:
    router = every_state()
    gone = json_reply(
        {"error": {"code": 400, "message": "model is not loaded", "type": "invalid_request_error"}},
        400,
    )
    async with (
        StandIn(router.routes(**{"/metrics": gone, "/slots": gone})) as server,
        provider_for(server.url) as provider,
    ):
        snapshot = await provider.snapshot()
    assert snapshot.up and not snapshot.failures and not snapshot.notes
    assert snapshot.engines == ()
    assert {m.name for m in snapshot.models if m.loaded} == {"qwen3-8b", "gemma-3-4b"}


async def test_children_without_metrics_say_so() -> None:
    router = every_state()
    router.metrics = False
    async with StandIn(router.routes()) as server, provider_for(server.url) as provider:
        snapshot = await provider.snapshot()
    assert not snapshot.failures
    assert snapshot.notes == ("engine metrics off: start llama-server with --metrics",)
    assert {(e.model, e.slots_idle) for e in snapshot.engines} == {
        ("qwen3-8b", 3),
        ("gemma-3-4b", 2),
    }


async def test_a_hostile_listing_is_bounded() -> None:
    long_name = "m" * 1000
    router = Router(
        {
            **{f"model-{i}": Model(LOADED, predicted_tokens=i) for i in range(500)},
            long_name: Model(LOADED),
        }
    )
    async with (
        StandIn(router.routes()) as server,
        provider_for(server.url, max_models="3") as provider,
    ):
        await provider.snapshot()
        snapshot = await provider.snapshot()
        states = await provider.model_states()
    assert [m.name for m in snapshot.models] == ["model-0", "model-1", "model-2"]
    assert [e.output_tokens_total for e in snapshot.engines] == [0, 1, 2]
    assert snapshot.notes == ("498 more models listed than max_models (3): not read",)
    assert len(states) == 3
    assert len({s.query["model"] for s in router.seen if "model" in s.query}) == 3
    assert not router.asked_of(long_name)


async def test_a_long_or_unprintable_name_is_listed_but_never_asked() -> None:
    odd = "bad\u0007name"
    router = Router({odd: Model(LOADED), "x" * 300: Model(LOADED), "fine": Model(LOADED)})
    async with StandIn(router.routes()) as server, provider_for(server.url) as provider:
        snapshot = await provider.snapshot()
    assert {m.name for m in snapshot.models} == {"badname", "x" * 128, "fine"}
    assert [e.model for e in snapshot.engines] == ["fine"]
    assert {s.query["model"] for s in router.seen if "model" in s.query} == {"fine"}


def test_residency_protocols() -> None:
    assert issubclass(LlamaCppProvider, ModelResidency)


@asynccontextmanager
async def serve(routes: dict[str, Handler], port: int) -> AsyncIterator[None]:
    """Serve routes on a given 127.0.0.1 port for the duration of the block."""

    async def dispatch(request: web.Request) -> web.StreamResponse:
        handler = routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="not found")
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def test_the_stand_in_autoloads_as_the_router_does() -> None:
    """What the tests above rely on: without autoload=false, asking a model loads it."""
    router = every_state()
    async with StandIn(router.routes()) as server, httpx.AsyncClient(base_url=server.url) as http:
        refused = await http.get("/metrics", params={"model": "mistral-7b", "autoload": "false"})
        missing = await http.get("/metrics")
        loaded = await http.get("/metrics", params={"model": "mistral-7b"})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "model is not loaded"
    assert missing.status_code == 400
    assert loaded.status_code == 200 and "llamacpp:tokens_predicted_total 0" in loaded.text
    assert router.autoloaded == ["mistral-7b"]
    assert router.models["mistral-7b"].state == LOADED
