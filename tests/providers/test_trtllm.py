"""The trtllm adapter against trtllm-serve's shapes (tests/fixtures/README.md says where from)."""

from __future__ import annotations

import asyncio
import math

import pytest

from exporter.errors import FailureClass, ProviderError
from exporter.providers.base import ModelState, Residence
from exporter.providers.promtext import parse_samples
from exporter.providers.trtllm import _WANTED, METRICS_OFF, UNHEALTHY, _engines
from tests.helpers import config_of, provider_yaml, running
from tests.providers.helpers import model_states_of, page_total
from tests.standins import StandIn, fixture, reply, sse_chat, trtllm_routes

MODEL = "TinyLlama-1.1B-Chat-v1.0"
LABELS = {"provider": "trt", "model": MODEL}


async def test_busy_server_maps_onto_normalized_series() -> None:
    page = fixture("trtllm_metrics.txt")
    async with StandIn(trtllm_routes()) as server:
        async with running(config_of(provider_yaml("trt", "trtllm", server.url))) as exporter:
            scrape = await exporter.scrape()
            health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_provider_up", provider="trt", kind="trtllm") == 1
    assert scrape.value("llm_provider_ready", provider="trt") == 1
    assert scrape.value("llm_provider_info", provider="trt", version="1.2.0") == 1
    assert scrape.value("llm_model_loaded", **LABELS) == 1
    # model_name="undefined" on every series: they are the served model's.
    assert scrape.all("llm_requests_running", model="undefined") == []
    assert (
        scrape.value("llm_requests_running", **LABELS)
        == page_total(page, "trtllm_num_requests_running")
        == 3
    )
    assert (
        scrape.value("llm_requests_waiting", **LABELS)
        == page_total(page, "trtllm_num_requests_waiting")
        == 2
    )
    assert (
        scrape.value("llm_kv_cache_usage_ratio", **LABELS)
        == page_total(page, "trtllm_kv_cache_utilization")
        == 28 / 64
    )
    assert (
        scrape.value("llm_tokens_total", type="input", **LABELS)
        == page_total(page, "trtllm_prompt_tokens_total")
        == 2734
    )
    assert (
        scrape.value("llm_tokens_total", type="output", **LABELS)
        == page_total(page, "trtllm_generation_tokens_total")
        == 1253
    )
    assert (
        scrape.value("llm_input_tokens_cached_total", **LABELS)
        == page_total(page, "trtllm_prompt_cached_tokens_total")
        == 1312
    )
    assert scrape.value("llm_token_processing_seconds_total", type="input", **LABELS) == page_total(
        page, "trtllm_request_prefill_time_seconds_sum"
    )
    assert scrape.value(
        "llm_token_processing_seconds_total", type="output", **LABELS
    ) == page_total(page, "trtllm_request_decode_time_seconds_sum")
    finished = {
        labels["reason"]: value
        for labels, value in scrape.all("llm_requests_finished_total", **LABELS)
    }
    assert finished == {"stop": 10, "length": 2}
    assert scrape.value("llm_exporter_scrape_success", provider="trt") == 1
    assert health["components"]["provider/trt"]["status"] == "healthy"


async def test_histograms_keep_trtllms_buckets() -> None:
    page = fixture("trtllm_metrics.txt")
    async with StandIn(trtllm_routes()) as server:
        async with running(config_of(provider_yaml("trt", "trtllm", server.url))) as exporter:
            scrape = await exporter.scrape()
    pairs = {
        "llm_time_to_first_token_seconds": "trtllm_time_to_first_token_seconds",
        "llm_request_duration_seconds": "trtllm_e2e_request_latency_seconds",
        "llm_inter_token_latency_seconds": "trtllm_time_per_output_token_seconds",
        "llm_request_queue_duration_seconds": "trtllm_request_queue_time_seconds",
    }
    for ours, theirs in pairs.items():
        buckets = {
            float(labels["le"]): value
            for labels, value in scrape.all(f"{ours}_bucket", model=MODEL)
        }
        bounds = [b for b in buckets if not math.isinf(b)]
        assert bounds, ours
        for bound in bounds:
            line = f'{theirs}_bucket{{engine_type="undefined",le="{bound}",model_name="undefined"}}'
            assert line in page, line
            assert buckets[bound] == float(page.split(line, 1)[1].split()[0])
        assert (
            scrape.value(f"{ours}_count", model=MODEL) == page_total(page, f"{theirs}_count") == 12
        )
        assert scrape.value(f"{ours}_sum", model=MODEL) == page_total(page, f"{theirs}_sum")


def test_gauges_of_several_processes_are_summed_and_the_ratio_is_the_largest() -> None:
    """Multiprocess mode writes a gauge per pid: counts add up, a fraction does not."""
    page = "\n".join(
        [
            'trtllm_num_requests_running{engine_type="undefined",model_name="undefined",pid="1"} 2.0',
            'trtllm_num_requests_running{engine_type="undefined",model_name="undefined",pid="2"} 1.0',
            'trtllm_kv_cache_utilization{engine_type="undefined",model_name="undefined",pid="1"} 0.25',
            'trtllm_kv_cache_utilization{engine_type="undefined",model_name="undefined",pid="2"} 0.5',
        ]
    )
    (engine,) = _engines(parse_samples(page, _WANTED), "served")
    assert (engine.model, engine.requests_running, engine.kv_cache_usage_ratio) == (
        "served",
        3.0,
        0.5,
    )
    # The served model unknown (its listing failed): grouped by model_name as they are.
    (unknown,) = _engines(parse_samples(page, _WANTED), None)
    assert unknown.model == "undefined"


def test_older_unprefixed_names_still_map() -> None:
    """TensorRT-LLM before the trtllm_ prefix (collector.py at 89fd9b7: five families, no
    prefix) names its request series plainly."""
    labels = 'engine_type="undefined",model_name="undefined"'
    page = "\n".join(
        [
            f'request_success_total{{{labels},finished_reason="stop"}} 4.0',
            f'time_to_first_token_seconds_bucket{{{labels},le="0.1"}} 3.0',
            f'time_to_first_token_seconds_bucket{{{labels},le="+Inf"}} 4.0',
            f"time_to_first_token_seconds_sum{{{labels}}} 0.5",
            f'e2e_request_latency_seconds_bucket{{{labels},le="+Inf"}} 4.0',
            f"e2e_request_latency_seconds_sum{{{labels}}} 3.0",
        ]
    )
    (engine,) = _engines(parse_samples(page, _WANTED), MODEL)
    assert engine.finished_requests == {"stop": 4.0}
    assert engine.time_to_first_token is not None
    assert engine.time_to_first_token.buckets == ((0.1, 3.0), (math.inf, 4.0))
    assert engine.request_duration is not None and engine.request_duration.sum == 3.0


async def test_unread_models_leave_the_engine_series_under_their_own_label() -> None:
    routes = trtllm_routes(**{"/v1/models": reply("busy", 503, "text/plain")})
    async with StandIn(routes) as server:
        async with running(config_of(provider_yaml("trt", "trtllm", server.url))) as exporter:
            scrape = await exporter.scrape()
    assert scrape.value("llm_provider_up", provider="trt") == 1
    assert scrape.value("llm_requests_running", provider="trt", model="undefined") == 3
    assert scrape.value("llm_exporter_scrape_success", provider="trt") == 0


async def test_without_perf_metrics_the_engine_series_are_absent_and_said_why() -> None:
    routes = trtllm_routes(**{"/prometheus/metrics": reply('{"detail":"Not Found"}', 404)})
    async with StandIn(routes) as server:
        async with running(config_of(provider_yaml("trt", "trtllm", server.url))) as exporter:
            scrape = await exporter.scrape()
            health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_model_loaded", **LABELS) == 1
    assert scrape.all("llm_requests_running", provider="trt") == []
    assert scrape.value("llm_exporter_scrape_success", provider="trt") == 1
    assert health["components"]["provider/trt"]["details"]["notes"] == [METRICS_OFF]


async def test_a_failed_engine_is_up_but_not_ready_and_its_model_not_loaded() -> None:
    unavailable = "LLM is unavailable. Please check the server logs for more details."
    routes = trtllm_routes(**{"/health": reply(unavailable, 503, "text/plain")})
    async with StandIn(routes) as server:
        async with running(config_of(provider_yaml("trt", "trtllm", server.url))) as exporter:
            scrape = await exporter.scrape()
            health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_provider_up", provider="trt") == 1
    assert scrape.value("llm_provider_ready", provider="trt") == 0
    assert scrape.value("llm_model_loaded", **LABELS) == 0
    assert UNHEALTHY in health["components"]["provider/trt"]["details"]["notes"]


async def test_the_served_model_is_loaded_while_health_answers_200() -> None:
    assert await model_states_of("trtllm", trtllm_routes()) == (
        ModelState(MODEL, Residence.LOADED),
    )


async def test_the_served_model_failed_when_health_answers_503() -> None:
    routes = trtllm_routes(**{"/health": reply("LLM is unavailable.", 503, "text/plain")})
    (state,) = await model_states_of("trtllm", routes)
    assert (state.name, state.residence) == (MODEL, Residence.FAILED)


async def test_residency_read_fails_when_the_models_are_unread() -> None:
    with pytest.raises(ProviderError) as failed:
        await model_states_of(
            "trtllm", trtllm_routes(**{"/v1/models": reply("busy", 503, "text/plain")})
        )
    assert (failed.value.failure, failed.value.endpoint) == (FailureClass.HTTP_5XX, "/v1/models")


async def test_probe_streams_an_openai_chat_completion() -> None:
    words = ("Hello", " from", " TensorRT", "-LLM")
    routes = trtllm_routes(**{"/v1/chat/completions": sse_chat(words)})
    async with StandIn(routes) as server:
        probes = "{interval: 1h, jitter: 0, max_tokens: 4}"
        config = config_of(provider_yaml("trt", "trtllm", server.url, probes=probes))
        async with running(config) as exporter:
            for _ in range(200):
                scrape = await exporter.scrape()
                if scrape.all("llm_probe_requests_total", provider="trt"):
                    break
                await asyncio.sleep(0.05)
    assert scrape.value("llm_probe_requests_total", outcome="success", **LABELS) == 1
    assert scrape.value("llm_probe_tokens_total", type="output", **LABELS) == len(words)
    assert scrape.value("llm_probe_tokens_total", type="input", **LABELS) == 11
