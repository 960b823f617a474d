"""llama.cpp's llama-server.

Reads GET /health (503 while the model loads: up, not ready), /v1/models, /props,
/slots (busy or idle only: slot prompts are never read into a snapshot) and
/metrics, whose llamacpp:* series map onto the normalized ones:

    llamacpp:prompt_tokens_total 221       -> llm_tokens_total{type="input"} 305
    llamacpp:prompt_tokens_cached_total 84 -> llm_input_tokens_cached_total 84
    llamacpp:tokens_predicted_total 360    -> llm_tokens_total{type="output"} 360
    llamacpp:requests_processing 2         -> llm_requests_running 2
    llamacpp:requests_deferred 3           -> llm_requests_waiting 3
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .base import (
    EngineSnapshot,
    Findings,
    ModelSnapshot,
    ProbeMeasurement,
    ProbeSpec,
    ProviderSnapshot,
    expect,
    number,
    text,
)
from .chat import probe_chat
from .promtext import parse_samples

if TYPE_CHECKING:
    from ..client import ProviderClient, Reply
    from ..config import ProviderConfig

_METRICS = {
    "llamacpp:prompt_tokens_total": "input_tokens_total",
    "llamacpp:tokens_predicted_total": "output_tokens_total",
    "llamacpp:prompt_tokens_cached_total": "cached_input_tokens_total",
    "llamacpp:prompt_seconds_total": "input_seconds_total",
    "llamacpp:tokens_predicted_seconds_total": "output_seconds_total",
    "llamacpp:prompt_tokens_seconds": "input_tokens_per_second",
    "llamacpp:predicted_tokens_seconds": "output_tokens_per_second",
    "llamacpp:requests_processing": "requests_running",
    "llamacpp:requests_deferred": "requests_waiting",
    "llamacpp:kv_cache_usage_ratio": "kv_cache_usage_ratio",
}

METRICS_OFF = "engine metrics off: start llama-server with --metrics"


def _health(reply: Reply) -> tuple[bool, float]:
    # llama-server answers 503 while it loads the model: alive, not ready.
    return reply.status == 200, reply.seconds


def _models(reply: Reply) -> list[ModelSnapshot]:
    body = expect(reply.json(), dict, "the body", reply.endpoint)
    models = []
    for entry in expect(body.get("data"), list, "data", reply.endpoint):
        entry = expect(entry, dict, "a model", reply.endpoint)
        meta = entry.get("meta")
        meta = meta if isinstance(meta, dict) else {}
        size = number(meta.get("size"))
        models.append(
            ModelSnapshot(
                name=text(expect(entry.get("id"), str, "a model id", reply.endpoint)),
                loaded=True,
                format="gguf",
                quantization=text(meta.get("ftype")),
                size_bytes=size,
                memory_bytes=size,
                context_length=number(meta.get("n_ctx")),
            )
        )
    return models


def _props(reply: Reply) -> dict[str, Any]:
    return expect(reply.json(), dict, "the body", reply.endpoint)


def _slots(reply: Reply) -> tuple[float, float]:
    slots = expect(reply.json(), list, "the body", reply.endpoint)
    busy = sum(
        1 for slot in slots if expect(slot, dict, "a slot", reply.endpoint).get("is_processing")
    )
    return float(busy), float(len(slots) - busy)


def _engine_values(reply: Reply) -> dict[str, float]:
    samples = parse_samples(reply.text(), _METRICS, reply.endpoint)
    values = {_METRICS[s.name]: s.value for s in samples if s.name in _METRICS}
    # llama.cpp counts only the prompt tokens it evaluated; input tokens, as OpenTelemetry
    # and every other kind count them, are all prompt tokens, cached or not.
    if "input_tokens_total" in values:
        values["input_tokens_total"] += values.get("cached_input_tokens_total", 0.0)
    return values


class LlamaCppProvider:
    """Reads a llama-server."""

    kind: ClassVar[str] = "llamacpp"

    def __init__(self, config: ProviderConfig, client: ProviderClient) -> None:
        self.config = config
        self.client = client

    async def snapshot(self) -> ProviderSnapshot:
        """Read health first; the rest concurrently once the server answers."""
        findings = Findings()
        (health,) = await findings.gather(
            self.client.fetch("/health", _health, statuses=(200, 503))
        )
        if health is None:
            return findings.snapshot(up=False)
        ready, seconds = health
        if not ready:
            return findings.snapshot(up=True, ready=False, response_time_seconds=seconds)
        models, props, slots, values = await findings.gather(
            self.client.fetch("/v1/models", _models),
            self.client.fetch("/props", _props, optional=True),
            self.client.fetch("/slots", _slots, optional=True),
            self.client.fetch("/metrics", _engine_values, optional=True),
        )
        models, props = models or [], props or {}
        model = models[0].name if models else text(props.get("model_alias"))
        engines: tuple[EngineSnapshot, ...] = ()
        if values is not None or slots is not None:
            busy, idle = slots if slots is not None else (None, None)
            fields: dict[str, Any] = values or {}
            engines = (EngineSnapshot(model=model, slots_busy=busy, slots_idle=idle, **fields),)
        failed = {failure.endpoint for failure in findings.failures}
        notes = (METRICS_OFF,) if values is None and "/metrics" not in failed else ()
        return findings.snapshot(
            up=True,
            ready=True,
            version=text(props.get("build_info")),
            response_time_seconds=seconds,
            models=tuple(models),
            engines=engines,
            notes=notes,
        )

    async def probe(self, model: str, spec: ProbeSpec) -> ProbeMeasurement:
        """One streamed chat completion, measured."""
        return await probe_chat(self.client, "/v1/chat/completions", model, spec)
