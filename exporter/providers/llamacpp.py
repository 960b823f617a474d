"""llama.cpp's llama-server.

Reads GET /health (503 while the model loads: up, not ready), /v1/models, /props,
/slots (busy or idle only: slot prompts are never read into a snapshot) and
/metrics, whose llamacpp:* series map onto the normalized ones:

    llamacpp:prompt_tokens_total 221       -> llm_tokens_total{type="input"} 221
    llamacpp:tokens_predicted_total 360    -> llm_tokens_total{type="output"} 360
    llamacpp:requests_processing 2         -> llm_requests_running 2
    llamacpp:requests_deferred 3           -> llm_requests_waiting 3
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .base import EngineSnapshot, Findings, ModelSnapshot, ProviderSnapshot, expect, number, text
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
    samples = parse_samples(reply.text(), ("llamacpp:",), reply.endpoint)
    return {_METRICS[s.name]: s.value for s in samples if s.name in _METRICS}


class LlamaCppProvider:
    """Reads a llama-server."""

    kind: ClassVar[str] = "llamacpp"

    def __init__(self, config: ProviderConfig, client: ProviderClient) -> None:
        self.config = config
        self.client = client

    async def snapshot(self) -> ProviderSnapshot:
        """Read health first; the rest concurrently once the server answers."""
        findings = Findings()
        (health,) = await self.client.get_all("/health")
        if not isinstance(health, Exception) and health.status == 503:
            # llama-server answers 503 while it loads the model: alive, not ready.
            return ProviderSnapshot(up=True, ready=False, response_time_seconds=health.seconds)
        if findings.reply(health) is None:
            return ProviderSnapshot(up=False, failures=tuple(findings.failures))
        assert not isinstance(health, Exception)
        models_r, props_r, slots_r, metrics_r = await self.client.get_all(
            "/v1/models", "/props", "/slots", "/metrics"
        )
        models = findings.parse(findings.reply(models_r), _models) or []
        props = findings.parse(findings.reply(props_r, optional=True), _props) or {}
        slots = findings.parse(findings.reply(slots_r, optional=True), _slots)
        values = findings.parse(findings.reply(metrics_r, optional=True), _engine_values)
        model = models[0].name if models else text(props.get("model_alias"))
        engines: tuple[EngineSnapshot, ...] = ()
        if values is not None or slots is not None:
            busy, idle = slots if slots is not None else (None, None)
            fields: dict[str, Any] = values or {}
            engines = (EngineSnapshot(model=model, slots_busy=busy, slots_idle=idle, **fields),)
        return ProviderSnapshot(
            up=True,
            ready=True,
            version=text(props.get("build_info")),
            response_time_seconds=health.seconds,
            models=tuple(models[: self.config.max_models]),
            engines=engines,
            failures=tuple(findings.failures),
        )
