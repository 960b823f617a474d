"""The runner: collects every provider concurrently under one deadline, plus host resources."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import psutil

from .client import DEADLINE, ConnectionStats, ProviderClient
from .config import Config, ProviderConfig
from .errors import FailureClass
from .gpu import GpuReader, GpuSnapshot
from .health import HealthReport, evaluate
from .host import HostReader, HostSnapshot, ProcessFinder, ProcessSnapshot
from .probes import ProbeStats
from .providers import KINDS, Provider
from .providers.base import Failure, ProviderSnapshot

log = logging.getLogger(__name__)
GUARD_SECONDS = 0.25


@dataclass(frozen=True)
class ProviderResult:
    """One provider's snapshot with how long it took and whether every request worked."""

    config: ProviderConfig
    snapshot: ProviderSnapshot
    duration_seconds: float
    process: ProcessSnapshot | None = None

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


def bounded(snapshot: ProviderSnapshot, max_models: int) -> ProviderSnapshot:
    """The snapshot with at most max_models models and engines: model labels stay bounded."""
    return replace(
        snapshot, models=snapshot.models[:max_models], engines=snapshot.engines[:max_models]
    )


class Collector:
    """Owns the provider adapters and their clients for one configuration."""

    def __init__(
        self,
        config: Config,
        *,
        stats: ConnectionStats | None = None,
        probe_stats: ProbeStats | None = None,
        ps: ModuleType = psutil,
        nvml: Any = None,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.stats = stats if stats is not None else ConnectionStats()
        self.probe_stats = probe_stats if probe_stats is not None else ProbeStats()
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

    async def collect(self, deadline: float | None = None) -> Collection:
        """Collect all providers and resources; no provider can take longer than the deadline."""
        budget = deadline if deadline is not None else self.config.global_.scrape_timeout
        tasks = [self._collect_one(p, budget) for p in self.providers]
        collected, resources = await asyncio.gather(
            asyncio.gather(*tasks), self._resources_within(budget)
        )
        results = tuple(
            ProviderResult(
                r.config, r.snapshot, r.duration_seconds, resources.processes.get(r.config.name)
            )
            for r in collected
        )
        health = evaluate(results, resources, self.probe_stats.by_provider(), self.config.health)
        return Collection(results, resources, health, self.wall_clock())

    async def _collect_one(self, provider: Provider, budget: float) -> ProviderResult:
        config = provider.config
        timeout = min(config.timeout, budget)
        started = self.clock()
        DEADLINE.set(started + timeout)
        try:
            # The client keeps every request inside the deadline; this only guards the adapter.
            snapshot = bounded(
                await asyncio.wait_for(provider.snapshot(), timeout + GUARD_SECONDS),
                config.max_models,
            )
        except TimeoutError:
            failure = Failure("", FailureClass.TIMEOUT, f"no complete answer within {timeout:g}s")
            snapshot = ProviderSnapshot(up=False, failures=(failure,))
        except Exception as exc:  # an adapter bug must cost one provider, not the scrape
            log.warning(
                "provider snapshot failed provider=%s error=%s", config.name, type(exc).__name__
            )
            failure = Failure("", FailureClass.INVALID_RESPONSE, type(exc).__name__)
            snapshot = ProviderSnapshot(up=False, failures=(failure,))
        duration = self.clock() - started
        for failure in snapshot.failures:
            log.debug(
                "provider request failed provider=%s endpoint=%s class=%s message=%r",
                config.name,
                failure.endpoint,
                failure.failure.value,
                failure.message,
            )
        return ProviderResult(config, snapshot, duration)

    async def _resources_within(self, budget: float) -> Resources:
        # psutil blocks, and a hung network mount can block it for good: read in a thread,
        # and leave the resources out of this scrape rather than miss the deadline.
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._read_resources), budget)
        except TimeoutError:
            log.warning("host resources not read within %gs: left out of this scrape", budget)
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
