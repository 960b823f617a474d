"""The lmstudio adapter against LM Studio's documented shapes (tests/fixtures/README.md)."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest
from aiohttp import web

from exporter.client import ConnectionStats, ProviderClient
from exporter.errors import FailureClass, ProviderError
from exporter.providers.base import ModelControl, ModelState, ProbeSpec, Residence
from exporter.providers.lmstudio import CHAT, LOAD, NO_V1, OPENAI_CHAT, UNLOAD, LmStudioProvider
from tests.helpers import config_of, provider_yaml, running
from tests.standins import (
    Handler,
    StandIn,
    fixture,
    json_reply,
    lmstudio_chat,
    lmstudio_routes,
    reply,
    sse_chat,
)

V1 = json.loads(fixture("lmstudio_models_v1.json"))
V0 = json.loads(fixture("lmstudio_models_v0.json"))
GEMMA = "google/gemma-4-26b-a4b"
# What LM Studio before 0.4.0 answers, with status 200, for a path it does not serve.
UNKNOWN_PATH = json_reply({"error": "Unexpected endpoint or method. (GET /api/v1/models)"})
SPEC = ProbeSpec("Say hello.", max_tokens=4, timeout=10)


def entry(key: str) -> dict[str, Any]:
    """One model of the v1 fixture."""
    return next(m for m in V1["models"] if m["key"] == key)


async def test_models_with_their_loaded_instances() -> None:
    async with StandIn(lmstudio_routes()) as server:
        async with running(config_of(provider_yaml("lm", "lmstudio", server.url))) as exporter:
            scrape = await exporter.scrape()
    gemma = {"provider": "lm", "model": GEMMA}
    assert scrape.value("llm_provider_up", provider="lm", kind="lmstudio") == 1
    assert scrape.value("llm_provider_info", provider="lm", kind="lmstudio", version="") == 1
    assert scrape.value("llm_exporter_scrape_success", provider="lm") == 1
    assert scrape.value("llm_model_loaded", **gemma) == 1
    assert (
        scrape.value(
            "llm_model_info",
            family=entry(GEMMA)["architecture"],
            parameter_size=entry(GEMMA)["params_string"],
            quantization=entry(GEMMA)["quantization"]["name"],
            format=entry(GEMMA)["format"],
            **gemma,
        )
        == 1
    )
    assert scrape.value("llm_model_size_bytes", **gemma) == entry(GEMMA)["size_bytes"]
    assert (
        scrape.value("llm_model_memory_bytes", memory="total", **gemma)
        == (entry(GEMMA)["size_bytes"])
    )
    served = entry(GEMMA)["loaded_instances"][0]["config"]["context_length"]
    assert scrape.value("llm_model_context_tokens", **gemma) == served == 4096
    # Downloaded, not loaded: its size, no memory, no context it is served with.
    for key in ("deepseek-r1", "text-embedding-nomic-embed-text-v1.5-embedding"):
        model = {"provider": "lm", "model": key}
        assert scrape.value("llm_model_loaded", **model) == 0
        assert scrape.value("llm_model_size_bytes", **model) == entry(key)["size_bytes"]
        assert scrape.value("llm_model_memory_bytes", memory="total", **model) is None
        assert scrape.value("llm_model_context_tokens", **model) is None
    assert len(scrape.all("llm_model_loaded", provider="lm")) == len(V1["models"])


@pytest.mark.parametrize(
    "v1", [UNKNOWN_PATH, reply("not found", 404, "text/plain")], ids=["answers-200", "404"]
)
async def test_an_older_lm_studio_is_read_through_v0(v1: Handler) -> None:
    async with StandIn(lmstudio_routes(**{"/api/v1/models": v1})) as server:
        config = config_of(provider_yaml("lm", "lmstudio", server.url, lifecycle="{watch: false}"))
        async with running(config) as exporter:
            scrape = await exporter.scrape()
            await exporter.scrape()
        hits = dict(server.hits)
    llama = {"provider": "lm", "model": "meta-llama-3.1-8b-instruct"}
    assert scrape.value("llm_provider_up", provider="lm") == 1
    assert scrape.value("llm_exporter_scrape_success", provider="lm") == 1
    assert scrape.value("llm_model_loaded", **llama) == 1
    assert (
        scrape.value(
            "llm_model_info", family="llama", quantization="Q4_K_M", format="gguf", **llama
        )
        == 1
    )
    assert scrape.value("llm_model_context_tokens", **llama) == 4096
    assert scrape.value("llm_model_loaded", provider="lm", model="qwen2-vl-7b-instruct") == 0
    assert len(scrape.all("llm_model_loaded", provider="lm")) == len(V0["data"])
    # Found without v1 once, the next scrape reads v0 alone.
    assert hits["/api/v1/models"] == 1


async def test_a_server_that_does_not_answer_is_down() -> None:
    routes = lmstudio_routes(**{"/api/v1/models": reply("oops", 500, "text/plain")})
    async with StandIn(routes) as server:
        # Unwatched: the lifecycle watcher reads the same list.
        config = config_of(provider_yaml("lm", "lmstudio", server.url, lifecycle="{watch: false}"))
        async with running(config) as exporter:
            scrape = await exporter.scrape()
    assert scrape.value("llm_provider_up", provider="lm") == 0
    assert (
        scrape.value(
            "llm_provider_requests_total",
            provider="lm",
            endpoint="/api/v1/models",
            outcome="http_5xx",
        )
        == 1
    )


class LmStudio:
    """An LM Studio 0.4 stand-in whose models load and unload (its docs' load and unload
    shapes), counting the actions it was asked for."""

    def __init__(self, answer_load: Handler | None = None) -> None:
        self.models = copy.deepcopy(V1)
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.answer_load = answer_load

    def routes(self, **overrides: Handler) -> dict[str, Handler]:
        routes = {
            "/api/v1/models": self.listing,
            LOAD: self.load,
            UNLOAD: self.unload,
            CHAT: lmstudio_chat(("Hi", "!")),
        }
        return {**lmstudio_routes(), **routes, **overrides}

    async def listing(self, request: web.Request) -> web.Response:
        return web.json_response(self.models)

    async def load(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.posts.append((LOAD, body))
        if self.answer_load is not None:
            return await self.answer_load(request)
        model = next(m for m in self.models["models"] if m["key"] == body["model"])
        instance = {"id": model["key"], "config": {"context_length": 4096}}
        model["loaded_instances"].append(instance)
        answer = {"type": model["type"], "instance_id": model["key"], "status": "loaded"}
        return web.json_response({**answer, "load_time_seconds": 9.099})

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.posts.append((UNLOAD, body))
        for model in self.models["models"]:
            instances = model["loaded_instances"]
            model["loaded_instances"] = [i for i in instances if i["id"] != body["instance_id"]]
        return web.json_response({"instance_id": body["instance_id"]})


async def with_provider(routes: dict[str, Handler], act: Any) -> Any:
    """Run act(provider) against a stand-in serving routes."""
    async with StandIn(routes) as server:
        config = config_of(provider_yaml("lm", "lmstudio", server.url)).providers[0]
        async with ProviderClient(config, ConnectionStats()) as client:
            provider = LmStudioProvider(config, client)
            assert isinstance(provider, ModelControl)
            return await act(provider)


async def test_model_states_are_the_models_with_a_loaded_instance() -> None:
    async def states(provider: LmStudioProvider) -> tuple[ModelState, ...]:
        return await provider.model_states()

    loaded = ModelState(GEMMA, Residence.LOADED, memory_bytes=entry(GEMMA)["size_bytes"])
    assert await with_provider(lmstudio_routes(), states) == (loaded,)
    older = lmstudio_routes(**{"/api/v1/models": UNKNOWN_PATH})
    assert await with_provider(older, states) == (
        ModelState("meta-llama-3.1-8b-instruct", Residence.LOADED),
    )


async def test_load_and_unload_through_the_v1_api() -> None:
    server = LmStudio()

    async def act(provider: LmStudioProvider) -> tuple[ModelState, ...]:
        await provider.load_model("deepseek-r1", pin=True)
        await provider.load_model(GEMMA, pin=False)  # loaded already: no second instance
        await provider.unload_model(GEMMA)
        await provider.unload_model("text-embedding-nomic-embed-text-v1.5-embedding")  # none
        return await provider.model_states()

    states = await with_provider(server.routes(), act)
    assert server.posts == [(LOAD, {"model": "deepseek-r1"}), (UNLOAD, {"instance_id": GEMMA})]
    assert [(s.name, s.residence) for s in states] == [("deepseek-r1", Residence.LOADED)]


async def test_every_instance_of_a_model_is_unloaded() -> None:
    server = LmStudio()
    gemma = next(m for m in server.models["models"] if m["key"] == GEMMA)
    gemma["loaded_instances"].append({"id": f"{GEMMA}:2", "config": {"context_length": 8192}})

    async def act(provider: LmStudioProvider) -> None:
        await provider.unload_model(GEMMA)

    await with_provider(server.routes(), act)
    assert server.posts == [
        (UNLOAD, {"instance_id": GEMMA}),
        (UNLOAD, {"instance_id": f"{GEMMA}:2"}),
    ]


@pytest.mark.parametrize(
    ("answer", "failure"),
    [
        (json_reply({"error": {"type": "model_not_found", "message": "no such"}}, 404), "http_4xx"),
        (json_reply({"error": "Unexpected endpoint or method. (POST /x)"}), "invalid_response"),
    ],
    ids=["refused", "answers-an-error"],
)
async def test_a_refused_load_is_a_classified_failure(answer: Handler, failure: str) -> None:
    async def act(provider: LmStudioProvider) -> None:
        await provider.load_model("deepseek-r1", pin=False)

    with pytest.raises(ProviderError) as failed:
        await with_provider(LmStudio(answer).routes(), act)
    assert (failed.value.failure.value, failed.value.endpoint) == (failure, LOAD)


async def test_an_older_lm_studio_cannot_load_or_unload() -> None:
    async def act(provider: LmStudioProvider) -> None:
        await provider.unload_model("meta-llama-3.1-8b-instruct")

    with pytest.raises(ProviderError) as failed:
        await with_provider(lmstudio_routes(**{"/api/v1/models": UNKNOWN_PATH}), act)
    assert (failed.value.failure, failed.value.message) == (FailureClass.HTTP_4XX, NO_V1)
    assert failed.value.endpoint == UNLOAD


async def test_the_lifecycle_policy_loads_a_pinned_model() -> None:
    server = LmStudio()
    async with StandIn(server.routes()) as standin:
        lifecycle = "{watch_interval: 50ms, pin: [deepseek-r1]}"
        config = config_of(provider_yaml("lm", "lmstudio", standin.url, lifecycle=lifecycle))
        async with running(config):
            for _ in range(200):
                if server.posts:
                    break
                await asyncio.sleep(0.05)
    assert server.posts[0] == (LOAD, {"model": "deepseek-r1"})


async def test_probe_reads_lm_studios_own_stats() -> None:
    words = ("Hello", " from", " LM", " Studio")
    bodies: list[Any] = []
    routes = lmstudio_routes(**{CHAT: lmstudio_chat(words, bodies=bodies)})

    async def act(provider: LmStudioProvider) -> Any:
        return await provider.probe(GEMMA, SPEC)

    result = await with_provider(routes, act)
    assert bodies == [
        {
            "model": GEMMA,
            "input": SPEC.prompt,
            "stream": True,
            "max_output_tokens": SPEC.max_tokens,
            "store": False,
        }
    ]
    assert (result.output_tokens, result.input_tokens) == (len(words), 17)
    assert result.provider_tokens_per_second == 51.03762685242662
    assert result.provider_prompt_seconds == 0.814
    assert result.load_duration is None  # the model was loaded already
    assert result.time_per_output_token is not None
    assert 0 < result.time_to_first_token <= result.duration


async def test_probe_that_loaded_its_model_reports_the_load_time() -> None:
    routes = lmstudio_routes(**{CHAT: lmstudio_chat(("Hi", "!"), load_seconds=2.656)})

    async def act(provider: LmStudioProvider) -> Any:
        return await provider.probe("deepseek-r1", SPEC)

    assert (await with_provider(routes, act)).load_duration == 2.656


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (
            b'event: error\ndata: {"type": "error", "error": {"type": "model_not_found",'
            b' "message": "no"}}\n\n',
            "error in the stream",
        ),
        (b'event: chat.start\ndata: {"type": "chat.start"}\n\n', "stream ended before chat.end"),
        (b"data: [1, 2]\n\n", "expected an event to be an object, got list"),
    ],
    ids=["error-event", "no-chat-end", "not-an-object"],
)
async def test_a_broken_chat_stream_is_invalid_response(stream: bytes, message: str) -> None:
    routes = lmstudio_routes(**{CHAT: reply(stream, 200, "text/event-stream")})

    async def act(provider: LmStudioProvider) -> Any:
        return await provider.probe(GEMMA, SPEC)

    with pytest.raises(ProviderError) as failed:
        await with_provider(routes, act)
    assert (failed.value.failure, failed.value.message) == (FailureClass.INVALID_RESPONSE, message)
    assert failed.value.endpoint == CHAT


async def test_probe_of_an_older_lm_studio_uses_the_openai_api() -> None:
    routes = lmstudio_routes(
        **{"/api/v1/models": UNKNOWN_PATH, OPENAI_CHAT: sse_chat(("Hi", " there"))}
    )

    async def act(provider: LmStudioProvider) -> Any:
        await provider.model_states()  # as the probe runner does first
        return await provider.probe("meta-llama-3.1-8b-instruct", SPEC)

    result = await with_provider(routes, act)
    assert (result.output_tokens, result.input_tokens) == (2, 11)
    assert result.provider_tokens_per_second is None


async def test_scheduled_probes_count_lm_studios_tokens() -> None:
    words = ("One", " two", " three")
    routes = lmstudio_routes(**{CHAT: lmstudio_chat(words)})
    async with StandIn(routes) as server:
        probes = "{interval: 1h, jitter: 0, max_tokens: 3}"
        config = config_of(provider_yaml("lm", "lmstudio", server.url, probes=probes))
        async with running(config) as exporter:
            for _ in range(200):
                scrape = await exporter.scrape()
                if scrape.all("llm_probe_requests_total", provider="lm"):
                    break
                await asyncio.sleep(0.05)
    gemma = {"provider": "lm", "model": GEMMA}
    # Only the loaded model is probed: a probe never loads one.
    assert [labels["model"] for labels, _ in scrape.all("llm_probe_requests_total")] == [GEMMA]
    assert scrape.value("llm_probe_requests_total", outcome="success", **gemma) == 1
    assert scrape.value("llm_probe_tokens_total", type="output", **gemma) == len(words)
    assert scrape.value("llm_probe_tokens_total", type="input", **gemma) == 17
