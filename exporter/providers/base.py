"""The provider protocol and the snapshot types every provider kind produces.

Snapshots are plain frozen dataclasses: adapters fill them, the renderer in
exporter.metrics turns them into metric families. Nothing here knows Prometheus.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from ..errors import FailureClass, ProviderError

if TYPE_CHECKING:
    from ..client import ProviderClient, Reply
    from ..config import ProviderConfig

T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """One failed request of a collection, classified."""

    endpoint: str
    failure: FailureClass
    message: str


@dataclass(frozen=True)
class ModelSnapshot:
    """A model a provider knows: on disk, served or loaded."""

    name: str
    loaded: bool | None = None
    family: str = ""
    parameter_size: str = ""
    quantization: str = ""
    format: str = ""
    size_bytes: float | None = None
    memory_bytes: float | None = None
    vram_bytes: float | None = None
    context_length: float | None = None
    expires_at: float | None = None


@dataclass(frozen=True)
class HistogramData:
    """A cumulative histogram: (upper bound, cumulative count) pairs ending in +Inf."""

    buckets: tuple[tuple[float, float], ...]
    sum: float

    @property
    def count(self) -> float:
        """Observations in all buckets."""
        return self.buckets[-1][1] if self.buckets else 0.0


@dataclass(frozen=True)
class EngineSnapshot:
    """What a serving engine reports about its own load and work for one model."""

    model: str
    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage_ratio: float | None = None
    kv_cache_block_size_tokens: float | None = None
    kv_cache_blocks: float | None = None
    preempted_requests_total: float | None = None
    rejected_requests: Mapping[str, float] = field(default_factory=dict)  # by reason
    input_tokens_total: float | None = None
    output_tokens_total: float | None = None
    cached_input_tokens_total: float | None = None
    input_seconds_total: float | None = None
    output_seconds_total: float | None = None
    input_tokens_per_second: float | None = None
    output_tokens_per_second: float | None = None
    slots_busy: float | None = None
    slots_idle: float | None = None
    finished_requests: Mapping[str, float] = field(default_factory=dict)
    time_to_first_token: HistogramData | None = None
    request_duration: HistogramData | None = None
    inter_token_latency: HistogramData | None = None
    queue_duration: HistogramData | None = None


@dataclass(frozen=True)
class ProviderSnapshot:
    """Everything one collection learned about one provider."""

    up: bool
    ready: bool = False
    version: str = ""
    response_time_seconds: float | None = None
    models: tuple[ModelSnapshot, ...] = ()
    engines: tuple[EngineSnapshot, ...] = ()
    failures: tuple[Failure, ...] = ()
    # What the operator should know that is no failure, such as an engine without metrics.
    notes: tuple[str, ...] = ()


def series_count(snapshot: ProviderSnapshot) -> int:
    """About how many series a snapshot renders into: one per value, bucket or label value.

    Counted from the fields themselves, so a field added to a snapshot is counted too.
    """
    items: list[ModelSnapshot | EngineSnapshot] = [*snapshot.models, *snapshot.engines]
    return 4 + sum(_series_of(item) for item in items)


def _series_of(item: ModelSnapshot | EngineSnapshot) -> int:
    count = 1  # llm_model_info, or the engine's label set
    for spec in fields(item):
        value = getattr(item, spec.name)
        if isinstance(value, HistogramData):
            count += len(value.buckets) + 2
        elif isinstance(value, Mapping):
            count += len(value)
        elif isinstance(value, int | float):
            count += 1
    return count


@dataclass(frozen=True)
class ProbeSpec:
    """What a probe asks of a model."""

    prompt: str
    max_tokens: int
    timeout: float
    # Seconds the model may stay loaded after the probe, so that probing never extends its
    # stay: None for the provider's default (the model's stay is not known), -1 for ever.
    keep_alive: float | None = None


@dataclass(frozen=True)
class ProbeMeasurement:
    """What one successful probe measured; times in seconds."""

    duration: float
    time_to_first_token: float
    output_tokens: int | None
    input_tokens: int | None
    # From the first to the last generated token, per token after the first (OpenTelemetry's
    # time per output token), and its inverse.
    time_per_output_token: float | None
    tokens_per_second: float | None
    load_duration: float | None = None
    # What the provider itself reports for the same request, where it does.
    provider_tokens_per_second: float | None = None
    provider_prompt_seconds: float | None = None


class Residence(StrEnum):
    """Where a model is in its provider's lifecycle."""

    LOADING = "loading"
    LOADED = "loaded"
    SLEEPING = "sleeping"  # loaded, its memory released until it wakes (vLLM, llama.cpp router)
    FAILED = "failed"  # its last load failed
    UNLOADED = "unloaded"


@dataclass(frozen=True)
class ModelState:
    """One model as a provider's cheap residency read saw it; a model not listed is unloaded."""

    name: str
    residence: Residence
    expires_at: float | None = None  # when the provider will unload it if it stays idle
    memory_bytes: float | None = None
    vram_bytes: float | None = None
    detail: str = ""  # what the provider said of a failure, label-safe


class Provider(Protocol):
    """A provider kind: reads one provider instance and returns a snapshot."""

    kind: ClassVar[str]
    config: ProviderConfig

    def __init__(self, config: ProviderConfig, client: ProviderClient) -> None: ...

    async def snapshot(self) -> ProviderSnapshot:
        """Read the provider; never raise: failures go into the snapshot."""
        ...

    async def probe(self, model: str, spec: ProbeSpec) -> ProbeMeasurement:
        """Send one small streamed generation; raise a classified ProviderError if it fails."""
        ...


@runtime_checkable
class ModelResidency(Protocol):
    """A provider kind that can tell cheaply which models are in memory (the lifecycle
    watcher reads it every few seconds, so it must never load, wake or keep a model)."""

    async def model_states(self) -> tuple[ModelState, ...]:
        """The models the provider holds or is loading now; raise a ProviderError if unread."""
        ...


@runtime_checkable
class ModelControl(ModelResidency, Protocol):
    """A provider kind whose models can be loaded and unloaded on request."""

    async def load_model(self, model: str, *, pin: bool) -> None:
        """Load a model (pin: keep it loaded until unloaded); raise a ProviderError if refused."""
        ...

    async def unload_model(self, model: str) -> None:
        """Unload a model now; raise a ProviderError if refused."""
        ...


class Findings:
    """Runs a snapshot's requests and keeps the failures, so one bad endpoint costs only itself."""

    def __init__(self) -> None:
        self.failures: list[Failure] = []

    async def gather(self, *fetches: Awaitable[Any]) -> list[Any]:
        """Await fetches concurrently; each result is its value, or None with its failure kept."""
        results = await asyncio.gather(*fetches, return_exceptions=True)
        values: list[Any] = []
        for result in results:
            if isinstance(result, ProviderError):
                self.failures.append(Failure(result.endpoint, result.failure, result.message))
                values.append(None)
            elif isinstance(result, BaseException):
                raise result
            else:
                values.append(result)
        return values

    def snapshot(self, **fields: Any) -> ProviderSnapshot:
        """A snapshot carrying the failures found so far."""
        return ProviderSnapshot(failures=tuple(self.failures), **fields)


def ready_when_200(reply: Reply) -> tuple[bool, float]:
    """A health endpoint's answer, asked for with statuses 200 and 503: whether the server is
    ready (200; 503 is up but not ready, a model loading or an engine down), and how long
    it took to answer."""
    return reply.status == 200, reply.seconds


def served_models(reply: Reply) -> list[ModelSnapshot]:
    """An OpenAI-style /v1/models answer of a server that serves what it lists: each model
    loaded, with its context length where the server gives max_model_len (vLLM, SGLang)."""
    body = expect(reply.json(), dict, "the body", reply.endpoint)
    models = []
    for entry in expect(body.get("data"), list, "data", reply.endpoint):
        entry = expect(entry, dict, "a model", reply.endpoint)
        models.append(
            ModelSnapshot(
                name=text(expect(entry.get("id"), str, "a model id", reply.endpoint)),
                loaded=True,
                context_length=number(entry.get("max_model_len")),
            )
        )
    return models


def version_field(reply: Reply) -> str:
    """The "version" of a JSON object answer (vLLM's /version, SGLang's /server_info ...)."""
    return text(expect(reply.json(), dict, "the body", reply.endpoint).get("version"))


def expect(value: object, kind: type[T], what: str, endpoint: str) -> T:
    """value if it is of kind, else an invalid_response ProviderError naming what was expected."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProviderError(
            FailureClass.INVALID_RESPONSE,
            f"expected {what} to be {_KIND_NAMES.get(kind, kind.__name__)}, "
            f"got {type(value).__name__}",
            endpoint=endpoint,
        )
    return value


def number(value: object) -> float | None:
    """A finite non-negative number, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value >= 0 and value != float("inf") else None


def text(value: object, limit: int = 128) -> str:
    """A label-safe string: printable, at most limit characters; "" for anything else."""
    if not isinstance(value, str):
        return ""
    return "".join(ch for ch in value if ch.isprintable())[:limit]


_KIND_NAMES: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}
