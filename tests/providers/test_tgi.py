"""The tgi adapter against a recorded TGI /metrics page (tests/fixtures/README.md)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.client import ConnectionStats, ProviderClient
from exporter.errors import FailureClass, ProviderError
from exporter.providers.base import ModelState, ProbeSpec, Residence
from exporter.providers.tgi import TgiProvider
from tests.helpers import config_of, provider_yaml
from tests.providers.helpers import model_states_of, page_total, scrape_of
from tests.standins import StandIn, fixture, reply, sse_chat, tgi_routes

MODEL = "bigscience/blomm-560m"
LABELS = {"provider": "tgi", "model": MODEL}


def buckets(page: str, name: str) -> dict[float, float]:
    return {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == f"{name}_bucket"
    }


async def test_recorded_page_maps_onto_normalized_series() -> None:
    page = fixture("tgi_metrics.txt")
    scrape = await scrape_of("tgi", tgi_routes())
    assert scrape.value("llm_provider_info", provider="tgi", kind="tgi", version="3.3.6") == 1
    assert scrape.value("llm_model_loaded", **LABELS) == 1
    assert scrape.value("llm_model_context_tokens", **LABELS) == 512
    assert scrape.value("llm_requests_running", **LABELS) == page_total(
        page, "tgi_batch_current_size"
    )
    assert scrape.value("llm_requests_waiting", **LABELS) == page_total(page, "tgi_queue_size")
    # The token histograms' sums are the exact totals.
    assert (
        scrape.value("llm_tokens_total", type="input", **LABELS)
        == page_total(page, "tgi_request_input_length_sum")
        == 662
    )
    assert (
        scrape.value("llm_tokens_total", type="output", **LABELS)
        == page_total(page, "tgi_request_generated_tokens_sum")
        == 3423
    )
    finished = {
        labels["reason"]: value
        for labels, value in scrape.all("llm_requests_finished_total", **LABELS)
    }
    # TGI writes its counters without _total; prometheus_client's parser adds it.
    assert "tgi_request_success 109" in page
    assert (
        finished
        == {
            "success": page_total(page, "tgi_request_success_total"),
            "validation": page_total(page, "tgi_request_failure_total", err="validation"),
        }
        == {"success": 109, "validation": 2}
    )
    # No time to first token, no KV cache, no inter-token histogram from TGI.
    for absent in (
        "llm_time_to_first_token_seconds_count",
        "llm_inter_token_latency_seconds_count",
        "llm_kv_cache_usage_ratio",
    ):
        assert scrape.all(absent, provider="tgi") == [], absent
    assert scrape.value("llm_exporter_scrape_success", provider="tgi") == 1


async def test_histograms_keep_tgis_buckets() -> None:
    page = fixture("tgi_metrics.txt")
    scrape = await scrape_of("tgi", tgi_routes())
    pairs = {
        "llm_request_duration_seconds": "tgi_request_duration",
        "llm_request_queue_duration_seconds": "tgi_request_queue_duration",
    }
    for ours, theirs in pairs.items():
        scraped = {
            float(labels["le"]): value for labels, value in scrape.all(f"{ours}_bucket", **LABELS)
        }
        assert scraped == buckets(page, theirs), ours
        assert len(scraped) == 36
        assert scrape.value(f"{ours}_count", **LABELS) == page_total(page, f"{theirs}_count") == 109
        assert scrape.value(f"{ours}_sum", **LABELS) == page_total(page, f"{theirs}_sum")


async def test_a_busy_server_and_its_failure_classes() -> None:
    page = (
        fixture("tgi_metrics.txt")
        .replace("tgi_queue_size 0", "tgi_queue_size 2")
        .replace("tgi_batch_current_size 0", "tgi_batch_current_size 4")
        .replace(
            'tgi_request_failure{err="validation"} 2',
            'tgi_request_failure{err="validation"} 2\n'
            'tgi_request_failure{err="overloaded"} 5\n'
            'tgi_request_failure{err="generation"} 1',
        )
    )
    scrape = await scrape_of("tgi", tgi_routes(**{"/metrics": reply(page, 200, "text/plain")}))
    assert scrape.value("llm_requests_running", **LABELS) == 4
    assert scrape.value("llm_requests_waiting", **LABELS) == 2
    finished = {
        labels["reason"]: value
        for labels, value in scrape.all("llm_requests_finished_total", **LABELS)
    }
    assert finished == {"success": 109, "validation": 2, "overloaded": 5, "generation": 1}
    # A full queue is TGI's admission limit: the contract's rejected requests.
    assert scrape.value("llm_requests_rejected_total", reason="overloaded", **LABELS) == 5


async def test_older_info_gives_model_and_context() -> None:
    """TGI 2.0's /info (model_dtype, max_input_length, max_batch_total_tokens)."""
    scrape = await scrape_of("tgi", tgi_routes(**{"/info": reply(fixture("tgi_info_v2.0.json"))}))
    assert scrape.value("llm_provider_info", provider="tgi", version="2.0.4") == 1
    assert scrape.value("llm_model_context_tokens", **LABELS) == 2048
    assert scrape.value("llm_tokens_total", type="output", **LABELS) == 3423


async def test_unhealthy_shards_leave_it_up_not_ready() -> None:
    unhealthy = reply('{"error":"unhealthy","error_type":"healthcheck"}', 503)
    scrape = await scrape_of("tgi", tgi_routes(**{"/health": unhealthy}))
    assert scrape.value("llm_provider_up", provider="tgi") == 1
    assert scrape.value("llm_provider_ready", provider="tgi") == 0
    assert scrape.all("llm_model_loaded", provider="tgi") == []


async def test_a_probe_streams_a_chat_completion() -> None:
    routes = tgi_routes(**{"/v1/chat/completions": sse_chat(("Hel", "lo", "!"))})
    async with StandIn(routes) as server:
        config = config_of(provider_yaml("tgi", "tgi", server.url)).providers[0]
        async with ProviderClient(config, ConnectionStats()) as client:
            measured = await TgiProvider(config, client).probe(MODEL, ProbeSpec("Hi", 8, 10.0))
        assert server.hits["/v1/chat/completions"] == 1
    assert (measured.input_tokens, measured.output_tokens) == (11, 3)
    assert 0 <= measured.time_to_first_token <= measured.duration


async def test_residency_follows_health() -> None:
    assert await model_states_of("tgi", tgi_routes()) == (ModelState(MODEL, Residence.LOADED),)
    with pytest.raises(ProviderError) as failed:
        await model_states_of("tgi", tgi_routes(**{"/health": reply("{}", 503)}))
    assert (failed.value.failure, failed.value.endpoint) == (FailureClass.HTTP_5XX, "/health")
