"""vLLM's OpenAI-compatible server.

Reads GET /health, /version, /v1/models and /metrics; the vllm:* series (labels
engine and model_name) are summed over engines per model and re-emitted under the
normalized names, histograms with their own buckets:

    vllm:num_requests_waiting{engine="0",model_name="tiny"} 4   -> llm_requests_waiting{model="tiny"} 4
    vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.27 -> llm_kv_cache_usage_ratio 0.27
    vllm:time_to_first_token_seconds_bucket{le="0.06",...} 4   -> llm_time_to_first_token_seconds_bucket

Which models are in memory (the residency read) comes from /v1/models and the sleep
mode's gauge (vllm/v1/metrics/loggers.py), 1 on the state the engine is in:

    vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="awake"} 0.0
    vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="weights_offloaded"} 1.0
    vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="discard_all"} 0.0
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

from ..errors import ProviderError
from .base import (
    EngineSnapshot,
    Findings,
    ModelState,
    ProbeMeasurement,
    ProbeSpec,
    ProviderSnapshot,
    Residence,
    number,
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
_GAUGES = {
    "requests_running": ("vllm:num_requests_running",),
    "requests_waiting": ("vllm:num_requests_waiting",),
    # Renamed in vLLM 0.10 (V1 engine); both are fractions from 0 to 1.
    "kv_cache_usage_ratio": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "input_tokens_total": ("vllm:prompt_tokens_total",),
    "output_tokens_total": ("vllm:generation_tokens_total",),
    "cached_input_tokens_total": ("vllm:prompt_tokens_cached_total",),
    "input_seconds_total": ("vllm:request_prefill_time_seconds_sum",),
    "output_seconds_total": ("vllm:request_decode_time_seconds_sum",),
    "preempted_requests_total": ("vllm:num_preemptions_total",),
}
_HISTOGRAMS = {
    "time_to_first_token": ("vllm:time_to_first_token_seconds",),
    "request_duration": ("vllm:e2e_request_latency_seconds",),
    "inter_token_latency": (
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
    ),
    "queue_duration": ("vllm:request_queue_time_seconds",),
}
FINISHED = "vllm:request_success_total"
REJECTED = "vllm:admission_rejections_total"
CACHE_CONFIG = "vllm:cache_config_info"
# Reasons of admission rejections kept as label values; vLLM has two.
MAX_REASONS = 8
SLEEP_STATE = "vllm:engine_sleep_state"
_WANTED = frozenset(
    [
        *(name for names in _GAUGES.values() for name in names),
        *(
            part
            for names in _HISTOGRAMS.values()
            for name in names
            for part in histogram_names(name)
        ),
        FINISHED,
        REJECTED,
    ]
)


def _seconds(reply: Reply) -> float:
    return reply.seconds


def _engines(samples: list[Sample], page: str, endpoint: str) -> list[EngineSnapshot]:
    """The engines of one /metrics page: its wanted samples, and the page for the cache's
    shape (an info series read apart)."""
    fields: dict[str, dict[str, object]] = {}
    for field_name, names in _GAUGES.items():
        for name in names:
            values = sum_by(samples, name, MODEL)
            if field_name == "kv_cache_usage_ratio":
                # A share per engine (data-parallel ranks, each its own cache of one size):
                # their mean, never their sum.
                engines = Counter(s.labels.get(MODEL, "") for s in samples if s.name == name)
                values = {model: value / engines[model] for model, value in values.items()}
            for model, value in values.items():
                fields.setdefault(model, {})[field_name] = value
            if values:
                break
    for field_name, names in _HISTOGRAMS.items():
        for name in names:
            histograms = histograms_by(samples, name, MODEL)
            for model, histogram in histograms.items():
                fields.setdefault(model, {})[field_name] = histogram
            if histograms:
                break
    reasons = sum_by_two(samples, FINISHED, MODEL, "finished_reason")
    for model, by_reason in reasons.items():
        cleaned: dict[str, float] = {}
        for reason, count in by_reason.items():  # a label value like any other: cleaned
            cleaned[text(reason)] = cleaned.get(text(reason), 0.0) + count
        fields.setdefault(model, {})["finished_requests"] = cleaned
    rejected = sum_by_two(samples, REJECTED, MODEL, "reason")
    for model, by_reason in rejected.items():
        kept = dict(sorted(by_reason.items())[:MAX_REASONS])
        fields.setdefault(model, {})["rejected_requests"] = {text(r): n for r, n in kept.items()}
    # The cache's shape is the engine's, labelled by engine only: every model it serves.
    # An info series of dozens of labels: one that cannot be read costs itself only.
    try:
        config = parse_samples(page, (CACHE_CONFIG,), endpoint)
    except ProviderError:
        config = []
    for sample in config[:1]:
        shape = {
            "kv_cache_block_size_tokens": _label_number(sample.labels.get("block_size")),
            "kv_cache_blocks": _label_number(sample.labels.get("num_gpu_blocks")),
        }
        for of_model in fields.values():
            of_model.update({k: v for k, v in shape.items() if v is not None})
    return [
        EngineSnapshot(model=text(model), **values)  # type: ignore[arg-type]
        for model, values in sorted(fields.items())
    ]


def _label_number(value: str | None) -> float | None:
    """A label's value as a finite non-negative number ("None" and the like: None)."""
    try:
        return number(float(value)) if value is not None else None
    except ValueError:
        return None


def _awake(reply: Reply) -> dict[str, bool]:
    """Per model_name of the sleep-state gauge: whether an engine of it is awake."""
    return _awake_of(parse_samples(reply.text(), (SLEEP_STATE,), reply.endpoint))


def _awake_of(samples: list[Sample]) -> dict[str, bool]:
    awake: dict[str, bool] = {}
    for sample in samples:
        if sample.name != SLEEP_STATE:
            continue
        model = sample.labels.get(MODEL, "")
        # "awake" is 1 on an awake engine and 0 on a sleeping one, whose level is the
        # other series that is 1 (or none, when only its KV cache was released).
        is_awake = sample.labels.get("sleep_state") == "awake" and sample.value >= 1
        awake[model] = awake.get(model, False) or is_awake
    return awake


def _engines_and_awake(reply: Reply) -> tuple[list[EngineSnapshot], dict[str, bool]]:
    """The engines and the sleep state of one /metrics page, decoded and read once."""
    page = reply.text()
    samples = parse_samples(page, _WANTED | {SLEEP_STATE}, reply.endpoint)
    return _engines(samples, page, reply.endpoint), _awake_of(samples)


class VllmProvider:
    """Reads a vLLM server."""

    kind: ClassVar[str] = "vllm"

    def __init__(self, config: ProviderConfig, client: ProviderClient) -> None:
        self.config = config
        self.client = client

    async def snapshot(self) -> ProviderSnapshot:
        """Read health first; the rest concurrently once the server answers."""
        findings = Findings()
        (seconds,) = await findings.gather(self.client.fetch("/health", _seconds))
        if seconds is None:
            return findings.snapshot(up=False)
        models, version, page = await findings.gather(
            self.client.fetch("/v1/models", served_models),
            self.client.fetch("/version", version_field, optional=True),
            self.client.fetch("/metrics", _engines_and_awake),
        )
        engines, awake = page if page is not None else ([], {})
        # A sleeping engine's weights are out of memory: its models are not loaded, as a
        # sleeping model of llama.cpp's router is not.
        engine_awake = any(awake.values()) if awake else True
        models = [replace(m, loaded=awake.get(m.name, engine_awake)) for m in models or []]
        return findings.snapshot(
            up=True,
            ready=True,
            version=version or "",
            response_time_seconds=seconds,
            models=tuple(models),
            engines=tuple(engines),
        )

    async def model_states(self) -> tuple[ModelState, ...]:
        """Every served model, loaded unless the sleep-state gauge says its engine sleeps.

        vLLM has no load or unload; sleep mode (POST /sleep, /wake_up) frees an engine's
        memory without ending the server. /metrics is read as it is for a scrape: it never
        wakes an engine.
        """
        answers = await asyncio.gather(
            self.client.fetch("/v1/models", served_models),
            self.client.fetch("/metrics", _awake),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        models, awake = answers
        # Neither is optional: each gave its value or raised.
        assert isinstance(models, list) and isinstance(awake, dict)
        # One server runs one engine (and data-parallel copies of it): every name it lists,
        # aliases and LoRA adapters included, is in memory exactly when that engine is.
        engine_awake = any(awake.values()) if awake else True
        states = []
        for model in models[: self.config.max_models]:
            is_awake = awake.get(model.name, engine_awake)
            states.append(
                ModelState(model.name, Residence.LOADED if is_awake else Residence.SLEEPING)
            )
        return tuple(states)

    async def probe(self, model: str, spec: ProbeSpec) -> ProbeMeasurement:
        """One streamed chat completion, measured."""
        return await probe_chat(self.client, "/v1/chat/completions", model, spec)
