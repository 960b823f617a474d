"""Fleet benchmark: what one exporter sustains through /probe, each provider its own target.

Run as `python bench/fleet.py [--quick]`. Processes, as in bench/scrape.py (whose helpers this
uses): one stand-in process serving the recorded llama.cpp bodies on one 127.0.0.1 port per
provider, and `python -m exporter` configured with 50, 200 and 500 llamacpp providers (the
lifecycle watcher on, as by default). This process is the scraper:

- paced: each provider probed once every 15 s (Prometheus' usual interval), spread evenly,
  for a while: the exporter's share of a core, its RSS, the probes' latency, and failures
  (a status other than 200, or probe_success 0);
- flat out: 8 scrapers probing back to back for 10 s: the most probes a second one exporter
  answers, and its CPU per probe;
- the peer: the same providers collected all at once by /metrics, as before /probe, scraped
  back to back: CPU per provider per scrape, against /probe's CPU per probe (the ratio says
  what one target per provider costs over one scrape for all).

CPU is user plus system time of the exporter's process from /proc; the machine is shared,
so the ratio, measured in one run, is the number to trust over the absolutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scrape import (
    ROOT,
    Processes,
    cpu_seconds,
    get,
    read_ports,
    rss_bytes,
    start_exporter,
    write_config,
)

INTERVAL = 15.0
SCRAPERS = 8
FLAT_OUT_SECONDS = 10.0
PEER_SCRAPES = 5


@dataclass(frozen=True)
class Plan:
    """Provider counts and how long the paced phase lasts at each."""

    providers: tuple[int, ...]
    paced_seconds: float


FULL = Plan((50, 200, 500), 30.0)
QUICK = Plan((50, 200), 15.0)


@dataclass(frozen=True)
class Row:
    """What one provider count measured."""

    providers: int
    paced_per_second: float
    paced_core_share: float
    paced_p50_ms: float
    paced_p99_ms: float
    failures: int
    flat_out_per_second: float
    probe_cpu_ms: float
    metrics_cpu_ms_per_provider: float
    rss_mib: float


def probe(port: int, target: str) -> tuple[float, bool]:
    """One /probe: its latency, and whether it answered 200 with probe_success 1."""
    started = time.perf_counter()
    try:
        status, body = get(port, f"/probe?target={target}", {}, timeout=30.0)
    except OSError:
        return time.perf_counter() - started, False
    ok = status == 200 and b"\nprobe_success 1.0" in body
    return time.perf_counter() - started, ok


def paced(port: int, names: list[str], seconds: float) -> tuple[list[float], int, float]:
    """Probe every name once per INTERVAL, spread evenly, for seconds: latencies, failures,
    and the rate sent."""
    gap = INTERVAL / len(names)
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def one(target: str) -> None:
        nonlocal failures
        latency, ok = probe(port, target)
        with lock:
            latencies.append(latency)
            failures += not ok

    started = time.monotonic()
    sent = 0
    with ThreadPoolExecutor(max_workers=32) as pool:
        while time.monotonic() - started < seconds:
            due = started + sent * gap
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            pool.submit(one, names[sent % len(names)])
            sent += 1
    return latencies, failures, sent / seconds


def flat_out(port: int, names: list[str]) -> int:
    """Probes answered by SCRAPERS scrapers probing back to back for FLAT_OUT_SECONDS."""
    deadline = time.monotonic() + FLAT_OUT_SECONDS
    done = [0] * SCRAPERS

    def scraper(index: int) -> None:
        turn = index
        while time.monotonic() < deadline:
            probe(port, names[turn % len(names)])
            done[index] += 1
            turn += SCRAPERS

    threads = [threading.Thread(target=scraper, args=(i,)) for i in range(SCRAPERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done)


def measure(procs: Processes, work: Path, ports: list[int], plan: Plan) -> Row:
    """Start an exporter for these providers and measure it."""
    config = work / f"fleet-{len(ports)}.yml"
    write_config(config, ports)
    names = [f"llama-{index:02d}" for index in range(len(ports))]
    exporter, port = start_exporter(procs, config, work / f"exporter-{len(ports)}.log")
    try:
        probe(port, names[0])  # warm
        cpu = cpu_seconds(exporter.pid)
        latencies, failures, rate = paced(port, names, plan.paced_seconds)
        paced_cpu = cpu_seconds(exporter.pid) - cpu
        rss = rss_bytes(exporter.pid)
        cpu = cpu_seconds(exporter.pid)
        answered = flat_out(port, names)
        flat_cpu = cpu_seconds(exporter.pid) - cpu
        cpu = cpu_seconds(exporter.pid)
        for _ in range(PEER_SCRAPES):
            status, _ = get(port, "/metrics", {}, timeout=60.0)
            assert status == 200
        metrics_cpu = cpu_seconds(exporter.pid) - cpu
    finally:
        procs.stop(exporter)
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Row(
        providers=len(ports),
        paced_per_second=rate,
        paced_core_share=paced_cpu / plan.paced_seconds,
        paced_p50_ms=quantiles[49] * 1000,
        paced_p99_ms=quantiles[98] * 1000,
        failures=failures,
        flat_out_per_second=answered / FLAT_OUT_SECONDS,
        probe_cpu_ms=flat_cpu / max(answered, 1) * 1000,
        metrics_cpu_ms_per_provider=metrics_cpu / PEER_SCRAPES / len(ports) * 1000,
        rss_mib=rss / 2**20,
    )


def print_table(rows: list[Row]) -> None:
    """The results as a Markdown table, for docs/performance.md."""
    print(
        "| providers | paced probes/s | exporter CPU (share of a core) | p50 / p99 ms | failures"
        " | flat-out probes/s | CPU per probe | CPU per provider in /metrics | ratio | RSS |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        ratio = row.probe_cpu_ms / row.metrics_cpu_ms_per_provider
        print(
            f"| {row.providers} | {row.paced_per_second:.1f} | {row.paced_core_share:.1%}"
            f" | {row.paced_p50_ms:.1f} / {row.paced_p99_ms:.1f} | {row.failures}"
            f" | {row.flat_out_per_second:.0f} | {row.probe_cpu_ms:.2f} ms"
            f" | {row.metrics_cpu_ms_per_provider:.2f} ms | {ratio:.1f}x | {row.rss_mib:.1f} MiB |"
        )


def main() -> int:
    """Parse the flags and run the bench."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 and 200 providers, 15 s each")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    print(f"llm-exporter fleet bench: {'quick' if args.quick else 'full'}", flush=True)
    procs = Processes(ROOT)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="llm-exporter-fleet-") as tmp:
            standins = procs.start(
                [str(Path(__file__).resolve().parent / "scrape.py"), "--serve-standins",
                 str(max(plan.providers))]
            )  # fmt: skip
            ports = read_ports(standins)
            for providers in plan.providers:
                rows.append(measure(procs, Path(tmp), ports[:providers], plan))
                print(f"  {providers} providers measured", flush=True)
    finally:
        procs.stop_all()
    print_table(rows)
    print(f"total {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
