"""Probe benchmark: what synthetic probes cost the exporter, and how well they time the first token.

Run as `python bench/probes.py [--quick]`. Like bench/scrape.py (whose process helpers it
imports), every server is a process of its own on 127.0.0.1:

- the stand-in: one aiohttp process answering an OpenAI-compatible API: GET /v1/models,
  and a streamed POST /v1/chat/completions (8 content chunks, a usage chunk, [DONE]) that
  answers at once, or, for the models named delay-<N>ms, sleeps N ms (asyncio.sleep, timed
  with perf_counter: GET /stats returns every sleep) before the first content chunk;
- the exporter: `python -m exporter` with openai providers whose probes point at it;
- for the TTFT error, also a process calling exporter.providers.chat.probe_chat directly
  with a ProviderClient, back to back, which reports every probe's time to first token.

This process reads the exporter's /metrics (llm_probe_requests_total, the TTFT histogram)
and the CPU time of the other processes from /proc/PID/stat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from scrape import (
    PLAIN_HEADERS,
    ROOT,
    START_TIMEOUT,
    Processes,
    cpu_seconds,
    get,
    read_ports,
    start_exporter,
)

# What every streamed answer carries: 8 content chunks, then the usage chunk, then [DONE].
WORDS = ("Hello", "!", " How", " can", " I", " help", " you", "?")
INSTANT_MODELS = tuple(f"m{index:02d}" for index in range(64))
DELAYS_MS = (50, 200, 500)
# Time between two probes of each TTFT provider, and its timeout: the delay plus this.
TTFT_SLACK = 0.3
WARMUP_PROBES = 3
PROMPT = "Say hello."


def delayed_model(ms: int) -> str:
    """The stand-in model that sleeps ms milliseconds before its first content chunk."""
    return f"delay-{ms}ms"


DELAYED = {delayed_model(ms): ms / 1000 for ms in DELAYS_MS}


@dataclass(frozen=True)
class Plan:
    """How long each part runs and how many probes it makes."""

    load_seconds: float
    load_providers: int
    load_models: int
    load_interval_ms: int
    load_concurrency: int
    steady_seconds: float
    direct_probes: int
    exporter_probes: int


FULL = Plan(
    load_seconds=20.0,
    load_providers=8,
    load_models=8,
    load_interval_ms=100,
    load_concurrency=16,
    steady_seconds=60.0,
    direct_probes=20,
    exporter_probes=10,
)
QUICK = Plan(
    load_seconds=5.0,
    load_providers=8,
    load_models=8,
    load_interval_ms=100,
    load_concurrency=16,
    steady_seconds=15.0,
    direct_probes=5,
    exporter_probes=3,
)


# --- child processes ------------------------------------------------------------------------


def _sse(value: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"


async def _serve_chat() -> None:
    """Serve the stand-in OpenAI-compatible API on 127.0.0.1 until SIGTERM; print the port."""
    from aiohttp import web

    listing = {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "owned_by": "bench"}
            for name in (*INSTANT_MODELS, *DELAYED)
        ],
    }
    chunks = [
        _sse(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
        )
        for word in WORDS
    ]
    usage = {"prompt_tokens": 11, "completion_tokens": len(WORDS), "total_tokens": 11 + len(WORDS)}
    final = _sse({"object": "chat.completion.chunk", "choices": [], "usage": usage})
    slept: dict[str, list[float]] = {}

    async def models(request: web.Request) -> web.Response:
        return web.json_response(listing)

    async def chat(request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            delay = DELAYED.get(model)
            if delay is not None:
                started = time.perf_counter()
                await asyncio.sleep(delay)
                slept.setdefault(model, []).append(time.perf_counter() - started)
            for chunk in (*chunks, final, b"data: [DONE]\n\n"):
                await response.write(chunk)
        except ConnectionError:
            pass  # the probe gave up (timeout) or the exporter stopped with it in flight
        return response

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(slept)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps([sock.getsockname()[1]]), flush=True)
    await stop.wait()
    await runner.cleanup()


async def _probe_direct(port: int, count: int) -> None:
    """Probe each delayed model count times with probe_chat, back to back; print the TTFTs."""
    from exporter.client import ConnectionStats, ProviderClient
    from exporter.config import ProviderConfig
    from exporter.providers.base import ProbeSpec
    from exporter.providers.chat import probe_chat

    config = ProviderConfig(name="direct", kind="openai", url=f"http://127.0.0.1:{port}/v1")
    spec = ProbeSpec(PROMPT, 16, 10.0)
    ttfts: dict[str, list[float]] = {}
    async with ProviderClient(config, ConnectionStats()) as client:
        for _ in range(WARMUP_PROBES):
            await probe_chat(client, "/chat/completions", INSTANT_MODELS[0], spec)
        for model in DELAYED:
            for _ in range(count):
                result = await probe_chat(client, "/chat/completions", model, spec)
                ttfts.setdefault(model, []).append(result.time_to_first_token)
    print(json.dumps(ttfts), flush=True)


# --- reading the processes --------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    """The samples of one /metrics page: (name, labels, value)."""

    samples: list[tuple[str, dict[str, str], float]]

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples with this name and (at least) these labels."""
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and labels.items() <= sample_labels.items()
        )

    def outcomes(self) -> dict[str, float]:
        """Probe requests by outcome, over every provider and model."""
        counts: dict[str, float] = {}
        for name, labels, value in self.samples:
            if name == "llm_probe_requests_total":
                counts[labels["outcome"]] = counts.get(labels["outcome"], 0.0) + value
        return counts


def read_metrics(port: int) -> Metrics:
    """Scrape an exporter's /metrics once, in the text format."""
    status, body = get(port, "/metrics", PLAIN_HEADERS)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    samples = [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    ]
    return Metrics(samples)


def slept(port: int) -> dict[str, list[float]]:
    """Every sleep the stand-in made so far, per model, in seconds."""
    status, body = get(port, "/stats", {})
    if status != 200:
        raise RuntimeError(f"stand-in /stats answered {status}")
    result: dict[str, list[float]] = json.loads(body)
    return result


def read_json(proc: subprocess.Popen[str], timeout: float) -> Any:
    """The one JSON line a child prints, within timeout seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"child {proc.args!r} printed nothing within {timeout:g}s")
    return json.loads(line)


@dataclass(frozen=True)
class Window:
    """CPU seconds of some processes over a stretch of wall time."""

    wall: float
    cpu: dict[str, float]


def cpu_over(pids: dict[str, int], seconds: float) -> Window:
    """Sleep seconds and return the CPU time each named process used meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - started
    return Window(wall, {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()})


# --- the exporter -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSet:
    """One provider's probes: its models and interval (its timeout too: no longer allowed)."""

    models: tuple[str, ...]
    interval_ms: int


def write_config(
    path: Path, port: int, providers: list[ProbeSet | None], concurrency: int = 2
) -> None:
    """A configuration with one openai provider per entry, probing its models (None: no probes)."""
    lines = ["global:", f"  probe_concurrency: {concurrency}", "providers:"]
    for index, probes in enumerate(providers):
        lines += [
            f"  - name: chat-{index:02d}",
            "    kind: openai",
            f"    url: http://127.0.0.1:{port}/v1",
        ]
        if probes is not None:
            lines += [
                "    probes:",
                f"      models: [{', '.join(probes.models)}]",
                f"      interval: {probes.interval_ms}ms",
                f"      timeout: {probes.interval_ms}ms",
                "      jitter: 0",
            ]
    path.write_text("\n".join(lines) + "\n")


@contextmanager
def exporter(procs: Processes, workdir: Path, name: str, config: Path) -> Iterator[tuple[int, int]]:
    """Run `python -m exporter` on a free 127.0.0.1 port until the block ends: (pid, port)."""
    proc, port = start_exporter(procs, config, workdir / f"{name}.log")
    try:
        yield proc.pid, port
    finally:
        procs.stop(proc)


# --- the three parts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """What every part uses: the child processes, a scratch directory and the stand-in."""

    procs: Processes
    workdir: Path
    standin_pid: int
    port: int


@dataclass(frozen=True)
class CostRow:
    """Probes made in a window and the CPU time each process used meanwhile."""

    label: str
    probes: float
    failures: dict[str, float]
    refreshes: float
    window: Window

    def per_1000(self, process: str) -> float:
        """CPU seconds of a process per 1,000 probes."""
        return self.window.cpu[process] / self.probes * 1000 if self.probes else float("nan")


def probe_cost(
    bench: Bench,
    idle_pid: int,
    label: str,
    providers: list[ProbeSet | None],
    concurrency: int,
    seconds: float,
) -> CostRow:
    """Run an exporter with these probes; count its probes and CPU over seconds of wall time."""
    config = bench.workdir / f"cost-{label[0]}.yml"
    write_config(config, bench.port, providers, concurrency)
    with exporter(bench.procs, bench.workdir, f"cost-{label[0]}", config) as (pid, exp_port):
        time.sleep(1.0)  # past the first collection and the first rounds
        before = read_metrics(exp_port)
        pids = {"exporter": pid, "idle": idle_pid, "stand-in": bench.standin_pid}
        measured = cpu_over(pids, seconds)
        after = read_metrics(exp_port)
    outcomes = after.outcomes()
    for outcome, count in before.outcomes().items():
        outcomes[outcome] -= count
    refreshes = after.total("llm_provider_requests_total", endpoint="/models") - before.total(
        "llm_provider_requests_total", endpoint="/models"
    )
    return CostRow(
        label=label,
        probes=sum(outcomes.values()),
        failures={k: v for k, v in outcomes.items() if k != "success" and v},
        refreshes=refreshes,
        window=measured,
    )


@dataclass(frozen=True)
class TtftRow:
    """TTFT errors for one known delay, in seconds."""

    delay: float
    standin_slept: list[float]
    direct: list[float]
    direct_slept: list[float]
    exporter_mean: float
    exporter_count: float
    exporter_slept: list[float]


def ttft_direct(bench: Bench, count: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """TTFT of count direct probe_chat calls per delay, and the stand-in's sleeps for them."""
    before = slept(bench.port)
    child = bench.procs.start(
        [str(Path(__file__).resolve()), "--probe-direct", str(bench.port), str(count)]
    )
    try:
        budget = START_TIMEOUT + count * len(DELAYS_MS) * (max(DELAYS_MS) / 1000 + 1.0)
        ttfts: dict[str, list[float]] = read_json(child, budget)
    finally:
        bench.procs.stop(child)
    after = slept(bench.port)
    return ttfts, {m: after.get(m, [])[len(before.get(m, [])) :] for m in DELAYED}


def ttft_exporter(bench: Bench, count: int) -> dict[str, tuple[float, float, list[float]]]:
    """Per delayed model: (mean TTFT, probes, stand-in's sleeps) from the exporter's /metrics."""
    config, port = bench.workdir / "ttft.yml", bench.port
    providers: list[ProbeSet | None] = [
        ProbeSet((model,), round((delay + TTFT_SLACK) * 1000)) for model, delay in DELAYED.items()
    ]
    write_config(config, port, providers, concurrency=len(providers))
    family = "llm_probe_time_to_first_token_seconds"
    slowest = max(DELAYED.values()) * 2 + TTFT_SLACK
    with exporter(bench.procs, bench.workdir, "ttft", config) as (_, exp_port):
        first, sleeps_before = read_metrics(exp_port), slept(port)
        deadline = time.monotonic() + count * slowest * 2 + 5
        while True:
            time.sleep(1.0)
            last = read_metrics(exp_port)
            done = [
                last.total(f"{family}_count", model=m) - first.total(f"{family}_count", model=m)
                for m in DELAYED
            ]
            if min(done) >= count or time.monotonic() > deadline:
                break
        sleeps_after = slept(port)
    result = {}
    for model in DELAYED:
        probes = last.total(f"{family}_count", model=model) - first.total(
            f"{family}_count", model=model
        )
        total = last.total(f"{family}_sum", model=model) - first.total(f"{family}_sum", model=model)
        sleeps = sleeps_after.get(model, [])[len(sleeps_before.get(model, [])) :]
        result[model] = (total / probes if probes else float("nan"), probes, sleeps)
    return result


# --- output -----------------------------------------------------------------------------------


def print_costs(rows: list[CostRow]) -> None:
    """The CPU table of parts 1 and 2."""
    print(
        "CPU in seconds (user + system, /proc/PID/stat); idle = an exporter with the same "
        "providers and no probes, over the same wall time"
    )
    header = (
        f"{'part':<34} {'probes':>6} {'/s':>6} {'wall s':>6} | {'CPU s: exp':>10} "
        f"{'idle':>5} {'stand-in':>8} | {'per 1,000 probes: exp':>21} {'net':>5} "
        f"{'stand-in':>8} | {'% core':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        w = row.window
        net = (w.cpu["exporter"] - w.cpu["idle"]) / row.probes * 1000 if row.probes else 0.0
        print(
            f"{row.label:<34} {row.probes:>6.0f} {row.probes / w.wall:>6.1f} {w.wall:>6.1f} | "
            f"{w.cpu['exporter']:>10.2f} {w.cpu['idle']:>5.2f} {w.cpu['stand-in']:>8.2f} | "
            f"{row.per_1000('exporter'):>21.2f} {net:>5.2f} {row.per_1000('stand-in'):>8.2f} | "
            f"{w.cpu['exporter'] / w.wall * 100:>6.2f}"
        )
    for row in rows:
        failures = ", ".join(f"{k} {v:.0f}" for k, v in sorted(row.failures.items())) or "none"
        print(
            f"  {row.label}: failures {failures}; model-list refreshes (/v1/models, "
            f"health.max_age) {row.refreshes:.0f}"
        )


def print_ttft(rows: list[TtftRow], direct: int, via_exporter: int) -> None:
    """The TTFT error table of part 3."""
    print(
        "error = measured TTFT - known delay, in ms; 'vs slept' compares with the stand-in's own "
        "perf_counter around its asyncio.sleep instead of the nominal delay"
    )
    print(
        f"direct: probe_chat + ProviderClient called in a process of their own (not the "
        f"exporter), back to back, "
        f"{direct} probes per delay (per-probe values: mean/max); exporter: the real exporter "
        f"probing on its schedule, {via_exporter}+ probes per delay, mean from the "
        "llm_probe_time_to_first_token_seconds _sum/_count deltas"
    )
    header = (
        f"{'delay ms':>8} | {'stand-in slept ms':>17} | {'direct err ms':>13} "
        f"{'vs slept':>11} | {'exporter err ms':>15} {'vs slept':>8} {'probes':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        over = [s * 1000 for s in row.standin_slept]
        err = [(t - row.delay) * 1000 for t in row.direct]
        vs = [(t - s) * 1000 for t, s in zip(row.direct, row.direct_slept, strict=False)]
        print(
            f"{row.delay * 1000:>8.0f} | {statistics.fmean(over):>8.2f}/{max(over):<8.2f} | "
            f"{statistics.fmean(err):>6.2f}/{max(err):<6.2f} "
            f"{statistics.fmean(vs):>5.2f}/{max(vs):<5.2f} | "
            f"{(row.exporter_mean - row.delay) * 1000:>15.2f} "
            f"{(row.exporter_mean - statistics.fmean(row.exporter_slept)) * 1000:>8.2f} "
            f"{row.exporter_count:>6.0f}"
        )


# --- the run ----------------------------------------------------------------------------------


def run(plan: Plan) -> tuple[list[CostRow], list[TtftRow]]:
    """Start the stand-in and an idle exporter, run the three parts, stop everything."""
    procs = Processes(ROOT)
    try:
        with tempfile.TemporaryDirectory(prefix="llm-exporter-probes-") as tmp:
            standin = procs.start([str(Path(__file__).resolve()), "--serve-chat"])
            (port,) = read_ports(standin)
            bench = Bench(procs, Path(tmp), standin.pid, port)
            load: list[ProbeSet | None] = [
                ProbeSet(
                    INSTANT_MODELS[index * plan.load_models : (index + 1) * plan.load_models],
                    plan.load_interval_ms,
                )
                for index in range(plan.load_providers)
            ]
            steady: list[ProbeSet | None] = [ProbeSet(INSTANT_MODELS[:1], 1000)]
            idle_config = bench.workdir / "idle.yml"
            write_config(idle_config, port, [None] * plan.load_providers)
            load_label = (
                f"1. load: {plan.load_providers}x{plan.load_models} models "
                f"every {plan.load_interval_ms}ms"
            )
            with exporter(procs, bench.workdir, "idle", idle_config) as (idle_pid, _):
                costs = [
                    probe_cost(
                        bench, idle_pid, load_label, load, plan.load_concurrency, plan.load_seconds
                    )
                ]
                print(f"  part 1 done ({costs[-1].window.wall:.0f}s)", flush=True)
                costs.append(
                    probe_cost(
                        bench,
                        idle_pid,
                        "2. steady: 1 model every 1 s",
                        steady,
                        2,
                        plan.steady_seconds,
                    )
                )
                print(f"  part 2 done ({costs[-1].window.wall:.0f}s)", flush=True)
            ttfts, direct_slept = ttft_direct(bench, plan.direct_probes)
            print("  part 3 direct probes done", flush=True)
            via = ttft_exporter(bench, plan.exporter_probes)
            print("  part 3 exporter probes done", flush=True)
            rows = [
                TtftRow(
                    delay=delay,
                    standin_slept=direct_slept[model] + via[model][2],
                    direct=ttfts[model],
                    direct_slept=direct_slept[model],
                    exporter_mean=via[model][0],
                    exporter_count=via[model][1],
                    exporter_slept=via[model][2],
                )
                for model, delay in DELAYED.items()
            ]
    finally:
        procs.stop_all()
    return costs, rows


def main() -> int:
    """Parse the flags, run the bench or one of its child roles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter parts: under 40 s")
    parser.add_argument("--serve-chat", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-direct", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_chat:
        asyncio.run(_serve_chat())
        return 0
    if args.probe_direct:
        asyncio.run(_probe_direct(*args.probe_direct))
        return 0
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    print(
        f"llm-exporter probe bench: {'quick' if args.quick else 'full'}, {os.cpu_count()} CPUs, "
        f"exporter from {ROOT}",
        flush=True,
    )
    costs, ttfts = run(plan)
    print()
    print_costs(costs)
    steady = costs[1].window
    print(
        f"steady probing (part 2): exporter {steady.cpu['exporter'] / steady.wall * 60:.2f} CPU s "
        f"per minute = {steady.cpu['exporter'] / steady.wall * 100:.2f}% of one core "
        f"(idle exporter {steady.cpu['idle'] / steady.wall * 60:.2f} CPU s per minute)"
    )
    print()
    print_ttft(ttfts, plan.direct_probes, plan.exporter_probes)
    print(f"total {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
