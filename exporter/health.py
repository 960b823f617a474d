"""Health verdicts: provider (each), connection and resources, and the overall worst."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .config import HealthConfig, Threshold

if TYPE_CHECKING:
    from .collector import ProviderResult, Resources
    from .probes import ModelProbeStats


class Status(StrEnum):
    """A verdict, from best to worst."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"

    @property
    def rank(self) -> int:
        """0 for healthy, 2 for unhealthy."""
        return list(Status).index(self)


@dataclass(frozen=True)
class ComponentHealth:
    """One component's verdict and why."""

    component: str
    provider: str
    status: Status
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The component's name in /health: provider/NAME, connection or resources."""
        return f"{self.component}/{self.provider}" if self.provider else self.component


@dataclass(frozen=True)
class HealthReport:
    """All component verdicts and the overall one."""

    status: Status
    components: tuple[ComponentHealth, ...]


def worst(statuses: Sequence[Status]) -> Status:
    """The worst of some verdicts; healthy when there are none."""
    return max(statuses, key=lambda s: s.rank, default=Status.HEALTHY)


def _against(value: float, threshold: Threshold) -> Status:
    if threshold.unhealthy is not None and value >= threshold.unhealthy:
        return Status.UNHEALTHY
    if threshold.degraded is not None and value >= threshold.degraded:
        return Status.DEGRADED
    return Status.HEALTHY


def _probe_verdicts(
    probes: Mapping[str, ModelProbeStats], config: HealthConfig
) -> list[tuple[Status, str]]:
    verdicts = []
    for model, stats in sorted(probes.items()):
        failures = stats.consecutive_failures
        if failures:
            status = _against(failures, config.probe_failures)
            times = f" {failures} times in a row" if failures > 1 else ""
            verdicts.append((status, f"probe of {model} failed{times}: {stats.last_failure}"))
        elif stats.last_duration is not None:
            status = _against(stats.last_duration, config.probe_duration)
            verdicts.append((status, f"probe of {model} took {stats.last_duration:.2f}s"))
    return verdicts


def _provider(
    result: ProviderResult, probes: Mapping[str, ModelProbeStats], config: HealthConfig
) -> ComponentHealth:
    snapshot = result.snapshot
    failures = [
        f"{f.endpoint or 'collection'} {f.failure.value}: {f.message}" for f in snapshot.failures
    ]
    details: dict[str, Any] = {
        "kind": result.config.kind,
        "probes": {
            model: {
                "last_success": stats.last_success,
                "last_duration_seconds": stats.last_duration,
                "consecutive_failures": stats.consecutive_failures,
            }
            for model, stats in sorted(probes.items())
        },
        "up": snapshot.up,
        "ready": snapshot.ready,
        "response_time_seconds": snapshot.response_time_seconds,
        "models": len(snapshot.models),
        "failures": failures,
    }
    name = result.config.name

    def verdict(status: Status, reason: str) -> ComponentHealth:
        return ComponentHealth("provider", name, status, reason, details)

    if not snapshot.up:
        return verdict(Status.UNHEALTHY, f"unreachable: {failures[0] if failures else 'no answer'}")
    if not snapshot.ready:
        return verdict(Status.DEGRADED, "up but not ready (loading a model)")
    seconds = snapshot.response_time_seconds or 0.0
    findings = [(_against(seconds, config.response_time), f"responds in {seconds:.2f}s")]
    if failures:
        findings.append((Status.DEGRADED, f"partial answer: {failures[0]}"))
    findings.extend(_probe_verdicts(probes, config))
    bad = [f for f in findings if f[0] is not Status.HEALTHY]
    if not bad:
        return verdict(Status.HEALTHY, "up")
    status = worst([s for s, _ in bad])
    return verdict(status, "; ".join(r for _, r in sorted(bad, key=lambda f: -f[0].rank)))


def _connection(results: Sequence[ProviderResult]) -> ComponentHealth:
    down = [r.config.name for r in results if not r.snapshot.up]
    details = {"providers": len(results), "unreachable": down}
    if not results:
        return ComponentHealth("connection", "", Status.HEALTHY, "no providers configured", details)
    if not down:
        reason = f"all {len(results)} providers reachable"
        return ComponentHealth("connection", "", Status.HEALTHY, reason, details)
    status = Status.UNHEALTHY if len(down) == len(results) else Status.DEGRADED
    reason = f"{len(down)} of {len(results)} providers unreachable: {', '.join(down)}"
    return ComponentHealth("connection", "", status, reason, details)


def _resources(
    results: Sequence[ProviderResult], resources: Resources, config: HealthConfig
) -> ComponentHealth:
    checks: list[tuple[Status, str]] = []
    details: dict[str, Any] = {}
    host = resources.host
    if host is not None:
        memory = (
            host.memory_used_bytes / host.memory_total_bytes if host.memory_total_bytes else 0.0
        )
        details["memory_ratio"] = round(memory, 4)
        details["cpu_ratio"] = round(host.cpu_usage_ratio, 4)
        checks.append((_against(memory, config.memory_ratio), f"memory {memory:.0%} used"))
        checks.append(
            (
                _against(host.cpu_usage_ratio, config.cpu_ratio),
                f"CPU {host.cpu_usage_ratio:.0%} busy",
            )
        )
        for disk in host.disks:
            ratio = disk.used_bytes / disk.total_bytes if disk.total_bytes else 0.0
            details[f"disk_ratio:{disk.mountpoint}"] = round(ratio, 4)
            checks.append(
                (_against(ratio, config.disk_ratio), f"disk {disk.mountpoint} {ratio:.0%} full")
            )
    for result in results:
        if result.config.process is not None and result.process is None:
            checks.append((Status.DEGRADED, f"process of provider {result.config.name} not found"))
    bad = [(status, reason) for status, reason in checks if status is not Status.HEALTHY]
    status = worst([s for s, _ in bad])
    if bad:
        reason = "; ".join(reason for _, reason in sorted(bad, key=lambda b: -b[0].rank))
    elif host is None:
        reason = "host resources not collected"
    else:
        reason = "within thresholds"
    return ComponentHealth("resources", "", status, reason, details)


def evaluate(
    results: Sequence[ProviderResult],
    resources: Resources,
    probes: Mapping[str, Mapping[str, ModelProbeStats]],
    config: HealthConfig,
) -> HealthReport:
    """Judge every component; the overall verdict is the worst of them."""
    components = (
        *(_provider(r, probes.get(r.config.name, {}), config) for r in results),
        _connection(results),
        _resources(results, resources, config),
    )
    return HealthReport(worst([c.status for c in components]), components)
