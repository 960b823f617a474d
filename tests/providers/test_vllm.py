"""The vllm adapter against recorded vLLM /metrics pages (the live server: test_vllm_live.py)."""

from __future__ import annotations

import asyncio
import math

import pytest

from exporter.errors import FailureClass, ProviderError
from exporter.providers.base import ModelState, Residence
from exporter.providers.promtext import histograms_by, parse_samples
from tests.helpers import config_of, provider_yaml, running
from tests.providers.helpers import model_states_of, page_total
from tests.standins import StandIn, fixture, reply, vllm_routes


async def test_busy_server_maps_onto_normalized_series() -> None:
    page = fixture("vllm_metrics_busy.txt")
    async with StandIn(vllm_routes()) as server:
        async with running(config_of(provider_yaml("vllm", "vllm", server.url))) as exporter:
            scrape = await exporter.scrape()
    labels = {"provider": "vllm", "model": "tiny"}
    assert scrape.value("llm_provider_info", provider="vllm", version="0.32.0") == 1
    assert scrape.value("llm_model_loaded", **labels) == 1
    assert scrape.value("llm_model_context_tokens", **labels) == 256
    assert (
        scrape.value("llm_requests_running", **labels)
        == page_total(page, "vllm:num_requests_running")
        == 4
    )
    assert (
        scrape.value("llm_requests_waiting", **labels)
        == page_total(page, "vllm:num_requests_waiting")
        == 4
    )
    assert scrape.value("llm_kv_cache_usage_ratio", **labels) == page_total(
        page, "vllm:kv_cache_usage_perc"
    )
    assert scrape.value("llm_tokens_total", type="input", **labels) == page_total(
        page, "vllm:prompt_tokens_total"
    )
    assert scrape.value("llm_tokens_total", type="output", **labels) == page_total(
        page, "vllm:generation_tokens_total"
    )
    assert scrape.value("llm_exporter_scrape_success", provider="vllm") == 1


async def test_the_router_contract_from_a_recorded_page() -> None:
    """KV cache shape from cache_config_info's labels, preemptions and admission rejections,
    as vLLM 0.32 wrote them (tests/fixtures/vllm_metrics_after.txt)."""
    async with StandIn(vllm_routes(metrics="vllm_metrics_after.txt")) as server:
        async with running(config_of(provider_yaml("vllm", "vllm", server.url))) as exporter:
            scrape = await exporter.scrape()
    tiny = {"provider": "vllm", "model": "tiny"}
    assert scrape.value("llm_kv_cache_block_size_tokens", **tiny) == 128
    assert scrape.value("llm_kv_cache_blocks", **tiny) == 8192
    assert scrape.value("llm_requests_preempted_total", **tiny) == 0
    assert {labels["reason"] for labels, _ in scrape.all("llm_requests_rejected_total")} == {
        "max_num_queued_reqs",
        "max_num_queued_tokens",
    }


async def test_histograms_keep_vllms_buckets() -> None:
    page = fixture("vllm_metrics_after.txt")
    async with StandIn(vllm_routes(metrics="vllm_metrics_after.txt")) as server:
        async with running(config_of(provider_yaml("vllm", "vllm", server.url))) as exporter:
            scrape = await exporter.scrape()
    pairs = {
        "llm_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
        "llm_request_duration_seconds": "vllm:e2e_request_latency_seconds",
        "llm_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
        "llm_request_queue_duration_seconds": "vllm:request_queue_time_seconds",
    }
    for ours, theirs in pairs.items():
        buckets = {
            float(labels["le"]): value
            for labels, value in scrape.all(f"{ours}_bucket", model="tiny")
        }
        bounds = [b for b in buckets if not math.isinf(b)]
        assert bounds, ours
        for bound in bounds:
            line = f'{theirs}_bucket{{engine="0",le="{bound}",model_name="tiny"}}'
            assert line in page, line
            assert buckets[bound] == float(page.split(line, 1)[1].split()[0])
        assert scrape.value(f"{ours}_count", model="tiny") == page_total(page, f"{theirs}_count")
        assert scrape.value(f"{ours}_sum", model="tiny") == page_total(page, f"{theirs}_sum")
    finished = {
        labels["reason"]: v for labels, v in scrape.all("llm_requests_finished_total", model="tiny")
    }
    assert finished["length"] == page_total(
        page, "vllm:request_success_total", finished_reason="length", model_name="tiny"
    )


async def test_older_names_still_map() -> None:
    """vllm:gpu_cache_usage_perc (before vLLM 0.10) feeds the same KV-cache series."""
    async with StandIn(vllm_routes(metrics="vllm_metrics_older.txt")) as server:
        async with running(config_of(provider_yaml("old", "vllm", server.url))) as exporter:
            scrape = await exporter.scrape()
    qwen = {"provider": "old", "model": "Qwen/Qwen2.5-Coder-32B-Instruct"}
    assert scrape.value("llm_kv_cache_usage_ratio", **qwen) == 0.0
    assert scrape.value("llm_requests_running", **qwen) == 0.0
    llama = {"provider": "old", "model": "meta-llama/Llama-3.1-8B-Instruct"}
    assert scrape.value("llm_requests_running", **llama) == 8.0
    assert scrape.value("llm_tokens_total", type="output", **llama) == 27453.0


def test_engines_are_summed_per_model() -> None:
    page = "\n".join(
        [
            'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0',
            'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0',
            'vllm:time_to_first_token_seconds_bucket{engine="1",le="0.1",model_name="m"} 3.0',
            'vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 5.0',
            'vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.5',
            'vllm:time_to_first_token_seconds_sum{engine="1",model_name="m"} 1.5',
        ]
    )
    names = ("vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_sum")
    merged = histograms_by(
        parse_samples(page, names), "vllm:time_to_first_token_seconds", "model_name"
    )
    assert merged["m"].buckets == ((0.1, 4.0), (math.inf, 7.0))
    assert merged["m"].sum == 2.0
    assert merged["m"].count == 7.0


@pytest.mark.parametrize(
    ("page", "residence"),
    [
        ("vllm_metrics_after.txt", Residence.LOADED),  # awake 1
        ("vllm_metrics_sleeping.txt", Residence.SLEEPING),  # awake 0, weights_offloaded 1
        ("vllm_metrics_older.txt", Residence.LOADED),  # no sleep-state gauge: served is loaded
    ],
)
async def test_residency_follows_the_sleep_state_gauge(page: str, residence: Residence) -> None:
    assert await model_states_of("vllm", vllm_routes(metrics=page)) == (
        ModelState("tiny", residence),
    )


async def test_a_sleeping_engine_s_model_is_not_loaded() -> None:
    async with StandIn(vllm_routes(metrics="vllm_metrics_sleeping.txt")) as server:
        async with running(config_of(provider_yaml("vllm", "vllm", server.url))) as exporter:
            for _ in range(100):  # the watcher's first read runs beside the first scrape
                scrape = await exporter.scrape()
                if scrape.value("llm_model_sleeping", provider="vllm", model="tiny") is not None:
                    break
                await asyncio.sleep(0.05)
    assert scrape.value("llm_model_loaded", provider="vllm", model="tiny") == 0
    assert scrape.value("llm_model_sleeping", provider="vllm", model="tiny") == 1


async def test_residency_read_fails_when_the_models_are_unread() -> None:
    with pytest.raises(ProviderError) as failed:
        await model_states_of(
            "vllm", vllm_routes(**{"/v1/models": reply("busy", 503, "text/plain")})
        )
    assert (failed.value.failure, failed.value.endpoint) == (FailureClass.HTTP_5XX, "/v1/models")


async def test_data_parallel_engines_sum_their_requests_and_average_their_kv_cache() -> None:
    page = (
        'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.5\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.3\n'
        'vllm:num_requests_running{engine="0",model_name="tiny"} 2\n'
        'vllm:num_requests_running{engine="1",model_name="tiny"} 3\n'
    )
    routes = vllm_routes(**{"/metrics": reply(page, content_type="text/plain")})
    async with StandIn(routes) as server:
        async with running(config_of(provider_yaml("vllm", "vllm", server.url))) as exporter:
            scrape = await exporter.scrape()
    tiny = {"provider": "vllm", "model": "tiny"}
    assert scrape.value("llm_kv_cache_usage_ratio", **tiny) == pytest.approx(0.4)
    assert scrape.value("llm_requests_running", **tiny) == 5
