"""SGLang's server (python -m sglang.launch_server; its /metrics needs --enable-metrics).

Reads GET /health (503 while the server starts: up, not ready), /v1/models (the served
name and its context length), /server_info (/get_server_info in older releases) once per
server start for the version, and /metrics, whose sglang:* series map onto the
normalized ones, histograms with SGLang's own buckets:

    sglang:num_running_reqs{tp_rank="0",...} 12.0      -> llm_requests_running 12
    sglang:num_queue_reqs{tp_rank="0",...} 3.0         -> llm_requests_waiting 3
    sglang:token_usage{tp_rank="0",...} 0.4            -> llm_kv_cache_usage_ratio 0.4
    sglang:prompt_tokens_total{...} 48210.0            -> llm_tokens_total{type="input"} 48210
    sglang:generation_tokens_total{...} 30177.0        -> llm_tokens_total{type="output"} 30177
    sglang:cached_tokens_total{...} 12288.0            -> llm_input_tokens_cached_total 12288
    sglang:time_to_first_token_seconds_bucket{le="0.2",...} 3.0
                                                       -> llm_time_to_first_token_seconds_bucket

and inter_token_latency_seconds (time_per_output_token_seconds before it was renamed),
e2e_request_latency_seconds and queue_time_seconds likewise.

The scheduler's series (running, queued, KV cache, queue time) carry tp_rank and pp_rank,
and dp_rank with data parallelism (python/sglang/srt/managers/scheduler_metrics_mixin.py).
The ranks of one replica share one scheduler state, which each reports with
--enable-metrics-for-all-schedulers: the lowest rank's value is taken, never their sum.
Data-parallel replicas serve different requests: their values are summed, and their
KV-cache shares averaged weighted by each one's max_total_num_tokens. The tokenizer's
series (tokens, time to first token, inter-token, end-to-end) carry no rank. Other labels
(engine_type, priority, extra_metric_labels) are summed over.

SGLang's /health generates one token when the server is idle and answers after at least a
second (unless the server runs with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0): it is the
one request of a scrape that costs the server work. The lifecycle watcher's residency read
uses /v1/models alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

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
from .promtext import Sample, histogram_names, histograms_by, parse_samples, sum_by, sum_by_two

if TYPE_CHECKING:
    from ..client import ProviderClient, Reply
    from ..config import ProviderConfig

MODEL = "model_name"
DATA_PARALLEL = "dp_rank"
# Ranks of one replica: they run one scheduler state between them.
RANKS = ("tp_rank", "pp_rank")
METRICS_OFF = "engine metrics off: start SGLang with --enable-metrics"
_SUMS = {
    "requests_running": "sglang:num_running_reqs",
    "requests_waiting": "sglang:num_queue_reqs",
    "input_tokens_total": "sglang:prompt_tokens_total",
    "output_tokens_total": "sglang:generation_tokens_total",
    "cached_input_tokens_total": "sglang:cached_tokens_total",
}
TOKEN_USAGE = "sglang:token_usage"
USED_TOKENS = "sglang:num_used_tokens"
CAPACITY = "sglang:max_total_num_tokens"
_HISTOGRAMS = {
    "time_to_first_token": ("sglang:time_to_first_token_seconds",),
    "request_duration": ("sglang:e2e_request_latency_seconds",),
    "inter_token_latency": (
        "sglang:inter_token_latency_seconds",
        "sglang:time_per_output_token_seconds",
    ),
    "queue_duration": ("sglang:queue_time_seconds",),
}
_WANTED = frozenset(
    [
        *_SUMS.values(),
        TOKEN_USAGE,
        USED_TOKENS,
        CAPACITY,
        *(
            part
            for names in _HISTOGRAMS.values()
            for name in names
            for part in histogram_names(name)
        ),
    ]
)


def _rank(value: str | None) -> int:
    if value is None:
        return -1
    # A rank the exporter cannot read never wins over one it can.
    return int(value) if value.isascii() and value.isdigit() and len(value) < 10 else 1 << 31


def lowest_ranks(samples: Iterable[Sample]) -> list[Sample]:
    """The samples of the lowest tensor- and pipeline-parallel rank of each series name,
    model and data-parallel rank: the other ranks repeat the same scheduler state."""
    ranked = []
    lowest: dict[tuple[str, str, str], tuple[int, ...]] = {}
    for sample in samples:
        group = (sample.name, sample.labels.get(MODEL, ""), sample.labels.get(DATA_PARALLEL, ""))
        rank = tuple(_rank(sample.labels.get(label)) for label in RANKS)
        ranked.append((group, rank, sample))
        if group not in lowest or rank < lowest[group]:
            lowest[group] = rank
    return [sample for group, rank, sample in ranked if rank == lowest[group]]


def _kv_usage(
    usage: dict[str, float], capacity: dict[str, float], used: dict[str, float]
) -> float | None:
    """The KV-cache share in use over data-parallel replicas (dp_rank -> value)."""
    if not usage:
        # Before sglang:token_usage: used over capacity, where both are known.
        total = sum(capacity.get(replica, 0.0) for replica in used)
        return sum(used.values()) / total if used and total > 0 else None
    if len(usage) == 1:
        return next(iter(usage.values()))
    weights = [capacity.get(replica, 0.0) for replica in usage]
    if all(weight > 0 for weight in weights):
        return sum(usage[r] * w for r, w in zip(usage, weights, strict=True)) / sum(weights)
    return sum(usage.values()) / len(usage)


def _engines(reply: Reply) -> list[EngineSnapshot]:
    samples = lowest_ranks(parse_samples(reply.text(), _WANTED, reply.endpoint))
    fields: dict[str, dict[str, Any]] = defaultdict(dict)
    for field_name, name in _SUMS.items():
        for model, value in sum_by(samples, name, MODEL).items():
            fields[model][field_name] = value
    usage = sum_by_two(samples, TOKEN_USAGE, MODEL, DATA_PARALLEL)
    capacity = sum_by_two(samples, CAPACITY, MODEL, DATA_PARALLEL)
    used = sum_by_two(samples, USED_TOKENS, MODEL, DATA_PARALLEL)
    for model in {*usage, *used}:
        ratio = _kv_usage(usage.get(model, {}), capacity.get(model, {}), used.get(model, {}))
        if ratio is not None and math.isfinite(ratio):
            fields[model]["kv_cache_usage_ratio"] = ratio
    for field_name, names in _HISTOGRAMS.items():
        for name in names:
            histograms = histograms_by(samples, name, MODEL)
            for model, histogram in histograms.items():
                fields[model][field_name] = histogram
            if histograms:
                break
    return [EngineSnapshot(model=text(model), **values) for model, values in sorted(fields.items())]


class SglangProvider:
    """Reads an SGLang server."""

    kind: ClassVar[str] = "sglang"

    def __init__(self, config: ProviderConfig, client: ProviderClient) -> None:
        self.config = config
        self.client = client
        # Asked once per server start: the server info is long, and costs the server a round
        # trip to its schedulers.
        self._version: str | None = None

    async def snapshot(self) -> ProviderSnapshot:
        """Read health first; the rest concurrently once the server answers."""
        findings = Findings()
        (health,) = await findings.gather(
            self.client.fetch("/health", ready_when_200, statuses=(200, 503))
        )
        if health is None:
            self._version = None
            return findings.snapshot(up=False)
        ready, seconds = health
        if not ready:
            return findings.snapshot(up=True, ready=False, response_time_seconds=seconds)
        models, engines, version = await findings.gather(
            self.client.fetch("/v1/models", served_models),
            self.client.fetch("/metrics", _engines, optional=True),
            self._read_version(),
        )
        failed = {failure.endpoint for failure in findings.failures}
        metrics_off = engines is None and "/metrics" not in failed
        return findings.snapshot(
            up=True,
            ready=True,
            version=version,
            response_time_seconds=seconds,
            models=tuple(models or ()),
            engines=tuple(engines or ()),
            notes=(METRICS_OFF,) if metrics_off else (),
        )

    async def _read_version(self) -> str:
        if self._version is None:
            version = await self.client.fetch("/server_info", version_field, optional=True)
            if version is None:
                version = await self.client.fetch("/get_server_info", version_field, optional=True)
            self._version = version
        return self._version or ""

    async def model_states(self) -> tuple[ModelState, ...]:
        """Every served model, loaded: SGLang serves HTTP only after its weights are loaded,
        and has no unload.

        Read from /v1/models alone: /health would make the idle server generate a token at
        every read of the lifecycle watcher.
        """
        models = await self.client.fetch("/v1/models", served_models) or []
        return tuple(ModelState(m.name, Residence.LOADED) for m in models[: self.config.max_models])

    async def probe(self, model: str, spec: ProbeSpec) -> ProbeMeasurement:
        """One streamed chat completion, measured."""
        return await probe_chat(self.client, "/v1/chat/completions", model, spec)
