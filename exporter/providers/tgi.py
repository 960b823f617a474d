"""Hugging Face Text Generation Inference (TGI), one model per server.

Reads GET /health (503 when its shards fail their health check: up, not ready), /info
(the model, TGI's version, and max_total_tokens, the most tokens a request may have in
all) and /metrics, whose tgi_* series carry no model label: they are the served model's.

    tgi_batch_current_size 4                  -> llm_requests_running{model="..."} 4
    tgi_queue_size 2                          -> llm_requests_waiting 2
    tgi_request_input_length_sum 662          -> llm_tokens_total{type="input"} 662
    tgi_request_generated_tokens_sum 3423     -> llm_tokens_total{type="output"} 3423
    tgi_request_success 109                   -> llm_requests_finished_total{reason="success"} 109
    tgi_request_failure{err="validation"} 2   -> llm_requests_finished_total{reason="validation"} 2
    tgi_request_duration_bucket{le="1.683411219602823"} 4
                                              -> llm_request_duration_seconds_bucket 4
    tgi_request_queue_duration_bucket{...}    -> llm_request_queue_duration_seconds_bucket

Tokens: TGI counts none, but observes each request's prompt length and generated tokens
in the histograms tgi_request_input_length and tgi_request_generated_tokens, whose _sum is
the exact total of those tokens and only grows, as a counter does. Prompt lengths are
observed when a request is validated, generated tokens when it succeeds: the tokens a
failed request generated are not counted.

Finished requests: tgi_request_success, and tgi_request_failure by TGI's own error class
(validation, overloaded, template, incomplete, generation, dropped) as the reason
(router/src/server.rs, router/src/infer/mod.rs, backends/v3/src/backend.rs).

Not mapped: tgi_request_mean_time_per_token_duration is one mean per request with its
prefill in it, not the time between tokens; TGI has no time to first token and no
KV-cache gauge.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .base import (
    EngineSnapshot,
    Findings,
    ModelSnapshot,
    ModelState,
    ProbeMeasurement,
    ProbeSpec,
    ProviderSnapshot,
    Residence,
    expect,
    number,
    ready_when_200,
    text,
)
from .chat import probe_chat
from .promtext import Sample, histogram_names, histograms_by, parse_samples

if TYPE_CHECKING:
    from ..client import ProviderClient, Reply
    from ..config import ProviderConfig

# Counters without _total, as metrics-exporter-prometheus writes them; with, as a newer
# exporter might.
_SUMS = {
    "requests_running": ("tgi_batch_current_size",),
    "requests_waiting": ("tgi_queue_size",),
    "input_tokens_total": ("tgi_request_input_length_sum",),
    "output_tokens_total": ("tgi_request_generated_tokens_sum",),
}
_HISTOGRAMS = {
    "request_duration": "tgi_request_duration",
    "queue_duration": "tgi_request_queue_duration",
}
SUCCESS = ("tgi_request_success", "tgi_request_success_total")
FAILURE = ("tgi_request_failure", "tgi_request_failure_total")
_WANTED = frozenset(
    [
        *(name for names in _SUMS.values() for name in names),
        *(part for name in _HISTOGRAMS.values() for part in histogram_names(name)),
        *SUCCESS,
        *FAILURE,
    ]
)


@dataclass(frozen=True)
class _Info:
    model: ModelSnapshot
    version: str


def _info(reply: Reply) -> _Info:
    body = expect(reply.json(), dict, "the body", reply.endpoint)
    name = text(expect(body.get("model_id"), str, "model_id", reply.endpoint))
    model = ModelSnapshot(
        name=name, loaded=True, context_length=number(body.get("max_total_tokens"))
    )
    return _Info(model, text(body.get("version")))


def _total(samples: list[Sample], names: tuple[str, ...]) -> float | None:
    for name in names:
        values = [sample.value for sample in samples if sample.name == name]
        if values:
            return sum(values)
    return None


def _values(reply: Reply) -> dict[str, Any]:
    """The engine's fields found in /metrics (no model: TGI's series are unlabelled)."""
    samples = parse_samples(reply.text(), _WANTED, reply.endpoint)
    values: dict[str, Any] = {}
    for field_name, names in _SUMS.items():
        value = _total(samples, names)
        if value is not None:
            values[field_name] = value
    for field_name, name in _HISTOGRAMS.items():
        # Any label is summed over: the one model's histogram is under "".
        histogram = histograms_by(samples, name, "").get("")
        if histogram is not None:
            values[field_name] = histogram
    finished: dict[str, float] = {}
    success = _total(samples, SUCCESS)
    if success is not None:
        finished["success"] = success
    for name in FAILURE:
        failures = [sample for sample in samples if sample.name == name]
        for sample in failures:
            reason = text(sample.labels.get("err", "")) or "unknown"
            finished[reason] = finished.get(reason, 0.0) + sample.value
        if failures:
            break
    if finished:
        values["finished_requests"] = finished
    if "overloaded" in finished:  # its queue was full: the server's own admission limit
        values["rejected_requests"] = {"overloaded": finished["overloaded"]}
    return values


class TgiProvider:
    """Reads a Text Generation Inference server."""

    kind: ClassVar[str] = "tgi"

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
        if not ready:
            return findings.snapshot(up=True, ready=False, response_time_seconds=seconds)
        info, values = await findings.gather(
            self.client.fetch("/info", _info),
            self.client.fetch("/metrics", _values),
        )
        engines: tuple[EngineSnapshot, ...] = ()
        if info is not None and values:
            engines = (EngineSnapshot(model=info.model.name, **values),)
        return findings.snapshot(
            up=True,
            ready=True,
            version=info.version if info is not None else "",
            response_time_seconds=seconds,
            models=(info.model,) if info is not None else (),
            engines=engines,
        )

    async def model_states(self) -> tuple[ModelState, ...]:
        """The served model, loaded while /health answers 200.

        TGI serves HTTP only once its shards have loaded the model, and has no unload; a 503
        (shards failing their health check) leaves the read failed, residency unknown.
        """
        answers = await asyncio.gather(
            self.client.fetch("/health", ready_when_200),
            self.client.fetch("/info", _info),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        _, info = answers
        # Neither is optional: each gave its value or raised.
        assert isinstance(info, _Info)
        return (ModelState(info.model.name, Residence.LOADED),)

    async def probe(self, model: str, spec: ProbeSpec) -> ProbeMeasurement:
        """One streamed chat completion, measured."""
        return await probe_chat(self.client, "/v1/chat/completions", model, spec)
