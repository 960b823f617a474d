"""Scrape benchmark: the exporter against stand-in llama.cpp servers, and against a bare floor.

Run as `python bench/scrape.py [--quick]` (or `make bench`). Three kinds of process:

- stand-ins: one process serving the recorded llama.cpp bodies of tests/fixtures/ on one
  127.0.0.1 port per provider (aiohttp);
- the exporter: `python -m exporter` with 1, 10 and 50 llamacpp providers, one process each;
- the floor: the same series (the exporter's exposition, parsed once) served as static
  families by bare prometheus_client's start_http_server, in a process of its own.

This process only scrapes /metrics sequentially, as Prometheus does, alternating exporter and
floor batches so that noise on the shared machine hits both alike, and reads CPU time and RSS
of the other processes from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
# The recorded llama-server bodies the tests replay too (tests/fixtures/README.md).
FIXTURES = ROOT / "tests" / "fixtures"
# Endpoint, fixture file, and the Content-Type llama-server sends with it.
ENDPOINTS = (
    ("/health", "llamacpp_health.body", "application/json; charset=utf-8"),
    ("/v1/models", "llamacpp_models.body", "application/json; charset=utf-8"),
    ("/props", "llamacpp_props.body", "application/json; charset=utf-8"),
    ("/slots", "llamacpp_slots_idle.body", "application/json; charset=utf-8"),
    ("/metrics", "llamacpp_metrics.body", "text/plain; version=0.0.4"),
)
# What Prometheus 3 sends on every scrape (default scrape_protocols, gzip on).
SCRAPE_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
    "text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/3.0.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}
PLAIN_HEADERS = {"Accept": "text/plain;version=0.0.4"}
NODE_EXPORTER_P50_MS = 5.0
NODE_EXPORTER_SERIES = 507
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0
ROUNDS = 5


@dataclass(frozen=True)
class Plan:
    """How many scrapes to make and how long they may take, per provider count."""

    providers: tuple[int, ...]
    scrapes: int
    warmup: int
    warmup_budget: float
    exporter_budget: float
    floor_budget: float


FULL = Plan(
    (1, 10, 50), scrapes=1000, warmup=20, warmup_budget=2.0, exporter_budget=30.0, floor_budget=10.0
)
QUICK = Plan(
    (1, 10, 50), scrapes=150, warmup=5, warmup_budget=0.5, exporter_budget=4.0, floor_budget=1.5
)


@dataclass
class Target:
    """A /metrics endpoint being scraped: its process, latencies and CPU time used."""

    name: str
    pid: int
    latencies: list[float]
    cpu_seconds: float = 0.0

    def p(self, q: int) -> float:
        """The q-th percentile latency in milliseconds."""
        if len(self.latencies) < 2:
            return self.latencies[0] * 1000 if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1] * 1000

    def cpu_per_1000(self) -> float:
        """CPU seconds (user and system) per 1,000 scrapes."""
        return self.cpu_seconds / len(self.latencies) * 1000 if self.latencies else float("nan")


@dataclass(frozen=True)
class Row:
    """The measurements of one provider count."""

    providers: int
    series: int
    floor_series: int
    exporter: Target
    floor: Target
    rss_bytes: int
    standin_cpu_per_1000: float


# --- child processes ------------------------------------------------------------------------


async def _serve_standins(count: int) -> None:
    """Serve the fixtures on count ports of 127.0.0.1 until SIGTERM; print the ports first."""
    from aiohttp import web

    app = web.Application()
    for path, file, content_type in ENDPOINTS:
        body = (FIXTURES / file).read_bytes()
        headers = {"Content-Type": content_type, "Server": "llama.cpp"}

        async def handler(
            request: web.Request, body: bytes = body, headers: dict[str, str] = headers
        ) -> web.Response:
            return web.Response(body=body, headers=headers)

        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ports = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        await web.SockSite(runner, sock).start()
        ports.append(sock.getsockname()[1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps(ports), flush=True)
    await stop.wait()
    await runner.cleanup()


def _serve_floor(exposition: Path) -> None:
    """Serve one exposition's samples as static families with bare prometheus_client."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import Collector

    families = list(text_string_to_metric_families(exposition.read_text()))

    class Static(Collector):
        """The parsed families, as they are, on every scrape."""

        def collect(self) -> Iterable[Metric]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Static())
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps([server.server_port]), flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()


# --- process handling -------------------------------------------------------------------------


class Processes:
    """Child processes, each stopped (SIGTERM, then SIGKILL) when the bench ends."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.children: list[subprocess.Popen[str]] = []

    def start(self, args: list[str], stderr: IO[str] | None = None) -> subprocess.Popen[str]:
        """Start a child with this Python, from the root of the tree under test."""
        env = {**os.environ, "PYTHONPATH": str(self.root), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """Stop one child and wait for it."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.children:
            self.children.remove(proc)

    def stop_all(self) -> None:
        """Stop every child still running."""
        for proc in reversed(list(self.children)):
            self.stop(proc)


def read_ports(proc: subprocess.Popen[str], timeout: float = START_TIMEOUT) -> list[int]:
    """The JSON list of ports a serving child prints once it listens."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"child {proc.args!r} printed no ports within {timeout:g}s")
    ports: list[int] = json.loads(line)
    return ports


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --- scraping ---------------------------------------------------------------------------------


def get(port: int, path: str, headers: dict[str, str], timeout: float = 30.0) -> tuple[int, bytes]:
    """One GET on a fresh connection: status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen[str], port: int, log: Path) -> None:
    """Wait until the exporter answers /-/ready with 200."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"exporter exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
            )
        try:
            if get(port, "/-/ready", {}, timeout=2.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"exporter not ready within {START_TIMEOUT:g}s:\n{log.read_text()[-2000:]}")


def start_exporter(
    procs: Processes, config: Path, log_path: Path
) -> tuple[subprocess.Popen[str], int]:
    """Start `python -m exporter` on a free 127.0.0.1 port and wait until it is ready."""
    port = free_port()
    with log_path.open("w") as log:
        proc = procs.start(
            ["-m", "exporter", "--config.file", str(config),
             "--web.listen-address", f"127.0.0.1:{port}"],
            stderr=log,
        )  # fmt: skip
    wait_ready(proc, port, log_path)
    return proc, port


@contextmanager
def scraper(port: int) -> Iterator[http.client.HTTPConnection]:
    """A connection kept alive between scrapes when the server allows it, as Prometheus does."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30.0)
    try:
        yield conn
    finally:
        conn.close()


def scrape(conn: http.client.HTTPConnection, count: int, budget: float) -> list[float]:
    """Scrape /metrics up to count times, sequentially, within budget seconds; the latencies."""
    latencies: list[float] = []
    end = time.perf_counter() + budget
    while len(latencies) < count and time.perf_counter() < end:
        started = time.perf_counter()
        conn.request("GET", "/metrics", headers=SCRAPE_HEADERS)
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        if response.status != 200:
            raise RuntimeError(f"/metrics answered {response.status}")
    return latencies


def negotiated(port: int) -> tuple[str, str]:
    """The format and encoding a target answers Prometheus' scrape headers with."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30.0)
    try:
        conn.request("GET", "/metrics", headers=SCRAPE_HEADERS)
        response = conn.getresponse()
        response.read()
        content_type = response.getheader("Content-Type", "").split(";")[0]
        return content_type, response.getheader("Content-Encoding", "identity")
    finally:
        conn.close()


def sample_lines(exposition: str) -> list[str]:
    """The sample lines of a text exposition."""
    return [line for line in exposition.splitlines() if line and not line.startswith("#")]


def check_exposition(samples: list[str], providers: int) -> list[str]:
    """Problems that would make the numbers meaningless: providers down or failing."""
    problems = []
    for metric in ("llm_provider_up", "llm_exporter_scrape_success"):
        values = [line.rsplit(" ", 1)[1] for line in samples if line.startswith(metric + "{")]
        good = sum(1 for value in values if float(value) == 1.0)
        if good != providers:
            problems.append(f"{metric}: {good} of {providers} providers at 1")
    return problems


def write_config(path: Path, ports: list[int]) -> None:
    """An exporter configuration with one llamacpp provider per stand-in port."""
    lines = ["providers:"]
    for index, port in enumerate(ports):
        lines += [
            f"  - name: llama-{index:02d}",
            "    kind: llamacpp",
            f"    url: http://127.0.0.1:{port}",
        ]
    path.write_text("\n".join(lines) + "\n")


def measure(
    procs: Processes, workdir: Path, standins: subprocess.Popen[str], ports: list[int], plan: Plan
) -> Row:
    """Run the exporter on these stand-in ports, then its floor, and scrape both."""
    providers = len(ports)
    config = workdir / f"providers-{providers}.yml"
    write_config(config, ports)
    exporter, port = start_exporter(procs, config, workdir / f"exporter-{providers}.log")
    floor_proc: subprocess.Popen[str] | None = None
    try:
        with scraper(port) as conn:
            scrape(conn, plan.warmup, plan.warmup_budget)
        status, body = get(port, "/metrics", PLAIN_HEADERS)
        if status != 200:
            raise RuntimeError(f"exporter /metrics answered {status}")
        samples = sample_lines(body.decode())
        for problem in check_exposition(samples, providers):
            print(f"  WARNING {providers} providers: {problem}")
        exposition = workdir / f"exposition-{providers}.txt"
        exposition.write_bytes(body)

        floor_proc = procs.start([str(Path(__file__).resolve()), "--serve-floor", str(exposition)])
        (floor_port,) = read_ports(floor_proc)
        floor_series = len(sample_lines(get(floor_port, "/metrics", PLAIN_HEADERS)[1].decode()))

        formats = negotiated(port), negotiated(floor_port)
        if formats[0] != formats[1]:
            print(f"  WARNING exporter answers {formats[0]}, floor {formats[1]}")
        exp = Target("exporter", exporter.pid, [])
        flo = Target("floor", floor_proc.pid, [])
        budgets = {"exporter": plan.exporter_budget, "floor": plan.floor_budget}
        standin_cpu = 0.0
        with scraper(port) as exp_conn, scraper(floor_port) as floor_conn:
            scrape(floor_conn, plan.warmup, plan.warmup_budget)
            for left in range(ROUNDS, 0, -1):
                for target, conn in ((exp, exp_conn), (flo, floor_conn)):
                    # Each round gets an even share of what is left, so that a slow scrape
                    # overrunning one round is taken from the next: the total stays bounded.
                    count = (plan.scrapes - len(target.latencies)) // left
                    started = time.perf_counter()
                    before = cpu_seconds(target.pid), cpu_seconds(standins.pid)
                    target.latencies += scrape(conn, count, budgets[target.name] / left)
                    target.cpu_seconds += cpu_seconds(target.pid) - before[0]
                    if target is exp:
                        standin_cpu += cpu_seconds(standins.pid) - before[1]
                    budgets[target.name] -= time.perf_counter() - started
        return Row(
            providers=providers,
            series=len(samples),
            floor_series=floor_series,
            exporter=exp,
            floor=flo,
            rss_bytes=rss_bytes(exporter.pid),
            standin_cpu_per_1000=standin_cpu / len(exp.latencies) * 1000,
        )
    finally:
        if floor_proc is not None:
            procs.stop(floor_proc)
        procs.stop(exporter)


def print_table(rows: list[Row]) -> None:
    """The results, one line per provider count, then the node_exporter comparison."""
    print(
        "latency in ms (p50/p99) per scrape; CPU in seconds per 1,000 scrapes; "
        "ratio = exporter p50 / floor p50"
    )
    header = (
        f"{'providers':>9} {'series':>6} | {'exporter':>17} | {'floor':>15} | {'ratio':>6} | "
        f"{'RSS MiB':>7} | {'CPU exp':>7} {'floor':>6} {'stand-in':>8} | {'scrapes':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        exp, flo = row.exporter, row.floor
        print(
            f"{row.providers:>9} {row.series:>6} | {exp.p(50):>8.1f}/{exp.p(99):<8.1f} | "
            f"{flo.p(50):>7.1f}/{flo.p(99):<7.1f} | {exp.p(50) / flo.p(50):>5.1f}x | "
            f"{row.rss_bytes / 2**20:>7.1f} | {exp.cpu_per_1000():>7.1f} "
            f"{flo.cpu_per_1000():>6.1f} {row.standin_cpu_per_1000:>8.1f} | "
            f"{len(exp.latencies):>4}/{len(flo.latencies):<4}"
        )
        if row.floor_series != row.series:
            print(f"  WARNING floor serves {row.floor_series} series, exporter {row.series}")
    for row in rows:
        if row.providers == 10:
            p50 = row.exporter.p(50)
            print(
                f"node_exporter reference (~{NODE_EXPORTER_P50_MS:g} ms p50 for "
                f"{NODE_EXPORTER_SERIES} series): exporter with 10 providers {p50:.1f} ms p50 "
                f"for {row.series} series = {p50 / NODE_EXPORTER_P50_MS:.1f}x"
            )


def run(plan: Plan, root: Path = ROOT) -> list[Row]:
    """Start the stand-ins, measure every provider count, stop everything."""
    procs = Processes(root)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="llm-exporter-bench-") as tmp:
            standins = procs.start(
                [str(Path(__file__).resolve()), "--serve-standins", str(max(plan.providers))]
            )
            ports = read_ports(standins)
            for providers in plan.providers:
                started = time.monotonic()
                rows.append(measure(procs, Path(tmp), standins, ports[:providers], plan))
                print(
                    f"  {providers} providers measured in {time.monotonic() - started:.1f}s",
                    flush=True,
                )
    finally:
        procs.stop_all()
    return rows


def main() -> int:
    """Parse the flags, run the bench or one of its child roles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer scrapes: under 40 s")
    parser.add_argument(
        "--providers", help="comma-separated provider counts (default: 1,10,50)", default=None
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="tree whose exporter package to run, to compare a change (default: %(default)s)",
    )
    parser.add_argument("--serve-standins", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_standins is not None:
        asyncio.run(_serve_standins(args.serve_standins))
        return 0
    if args.serve_floor is not None:
        _serve_floor(args.serve_floor)
        return 0
    plan = QUICK if args.quick else FULL
    if args.providers:
        plan = replace(plan, providers=tuple(int(n) for n in args.providers.split(",")))
    started = time.monotonic()
    print(
        f"llm-exporter scrape bench: {'quick' if args.quick else 'full'}, "
        f"up to {plan.scrapes} scrapes per target, {os.cpu_count()} CPUs, "
        f"exporter from {args.root.resolve()}",
        flush=True,
    )
    rows = run(plan, args.root.resolve())
    print_table(rows)
    print(f"total {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
