"""The sglang adapter against pages in SGLang's shapes (tests/fixtures/make_sglang_metrics.py)."""

from __future__ import annotations

import math

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from exporter.client import ConnectionStats, ProviderClient
from exporter.errors import FailureClass, ProviderError
from exporter.providers.base import ModelState, ProbeSpec, Residence
from exporter.providers.promtext import parse_samples
from exporter.providers.sglang import SglangProvider, lowest_ranks
from tests.helpers import Scrape, config_of, provider_yaml, running
from tests.providers.helpers import model_states_of, page_total, scrape_of
from tests.standins import StandIn, fixture, reply, sglang_routes, sse_chat

MODEL = "Qwen/Qwen2.5-7B-Instruct"
LABELS = {"provider": "sg", "model": MODEL}


def buckets(page: str, name: str, **labels: str) -> dict[float, float]:
    """A histogram's cumulative counts by bound, summed over the samples with these labels."""
    found: dict[float, float] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == f"{name}_bucket" and labels.items() <= sample.labels.items():
                bound = float(sample.labels["le"])
                found[bound] = found.get(bound, 0.0) + sample.value
    return found


def scraped_buckets(scrape: Scrape, name: str) -> dict[float, float]:
    return {float(labels["le"]): value for labels, value in scrape.all(f"{name}_bucket", **LABELS)}


async def test_tensor_parallel_ranks_are_taken_once() -> None:
    page = fixture("sglang_metrics.txt")
    scrape = await scrape_of("sglang", name="sg", routes=sglang_routes())
    assert scrape.value("llm_provider_info", provider="sg", kind="sglang", version="0.5.6") == 1
    assert scrape.value("llm_provider_ready", provider="sg") == 1
    assert scrape.value("llm_model_loaded", **LABELS) == 1
    assert scrape.value("llm_model_context_tokens", **LABELS) == 32768
    # Both ranks report the scheduler's state: summed, it would be doubled.
    assert page_total(page, "sglang:num_running_reqs") == 24
    running_ = page_total(page, "sglang:num_running_reqs", tp_rank="0")
    assert scrape.value("llm_requests_running", **LABELS) == running_ == 12
    waiting = page_total(page, "sglang:num_queue_reqs", tp_rank="0")
    assert scrape.value("llm_requests_waiting", **LABELS) == waiting == 3
    usage = page_total(page, "sglang:token_usage", tp_rank="0")
    assert scrape.value("llm_kv_cache_usage_ratio", **LABELS) == usage == 0.4
    assert scrape.value("llm_tokens_total", type="input", **LABELS) == page_total(
        page, "sglang:prompt_tokens_total"
    )
    assert scrape.value("llm_tokens_total", type="output", **LABELS) == page_total(
        page, "sglang:generation_tokens_total"
    )
    assert scrape.value("llm_input_tokens_cached_total", **LABELS) == page_total(
        page, "sglang:cached_tokens_total"
    )
    assert scrape.value("llm_exporter_scrape_success", provider="sg") == 1


async def test_histograms_keep_sglangs_buckets_and_one_rank() -> None:
    page = fixture("sglang_metrics.txt")
    scrape = await scrape_of("sglang", name="sg", routes=sglang_routes())
    pairs = {
        "llm_time_to_first_token_seconds": ("sglang:time_to_first_token_seconds", {}),
        "llm_inter_token_latency_seconds": ("sglang:inter_token_latency_seconds", {}),
        "llm_request_duration_seconds": ("sglang:e2e_request_latency_seconds", {}),
        "llm_request_queue_duration_seconds": ("sglang:queue_time_seconds", {"tp_rank": "0"}),
    }
    for ours, (theirs, labels) in pairs.items():
        expected = buckets(page, theirs, **labels)
        assert len(expected) > 2, theirs
        assert scraped_buckets(scrape, ours) == expected, ours
        assert scrape.value(f"{ours}_count", **LABELS) == page_total(
            page, f"{theirs}_count", **labels
        )
        assert scrape.value(f"{ours}_sum", **LABELS) == pytest.approx(
            page_total(page, f"{theirs}_sum", **labels)
        )
    assert buckets(page, "sglang:queue_time_seconds")[math.inf] == 12  # both ranks: 6 each
    assert scrape.value("llm_request_queue_duration_seconds_count", **LABELS) == 6


async def test_data_parallel_replicas_are_summed() -> None:
    page = fixture("sglang_metrics_dp.txt")
    scrape = await scrape_of(
        "sglang", name="sg", routes=sglang_routes(metrics="sglang_metrics_dp.txt")
    )
    rank0 = {"tp_rank": "0"}
    assert (
        scrape.value("llm_requests_running", **LABELS)
        == page_total(page, "sglang:num_running_reqs", **rank0)
        == 5 + 9
    )
    assert (
        scrape.value("llm_requests_waiting", **LABELS)
        == page_total(page, "sglang:num_queue_reqs", **rank0)
        == 1 + 4
    )
    # Each replica has a KV cache of its own: the share in use is over both.
    used = page_total(page, "sglang:num_used_tokens", **rank0)
    capacity = page_total(page, "sglang:max_total_num_tokens", **rank0)
    assert scrape.value("llm_kv_cache_usage_ratio", **LABELS) == used / capacity == 0.375
    assert scrape.value("llm_tokens_total", type="input", **LABELS) == page_total(
        page, "sglang:prompt_tokens_total"
    )
    queue = "llm_request_queue_duration_seconds"
    assert scraped_buckets(scrape, queue) == buckets(page, "sglang:queue_time_seconds", **rank0)
    assert scrape.value(f"{queue}_count", **LABELS) == 3 + 4


def test_the_lowest_rank_present_is_taken_per_replica() -> None:
    page = "\n".join(
        [
            'sglang:num_running_reqs{dp_rank="0",model_name="m",pp_rank="0",tp_rank="1"} 2',
            'sglang:num_running_reqs{dp_rank="0",model_name="m",pp_rank="0",tp_rank="3"} 2',
            'sglang:num_running_reqs{dp_rank="1",model_name="m",pp_rank="0",tp_rank="2"} 5',
            'sglang:num_running_reqs{dp_rank="1",model_name="m",pp_rank="0",tp_rank="x"} 7',
            'sglang:num_running_reqs{dp_rank="0",model_name="other",tp_rank="0"} 1',
        ]
    )
    kept = lowest_ranks(parse_samples(page, {"sglang:num_running_reqs"}))
    assert sorted((s.labels["model_name"], s.value) for s in kept) == [
        ("m", 2.0),
        ("m", 5.0),
        ("other", 1.0),
    ]


async def test_a_starting_server_is_up_not_ready() -> None:
    scrape = await scrape_of(
        "sglang", name="sg", routes=sglang_routes(**{"/health": reply(b"", 503, "text/plain")})
    )
    assert scrape.value("llm_provider_up", provider="sg") == 1
    assert scrape.value("llm_provider_ready", provider="sg") == 0
    assert scrape.all("llm_requests_running", provider="sg") == []


async def test_metrics_off_costs_no_failure_and_older_servers_give_their_version() -> None:
    info = reply(fixture("sglang_server_info.json"))
    missing = reply("not found", 404, "text/plain")
    routes = sglang_routes(
        **{"/metrics": missing, "/server_info": missing, "/get_server_info": info}
    )
    async with StandIn(routes) as server:
        async with running(config_of(provider_yaml("sg", "sglang", server.url))) as exporter:
            scrape = await exporter.scrape()
            health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_exporter_scrape_success", provider="sg") == 1
    assert scrape.value("llm_provider_info", provider="sg", version="0.5.6") == 1
    assert scrape.value("llm_model_loaded", **LABELS) == 1
    assert scrape.all("llm_requests_running", provider="sg") == []
    assert "--enable-metrics" in health["components"]["provider/sg"]["reason"]


async def test_a_probe_streams_a_chat_completion() -> None:
    routes = sglang_routes(**{"/v1/chat/completions": sse_chat(("Hel", "lo", "!"))})
    async with StandIn(routes) as server:
        config = config_of(provider_yaml("sg", "sglang", server.url)).providers[0]
        async with ProviderClient(config, ConnectionStats()) as client:
            measured = await SglangProvider(config, client).probe(MODEL, ProbeSpec("Hi", 8, 10.0))
        assert server.hits["/v1/chat/completions"] == 1
    assert (measured.input_tokens, measured.output_tokens) == (11, 3)
    assert 0 <= measured.time_to_first_token <= measured.duration


async def test_residency_is_read_without_health_which_would_generate() -> None:
    never: list[str] = []

    async def generating_health(request: web.Request) -> web.Response:
        never.append(request.path)
        return web.Response(text="")

    routes = sglang_routes(**{"/health": generating_health})
    assert await model_states_of("sglang", routes) == (ModelState(MODEL, Residence.LOADED),)
    assert never == []


async def test_residency_read_fails_when_the_models_are_unread() -> None:
    with pytest.raises(ProviderError) as failed:
        await model_states_of(
            "sglang", sglang_routes(**{"/v1/models": reply("busy", 500, "text/plain")})
        )
    assert (failed.value.failure, failed.value.endpoint) == (FailureClass.HTTP_5XX, "/v1/models")
