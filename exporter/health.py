"""Health verdicts: provider (each), connection and resources, and the overall worst."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .config import HealthConfig, Threshold
from .errors import FailureClass

if TYPE_CHECKING:
    from .collector import ProviderResult, Resources
    from .gateway.stats import QueueStats
    from .probes import ModelProbeStats
    from .providers.base import Failure


MAX_LISTED_MODELS = 20
# A gateway queue with this share of max_waiting waiting is saturated.
QUEUE_SATURATED_SHARE = 0.9


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


def iso_time(timestamp: float | None) -> str | None:
    """A Unix timestamp as ISO 8601 in UTC, to the millisecond; None stays None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def plural(count: int, noun: str) -> str:
    """'1 provider', '2 providers'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _hint(failure: Failure) -> str:
    if failure.failure is FailureClass.HTTP_4XX:
        if failure.message in ("HTTP 401", "HTTP 403"):
            return ": check api_key"
        if failure.message in ("HTTP 404", "HTTP 405"):
            return ": is `kind` right, and `url` the server's root (or the API base for openai)?"
    return ""


def down_reason(failure: Failure | None) -> str:
    """Why a provider is down, told apart: unreachable, silent, or answering the wrong thing."""
    if failure is None:
        return "unreachable: no answer"
    where = f"GET {failure.endpoint}" if failure.endpoint else "the collection"
    if failure.failure is FailureClass.CONNECT:
        return f"unreachable: {where}: {failure.message}"
    if failure.failure is FailureClass.TIMEOUT:
        return f"no answer in time: {where}: {failure.message}"
    if failure.failure in (FailureClass.HTTP_4XX, FailureClass.HTTP_5XX):
        return f"the server answered {failure.message} to {where}{_hint(failure)}"
    return f"unexpected answer to {where}: {failure.message}"


def worst(statuses: Sequence[Status]) -> Status:
    """The worst of some verdicts; healthy when there are none."""
    return max(statuses, key=lambda s: s.rank, default=Status.HEALTHY)


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


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


def _queue_verdicts(queue: QueueStats, now: float) -> list[tuple[Status, str]]:
    verdicts = []
    if queue.max_waiting and queue.waiting >= QUEUE_SATURATED_SHARE * queue.max_waiting:
        saturated = f"gateway queue saturated: {queue.waiting} of {queue.max_waiting} waiting"
        verdicts.append((Status.DEGRADED, saturated))
    rejected = queue.recent_rejections(now)
    if rejected:
        turned_away = f"gateway queue turned away {plural(rejected, 'request')} in the last minute"
        verdicts.append((Status.DEGRADED, turned_away))
    return verdicts


def _queue_details(queue: QueueStats, now: float) -> dict[str, int]:
    return {
        "running": queue.running,
        "max_concurrent": queue.max_concurrent,
        "waiting": queue.waiting,
        "max_waiting": queue.max_waiting,
        "rejected_last_minute": queue.recent_rejections(now),
    }


def _provider(
    result: ProviderResult,
    probes: Mapping[str, ModelProbeStats],
    queue: QueueStats | None,
    config: HealthConfig,
    now: float,
) -> ComponentHealth:
    snapshot = result.snapshot
    failures = [
        f"{f.endpoint or 'collection'} {f.failure.value}: {f.message}" for f in snapshot.failures
    ]
    details: dict[str, Any] = {
        "kind": result.config.kind,
        "probes": {
            model: {
                "last_success": iso_time(stats.last_success),
                "last_duration_seconds": _rounded(stats.last_duration),
                "tokens_per_second": _rounded(stats.tokens_per_second, 1),
                "consecutive_failures": stats.consecutive_failures,
            }
            for model, stats in sorted(probes.items())
        },
        "up": snapshot.up,
        "ready": snapshot.ready,
        "response_time_seconds": _rounded(snapshot.response_time_seconds),
        "models": len(snapshot.models),
        "loaded_models": [m.name for m in snapshot.models if m.loaded][:MAX_LISTED_MODELS],
        "failures": failures,
        "notes": list(snapshot.notes),
    }
    if queue is not None:
        details["gateway_queue"] = _queue_details(queue, now)
    name = result.config.name

    def verdict(status: Status, reason: str) -> ComponentHealth:
        return ComponentHealth("provider", name, status, reason, details)

    if not snapshot.up:
        return verdict(Status.UNHEALTHY, down_reason(next(iter(snapshot.failures), None)))
    if not snapshot.ready:
        return verdict(Status.DEGRADED, "up but not ready (loading a model)")
    seconds = snapshot.response_time_seconds or 0.0
    findings = [(_against(seconds, config.response_time), f"responds in {seconds:.2f}s")]
    if failures:
        findings.append((Status.DEGRADED, f"partial answer: {failures[0]}"))
    findings.extend(_probe_verdicts(probes, config))
    if queue is not None:
        findings.extend(_queue_verdicts(queue, now))
    bad = [f for f in findings if f[0] is not Status.HEALTHY]
    if not bad:
        return verdict(Status.HEALTHY, "; ".join(("up", *snapshot.notes)))
    status = worst([s for s, _ in bad])
    return verdict(status, "; ".join(r for _, r in sorted(bad, key=lambda f: -f[0].rank)))


def _connection(results: Sequence[ProviderResult]) -> ComponentHealth:
    down = [r.config.name for r in results if not r.snapshot.up]
    details = {"providers": len(results), "unreachable": down}
    if not results:
        return ComponentHealth("connection", "", Status.HEALTHY, "no providers configured", details)
    if not down:
        reason = (
            "the provider is reachable"
            if len(results) == 1
            else f"all {len(results)} providers reachable"
        )
        return ComponentHealth("connection", "", Status.HEALTHY, reason, details)
    status = Status.UNHEALTHY if len(down) == len(results) else Status.DEGRADED
    if len(results) == 1:
        reason = f"the only provider is unreachable: {down[0]}"
    else:
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
    queues: Mapping[str, QueueStats] | None = None,
    now: float = 0.0,
) -> HealthReport:
    """Judge every component; the overall verdict is the worst of them. queues: the
    gateway queues by provider, judged at now (their clock's time)."""
    queues = queues or {}
    components = (
        *(
            _provider(r, probes.get(r.config.name, {}), queues.get(r.config.name), config, now)
            for r in results
        ),
        _connection(results),
        _resources(results, resources, config),
    )
    return HealthReport(worst([c.status for c in components]), components)
