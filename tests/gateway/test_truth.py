"""The gateway in front of a real llama.cpp server: its numbers equal the server's own, its
streams equal the server's, and a client that goes away stops the generation."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from llamacpp_server import LlamaCppServer
from tests.gateway.helpers import (
    LABELS,
    chat_body,
    own_metrics,
    requests_processing,
    through_gateway,
    tokens,
)
from tests.helpers import parse


async def streamed_usage(response: httpx.Response) -> dict[str, int]:
    """The usage a client of a streamed answer receives (the usage chunk, else llama.cpp's
    timings, which clients such as llama.cpp's web UI read)."""
    usage: dict[str, int] = {}
    async for line in response.aiter_lines():
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]
        elif event.get("timings") and not usage:
            t = event["timings"]
            usage = {
                "prompt_tokens": t["prompt_n"] + t["cache_n"],
                "completion_tokens": t["predicted_n"],
            }
    return usage


async def test_token_counts_equal_the_servers_own_and_what_clients_received(
    llama_server: LlamaCppServer,
) -> None:
    async with through_gateway(llama_server) as (exporter, gateway):
        before, truth_before = await exporter.scrape(), await own_metrics(llama_server.url)
        received: list[dict[str, int]] = []
        async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
            for index in range(12):
                if index % 3 == 0:
                    answer = await client.post("/v1/chat/completions", json=chat_body(index, False))
                    received.append(answer.json()["usage"])
                    continue
                extra = {"stream_options": {"include_usage": True}} if index % 3 == 1 else {}
                body = chat_body(index, True, **extra)
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    received.append(await streamed_usage(response))
            completion = await client.post(
                "/completion", json={"prompt": "Once upon a time", "n_predict": 5}
            )
            native = completion.json()
            received.append(
                {
                    "prompt_tokens": native["tokens_evaluated"],
                    "completion_tokens": native["tokens_predicted"],
                }
            )
        after, truth_after = await exporter.scrape(), await own_metrics(llama_server.url)

    def truth(*names: str) -> float:
        return sum(truth_after[name] - truth_before[name] for name in names)

    sent_in = sum(usage["prompt_tokens"] for usage in received)
    sent_out = sum(usage["completion_tokens"] for usage in received)
    engine_in = truth("llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total")
    assert tokens(after, "input") - tokens(before, "input") == engine_in == sent_in
    engine_out = truth("llamacpp:tokens_predicted_total")
    assert tokens(after, "output") - tokens(before, "output") == engine_out == sent_out
    cached = after.value("llm_gateway_input_tokens_cached_total", **LABELS) or 0
    cached -= before.value("llm_gateway_input_tokens_cached_total", **LABELS) or 0
    assert cached == truth("llamacpp:prompt_tokens_cached_total")
    # The exporter's engine series say the same, in the same (OpenTelemetry) meaning.
    engine_series = after.value("llm_tokens_total", type="input", **LABELS) or 0
    engine_series -= before.value("llm_tokens_total", type="input", **LABELS) or 0
    assert engine_series == engine_in


async def test_embedding_tokens_equal_the_servers_own(tiny_model: Path) -> None:
    with LlamaCppServer(tiny_model, embeddings=True) as server:
        async with through_gateway(server) as (exporter, gateway):
            before, truth_before = await exporter.scrape(), await own_metrics(server.url)
            async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
                usages = []
                for inputs in (["hello there"], ["a b c d", "the sky is blue"], "one more"):
                    body = {"model": "tiny-llama", "input": inputs}
                    answer = await client.post("/v1/embeddings", json=body)
                    assert answer.status_code == 200
                    usages.append(answer.json()["usage"])
            after, truth_after = await exporter.scrape(), await own_metrics(server.url)
    engine = (
        truth_after["llamacpp:prompt_tokens_total"] - truth_before["llamacpp:prompt_tokens_total"]
    )
    labels = {**LABELS, "type": "input"}
    counted = sum(v for _, v in after.all("llm_gateway_tokens_total", **labels))
    counted -= sum(v for _, v in before.all("llm_gateway_tokens_total", **labels))
    assert counted == engine == sum(u["prompt_tokens"] for u in usages) > 0
    requests = after.all("llm_gateway_requests_total", operation="embeddings", **LABELS)
    assert sum(v for _, v in requests) == 3


def _stable(body: bytes) -> bytes:
    """A llama.cpp stream without what differs between two runs: ids, times, timings."""
    body = re.sub(rb'"id":"[^"]*"', b'"id":""', body)
    body = re.sub(rb'"created":\d+', b'"created":0', body)
    return re.sub(rb'"timings":\{[^}]*\}', b'"timings":{}', body)


async def test_a_streamed_answer_equals_the_same_request_sent_directly(
    llama_server: LlamaCppServer,
) -> None:
    async with through_gateway(llama_server) as (_, gateway):
        bodies = []
        for base in (llama_server.url, gateway, llama_server.url):
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                body = chat_body(99, True, max_tokens=12)
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    headers = response.headers
                    bodies.append(b"".join([piece async for piece in response.aiter_raw()]))
                    assert headers["content-type"] == "text/event-stream"
    direct, proxied, again = (_stable(body) for body in bodies)
    assert direct == again, "the server itself is not deterministic here"
    assert proxied == direct
    assert proxied.count(b'"content":') >= 12


async def test_time_to_first_token_lies_between_the_servers_prompt_time_and_the_total(
    llama_server: LlamaCppServer,
) -> None:
    async with through_gateway(llama_server) as (exporter, gateway):
        timings = []
        async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
            for index in range(5):
                started = time.perf_counter()
                body = chat_body(index + 200, True, max_tokens=16)
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if '"timings"' in line:
                            timings.append(json.loads(line[6:])["timings"])
                total = time.perf_counter() - started
        scrape = await exporter.scrape()
    labels = {**LABELS, "operation": "chat"}
    count = scrape.value("llm_gateway_time_to_first_token_seconds_count", **labels)
    ttft = scrape.value("llm_gateway_time_to_first_token_seconds_sum", **labels)
    assert count == 5 and ttft is not None
    prompt_seconds = sum(t["prompt_ms"] for t in timings) / 1000
    assert prompt_seconds <= ttft <= 5 * total


async def test_a_client_going_away_stops_the_generation(long_generation: LlamaCppServer) -> None:
    """Streamed: llama.cpp notices a closed connection only while it streams (a client of a
    non-streamed answer that goes away, even talking to it directly, leaves the generation
    running; tests/gateway/test_proxy.py shows the gateway closes that connection too)."""
    with long_generation as server:
        async with through_gateway(server) as (exporter, gateway):
            async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
                body = chat_body(1, True, max_tokens=4000, ignore_eos=True)
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    chunks = 0
                    async for line in response.aiter_lines():
                        chunks += line.startswith("data: ")
                        if chunks == 20:
                            break
                    assert await requests_processing(server.url) == 1
            gone = time.monotonic()
            processing = 1.0
            while processing and time.monotonic() - gone < 5:
                await asyncio.sleep(0.05)
                processing = await requests_processing(server.url)
            stopped_after = time.monotonic() - gone
            scrape = await exporter.scrape()
    # 4,000 tokens take this model many seconds; the slot was free almost at once.
    assert processing == 0, "the generation went on for nobody"
    assert stopped_after < 2.0
    abandoned = scrape.all("llm_gateway_requests_total", outcome="abandoned", **LABELS)
    assert sum(v for _, v in abandoned) == 1


async def test_a_server_killed_mid_stream_ends_the_clients_stream(
    long_generation: LlamaCppServer,
) -> None:
    with long_generation as server:
        async with through_gateway(server) as (exporter, gateway):
            received = 0
            async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
                body = chat_body(1, True, max_tokens=4000, ignore_eos=True)
                with pytest.raises(httpx.RemoteProtocolError):
                    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        async for line in response.aiter_lines():
                            received += line.startswith("data: ")
                            if received == 10:
                                assert server.pid is not None
                                os.kill(server.pid, signal.SIGKILL)
            scrape = await exporter.scrape()
    assert received >= 10
    failed = scrape.all("llm_gateway_requests_total", outcome="upstream_failed", **LABELS)
    assert sum(v for _, v in failed) == 1


async def test_a_thousand_requests_survive_the_servers_connection_limits(
    llama_server: LlamaCppServer,
) -> None:
    """llama-server closes a keep-alive connection after 100 requests and after every
    streamed answer, while announcing keep-alive: the gateway's clients never see it."""
    async with through_gateway(llama_server) as (exporter, gateway):
        failures: list[str] = []
        async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:

            async def worker(first: int) -> None:
                for index in range(first, 1000, 4):
                    body = chat_body(index % 7, stream=index % 2 == 0, max_tokens=1)
                    response = await client.post("/v1/chat/completions", json=body)
                    complete = response.text.rstrip().endswith(("[DONE]", "}"))
                    if response.status_code != 200 or not complete:
                        failures.append(f"{response.status_code} {response.text[:80]}")

            await asyncio.gather(*(worker(first) for first in range(4)))
        scrape = parse((await exporter.http.get("/metrics")).text)
    assert failures == []
    complete = scrape.all("llm_gateway_requests_total", outcome="complete", code="2xx", **LABELS)
    assert sum(v for _, v in complete) == 1000
