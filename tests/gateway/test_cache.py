"""The response cache: what it stores, under which key, and how it stays within its bounds."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

from exporter.config import CacheConfig
from exporter.gateway.cache import (
    BODY,
    ENTRY_OVERHEAD_BYTES,
    EXPIRED,
    MAX_BYTES,
    MAX_ENTRIES,
    NO_CACHE,
    SAMPLING,
    STREAM,
    ResponseCache,
)
from exporter.gateway.meter import CHAT, EMBEDDINGS, GENERATE, request_document
from exporter.gateway.stats import CacheStats
from llamacpp_server import LlamaCppServer
from tests.gateway.helpers import chat_body, gatewayed, own_metrics, through_gateway
from tests.standins import StandIn, json_reply, openai_routes

CHAT_PATH = "/v1/chat/completions"
DETERMINISTIC = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def cache_of(**options: Any) -> ResponseCache:
    return ResponseCache(CacheConfig(enabled=True, **options), CacheStats())


def plan(
    cache: ResponseCache,
    body: Any,
    *,
    path: str = CHAT_PATH,
    operation: str = CHAT,
    headers: dict[str, str] | None = None,
) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return cache.plan("POST", path, CIMultiDict(headers or {}), request_document(raw), operation)


def test_the_key_is_per_credential_and_ignores_key_order_and_spacing() -> None:
    cache = cache_of()
    alice = plan(cache, DETERMINISTIC, headers={"Authorization": "Bearer alice"})
    bob = plan(cache, DETERMINISTIC, headers={"Authorization": "Bearer bob"})
    reordered = json.dumps(dict(reversed(list(DETERMINISTIC.items()))), indent=2).encode()
    alice_again = plan(cache, reordered, headers={"Authorization": "Bearer alice"})
    anonymous = plan(cache, DETERMINISTIC)
    api_key = plan(cache, DETERMINISTIC, headers={"X-Api-Key": "alice"})
    assert alice.key == alice_again.key
    assert len({alice.key, bob.key, anonymous.key, api_key.key}) == 4
    assert alice.lookup and alice.store


def test_path_query_and_encoding_are_part_of_the_key() -> None:
    cache = cache_of()
    keys = {
        plan(cache, DETERMINISTIC).key,
        plan(cache, DETERMINISTIC, path="/v1/completions").key,
        plan(cache, DETERMINISTIC, path=CHAT_PATH + "?x=1").key,
        plan(cache, DETERMINISTIC, headers={"Accept-Encoding": "gzip"}).key,
    }
    assert len(keys) == 4


@pytest.mark.parametrize(
    ("body", "path", "operation", "reason"),
    [
        ({**DETERMINISTIC, "stream": True}, CHAT_PATH, CHAT, STREAM),
        # Ollama streams unless told not to.
        ({"model": "m", "prompt": "hi", "options": {"temperature": 0}}, "/api/generate", GENERATE, STREAM),
        # Every API samples by default.
        ({"model": "m", "messages": []}, CHAT_PATH, CHAT, SAMPLING),
        ({**DETERMINISTIC, "temperature": 0.7}, CHAT_PATH, CHAT, SAMPLING),
        ({**DETERMINISTIC, "temperature": 0.7, "seed": -1}, "/completion", CHAT, SAMPLING),
        ({"model": "m", "prompt": "hi", "stream": False, "options": {"temperature": 0.8}}, "/api/generate", GENERATE, SAMPLING),
        (b"not json", CHAT_PATH, CHAT, BODY),
        ([1, 2], CHAT_PATH, CHAT, BODY),
    ],
)  # fmt: skip
def test_streams_sampling_and_unreadable_bodies_bypass(
    body: Any, path: str, operation: str, reason: str
) -> None:
    decision = plan(cache_of(), body, path=path, operation=operation)
    assert (decision.key, decision.lookup, decision.store, decision.bypass) == (
        None,
        False,
        False,
        reason,
    )


@pytest.mark.parametrize(
    ("body", "path", "operation"),
    [
        ({**DETERMINISTIC, "temperature": 0.9, "seed": 42}, CHAT_PATH, CHAT),
        ({"model": "m", "prompt": "hi", "stream": False, "options": {"temperature": 0.8, "seed": 1}}, "/api/generate", GENERATE),
        # Embeddings are deterministic whatever the body says.
        ({"model": "m", "input": ["a", "b"]}, "/v1/embeddings", EMBEDDINGS),
        ({"model": "m", "input": "a"}, "/api/embed", EMBEDDINGS),
    ],
)  # fmt: skip
def test_seeded_sampling_and_embeddings_are_cached(
    body: dict[str, Any], path: str, operation: str
) -> None:
    decision = plan(cache_of(), body, path=path, operation=operation)
    assert decision.key is not None and decision.lookup and decision.store


def test_sampled_answers_are_cached_when_the_operator_says_so() -> None:
    decision = plan(cache_of(sampled=True), {"model": "m", "messages": []})
    assert decision.lookup and decision.store


def test_no_cache_refreshes_and_no_store_leaves_the_cache_alone() -> None:
    cache = cache_of()
    refresh = plan(cache, DETERMINISTIC, headers={"Cache-Control": "no-cache"})
    assert (refresh.lookup, refresh.store, refresh.bypass) == (False, True, NO_CACHE)
    untouched = plan(cache, DETERMINISTIC, headers={"Cache-Control": "max-age=0, no-store"})
    assert (untouched.key, untouched.store, untouched.bypass) == (None, False, NO_CACHE)


def put(cache: ResponseCache, key: bytes, body: bytes, now: float) -> None:
    headers = CIMultiDict({"Content-Type": "application/json"})
    cache.put(key, 200, "OK", headers, body, now=now)


def test_entries_expire_after_the_ttl() -> None:
    cache = cache_of(ttl=10.0)
    put(cache, b"a", b"{}", now=0.0)
    put(cache, b"b", b"{}", now=5.0)
    assert cache.get(b"a", now=9.9) is not None
    assert cache.get(b"a", now=10.0) is None
    assert cache.get(b"b", now=10.0) is not None
    assert cache.stats.evictions == {EXPIRED: 1}
    assert cache.stats.entries == 1


def test_least_recently_used_goes_first_by_entries_and_by_bytes() -> None:
    cache = cache_of(max_entries=2)
    put(cache, b"a", b"1", now=0.0)
    put(cache, b"b", b"2", now=0.0)
    cache.get(b"a", now=1.0)  # a is now the most recently used
    put(cache, b"c", b"3", now=2.0)
    assert cache.get(b"b", now=2.0) is None
    assert cache.get(b"a", now=2.0) is not None
    assert cache.stats.evictions == {MAX_ENTRIES: 1}

    body = b"x" * 1000
    entry_size = len(body) + 1 + len("Content-Type") + len("application/json")
    entry_size += ENTRY_OVERHEAD_BYTES
    by_bytes = cache_of(max_bytes=3 * entry_size + 10)
    for key in (b"1", b"2", b"3", b"4"):
        put(by_bytes, key, body, now=0.0)
    assert by_bytes.stats.entries == 3
    assert by_bytes.stats.bytes == 3 * entry_size <= by_bytes.config.max_bytes
    assert by_bytes.get(b"1", now=0.0) is None
    assert by_bytes.stats.evictions == {MAX_BYTES: 1}


def test_only_whole_successful_personal_free_answers_may_be_stored() -> None:
    cache = cache_of(max_bytes=8 * 1024)
    json_type = {"Content-Type": "application/json"}

    def storable(status: int, size: int = 10, **headers: str) -> bool:
        return cache.storable(status, CIMultiDict({**json_type, **headers}), size)

    assert storable(200)
    assert not storable(500)
    assert not storable(206)
    assert not storable(200, size=1025)  # above an eighth of max_bytes
    assert not storable(200, **{"Content-Type": "text/event-stream"})
    assert not storable(200, **{"Set-Cookie": "session=1"})
    assert not storable(200, **{"Cache-Control": "no-store"})


def test_a_smaller_bound_on_reload_evicts_at_once() -> None:
    cache = cache_of()
    for key in (b"a", b"b", b"c"):
        put(cache, key, b"{}", now=0.0)
    cache.configure(CacheConfig(enabled=True, max_entries=1), now=0.0)
    assert cache.stats.entries == 1
    assert cache.get(b"c", now=0.0) is not None
    assert (cache.stats.max_entries, cache.stats.evictions) == (1, {MAX_ENTRIES: 2})


# Through the gateway, in front of a real llama.cpp server.

CACHE_ON = "cache: {enabled: true}"


async def predicted(url: str) -> float:
    """Tokens llama.cpp has generated so far."""
    return (await own_metrics(url))["llamacpp:tokens_predicted_total"]


async def test_each_user_gets_their_own_answer_and_a_repeat_is_a_byte_identical_hit(
    llama_server: LlamaCppServer,
) -> None:
    body = chat_body(7, False, max_tokens=8)
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    async with through_gateway(llama_server, CACHE_ON) as (exporter, gateway):
        async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:

            async def ask(headers: dict[str, str], payload: Any = body) -> httpx.Response:
                return await client.post("/v1/chat/completions", json=payload, headers=headers)

            start = await predicted(llama_server.url)
            first_alice, first_bob = await ask(alice), await ask(bob)
            after_misses = await predicted(llama_server.url)
            again_alice = await ask(alice)
            reordered = await ask(alice, dict(reversed(list(body.items()))))
            after_hits = await predicted(llama_server.url)
            refreshed = await ask({**alice, "Cache-Control": "no-cache"})
            after_refresh = await predicted(llama_server.url)
        scrape = await exporter.scrape()
    assert "X-Cache" not in first_alice.headers and "X-Cache" not in first_bob.headers
    assert after_misses - start == 16, "each user's first question reached the server"
    for hit in (again_alice, reordered):
        assert hit.headers["X-Cache"] == "HIT"
        assert int(hit.headers["Age"]) >= 0
        assert hit.content == first_alice.content  # the same bytes, id and created included
        assert hit.headers["Content-Type"] == first_alice.headers["Content-Type"]
    assert after_hits == after_misses, "a hit reached the server"
    assert "X-Cache" not in refreshed.headers and after_refresh - after_hits == 8
    lookups = {
        labels["result"]: value
        for labels, value in scrape.all("llm_gateway_cache_lookups_total", provider="llama")
    }
    assert lookups == {"hit": 2, "miss": 2, "bypass": 1}
    assert scrape.value("llm_gateway_cache_bypasses_total", provider="llama") == 1
    saved = scrape.value("llm_gateway_cache_saved_tokens_total", provider="llama", type="output")
    assert saved == 16
    assert (scrape.value("llm_gateway_cache_saved_seconds_total", provider="llama") or 0) > 0
    # alice's refreshed answer replaced hers: still two entries.
    assert scrape.value("llm_gateway_cache_entries", provider="llama") == 2
    cached = scrape.all("llm_gateway_requests_total", provider="llama", outcome="cached")
    assert sum(v for _, v in cached) == 2
    # Hits are not the server's work: its tokens through the gateway are the 24 it generated.
    output = scrape.all("llm_gateway_tokens_total", provider="llama", type="output")
    assert sum(v for _, v in output) == 24


async def test_streams_and_sampled_requests_pass_to_the_server(
    llama_server: LlamaCppServer,
) -> None:
    streamed = chat_body(8, True, max_tokens=4)
    sampled = {**chat_body(9, False, max_tokens=4), "temperature": 0.8}
    del sampled["seed"]
    async with through_gateway(llama_server, CACHE_ON) as (exporter, gateway):
        async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
            start = await predicted(llama_server.url)
            for body in (streamed, streamed, sampled, sampled):
                answer = await client.post("/v1/chat/completions", json=body)
                assert answer.status_code == 200 and "X-Cache" not in answer.headers
            end = await predicted(llama_server.url)
        scrape = await exporter.scrape()
    assert end - start == 16
    bypasses = {
        labels["reason"]: value
        for labels, value in scrape.all("llm_gateway_cache_bypasses_total", provider="llama")
    }
    assert bypasses == {"stream": 2, "sampling": 2}


async def test_errors_are_never_cached() -> None:
    failing = json_reply({"error": {"message": "boom"}}, status=500)
    async with (
        StandIn(openai_routes(**{"/v1/chat/completions": failing})) as upstream,
        gatewayed(f"{upstream.url}/v1", gateway=CACHE_ON) as (exporter, client),
    ):
        for _ in range(2):
            answer = await client.post("/v1/chat/completions", json=DETERMINISTIC)
            assert answer.status_code == 500 and "X-Cache" not in answer.headers
        scrape = await exporter.scrape()
    assert upstream.hits["/v1/chat/completions"] == 2
    assert scrape.value("llm_gateway_cache_entries", provider="p") == 0


async def test_a_partial_answer_is_never_cached() -> None:
    async def breaks_off(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 100
        await response.prepare(request)
        await response.write(b'{"choices": [')
        assert request.transport is not None
        request.transport.close()
        return response

    async with (
        StandIn(openai_routes(**{"/v1/chat/completions": breaks_off})) as upstream,
        gatewayed(f"{upstream.url}/v1", gateway=CACHE_ON) as (exporter, client),
    ):
        for _ in range(2):
            with pytest.raises(httpx.HTTPError):
                await client.post("/v1/chat/completions", json=DETERMINISTIC)
        scrape = await exporter.scrape()
    assert upstream.hits["/v1/chat/completions"] == 2
    assert scrape.value("llm_gateway_cache_entries", provider="p") == 0


def test_answers_on_their_way_in_take_at_most_max_bytes() -> None:
    cache = cache_of(max_bytes=1000)
    assert cache.keep(600)
    assert not cache.keep(500), "two answers being read would hold 1,100 bytes"
    cache.unkeep(600)
    assert cache.keep(1000)
