"""The vllm adapter against a real vLLM server running on the CPU (about a minute to start)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Scrape, config_of, parse, provider_yaml, running, watch_queue
from vllm_server import VllmServer, ensure_vllm

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vllm() -> Iterator[VllmServer]:
    """vLLM serving the tiny Llama as "tiny", with room for 4 running requests: more must wait."""
    python, model_dir = ensure_vllm(ROOT)
    server = VllmServer(
        model_dir,
        venv=python.parent.parent,
        max_num_seqs=4,
        max_model_len=2048,
        kv_cache_memory_bytes=8 * 1024 * 1024,  # room for four running 1,000-token requests
    )
    with server:
        yield server


async def chat(client: httpx.AsyncClient, max_tokens: int) -> dict[str, int]:
    """A chat completion that runs to max_tokens (the random model could otherwise stop early)."""
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        },
    )
    response.raise_for_status()
    usage: dict[str, int] = response.json()["usage"]
    return usage


async def own(client: httpx.AsyncClient) -> Scrape:
    """vLLM's own /metrics."""
    return parse((await client.get("/metrics")).text)


async def test_counters_and_histograms_equal_vllms_own(vllm: VllmServer) -> None:
    config = config_of(provider_yaml("vllm", "vllm", vllm.url))
    async with (
        running(config) as exporter,
        httpx.AsyncClient(base_url=vllm.url, timeout=60) as client,
    ):
        first = await exporter.scrape()
        usages = [await chat(client, max_tokens=8) for _ in range(3)]
        # vLLM updates its counters just after it answers: wait until they settle (bounded).
        for _ in range(50):
            truth = await own(client)
            generated = truth.value("vllm:generation_tokens_total", model_name="tiny") or 0
            if generated >= (first.value("llm_tokens_total", type="output") or 0) + 24:
                break
            await asyncio.sleep(0.1)
        after = await exporter.scrape()
        truth_after = await own(client)
    tiny = {"provider": "vllm", "model": "tiny"}
    assert first.value("llm_provider_up", provider="vllm", kind="vllm") == 1
    assert first.value("llm_model_loaded", **tiny) == 1
    assert first.value("llm_model_context_tokens", **tiny) == 2048
    assert (
        (after.value("llm_tokens_total", type="output", **tiny) or 0)
        - (first.value("llm_tokens_total", type="output", **tiny) or 0)
        == sum(u["completion_tokens"] for u in usages)
        == 24
    )
    assert after.value("llm_tokens_total", type="output", **tiny) == truth_after.value(
        "vllm:generation_tokens_total", model_name="tiny"
    )
    assert after.value("llm_tokens_total", type="input", **tiny) == truth_after.value(
        "vllm:prompt_tokens_total", model_name="tiny"
    )
    assert after.value("llm_time_to_first_token_seconds_count", **tiny) == truth_after.value(
        "vllm:time_to_first_token_seconds_count", model_name="tiny"
    )
    assert after.value("llm_requests_finished_total", reason="length", **tiny) == truth_after.value(
        "vllm:request_success_total", model_name="tiny", finished_reason="length"
    )
    assert after.value("llm_exporter_scrape_success", provider="vllm") == 1
    # The contract a router reads, against vLLM's own page: the KV cache's shape, preemptions
    # and its admission limit's rejections.
    ((config, _),) = truth_after.all("vllm:cache_config_info")
    assert after.value("llm_kv_cache_blocks", **tiny) == float(config["num_gpu_blocks"])
    assert after.value("llm_kv_cache_block_size_tokens", **tiny) == float(config["block_size"])
    assert after.value("llm_requests_preempted_total", **tiny) == truth_after.value(
        "vllm:num_preemptions_total", model_name="tiny"
    )
    rejected = truth_after.all("vllm:admission_rejections_total", model_name="tiny")
    assert rejected and all(
        after.value("llm_requests_rejected_total", reason=labels["reason"], **tiny) == value
        for labels, value in rejected
    )


async def test_waiting_series_shows_the_queue(vllm: VllmServer) -> None:
    """Eight long requests on a server that runs four at a time: four wait, and the exporter shows it.

    The tiny model runs four 200-token requests in well under a second, so the requests ask for
    1,000 tokens: the queue then lasts seconds, and they are cancelled once it has been seen.
    """
    config = config_of(provider_yaml("vllm", "vllm", vllm.url))
    async with (
        running(config) as exporter,
        httpx.AsyncClient(base_url=vllm.url, timeout=120) as client,
    ):
        requests = [asyncio.create_task(chat(client, max_tokens=1000)) for _ in range(8)]
        seen = await watch_queue(
            exporter, "vllm", requests, until=lambda running, waiting: (running, waiting) == (4, 4)
        )
    assert (4, 4) in seen, seen
    assert max(running for running, _ in seen) <= 4, seen


async def test_gateway_token_counts_equal_vllms_own(vllm: VllmServer) -> None:
    """Real traffic through the gateway (here, to share the one vLLM server of this module):
    streamed with usage, streamed without, and not streamed."""
    config = config_of(provider_yaml("vllm", "vllm", vllm.url, gateway="{listen: '127.0.0.1:0'}"))
    async with running(config) as exporter, httpx.AsyncClient(base_url=vllm.url) as direct:
        before, truth_before = await exporter.scrape(), await own(direct)
        gateway = f"http://{exporter.exporter.gateway.addresses['vllm']}"
        received: list[dict[str, int]] = []
        streamed_chunks = 0
        async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
            for index in range(6):
                body: dict[str, object] = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": f"Count to {index}."}],
                    "max_tokens": 5 + index,
                    "ignore_eos": True,
                    "temperature": 0,  # the same tokens, so the same chunks, every run
                    "stream": index % 3 != 0,
                }
                if index % 3 == 1:
                    body["stream_options"] = {"include_usage": True}
                response = await client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200
                if index % 3 == 0:
                    received.append(response.json()["usage"])
                    continue
                events = [
                    json.loads(line[6:])
                    for line in response.text.splitlines()
                    if line.startswith("data: {")
                ]
                usage = [e["usage"] for e in events if e.get("usage")]
                if usage:
                    received.append(usage[-1])
                else:  # no usage in the stream: the gateway counts content chunks, and says so
                    streamed_chunks += sum(
                        1
                        for e in events
                        if e["choices"] and e["choices"][0]["delta"].get("content")
                    )
        expected_out = sum(u["completion_tokens"] for u in received) + streamed_chunks
        for _ in range(50):  # vLLM updates its counters just after it answers
            truth = await own(direct)
            if (
                truth.value("vllm:generation_tokens_total", model_name="tiny")
                == (truth_before.value("vllm:generation_tokens_total", model_name="tiny") or 0)
                + expected_out
            ):
                break
            await asyncio.sleep(0.1)
        after = await exporter.scrape()

    def delta(scrape: Scrape, first: Scrape, name: str, **labels: str) -> float:
        now = sum(v for _, v in scrape.all(name, **labels))
        return now - sum(v for _, v in first.all(name, **labels))

    tiny = {"provider": "vllm", "model": "tiny"}
    engine_out = delta(truth, truth_before, "vllm:generation_tokens_total", model_name="tiny")
    engine_in = delta(truth, truth_before, "vllm:prompt_tokens_total", model_name="tiny")
    out_usage = delta(
        after, before, "llm_gateway_tokens_total", type="output", source="usage", **tiny
    )
    out_chunks = delta(
        after, before, "llm_gateway_tokens_total", type="output", source="stream_chunks", **tiny
    )
    assert out_usage == sum(u["completion_tokens"] for u in received)
    assert out_chunks == streamed_chunks > 0
    assert out_usage + out_chunks == engine_out
    # Input tokens come only with usage: the two streams without it carry none.
    assert delta(after, before, "llm_gateway_tokens_total", type="input", **tiny) == sum(
        u["prompt_tokens"] for u in received
    )
    assert engine_in >= sum(u["prompt_tokens"] for u in received)
