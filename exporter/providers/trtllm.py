"""NVIDIA TensorRT-LLM's OpenAI-compatible server, trtllm-serve.

Reads GET /health (200 while its engine serves, 503 once the engine failed), /version,
/v1/models (the one model it serves) and /prometheus/metrics, which trtllm-serve mounts
only when started with return_perf_metrics: true (its own /metrics is JSON iteration
stats, not Prometheus). The trtllm_* series carry model_name and engine_type labels, which
trtllm-serve sets to "undefined", and gauges also the pid of the process that wrote them
(prometheus_client's multiprocess mode): one server's series are summed, and re-emitted for
the model it serves under the normalized names, histograms with their own buckets:

    trtllm_num_requests_waiting{engine_type="undefined",model_name="undefined",pid="4242"} 2.0
        -> llm_requests_waiting{model="TinyLlama-1.1B-Chat-v1.0"} 2
    trtllm_kv_cache_utilization{...} 0.4375                  -> llm_kv_cache_usage_ratio 0.4375
    trtllm_time_to_first_token_seconds_bucket{le="0.1",...} 7 -> llm_time_to_first_token_seconds_bucket

Names, labels and buckets follow tensorrt_llm/metrics/collector.py (MetricsCollector) and
tensorrt_llm/serve/openai_server.py upstream.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

from .base import (
    EngineSnapshot,
    Findings,
    ModelState,
    ProbeMeasurement,
    ProbeSpec,
    ProviderSnapshot,
    Residence,
    ready_when_200,
    served_models,
    text,
    version_field,
)
from .chat import probe_chat
from .promtext import Sample, histogram_names, histograms_by, parse_samples, sum_by_two

if TYPE_CHECKING:
    from ..client import ProviderClient, Reply
    from ..config import ProviderConfig

MODEL = "model_name"
# Not a label of any series: grouping by it puts all of a server's series in one group.
_ONE = "\x00one"
METRICS = "/prometheus/metrics"
METRICS_OFF = (
    "engine metrics off: start trtllm-serve with return_perf_metrics: true"
    " (and enable_iter_perf_stats: true for the queue and KV-cache gauges)"
    " in --extra_llm_api_options"
)
UNHEALTHY = "health check failed: the engine is unavailable"
# Summed over the processes that wrote them.
_SUMMED = {
    "requests_running": "trtllm_num_requests_running",
    "requests_waiting": "trtllm_num_requests_waiting",
    "input_tokens_total": "trtllm_prompt_tokens_total",
    "output_tokens_total": "trtllm_generation_tokens_total",
    "cached_input_tokens_total": "trtllm_prompt_cached_tokens_total",
    "input_seconds_total": "trtllm_request_prefill_time_seconds_sum",
    "output_seconds_total": "trtllm_request_decode_time_seconds_sum",
}
# A fraction from 0 to 1: the largest any process wrote, never a sum.
KV_CACHE = "trtllm_kv_cache_utilization"
# Before the trtllm_ prefix (TensorRT-LLM 1.1 and older; Dynamo adds one of its own), the
# request series were named without it: those names are read where the prefixed are absent.
_HISTOGRAMS = {
    "time_to_first_token": ("trtllm_time_to_first_token_seconds", "time_to_first_token_seconds"),
    "request_duration": ("trtllm_e2e_request_latency_seconds", "e2e_request_latency_seconds"),
    "inter_token_latency": (
        "trtllm_time_per_output_token_seconds",
        "time_per_output_token_seconds",
    ),
    "queue_duration": ("trtllm_request_queue_time_seconds", "request_queue_time_seconds"),
}
FINISHED = ("trtllm_request_success_total", "request_success_total")
_WANTED = frozenset(
    [
        *_SUMMED.values(),
        KV_CACHE,
        *(
            part
            for names in _HISTOGRAMS.values()
            for name in names
            for part in histogram_names(name)
        ),
        *FINISHED,
    ]
)


def _samples(reply: Reply) -> list[Sample]:
    return parse_samples(reply.text(), _WANTED, reply.endpoint)


def _engines(samples: list[Sample], served: str | None) -> list[EngineSnapshot]:
    """The engine series of one server, for the model it serves.

    trtllm-serve serves one model and labels its series model_name="undefined": with the
    served model known, all of them are that model's. Without it (its listing failed),
    they are grouped by model_name as they are.
    """
    label = MODEL if served is None else _ONE
    fields: dict[str, dict[str, object]] = defaultdict(dict)
    for field_name, name in _SUMMED.items():
        for key, value in _sum(samples, name, label).items():
            fields[key][field_name] = value
    for key, value in _max(samples, KV_CACHE, label).items():
        fields[key]["kv_cache_usage_ratio"] = value
    for field_name, names in _HISTOGRAMS.items():
        for name in names:
            histograms = histograms_by(samples, name, label)
            for key, histogram in histograms.items():
                fields[key][field_name] = histogram
            if histograms:
                break
    for name in FINISHED:
        reasons = sum_by_two(samples, name, label, "finished_reason")
        for key, by_reason in reasons.items():
            cleaned: dict[str, float] = {}
            for reason, count in by_reason.items():  # a label value like any other: cleaned
                cleaned[text(reason)] = cleaned.get(text(reason), 0.0) + count
            fields[key]["finished_requests"] = cleaned
        if reasons:
            break
    return [
        EngineSnapshot(model=served if served is not None else text(key), **values)  # type: ignore[arg-type]
        for key, values in sorted(fields.items())
    ]


def _sum(samples: list[Sample], name: str, label: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for sample in samples:
        if sample.name == name:
            totals[sample.labels.get(label, "")] += sample.value
    return dict(totals)


def _max(samples: list[Sample], name: str, label: str) -> dict[str, float]:
    largest: dict[str, float] = {}
    for sample in samples:
        if sample.name == name:
            key = sample.labels.get(label, "")
            largest[key] = max(largest.get(key, 0.0), sample.value)
    return largest


class TrtllmProvider:
    """Reads a trtllm-serve server."""

    kind: ClassVar[str] = "trtllm"

    def __init__(self, config: ProviderConfig, client: ProviderClient) -> None:
        self.config = config
        self.client = client

    async def snapshot(self) -> ProviderSnapshot:
        """Read health first; the rest concurrently once the server answers."""
        findings = Findings()
        (health,) = await findings.gather(
            self.client.fetch("/health", ready_when_200, statuses=(200, 503))
        )
        if health is None:
            return findings.snapshot(up=False)
        ready, seconds = health
        models, version, samples = await findings.gather(
            self.client.fetch("/v1/models", served_models),
            self.client.fetch("/version", version_field, optional=True),
            self.client.fetch(METRICS, _samples, optional=True),
        )
        models = [replace(model, loaded=ready) for model in models or []]
        served = models[0].name if len(models) == 1 else None
        engines = _engines(samples, served) if samples is not None else []
        failed = {failure.endpoint for failure in findings.failures}
        notes = []
        if samples is None and METRICS not in failed:
            notes.append(METRICS_OFF)
        if not ready:
            notes.append(UNHEALTHY)
        return findings.snapshot(
            up=True,
            ready=ready,
            version=version or "",
            response_time_seconds=seconds,
            models=tuple(models),
            engines=tuple(engines),
            notes=tuple(notes),
        )

    async def model_states(self) -> tuple[ModelState, ...]:
        """The served model: loaded while /health answers 200, failed when it answers 503.

        trtllm-serve loads its one model before it listens and never unloads it: there is
        no load or unload, and a failed engine does not come back.
        """
        answers = await asyncio.gather(
            self.client.fetch("/health", ready_when_200, statuses=(200, 503)),
            self.client.fetch("/v1/models", served_models),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        health, models = answers
        # Neither is optional: each gave its value or raised.
        assert isinstance(health, tuple) and isinstance(models, list)
        ready, _ = health
        return tuple(
            ModelState(model.name, Residence.LOADED)
            if ready
            else ModelState(model.name, Residence.FAILED, detail="health check answered 503")
            for model in models[: self.config.max_models]
        )

    async def probe(self, model: str, spec: ProbeSpec) -> ProbeMeasurement:
        """One streamed chat completion, measured."""
        return await probe_chat(self.client, "/v1/chat/completions", model, spec)
