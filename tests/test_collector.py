"""Collection: what every provider kind's snapshot goes through before it is rendered."""

from __future__ import annotations

import logging
import math

import pytest
from aiohttp import web

from exporter.collector import MAX_BUCKETS, MAX_LABEL_VALUES, bounded
from exporter.providers.base import EngineSnapshot, HistogramData, ModelSnapshot, ProviderSnapshot
from tests.helpers import config_of, provider_yaml, running
from tests.standins import StandIn, fixture, ollama_routes, vllm_routes


async def test_max_models_bounds_the_model_labels_on_metrics() -> None:
    """The Ollama stand-in has two models; with max_models 1, one model label reaches /metrics."""
    async with StandIn(ollama_routes()) as server:
        config = config_of(provider_yaml("ollama", "ollama", server.url, max_models=1))
        async with running(config) as exporter:
            scrape = await exporter.scrape()
    models = {labels["model"] for _, labels, _ in scrape.samples if "model" in labels}
    assert len(models) == 1, models
    assert scrape.value("llm_provider_up", provider="ollama") == 1


def test_bounded_caps_models_and_engines_alike() -> None:
    snapshot = ProviderSnapshot(
        up=True,
        models=tuple(ModelSnapshot(name=f"m{i}") for i in range(3)),
        engines=tuple(EngineSnapshot(model=f"m{i}") for i in range(3)),
    )
    capped, dropped = bounded(snapshot, 2, 10_000)
    assert [m.name for m in capped.models] == ["m0", "m1"]
    assert [e.model for e in capped.engines] == ["m0", "m1"]
    assert dropped == {"llm_model_info": 1, "llm_requests_running": 1}
    assert bounded(snapshot, 100, 10_000) == (snapshot, {})


def test_bounded_keeps_each_model_name_once() -> None:
    """Names that were different before cleaning would be duplicate series after it."""
    snapshot = ProviderSnapshot(
        up=True,
        models=(ModelSnapshot(name="twin", size_bytes=1), ModelSnapshot(name="twin", size_bytes=2)),
        engines=(EngineSnapshot(model="twin"), EngineSnapshot(model="twin")),
    )
    capped, _ = bounded(snapshot, 100, 10_000)
    assert [m.size_bytes for m in capped.models] == [1]
    assert len(capped.engines) == 1


def test_folding_keeps_the_largest_reasons_and_the_total() -> None:
    reasons = {f"r{i:03d}": float(i) for i in range(100)}
    snapshot = ProviderSnapshot(up=True, engines=(EngineSnapshot("m", finished_requests=reasons),))
    capped, dropped = bounded(snapshot, 100, 10_000)
    kept = capped.engines[0].finished_requests
    assert len(kept) == MAX_LABEL_VALUES
    assert sum(kept.values()) == sum(reasons.values())
    assert "r099" in kept and "r000" not in kept
    assert dropped == {"llm_requests_finished_total": 100 - MAX_LABEL_VALUES + 1}


def test_thinned_histogram_is_still_cumulative_and_ends_in_inf() -> None:
    buckets = (*tuple((float(i), float(i)) for i in range(1, 1000)), (math.inf, 1000.0))
    histogram = HistogramData(buckets, 5.0)
    snapshot = ProviderSnapshot(up=True, engines=(EngineSnapshot("m", request_duration=histogram),))
    capped, _ = bounded(snapshot, 100, 10_000)
    thinned = capped.engines[0].request_duration
    assert thinned is not None
    assert len(thinned.buckets) <= MAX_BUCKETS
    assert thinned.buckets[-1] == (math.inf, 1000.0)
    assert set(thinned.buckets) <= set(buckets)


async def test_an_engine_series_gone_after_an_upgrade_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc: a name the exporter does not
    know yet leaves the series out, and the operator is told once, with its name."""
    page = {"text": fixture("vllm_metrics_after.txt")}

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=page["text"], content_type="text/plain")

    async with StandIn(vllm_routes(**{"/metrics": metrics})) as server:
        config = config_of(provider_yaml("vllm", "vllm", server.url, lifecycle="{watch: false}"))
        async with running(config) as exporter:
            before = await exporter.scrape()
            page["text"] = page["text"].replace(
                "vllm:kv_cache_usage_perc", "vllm:kv_cache_use_2027"
            )
            with caplog.at_level(logging.WARNING, logger="exporter.collector"):
                for _ in range(3):
                    after = await exporter.scrape()
    assert before.value("llm_kv_cache_usage_ratio", model="tiny") is not None
    assert after.value("llm_kv_cache_usage_ratio", model="tiny") is None
    gone = [r for r in caplog.records if "no longer reported" in r.getMessage()]
    assert len(gone) == 1
    assert getattr(gone[0], "fields", {})["series"] == "kv_cache_usage_ratio"
