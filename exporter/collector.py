"""The runner: collects every provider concurrently under one deadline, plus host resources."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from types import ModuleType
from typing import Any, TypeVar

import psutil

from .client import DEADLINE, ConnectionStats, ProviderClient
from .config import Config, ProviderConfig
from .errors import FailureClass
from .gateway.stats import GatewayStats
from .gpu import GpuReader, GpuSnapshot
from .health import HealthReport, evaluate
from .host import HostReader, HostSnapshot, ProcessFinder, ProcessSnapshot
from .logs import fields
from .probes import ProbeStats
from .providers import KINDS, Provider
from .providers.base import (
    EngineSnapshot,
    Failure,
    HistogramData,
    ProviderSnapshot,
    series_count,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
GUARD_SECONDS = 0.25
# Label values a provider may put into one family of one model (finish reasons and the
# like); the rest are summed into OTHER, so totals stay true and series stay bounded.
MAX_LABEL_VALUES = 16
OTHER = "other"
# Buckets kept of a provider's own histogram: dropping bounds of a cumulative histogram
# keeps it correct, only coarser.
MAX_BUCKETS = 40
# An engine's histograms, by the family they are served as.
HISTOGRAM_FAMILIES = {
    "time_to_first_token": "llm_time_to_first_token_seconds",
    "request_duration": "llm_request_duration_seconds",
    "inter_token_latency": "llm_inter_token_latency_seconds",
    "queue_duration": "llm_request_queue_duration_seconds",
}


@dataclass(frozen=True)
class ProviderResult:
    """One provider's snapshot with how long it took and whether every request worked."""

    config: ProviderConfig
    snapshot: ProviderSnapshot
    duration_seconds: float
    process: ProcessSnapshot | None = None
    # Label values dropped or folded into "other" by the bounds, per family.
    dropped: Mapping[str, int] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """The provider answered and none of its requests failed."""
        return self.snapshot.up and not self.snapshot.failures


@dataclass(frozen=True)
class Resources:
    """What the host, the provider processes and the GPUs look like now."""

    host: HostSnapshot | None
    processes: dict[str, ProcessSnapshot]
    gpus: tuple[GpuSnapshot, ...]


@dataclass(frozen=True)
class Collection:
    """Everything one collection learned."""

    providers: tuple[ProviderResult, ...]
    resources: Resources
    health: HealthReport
    finished_at: float


def bounded(
    snapshot: ProviderSnapshot, max_models: int, max_series: int
) -> tuple[ProviderSnapshot, dict[str, int]]:
    """The snapshot within the provider's bounds, and what was dropped per family.

    Models are unique by name (two names can clean up to the same label value) and at
    most max_models, loaded ones first; each family's label values and buckets are bounded; and a snapshot
    still over max_series keeps its status only, with a failure saying why.
    """
    dropped: dict[str, int] = {}

    def note(family: str, count: int) -> None:
        if count > 0:
            dropped[family] = dropped.get(family, 0) + count

    # Past max_models, loaded models are kept first: they are the ones being served.
    models = _first_of_each(snapshot.models, lambda m: m.name)
    models = tuple(sorted(models, key=lambda m: m.loaded is not True))
    engines = _first_of_each(snapshot.engines, lambda e: e.model)
    note("llm_model_info", len(models) - max_models)
    note("llm_requests_running", len(engines) - max_models)
    engines = tuple(_bounded_engine(e, note) for e in engines[:max_models])
    snapshot = replace(snapshot, models=models[:max_models], engines=engines)
    series = series_count(snapshot)
    if series > max_series:
        failure = Failure(
            "/metrics" if snapshot.engines else "",
            FailureClass.INVALID_RESPONSE,
            f"{series} series, over max_series ({max_series}): only its status is kept",
        )
        note("all", series)
        snapshot = replace(snapshot, models=(), engines=(), failures=(*snapshot.failures, failure))
    return snapshot, dropped


def _first_of_each(items: tuple[T, ...], key: Callable[[T], str]) -> tuple[T, ...]:
    """The items whose key was not seen before, in order."""
    seen: set[str] = set()
    unique = []
    for item in items:
        if key(item) not in seen:
            seen.add(key(item))
            unique.append(item)
    return tuple(unique)


def _bounded_engine(engine: EngineSnapshot, note: Callable[[str, int], None]) -> EngineSnapshot:
    changes: dict[str, object] = {}
    if len(engine.finished_requests) > MAX_LABEL_VALUES:
        ranked = sorted(engine.finished_requests.items(), key=lambda item: (-item[1], item[0]))
        kept = dict(ranked[: MAX_LABEL_VALUES - 1])
        kept[OTHER] = kept.get(OTHER, 0.0) + sum(
            count for _, count in ranked[MAX_LABEL_VALUES - 1 :]
        )
        note("llm_requests_finished_total", len(ranked) - len(kept) + 1)
        changes["finished_requests"] = kept
    for name, family in HISTOGRAM_FAMILIES.items():
        histogram = getattr(engine, name)
        if histogram is not None and len(histogram.buckets) > MAX_BUCKETS:
            thinned = _fewer_buckets(histogram)
            note(family, len(histogram.buckets) - len(thinned.buckets))
            changes[name] = thinned
    return replace(engine, **changes) if changes else engine  # type: ignore[arg-type]


def _fewer_buckets(histogram: HistogramData) -> HistogramData:
    """Every n-th bound and +Inf: still a correct cumulative histogram."""
    buckets = histogram.buckets
    step = -(-(len(buckets) - 1) // (MAX_BUCKETS - 1))
    return replace(histogram, buckets=(*buckets[:-1][step - 1 :: step], buckets[-1]))


class Collector:
    """Owns the provider adapters and their clients for one configuration."""

    def __init__(
        self,
        config: Config,
        *,
        stats: ConnectionStats | None = None,
        probe_stats: ProbeStats | None = None,
        gateway_stats: GatewayStats | None = None,
        ps: ModuleType = psutil,
        nvml: Any = None,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.stats = stats if stats is not None else ConnectionStats()
        self.probe_stats = probe_stats if probe_stats is not None else ProbeStats()
        self.gateway_stats = gateway_stats if gateway_stats is not None else GatewayStats()
        self.clock = clock
        self.wall_clock = wall_clock
        self.clients = [
            ProviderClient(p, self.stats, clock=clock, wall_clock=wall_clock)
            for p in config.providers
        ]
        self.providers: list[Provider] = [
            KINDS[p.kind](p, client)
            for p, client in zip(config.providers, self.clients, strict=True)
        ]
        self.by_name = {
            p.name: provider for p, provider in zip(config.providers, self.providers, strict=True)
        }
        self.host = HostReader(config.host, ps) if config.host.enabled else None
        self.gpu = GpuReader(nvml) if config.host.enabled and config.host.gpu else None
        self.finders = {
            p.name: ProcessFinder(p.process, ps) for p in config.providers if p.process is not None
        }
        self._reported_drops: set[tuple[str, str]] = set()
        # Per provider, the (model, engine field) pairs its last read engine page gave.
        self._engine_fields: dict[str, set[tuple[str, str]]] = {}
        self._reported_gone: set[tuple[str, str, str]] = set()
        self._reading: asyncio.Future[Resources] | None = None

    async def collect(self, deadline: float | None = None) -> Collection:
        """Collect all providers and resources; no provider can take longer than the deadline."""
        budget = deadline if deadline is not None else self.config.global_.scrape_timeout
        tasks = [self._collect_one(p, budget) for p in self.providers]
        collected, resources = await asyncio.gather(
            asyncio.gather(*tasks), self._resources_within(budget)
        )
        results = tuple(
            replace(r, process=resources.processes.get(r.config.name)) for r in collected
        )
        queues = {
            name: traffic.queue
            for name, traffic in self.gateway_stats.providers.items()
            if traffic.queue is not None
        }
        health = evaluate(
            results,
            resources,
            self.probe_stats.by_provider(),
            self.config.health,
            queues,
            self.clock(),
        )
        return Collection(results, resources, health, self.wall_clock())

    async def collect_provider(self, name: str, budget: float) -> ProviderResult:
        """Collect one provider now, within budget (KeyError if there is none of that name)."""
        return await self._collect_one(self.by_name[name], budget)

    async def _collect_one(self, provider: Provider, budget: float) -> ProviderResult:
        config = provider.config
        timeout = min(config.timeout, budget)
        started = self.clock()
        DEADLINE.set(started + timeout)
        dropped: dict[str, int] = {}
        try:
            # The client keeps every request inside the deadline; this only guards the adapter.
            snapshot, dropped = bounded(
                await asyncio.wait_for(provider.snapshot(), timeout + GUARD_SECONDS),
                config.max_models,
                config.max_series,
            )
        except TimeoutError:
            failure = Failure("", FailureClass.TIMEOUT, f"no complete answer within {timeout:g}s")
            snapshot = ProviderSnapshot(up=False, failures=(failure,))
        except Exception as exc:  # an adapter bug must cost one provider, not the scrape
            log.warning(
                "provider snapshot failed",
                extra=fields(provider=config.name, error=type(exc).__name__),
            )
            failure = Failure("", FailureClass.INVALID_RESPONSE, type(exc).__name__)
            snapshot = ProviderSnapshot(up=False, failures=(failure,))
        duration = self.clock() - started
        for failure in snapshot.failures:
            log.debug(
                "provider request failed",
                extra=fields(
                    provider=config.name,
                    endpoint=failure.endpoint,
                    error_class=failure.failure.value,
                    message=failure.message,
                ),
            )
        for family, count in dropped.items():
            if (config.name, family) not in self._reported_drops:
                self._reported_drops.add((config.name, family))
                log.warning(
                    "provider series over their bound: dropped or folded into other",
                    extra=fields(provider=config.name, family=family, dropped=count),
                )
        self._note_gone(config.name, snapshot)
        return ProviderResult(config, snapshot, duration, dropped=dropped)

    def _note_gone(self, provider: str, snapshot: ProviderSnapshot) -> None:
        """Warn once about an engine series that a model still served no longer reports (an
        upgrade renamed or dropped it): lost, not silently."""
        if not snapshot.engines:
            return  # its page was not read this time: nothing can be told
        present = {
            (engine.model, spec.name)
            for engine in snapshot.engines
            for spec in dataclass_fields(engine)
            if spec.name != "model" and getattr(engine, spec.name) not in (None, {})
        }
        served = {engine.model for engine in snapshot.engines}
        for model, name in sorted(self._engine_fields.get(provider, set()) - present):
            if model in served and (provider, model, name) not in self._reported_gone:
                self._reported_gone.add((provider, model, name))
                log.warning(
                    "engine metric no longer reported: its series is gone",
                    extra=fields(provider=provider, model=model, series=name),
                )
        self._engine_fields[provider] = present

    async def _resources_within(self, budget: float) -> Resources:
        # psutil blocks, and a hung network mount can block it for good: read in a thread,
        # and leave the resources out of this scrape rather than miss the deadline. While
        # a read hangs, no other is started: a hung mount holds one thread, not all of them.
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(asyncio.to_thread(self._read_resources))
        try:
            return await asyncio.wait_for(asyncio.shield(self._reading), budget)
        except TimeoutError:
            log.warning(
                "host resources not read in time: left out of this scrape",
                extra=fields(budget_seconds=round(budget, 3)),
            )
        except Exception as exc:  # a lost device or an odd mount costs the resources only
            log.warning("host resources not read", extra=fields(error=type(exc).__name__))
        return Resources(host=None, processes={}, gpus=())

    def _read_resources(self) -> Resources:
        processes = {}
        for name, finder in self.finders.items():
            process = finder.read()
            if process is not None:
                processes[name] = process
        return Resources(
            host=self.host.read() if self.host is not None else None,
            processes=processes,
            gpus=self.gpu.read() if self.gpu is not None else (),
        )

    async def aclose(self) -> None:
        """Close every provider client."""
        await asyncio.gather(*(client.aclose() for client in self.clients))
