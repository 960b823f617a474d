"""Ollama.

Reads GET /api/version, /api/tags (models on disk) and /api/ps (models loaded in
memory). Ollama has no /metrics: its load and latency come from probes.

    /api/ps {"name": "mistral:latest", "size": 5137025024, "size_vram": 5137025024, ...}
      -> llm_model_loaded{model="mistral:latest"} 1
         llm_model_memory_bytes{model="mistral:latest",memory="total"} 5137025024
         llm_model_memory_bytes{model="mistral:latest",memory="vram"} 5137025024
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import FailureClass, ProviderError
from .base import (
    Findings,
    ModelSnapshot,
    ModelState,
    ProbeMeasurement,
    ProbeSpec,
    ProviderSnapshot,
    Residence,
    expect,
    number,
    text,
)
from .chat import measurement

if TYPE_CHECKING:
    from ..client import ProviderClient, Reply, Stream
    from ..config import ProviderConfig

NANOSECONDS = 1e9
# A load moves gigabytes into memory; an unload only frees them.
LOAD_TIMEOUT_SECONDS = 600.0
UNLOAD_TIMEOUT_SECONDS = 60.0


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Ollama writes the zero time (year 1) for "never": that is no expiry.
    return moment.timestamp() if moment.year > 1970 else None


def _model(entry: Any, endpoint: str, loaded: bool) -> ModelSnapshot:
    entry = expect(entry, dict, "a model", endpoint)
    details = entry.get("details")
    details = details if isinstance(details, dict) else {}
    size = number(entry.get("size"))
    return ModelSnapshot(
        name=text(expect(entry.get("name"), str, "a model name", endpoint)),
        loaded=loaded,
        family=text(details.get("family")),
        parameter_size=text(details.get("parameter_size")),
        quantization=text(details.get("quantization_level")),
        format=text(details.get("format")),
        size_bytes=size if not loaded else None,
        memory_bytes=size if loaded else None,
        vram_bytes=number(entry.get("size_vram")) if loaded else None,
        context_length=number(entry.get("context_length")) if loaded else None,
        expires_at=_timestamp(entry.get("expires_at")) if loaded else None,
    )


def _models(loaded: bool) -> Any:
    def parse(reply: Reply) -> list[ModelSnapshot]:
        body = expect(reply.json(), dict, "the body", reply.endpoint)
        entries = expect(body.get("models"), list, "models", reply.endpoint)
        return [_model(entry, reply.endpoint, loaded) for entry in entries]

    return parse


def _states(reply: Reply) -> tuple[ModelState, ...]:
    return tuple(
        ModelState(
            name=model.name,
            residence=Residence.LOADED,
            expires_at=model.expires_at,
            memory_bytes=model.memory_bytes,
            vram_bytes=model.vram_bytes,
        )
        for model in _models(loaded=True)(reply)
    )


def _done(reply: Reply) -> None:
    body = expect(reply.json(), dict, "the body", reply.endpoint)
    if "error" in body:
        raise ProviderError(
            FailureClass.INVALID_RESPONSE, text(str(body["error"]), 200), endpoint=reply.endpoint
        )


def _version(reply: Reply) -> tuple[str, float]:
    body = expect(reply.json(), dict, "the body", reply.endpoint)
    return text(expect(body.get("version"), str, "version", reply.endpoint)), reply.seconds


def _merge(on_disk: list[ModelSnapshot], in_memory: list[ModelSnapshot]) -> list[ModelSnapshot]:
    """One entry per model: what /api/tags says, with what /api/ps adds for loaded ones."""
    loaded = {model.name: model for model in in_memory}
    merged = []
    for model in on_disk:
        running = loaded.pop(model.name, None)
        if running is None:
            merged.append(replace(model, loaded=False))
        else:
            merged.append(
                replace(
                    running,
                    size_bytes=model.size_bytes,
                    family=running.family or model.family,
                )
            )
    merged.extend(loaded.values())
    return merged


def _seconds(final: dict[str, Any], key: str) -> float | None:
    nanoseconds = number(final.get(key))
    return nanoseconds / NANOSECONDS if nanoseconds is not None else None


async def _read_chat(stream: Stream) -> ProbeMeasurement:
    """Ollama's /api/chat stream: one JSON object a line, the last with done and statistics."""
    token_times: list[float] = []
    final: dict[str, Any] = {}
    finished = stream.started
    async for arrived, line in stream.lines():
        finished = arrived
        chunk = expect(json.loads(line), dict, "a chunk", stream.endpoint)
        if "error" in chunk:
            raise ProviderError(
                FailureClass.INVALID_RESPONSE, "error in the stream", endpoint=stream.endpoint
            )
        if (chunk.get("message") or {}).get("content"):
            token_times.append(arrived)
        if chunk.get("done"):
            final = chunk
            break
    if not final:
        raise ProviderError(
            FailureClass.INVALID_RESPONSE, "stream ended before done", endpoint=stream.endpoint
        )
    output, eval_seconds = number(final.get("eval_count")), _seconds(final, "eval_duration")
    return measurement(
        stream,
        finished,
        token_times,
        final.get("eval_count"),
        final.get("prompt_eval_count"),
        load_duration=_seconds(final, "load_duration"),
        provider_tokens_per_second=output / eval_seconds if output and eval_seconds else None,
        provider_prompt_seconds=_seconds(final, "prompt_eval_duration"),
    )


class OllamaProvider:
    """Reads an Ollama server."""

    kind: ClassVar[str] = "ollama"

    def __init__(self, config: ProviderConfig, client: ProviderClient) -> None:
        self.config = config
        self.client = client

    async def snapshot(self) -> ProviderSnapshot:
        """Read version, models on disk and loaded models concurrently."""
        findings = Findings()
        version, on_disk, in_memory = await findings.gather(
            self.client.fetch("/api/version", _version),
            self.client.fetch("/api/tags", _models(loaded=False)),
            self.client.fetch("/api/ps", _models(loaded=True)),
        )
        if version is None:
            return findings.snapshot(up=False)
        name, seconds = version
        return findings.snapshot(
            up=True,
            ready=True,
            version=name,
            response_time_seconds=seconds,
            models=tuple(_merge(on_disk or [], in_memory or [])),
        )

    async def probe(self, model: str, spec: ProbeSpec) -> ProbeMeasurement:
        """One streamed /api/chat request; Ollama reports its own durations in nanoseconds.

        Every request restarts the model's keep-alive timer, so the probe asks for no more
        than the model had left: probing never keeps a model loaded.
        """
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": spec.prompt}],
            "stream": True,
            "options": {"num_predict": spec.max_tokens},
        }
        if spec.keep_alive is not None:
            body["keep_alive"] = -1 if spec.keep_alive < 0 else round(spec.keep_alive, 3)
        return await self.client.stream("/api/chat", body, _read_chat, timeout=spec.timeout)

    async def model_states(self) -> tuple[ModelState, ...]:
        """The loaded models, from /api/ps (which neither loads a model nor moves its expiry)."""
        states = await self.client.fetch("/api/ps", _states)
        return states or ()

    async def load_model(self, model: str, *, pin: bool) -> None:
        """Load a model with an empty /api/generate (pin: keep_alive -1, else the default)."""
        body: dict[str, Any] = {"model": model, "stream": False}
        if pin:
            body["keep_alive"] = -1
        await self.client.post("/api/generate", body, _done, timeout=LOAD_TIMEOUT_SECONDS)

    async def unload_model(self, model: str) -> None:
        """Unload a model now: an empty /api/generate with keep_alive 0."""
        body = {"model": model, "stream": False, "keep_alive": 0}
        await self.client.post("/api/generate", body, _done, timeout=UNLOAD_TIMEOUT_SECONDS)
