"""Model lifecycle: events and their causes, probes that never keep a model, and the policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aiohttp import web

from exporter.config import LifecycleConfig, ProviderConfig
from exporter.lifecycle import (
    EVICTED,
    IDLE,
    LOAD_FAILED,
    LOADED,
    REQUESTED,
    SLEPT,
    UNKNOWN,
    UNLOADED,
    WOKE,
    LifecycleEvent,
    ProviderLifecycle,
)
from exporter.providers.base import ModelState, Residence
from tests.helpers import Running, config_of, provider_yaml, running
from tests.ollama_standin import OllamaLifecycle
from tests.router_standin import LOADED as LOADED_STATE
from tests.router_standin import SLEEPING as SLEEPING_STATE
from tests.router_standin import UNLOADED as UNLOADED_STATE
from tests.router_standin import Model as RouterModel
from tests.router_standin import Router
from tests.standins import StandIn

HELD = Residence.LOADED


def lifecycle(max_models: int = 100) -> ProviderLifecycle:
    return ProviderLifecycle(ProviderConfig("p", "ollama", "http://x", max_models=max_models))


def state(name: str, residence: Residence = HELD, expires_at: float | None = None) -> ModelState:
    return ModelState(name, residence, expires_at=expires_at)


def told(events: list[LifecycleEvent]) -> list[tuple[str, str, str]]:
    return [(e.model, e.event, e.cause) for e in events]


# The watcher's reasoning, read by read.


def test_the_first_read_is_no_event_and_later_changes_are() -> None:
    watched = lifecycle()
    assert watched.observe([state("a")], 100.0) == []
    assert told(watched.observe([state("a"), state("b", Residence.LOADING)], 110.0)) == []
    events = watched.observe([state("a"), state("b")], 120.0)
    assert told(events) == [("b", LOADED, "")]
    assert events[0].load_seconds == 10.0  # from loading to loaded
    assert watched.records["b"].loads == 1 and watched.records["a"].loads == 0
    assert watched.records["b"].load_duration.observed == 1


def test_a_model_past_its_expiry_went_idle() -> None:
    watched = lifecycle()
    watched.observe([state("a", expires_at=105.0)], 100.0)
    assert told(watched.observe([], 110.0)) == [("a", UNLOADED, IDLE)]


def test_a_model_gone_while_another_loaded_was_evicted() -> None:
    watched = lifecycle()
    watched.observe([state("a", expires_at=400.0)], 100.0)
    events = watched.observe([state("b", expires_at=500.0)], 110.0)
    assert told(events) == [("a", UNLOADED, EVICTED), ("b", LOADED, "")]


def test_an_eviction_is_told_when_the_load_that_caused_it_shows() -> None:
    """Ollama lists a model only once it is loaded: the one it evicted is gone before."""
    watched = lifecycle()
    watched.observe([state("a", expires_at=400.0)], 100.0)
    assert watched.observe([], 110.0) == []
    events = watched.observe([state("b")], 120.0)
    assert told(events) == [("a", UNLOADED, EVICTED), ("b", LOADED, "")]
    assert events[0].at == 110.0  # when it was seen gone


def test_a_cause_that_cannot_be_told_is_unknown_after_two_more_reads() -> None:
    watched = lifecycle()
    watched.observe([state("a", expires_at=400.0)], 100.0)
    assert watched.observe([], 110.0) == []
    assert watched.observe([], 120.0) == []
    assert told(watched.observe([], 130.0)) == [("a", UNLOADED, UNKNOWN)]
    assert watched.records["a"].unloads == {UNKNOWN: 1}


def test_an_unload_asked_for_is_requested() -> None:
    watched = lifecycle()
    watched.observe([state("a", expires_at=400.0)], 100.0)
    watched.requested["a"] = 105.0
    assert told(watched.observe([], 110.0)) == [("a", UNLOADED, REQUESTED)]
    assert "a" not in watched.requested


def test_a_request_after_the_read_moves_the_expiry_so_it_is_not_idle() -> None:
    watched = lifecycle()
    watched.observe([state("a", expires_at=105.0)], 100.0)
    watched.record("a", 103.0).last_used = 103.0
    assert watched.observe([], 110.0) == []  # its expiry is unknown now: wait for a load
    assert watched.observe([], 120.0) == []
    assert told(watched.observe([state("b")], 130.0)) == [
        ("a", UNLOADED, EVICTED),
        ("b", LOADED, ""),
    ]


def test_a_router_model_sleeps_wakes_and_fails() -> None:
    watched = lifecycle()
    watched.observe([state("a"), state("b", Residence.LOADING)], 100.0)
    failed = ModelState("b", Residence.FAILED, detail="exit code 1")
    events = watched.observe([state("a", Residence.SLEEPING), failed], 110.0)
    assert told(events) == [("a", SLEPT, ""), ("b", LOAD_FAILED, "")]
    assert events[1].detail == "exit code 1"
    assert told(watched.observe([state("a"), failed], 120.0)) == [("a", WOKE, "")]
    events = watched.observe([ModelState("a", Residence.FAILED)], 130.0)
    assert told(events) == [("a", UNLOADED, "failed")]
    record = watched.records["a"]
    assert (record.sleeps, record.wakes, record.unloads) == (1, 1, {"failed": 1})


def test_a_load_takes_the_duration_its_request_reported_before_or_after_it_shows() -> None:
    watched = lifecycle()
    watched.observe([state("a")], 100.0)
    watched.note_load("b", 4.0, 105.0)  # the request that loaded b ended before b showed
    watched.note_load("a", 0.002, 105.0)  # a was loaded already: no load
    assert watched.observe([state("a"), state("b")], 110.0)[0].load_seconds == 4.0
    assert watched.observe([state("a"), state("b"), state("c")], 120.0)[0].load_seconds is None
    watched.note_load("c", 7.0, 121.0)  # c showed while its request still ran
    durations = {name: r.load_duration for name, r in watched.records.items()}
    assert (durations["a"].observed, durations["b"].total, durations["c"].total) == (0, 4.0, 7.0)


def test_unwatched_every_reported_load_counts() -> None:
    watched = lifecycle()
    watched.note_load("a", 4.0, 100.0)
    watched.note_load("a", 0.002, 101.0)
    assert watched.records["a"].load_duration.observed == 2


def test_records_are_bounded_and_held_models_kept() -> None:
    watched = lifecycle(max_models=3)
    watched.observe([state("a"), state("b")], 100.0)
    for index in range(50):
        watched.record(f"gone-{index}", 101.0 + index)
    assert len(watched.records) == 3
    assert {"a", "b"} <= set(watched.records)


# Against an Ollama stand-in with Ollama's scheduler.


WATCH = "50ms"


@asynccontextmanager
async def watched_ollama(
    ollama: OllamaLifecycle, lifecycle: str = "", **extra: str
) -> AsyncIterator[tuple[Running, str]]:
    """An exporter watching the stand-in every 50 ms, with a gateway in front of it."""
    server = await ollama.serve()
    try:
        section = f"{{watch_interval: {WATCH}{', ' + lifecycle if lifecycle else ''}}}"
        provider = provider_yaml(
            "ollama",
            "ollama",
            server.url,
            lifecycle=section,
            gateway="{listen: '127.0.0.1:0'}",
            **extra,
        )
        async with running(config_of(provider)) as exporter:
            await until(lambda: bool(exporter.exporter.lifecycle_stats.reads), "a first read")
            yield exporter, "http://" + exporter.exporter.gateway.addresses["ollama"]
    finally:
        await server.close()


async def until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Wait until condition holds (bounded)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {seconds:g}s")
        await asyncio.sleep(0.01)


async def chat(url: str, model: str, **extra: Any) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]} | extra
        response = await client.post(f"{url}/api/chat", json=body)
        assert response.status_code == 200, response.text


def in_flight(exporter: Running) -> int:
    """Requests through the gateway that the lifecycle still counts as serving a model."""
    records = exporter.exporter.lifecycle_stats.providers["ollama"].records.values()
    return sum(record.in_flight for record in records)


def history(ollama: OllamaLifecycle) -> list[tuple[str, str, str]]:
    return [(model, what, why) for _, model, what, why in ollama.history]


def seen(exporter: Running) -> list[tuple[str, str, str]]:
    events = reversed(exporter.exporter.lifecycle.events())
    return [(e["model"], e["event"], e.get("cause", "")) for e in events]


async def test_each_load_and_unload_is_reported_with_its_cause() -> None:
    """Evicted for another model, idle past its keep-alive, unloaded by a client's
    keep_alive 0: the exporter tells each as the stand-in's scheduler did it."""
    ollama = OllamaLifecycle(
        ("a", "b"), default_keep_alive=0.6, load_seconds=0.15, generate_seconds=0.2, max_loaded=1
    )
    async with watched_ollama(ollama) as (exporter, gateway):
        await chat(gateway, "a")
        await until(lambda: seen(exporter)[-1:] == [("a", LOADED, "")], "load of a")
        await chat(gateway, "b")  # a is within its keep-alive: evicted
        await until(lambda: ("b", LOADED, "") in seen(exporter), "load of b")
        await until(lambda: ("b", UNLOADED, IDLE) in seen(exporter), "b idle")
        await chat(gateway, "a", keep_alive=0)
        await until(lambda: ("a", UNLOADED, REQUESTED) in seen(exporter), "a requested")
        scrape = await exporter.scrape()
        page = (await exporter.http.get("/")).text
        listed = (await exporter.http.get("/models")).json()
    expected = [
        ("a", LOADED, ""),
        ("a", UNLOADED, EVICTED),
        ("b", LOADED, ""),
        ("b", UNLOADED, IDLE),
        ("a", LOADED, ""),
        ("a", UNLOADED, REQUESTED),
    ]
    assert history(ollama) == expected
    assert seen(exporter) == expected
    a, b = {"provider": "ollama", "model": "a"}, {"provider": "ollama", "model": "b"}
    assert scrape.value("llm_model_loads_total", **a) == 2
    assert scrape.value("llm_model_unloads_total", cause=EVICTED, **a) == 1
    assert scrape.value("llm_model_unloads_total", cause=REQUESTED, **a) == 1
    assert scrape.value("llm_model_unloads_total", cause=IDLE, **b) == 1
    assert scrape.value("llm_model_unloads_total", cause=EVICTED, **b) == 0
    # Each load once, with the time the request that waited for it reported.
    reported = sum(ollama.reported_loads)
    loads = sum(scrape.value("llm_model_load_duration_seconds_count", **m) or 0 for m in (a, b))
    total = sum(scrape.value("llm_model_load_duration_seconds_sum", **m) or 0 for m in (a, b))
    assert (loads, total) == (3, pytest.approx(reported))
    assert scrape.value("llm_model_last_used_timestamp_seconds", **a) is not None
    assert [e["event"] for e in listed["events"]][:2] == [UNLOADED, LOADED]  # newest first
    assert listed["models"]["ollama"]["a"]["unloads"] == {EVICTED: 1, REQUESTED: 1}
    assert "Model events" in page and "evicted" in page


async def test_probes_every_100ms_do_not_keep_an_idle_model_loaded() -> None:
    ollama = OllamaLifecycle(("a",), default_keep_alive=1.0, generate_seconds=0.005)
    probes = "{interval: 100ms, jitter: 0, timeout: 100ms, max_tokens: 2}"
    async with watched_ollama(ollama, probes=probes) as (exporter, _):
        await chat(exporter_url(ollama), "a")
        used_until = time.time()
        await until(lambda: ("a", UNLOADED, IDLE) in history(ollama), "a unloaded", 5)
        unloaded_at = ollama.history[-1][0]
        await asyncio.sleep(0.5)  # probes go on, and must not load it again
        scrape = await exporter.scrape()
    probes_sent = len(ollama.chat_requests) - 1  # all but the client's own
    # A probe while the client's request still ran found no expiry yet: the model's default.
    assert len([r for r in ollama.chat_requests if "keep_alive" in r]) >= 5
    assert unloaded_at - used_until < 1.0 + 0.25  # its keep-alive, and a probe's length at most
    assert history(ollama) == [("a", LOADED, ""), ("a", UNLOADED, IDLE)]
    assert scrape.value("llm_probe_requests_total", model="a", outcome="success") == probes_sent
    assert ("a", UNLOADED, IDLE) in seen(exporter)


async def test_the_standin_keeps_a_model_that_requests_without_keep_alive_use() -> None:
    """What the test above guards against: a request every 100 ms restarts the timer."""
    ollama = OllamaLifecycle(("a",), default_keep_alive=1.0, generate_seconds=0.005)
    server = await ollama.serve()
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            await chat(server.url, "a")
            await asyncio.sleep(0.1)
    finally:
        await server.close()
    assert history(ollama) == [("a", LOADED, "")]


def exporter_url(ollama: OllamaLifecycle) -> str:
    """The stand-in's own address (not the gateway's)."""
    assert ollama.server is not None
    return ollama.server.url


# The policy.


async def test_with_max_loaded_1_every_switch_unloads_the_other_model_first() -> None:
    ollama = OllamaLifecycle(("a", "b"), default_keep_alive=300, max_loaded=3)
    async with watched_ollama(ollama, "max_loaded: 1") as (exporter, gateway):
        for count, model in enumerate(("a", "b", "a", "b")):
            await chat(gateway, model)
            loads = count // 2 + 1

            def loaded(model: str = model, loads: int = loads) -> bool:
                return seen(exporter).count((model, LOADED, "")) == loads

            await until(loaded, f"load {loads} of {model}")
            # The client has its answer a moment before the gateway counts the request done;
            # a model still serving one is never unloaded to make room.
            await until(lambda: not in_flight(exporter), "the request done")
        await until(lambda: len(seen(exporter)) == 7, "every event")
        scrape = await exporter.scrape()
    assert history(ollama) == [
        ("a", LOADED, ""),
        ("a", UNLOADED, REQUESTED),
        ("b", LOADED, ""),
        ("b", UNLOADED, REQUESTED),
        ("a", LOADED, ""),
        ("a", UNLOADED, REQUESTED),
        ("b", LOADED, ""),
    ]
    assert seen(exporter) == history(ollama)
    unloads = {"provider": "ollama", "action": "unload", "reason": "max_loaded"}
    assert scrape.value("llm_lifecycle_actions_total", outcome="success", **unloads) == 3


async def test_a_pinned_model_is_loaded_again_after_an_external_unload() -> None:
    ollama = OllamaLifecycle(("a",), default_keep_alive=0.3)
    async with watched_ollama(ollama, "pin: [a]") as (exporter, _):
        await until(lambda: ("a", LOADED, "") in history(ollama), "the pin")
        await asyncio.sleep(0.5)  # past the default keep-alive: pinned, it stays
        await chat(exporter_url(ollama), "a", keep_alive=0)  # another client unloads it
        await until(lambda: history(ollama).count(("a", LOADED, "")) == 2, "a reload")
        scrape = await exporter.scrape()
    assert history(ollama) == [("a", LOADED, ""), ("a", UNLOADED, REQUESTED), ("a", LOADED, "")]
    assert ollama.loaded["a"].keep_alive < 0  # for ever
    pins = {"provider": "ollama", "action": "load", "reason": "pin", "outcome": "success"}
    assert scrape.value("llm_lifecycle_actions_total", **pins) == 2
    assert scrape.value("llm_model_pinned", provider="ollama", model="a") == 1


async def test_idle_unload_unloads_after_the_idle_time_and_not_before() -> None:
    ollama = OllamaLifecycle(("a",), default_keep_alive=300)
    async with watched_ollama(ollama, "idle_unload: 500ms") as (exporter, gateway):
        await chat(gateway, "a")
        await until(lambda: ("a", UNLOADED, REQUESTED) in seen(exporter), "idle unload")
        scrape = await exporter.scrape()
    used = scrape.value("llm_model_last_used_timestamp_seconds", provider="ollama", model="a")
    assert used is not None
    unloaded_at = ollama.history[-1][0]
    assert history(ollama) == [("a", LOADED, ""), ("a", UNLOADED, REQUESTED)]
    assert (
        0.5 <= unloaded_at - used < 0.5 + 1.0
    )  # a watcher round (50 ms) late at most, on a quiet machine
    idle = {"provider": "ollama", "action": "unload", "reason": "idle", "outcome": "success"}
    assert scrape.value("llm_lifecycle_actions_total", **idle) == 1


def test_lifecycle_config_defaults_watch_without_policy() -> None:
    assert LifecycleConfig().watch and not LifecycleConfig().policy
    assert LifecycleConfig(max_loaded=1).limited


async def test_a_failed_action_never_blocks_a_request() -> None:
    """max_loaded 1, and the server refuses every unload: the request for the second model
    still goes through, and the failure is counted."""
    ollama = OllamaLifecycle(("a", "b"), default_keep_alive=300)
    load_or_generate = ollama.routes()["/api/generate"]

    async def refuse_unloads(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("keep_alive") == 0:
            return web.json_response({"error": "unload refused"}, status=500)
        return await load_or_generate(request)

    server = await StandIn({**ollama.routes(), "/api/generate": refuse_unloads}).start()
    ollama.server = server
    try:
        provider = provider_yaml(
            "ollama",
            "ollama",
            server.url,
            lifecycle=f"{{watch_interval: {WATCH}, max_loaded: 1}}",
            gateway="{listen: '127.0.0.1:0'}",
        )
        async with running(config_of(provider)) as exporter:
            gateway = "http://" + exporter.exporter.gateway.addresses["ollama"]
            await chat(gateway, "a")
            await until(lambda: ("a", LOADED, "") in seen(exporter), "load of a")
            await chat(gateway, "b")
            scrape = await exporter.scrape()
    finally:
        await server.close()
    assert [m for m, what, _ in history(ollama) if what == LOADED] == ["a", "b"]
    failed = {"provider": "ollama", "action": "unload", "reason": "max_loaded"}
    assert scrape.value("llm_lifecycle_actions_total", outcome="failure", **failed) == 1


async def test_router_pin_loads_at_start_and_again_after_an_unload_and_sleep_is_seen() -> None:
    router = Router(
        {"kept": RouterModel(UNLOADED_STATE), "other": RouterModel(LOADED_STATE)},
        load_seconds=0.3,
    )
    async with StandIn(router.routes()) as server:
        provider = provider_yaml(
            "router",
            "llamacpp",
            server.url,
            lifecycle=f"{{watch_interval: {WATCH}, pin: [kept]}}",
        )
        async with running(config_of(provider)) as exporter:
            await until(lambda: ("kept", LOADED, "") in seen(exporter), "the pin's load")
            router.set_state("other", SLEEPING_STATE)
            await until(lambda: ("other", SLEPT, "") in seen(exporter), "other asleep")
            router.set_state("kept", UNLOADED_STATE)  # another client unloads it
            await until(lambda: seen(exporter).count(("kept", LOADED, "")) == 2, "a reload")
            scrape = await exporter.scrape()
    kept = {"provider": "router", "model": "kept"}
    # Timed from loading to loaded by 50 ms reads: the router's 0.3 s, give or take a read.
    assert scrape.value("llm_model_load_duration_seconds_count", **kept) == 2
    total = scrape.value("llm_model_load_duration_seconds_sum", **kept) or 0
    assert 2 * 0.3 - 0.1 <= total <= 2 * 0.3 + 0.5
    assert scrape.value("llm_model_unloads_total", cause=UNKNOWN, **kept) == 1
    assert scrape.value("llm_model_sleeping", provider="router", model="other") == 1
    loads = [s for s in router.seen if s.path == "/models/load"]
    assert len(loads) == 2
    assert router.autoloaded == [] and router.woken == []
    for request in router.seen:
        if request.path in ("/metrics", "/slots", "/props") and "model" in request.query:
            assert request.state == LOADED_STATE, request


async def test_a_load_that_hangs_does_not_stop_the_watcher() -> None:
    ollama = OllamaLifecycle(("a", "b"), default_keep_alive=300)
    routes = ollama.routes()

    async def hang_loads(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    server = await StandIn({**routes, "/api/generate": hang_loads}).start()
    try:
        lifecycle = f"{{watch_interval: {WATCH}, pin: [a]}}"
        provider = provider_yaml("ollama", "ollama", server.url, lifecycle=lifecycle)
        async with running(config_of(provider)) as exporter:
            await chat(server.url, "b")  # while the pin's load hangs
            await until(lambda: ("b", LOADED, "") in seen(exporter), "load of b")
    finally:
        await server.close()
