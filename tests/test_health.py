"""Health verdicts from snapshots and thresholds."""

from __future__ import annotations

from exporter.collector import ProviderResult, Resources
from exporter.config import HealthConfig, ProcessMatch, ProviderConfig, Threshold
from exporter.errors import FailureClass, ProviderError
from exporter.health import Status, evaluate
from exporter.host import DiskSnapshot, HostSnapshot
from exporter.probes import ProbeStats
from exporter.providers.base import Failure, ProbeMeasurement, ProviderSnapshot

GIB = 1024**3


def result(name: str, snapshot: ProviderSnapshot, process: bool = False) -> ProviderResult:
    config = ProviderConfig(
        name=name,
        kind="ollama",
        url="http://127.0.0.1:11434",
        process=ProcessMatch(name="ollama") if process else None,
    )
    return ProviderResult(config, snapshot, 0.01)


def host(
    memory_used: float = 4 * GIB, disk_used: float = 10 * GIB, cpu: float = 0.2
) -> HostSnapshot:
    return HostSnapshot(
        cpu_usage_ratio=cpu,
        cpu_count=2,
        memory_used_bytes=memory_used,
        memory_available_bytes=16 * GIB - memory_used,
        memory_total_bytes=16 * GIB,
        boot_time_seconds=0,
        disks=(DiskSnapshot("/", disk_used, 100 * GIB),),
    )


UP = ProviderSnapshot(up=True, ready=True, response_time_seconds=0.05)


def verdicts(
    results: list[ProviderResult], resources: Resources, config: HealthConfig | None = None
) -> dict[str, tuple[Status, str]]:
    report = evaluate(results, resources, {}, config or HealthConfig())
    out = {c.key: (c.status, c.reason) for c in report.components}
    out["overall"] = (report.status, "")
    return out


def test_all_well_is_healthy() -> None:
    got = verdicts([result("a", UP)], Resources(host(), {}, ()))
    assert {key: status for key, (status, _) in got.items()} == {
        "provider/a": Status.HEALTHY,
        "connection": Status.HEALTHY,
        "resources": Status.HEALTHY,
        "overall": Status.HEALTHY,
    }


def test_one_provider_down_of_two() -> None:
    down = ProviderSnapshot(
        up=False, failures=(Failure("/api/version", FailureClass.CONNECT, "refused"),)
    )
    got = verdicts([result("a", UP), result("b", down)], Resources(None, {}, ()))
    assert got["provider/b"] == (Status.UNHEALTHY, "unreachable: GET /api/version: refused")
    assert got["connection"] == (Status.DEGRADED, "1 of 2 providers unreachable: b")
    assert got["overall"][0] is Status.UNHEALTHY


def test_partial_answer_and_loading_are_degraded() -> None:
    partial = ProviderSnapshot(
        up=True, ready=True, failures=(Failure("/api/ps", FailureClass.HTTP_5XX, "HTTP 500"),)
    )
    loading = ProviderSnapshot(up=True, ready=False)
    got = verdicts([result("p", partial), result("l", loading)], Resources(None, {}, ()))
    assert got["provider/p"] == (Status.DEGRADED, "partial answer: /api/ps http_5xx: HTTP 500")
    assert got["provider/l"][0] is Status.DEGRADED
    assert got["connection"][0] is Status.HEALTHY


def test_response_time_thresholds() -> None:
    config = HealthConfig(response_time=Threshold(degraded=1.0, unhealthy=3.0))
    slow = ProviderSnapshot(up=True, ready=True, response_time_seconds=1.5)
    slower = ProviderSnapshot(up=True, ready=True, response_time_seconds=3.0)
    got = verdicts([result("s", slow), result("t", slower)], Resources(None, {}, ()), config)
    assert got["provider/s"] == (Status.DEGRADED, "responds in 1.50s")
    assert got["provider/t"] == (Status.UNHEALTHY, "responds in 3.00s")


def test_resources_name_every_threshold_crossed_worst_first() -> None:
    busy = host(memory_used=15.7 * GIB, disk_used=92 * GIB)
    got = verdicts([], Resources(busy, {}, ()))
    assert got["resources"] == (Status.UNHEALTHY, "memory 98% used; disk / 92% full")
    assert got["connection"] == (Status.HEALTHY, "no providers configured")


def test_missing_provider_process_is_degraded() -> None:
    got = verdicts([result("a", UP, process=True)], Resources(host(), {}, ()))
    assert got["resources"] == (Status.DEGRADED, "process of provider a not found")


def test_probe_failures_and_slow_probes_judge_the_provider() -> None:
    stats = ProbeStats()
    timeout = ProviderError(FailureClass.TIMEOUT, "no answer within 30s", endpoint="/api/chat")
    stats.record_failure("a", "llama3.2", timeout, at=1.0)
    slow = ProbeMeasurement(12.0, 0.5, 16, 20, 0.7, 1.4)
    stats.record("b", "qwen", slow, at=1.0)
    for _ in range(3):
        stats.record_failure("c", "phi", timeout, at=2.0)
    results = [result("a", UP), result("b", UP), result("c", UP)]
    report = evaluate(results, Resources(None, {}, ()), stats.by_provider(), HealthConfig())
    got = {c.key: (c.status, c.reason) for c in report.components}
    assert got["provider/a"] == (
        Status.DEGRADED,
        "probe of llama3.2 failed: timeout: no answer within 30s",
    )
    assert got["provider/b"] == (Status.DEGRADED, "probe of qwen took 12.00s")
    assert got["provider/c"] == (
        Status.UNHEALTHY,
        "probe of phi failed 3 times in a row: timeout: no answer within 30s",
    )
    stats.record("c", "phi", ProbeMeasurement(0.2, 0.05, 16, 20, 0.01, 100.0), at=3.0)
    report = evaluate(results, Resources(None, {}, ()), stats.by_provider(), HealthConfig())
    assert {c.key: c.status for c in report.components}["provider/c"] is Status.HEALTHY


def test_down_reasons_tell_unreachable_from_a_wrong_kind_or_key() -> None:
    cases = {
        Failure("/api/version", FailureClass.HTTP_4XX, "HTTP 404"): (
            "the server answered HTTP 404 to GET /api/version: is `kind` right"
        ),
        Failure("/models", FailureClass.HTTP_4XX, "HTTP 401"): (
            "the server answered HTTP 401 to GET /models: check api_key"
        ),
        Failure("/health", FailureClass.TIMEOUT, "no answer within 5s"): (
            "no answer in time: GET /health: no answer within 5s"
        ),
        Failure("/health", FailureClass.HTTP_5XX, "HTTP 503"): (
            "the server answered HTTP 503 to GET /health"
        ),
        Failure("/api/version", FailureClass.INVALID_RESPONSE, "expected JSON, got HTML"): (
            "unexpected answer to GET /api/version: expected JSON, got HTML"
        ),
    }
    for failure, reason in cases.items():
        got = verdicts(
            [result("p", ProviderSnapshot(up=False, failures=(failure,)))], Resources(None, {}, ())
        )
        assert got["provider/p"][0] is Status.UNHEALTHY
        assert got["provider/p"][1].startswith(reason), got["provider/p"][1]


def test_an_engine_without_metrics_is_said_not_hidden() -> None:
    quiet = ProviderSnapshot(
        up=True,
        ready=True,
        response_time_seconds=0.01,
        notes=("engine metrics off: start llama-server with --metrics",),
    )
    got = verdicts([result("llama", quiet)], Resources(None, {}, ()))
    assert got["provider/llama"] == (
        Status.HEALTHY,
        "up; engine metrics off: start llama-server with --metrics",
    )
