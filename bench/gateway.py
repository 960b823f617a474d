"""Gateway benchmark: what the exporter's measuring gateway adds to every request it relays,
what its admission queue and response cache cost, and what a full cache holds in memory.

Run as `python bench/gateway.py [--quick] [--litellm | --no-litellm]`. Every server is a
process of its own on 127.0.0.1 (free ports), in a process group of its own, stopped at the end:

- the upstream: a stand-in of an OpenAI-compatible server on a raw asyncio protocol, so that
  it costs little: POST /v1/chat/completions answers a fixed small chat completion with a
  `usage` object, or, when the body says "stream": true, 64 SSE chunks 5 ms apart (chunked
  transfer encoding, the first at once), then a chunk with `usage` and `data: [DONE]`, or,
  when the body says "pad": N, a chat completion whose content is N bytes long;
  GET /v1/models answers one model, for the exporter's own health checks;
- the floor: a bare aiohttp pass-through proxy in this file (low-level web.Server and one
  ClientSession: method, path, headers less hop-by-hop ones, body; the answer relayed with
  iter_any()), the least a Python proxy could cost;
- the gateway: `python -m exporter` with one `openai` provider whose `gateway.listen` relays
  to the upstream, metrics on; and a second exporter without a gateway, idle, whose RSS is
  the reference for what the gateway adds;
- "gateway+queue": the same exporter with `gateway.queue: {max_concurrent: 64}`, a queue
  that 16 connections never fill: what admitting every request costs when nobody waits;
  and "gateway again", configured as the gateway, whose difference from it is the noise
  between two processes that do the same work (both without streams);
- "gateway+cache": the same exporter with `gateway.cache: {enabled: true, ttl: 1h}`. Every
  request of the bench is deterministic ("temperature": 0), so after the first one each plain
  request is a cache hit (the replies' X-Cache header and the exporter's
  llm_gateway_cache_lookups_total say how many were); it gets no streams, which the cache
  never stores;
- "answer floor": a bare aiohttp server in this file that reads each request's body and
  answers the upstream's small chat completion from memory, the least an aiohttp server
  costs to answer without going upstream: the floor of a cache hit (plain requests only);
- "+uvloop": the floor and the gateway again on uvloop's loop (the gateway through a `-c`
  wrapper that calls uvloop.install() before exporter.cli.main), uvloop from .venv, or
  installed once with `pip install --target .cache/bench/uvloop`;
- LiteLLM's proxy (`litellm --config`, a pinned release installed once into
  .cache/bench/litellm-venv; uvicorn runs it on uvloop, which its [proxy] extra brings), with
  the upstream as an openai/ model and a master key, which it requires; skipped with a note
  when it cannot be installed or started in time. It is slow: it gets a twentieth of the
  requests (and at least one stream per connection).

This process is the load generator: asyncio, a minimal HTTP/1.1 client on keep-alive
connections. With two or more CPUs it pins itself and the upstream to one core and every proxy
to another (sched_setaffinity on each thread), so the proxies' requests per second are those of
one core and the load's own cost never lands on the proxy's core. Each round measures, for every
contender in turn (direct to the upstream first, the order rotating), 1 connection sending
requests back to back, then 16, then 16 connections streaming (their first streams spread
over one stream's length, as under steady load, not started in one burst); rounds interleave
so that noise on the shared machine hits all alike. Each batch starts with untimed warm-up
requests. Latency is timed here per request, to the last byte, and for streams also to the
first body byte; "added" is a proxy's percentile minus the direct one. Requests per second
are those at 16 connections; CPU per request is the proxy's CPU time over the timed requests
(every thread's time on a CPU, to the nanosecond, from /proc/PID/task/*/schedstat; user plus
system time from /proc/PID/stat, to the clock tick, where the kernel keeps no schedstat);
RSS is VmRSS (/proc/PID/status) after the runs. Every proxy's bodies are compared with the
upstream's, and each gateway's llm_gateway_requests_total with the requests sent to it.
The queue's cost is gateway+queue's latency and CPU per request minus the gateway's, pooled
over the rounds and round by round (both ran in every round, side by side); the noise of such
a pooled difference is two standard errors of gateway again's round-by-round differences from
the gateway, and a verdict is "unclear" when that noise exceeds the aim itself. The direct
contender's requests per second at c=16 bound what the load generator can send: it then
shares its core with the upstream, so alone it sends at least that many.

After the rounds, one more exporter, its cache bounded to 16 MiB (`max_bytes: 16MiB`), is
filled several times over (four passes, `--quick`: two) with distinct deterministic requests
whose answers are 16 to 64 KiB ("pad"), from 16 connections; its RSS after a warm-up and
after each pass, and its llm_gateway_cache_bytes, _entries and _evictions_total, show what
a cache full to its bound costs in memory. Last, alone on the proxies' core, a child process
times the queue's and the cache's own work without any HTTP: an uncontended admission (admit,
then release) and a hit (the key from the canonical JSON body, the lookup, the answer), each
the best of five runs of 20,000.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from scrape import (
    PLAIN_HEADERS,
    ROOT,
    Processes,
    cpu_seconds,
    free_port,
    get,
    read_ports,
    rss_bytes,
    wait_ready,
)

CACHE = ROOT / ".cache" / "bench"
UVLOOP_SPEC = "uvloop==0.23.0"
# Pinned, not the newest: LiteLLM has had compromised releases on PyPI, and the [proxy]
# extra of the later ones tried (1.108.14, 1.109.3, 1.110.2) needs litellm-proxy-extras or
# litellm-proxy releases the package index used here lacks. Change it on purpose.
LITELLM_SPEC = "litellm[proxy]==1.106.12"
INSTALL_TIMEOUT = 900.0
LITELLM_START_TIMEOUT = 180.0
# How long after /-/ready the gateway port may take to accept connections.
LISTEN_TIMEOUT = 10.0
# Per-request bound: a batch may overrun its budget by at most this.
REQUEST_TIMEOUT = 10.0
CHUNKS = 64
CHUNK_INTERVAL = 0.005
MODEL = "m"
# The bearer token every request carries; LiteLLM refuses to start without a master key, a
# strong one, and checks it. The upstream ignores it.
API_KEY = "sk-bench-" + secrets.token_hex(32)
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
# The product's aims for the gateway.
AIM_ADDED_P50_MS = 0.5
AIM_RPS = 4000.0
AIM_CPU_RATIO = 1.3
AIM_TTFB_MS = 0.5
AIM_RSS_MB = 60.0
# The admission queue, uncontended: at most this much more per request than without it.
AIM_QUEUE_US = 20.0
# A cache hit: answered within this at c=1 (p50), and this many per second on one core.
AIM_HIT_P50_MS = 0.3
AIM_HIT_RPS = 8000.0
# A cache filled past max_bytes: RSS grows by at most max_bytes plus this.
FILL_MAX_BYTES = 16 * 2**20
AIM_FILL_OVERHEAD_MIB = 20.0
# The answers that fill it: content sizes from 16 to 64 KiB.
FILL_MIN_PAD, FILL_MAX_PAD = 16 * 1024, 64 * 1024
FILL_WARMUPS = 64
# The contenders' gateway settings (lines under `gateway:`): a queue that 16 connections never
# fill, and a cache whose one entry outlives the run.
QUEUE_SETTINGS = ("queue:", "  max_concurrent: 64")
CACHE_SETTINGS = ("cache:", "  enabled: true", "  ttl: 1h")
FILL_SETTINGS = (
    "cache:",
    "  enabled: true",
    "  ttl: 1h",
    f"  max_bytes: {FILL_MAX_BYTES >> 20}MiB",
)


@dataclass(frozen=True)
class Plan:
    """How many requests each contender gets per round, and how long a batch may take."""

    rounds: int
    single: int
    many: int
    streams: int
    budget: float
    stream_budget: float
    litellm: bool
    fill_passes: int  # how many times over the bounded cache is filled


FULL = Plan(
    rounds=5,
    single=600,
    many=3000,
    streams=64,
    budget=5.0,
    stream_budget=6.0,
    litellm=True,
    fill_passes=4,
)
QUICK = Plan(
    rounds=3,
    single=200,
    many=800,
    streams=32,
    budget=2.0,
    stream_budget=3.0,
    litellm=False,
    fill_passes=2,
)
# LiteLLM answers ~65 requests a second here: it gets this share of the counts.
SLOW_SHARE = 0.05
CONCURRENCY = 16
NAN = float("nan")


# --- the upstream stand-in --------------------------------------------------------------------


def _json(value: object) -> bytes:
    """Compact JSON, as servers send it."""
    return json.dumps(value, separators=(",", ":")).encode()


def _chunk(payload: object) -> bytes:
    """One SSE event as one chunk of a chunked transfer encoding."""
    data = b"data: " + (payload if isinstance(payload, bytes) else _json(payload)) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _answer(status: str, content_type: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 response with a Content-Length."""
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


BASE = {"id": "chatcmpl-bench", "created": 1764000000, "model": MODEL}
USAGE = {"prompt_tokens": 9, "completion_tokens": CHUNKS, "total_tokens": 9 + CHUNKS}
COMPLETION = _answer(
    "200 OK",
    "application/json",
    _json({**BASE, "object": "chat.completion", "usage": {**USAGE, "completion_tokens": 9,
           "total_tokens": 18}, "choices": [{"index": 0, "finish_reason": "stop", "message": {
           "role": "assistant", "content": "Hello! How can I help you today?"}}]}),
)  # fmt: skip
MODELS = _answer(
    "200 OK",
    "application/json",
    _json({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}),
)


def padded(size: int) -> bytes:
    """A chat completion whose content is size bytes long."""
    return _answer(
        "200 OK",
        "application/json",
        _json({**BASE, "object": "chat.completion", "usage": {**USAGE, "completion_tokens": 9,
               "total_tokens": 18}, "choices": [{"index": 0, "finish_reason": "stop", "message": {
               "role": "assistant", "content": "x" * size}}]}),
    )  # fmt: skip


NOT_FOUND = _answer("404 Not Found", "application/json", b'{"error":"not found"}')
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
EVENTS = [
    _chunk({**BASE, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": (
        {"role": "assistant", "content": f"t{i} "} if i == 0 else {"content": f"t{i} "}),
        "finish_reason": "stop" if i == CHUNKS - 1 else None}]})
    for i in range(CHUNKS)
]  # fmt: skip
STREAM_TAIL = (
    _chunk({**BASE, "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    + _chunk(b"[DONE]")
    + b"0\r\n\r\n"
)


class _Upstream(asyncio.Protocol):
    """One connection to the stand-in: requests answered in order, streams paced by timers."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.streaming: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to answer on."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Buffer the bytes; answer what is complete unless a stream is under way."""
        self.buffer += data
        if self.streaming is None:
            self._answer_all()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop a stream whose client went away."""
        if self.streaming is not None:
            self.streaming.cancel()
            self.streaming = None
        self.transport = None

    def _answer_all(self) -> None:
        """Answer every whole request in the buffer, up to the first stream."""
        while self.transport is not None and self.streaming is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path = lines[0].split(" ")[:2]
            if method == "POST" and path.startswith("/v1/chat/completions"):
                document = json.loads(body or b"{}")
                if document.get("stream"):
                    self.transport.write(STREAM_HEAD + EVENTS[0])
                    self._stream(1, asyncio.get_running_loop().time())
                elif document.get("pad"):
                    self.transport.write(padded(int(document["pad"])))
                else:
                    self.transport.write(COMPLETION)
            elif method == "GET" and path.startswith("/v1/models"):
                self.transport.write(MODELS)
            else:
                self.transport.write(NOT_FOUND)

    def _stream(self, index: int, started: float) -> None:
        """Schedule event index at started + index intervals; the tail after the last one."""
        loop = asyncio.get_running_loop()
        self.streaming = loop.call_at(started + index * CHUNK_INTERVAL, self._send, index, started)

    def _send(self, index: int, started: float) -> None:
        """Send one event (or the tail), then schedule the next."""
        self.streaming = None
        if self.transport is None:
            return
        if index < CHUNKS:
            self.transport.write(EVENTS[index])
            self._stream(index + 1, started)
        else:
            self.transport.write(STREAM_TAIL)
            self._answer_all()


async def _serve_upstream() -> None:
    """Serve the stand-in on a free port of 127.0.0.1 until SIGTERM; print the port first."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", 0, backlog=512)
    await _serve_until_stopped([server.sockets[0].getsockname()[1]])
    server.close()


async def _serve_until_stopped(ports: list[int]) -> None:
    """Print the ports as JSON, then wait for SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps(ports), flush=True)
    await stop.wait()


# --- the queue's and the cache's own work, in one process ---------------------------------------


COMPONENT_REPEATS = 5
COMPONENT_COUNT = 20000


def _component_costs(cpu: int) -> None:
    """Print, as JSON, the CPU microseconds per request of the admission queue's work for an
    uncontended request (admit, then release), of the cache's own work for a hit (plan:
    canonical JSON and key; lookup; the answer), and of the model lifecycle's begin and end
    of a request, each the best of COMPONENT_REPEATS runs."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from exporter.config import CacheConfig, QueueConfig
    from exporter.gateway.cache import ResponseCache
    from exporter.gateway.meter import operation_of, request_document
    from exporter.gateway.queue import AdmissionQueue
    from exporter.gateway.stats import CacheStats, QueueStats

    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})

    async def admission() -> float:
        queue = AdmissionQueue(QueueConfig(max_concurrent=64), QueueStats())
        loop, clock = asyncio.get_running_loop(), time.perf_counter
        priorities = queue.config.client_priorities  # what a request without a priority gets
        started = time.process_time()
        for _ in range(COMPONENT_COUNT):
            ticket = await queue.admit(priorities.get("", 0), clock=clock, loop=loop)
            queue.release(ticket, clock())
        return (time.process_time() - started) / COMPONENT_COUNT * 1e6

    def hit() -> float:
        cache = ResponseCache(CacheConfig(enabled=True, ttl=3600.0), CacheStats())
        head, _, body = request_bytes(0, False).partition(b"\r\n\r\n")
        fields = (line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        headers = CIMultiDictProxy(CIMultiDict((name, value) for name, value in fields))
        path = "/v1/chat/completions"
        operation, now = operation_of(path), time.perf_counter()
        plan = cache.plan("POST", path, headers, request_document(body), operation)
        assert plan.key is not None
        answer_headers = CIMultiDict({"Content-Type": "application/json"})
        answer = COMPLETION.partition(b"\r\n\r\n")[2]
        cache.put(plan.key, 200, "OK", answer_headers, answer, now=now)
        started = time.process_time()
        for _ in range(COMPONENT_COUNT):
            plan = cache.plan("POST", path, headers, request_document(body), operation)
            assert plan.key is not None
            entry = cache.get(plan.key, now)
            assert entry is not None
            cache.answer(entry, now)
        return (time.process_time() - started) / COMPONENT_COUNT * 1e6

    async def lifecycle(limited: bool) -> float:
        from exporter.config import LifecycleConfig, ProviderConfig
        from exporter.lifecycle import Lifecycle, LifecycleStats
        from exporter.providers.base import ModelState, Residence

        policy = LifecycleConfig(max_loaded=2) if limited else LifecycleConfig()
        provider = ProviderConfig("p", "ollama", "http://127.0.0.1:1", lifecycle=policy)
        uses = Lifecycle(LifecycleStats())
        uses.configs = {"p": provider}  # no watcher: the reads are not what is timed
        watched = uses.stats.of(provider)
        watched.observe([ModelState("m", Residence.LOADED)], time.time())
        document = {"model": "m", "messages": []}
        started = time.process_time()
        for _ in range(COMPONENT_COUNT):
            await uses.begin("p", "m", document)
            uses.end("p", "m", load_seconds=0.001)
        return (time.process_time() - started) / COMPONENT_COUNT * 1e6

    costs = {
        "admission_us": min(asyncio.run(admission()) for _ in range(COMPONENT_REPEATS)),
        "hit_us": min(hit() for _ in range(COMPONENT_REPEATS)),
        "lifecycle_us": min(asyncio.run(lifecycle(False)) for _ in range(COMPONENT_REPEATS)),
        "lifecycle_limited_us": min(asyncio.run(lifecycle(True)) for _ in range(COMPONENT_REPEATS)),
    }
    print(json.dumps(costs), flush=True)


def component_costs(proxy_cores: set[int] | None) -> dict[str, float]:
    """The queue's and the cache's own work per request, timed in a child on the proxy core;
    empty, with a note, if that fails."""
    cpu = min(proxy_cores) if proxy_cores else -1
    command = [sys.executable, str(Path(__file__).resolve()), "--component-costs", str(cpu)]
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        costs: dict[str, float] = json.loads(done.stdout)
        return costs
    except (subprocess.SubprocessError, ValueError) as exc:
        print(f"  NOTE the queue's and the cache's own work not timed: {exc!r}")
        return {}


# --- the floor: a bare aiohttp pass-through proxy ----------------------------------------------


async def _serve_floor(upstream: int) -> None:
    """Relay every request to the upstream and its answer back, chunk by chunk."""
    from aiohttp import ClientSession, web

    session = ClientSession(
        f"http://127.0.0.1:{upstream}",
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )

    async def forward(request: web.BaseRequest) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        async with session.request(
            request.method,
            request.raw_path,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as answer:
            response = web.StreamResponse(
                status=answer.status,
                reason=answer.reason,
                headers=[
                    (k, v)
                    for k, v in answer.headers.items()
                    if k.lower() not in HOP_BY_HOP or k.lower() == "content-length"
                ],
            )
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    server = web.Server(forward, access_log=None)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", 0, backlog=512)
    await _serve_until_stopped([listener.sockets[0].getsockname()[1]])
    listener.close()
    await server.shutdown(1.0)
    await session.close()


async def _serve_answer() -> None:
    """Answer every request with the upstream's small chat completion, from memory, after
    reading its body: the least an aiohttp server costs to answer without going upstream."""
    from aiohttp import web

    body = COMPLETION.partition(b"\r\n\r\n")[2]
    content_type = "application/json"

    async def answer(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=body, headers={"Content-Type": content_type})

    server = web.Server(answer, access_log=None)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", 0, backlog=512)
    await _serve_until_stopped([listener.sockets[0].getsockname()[1]])
    listener.close()
    await server.shutdown(1.0)


# --- processes ---------------------------------------------------------------------------------


class Group(Processes):
    """Children each leading a process group of their own, stopped together with it."""

    def start(
        self,
        args: list[str],
        stderr: IO[str] | None = None,
        *,
        program: str = sys.executable,
        stdout: IO[str] | int = subprocess.PIPE,
        paths: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        """Start program with args from the root of the tree, paths added to PYTHONPATH."""
        pythonpath = os.pathsep.join([str(self.root), *paths])
        proc = subprocess.Popen(
            [program, *args],
            cwd=self.root,
            env={**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """SIGTERM the child's group, SIGKILL it after 5 s, then sweep what is left of it."""
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        super().stop(proc)


def run_bounded(command: list[str], timeout: float, log: Path) -> bool:
    """Run a command in a group of its own, killed with it after timeout s; True on success."""
    with log.open("a") as out:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            out.write(f"\n-- killed after {timeout:g}s\n")
            return False
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def group_pids(leader: int) -> list[int]:
    """The processes of leader's process group."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if os.getpgid(int(entry.name)) == leader:
                    pids.append(int(entry.name))
    return pids or [leader]


def pin(leader: int, cores: set[int] | None) -> None:
    """Pin every thread of every process in leader's group to these cores."""
    if cores is None:
        return
    for pid in group_pids(leader):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with suppress(OSError):
                os.sched_setaffinity(int(task.name), cores)


# Whether the kernel keeps each task's time on a CPU in nanoseconds (CONFIG_SCHED_INFO).
SCHEDSTAT = Path("/proc/self/schedstat").exists()


def process_cpu(pid: int) -> float:
    """CPU seconds of a process: its threads' time on a CPU to the nanosecond where the kernel
    keeps it, else user plus system time to the clock tick."""
    if not SCHEDSTAT:
        return cpu_seconds(pid)
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError, ValueError, IndexError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def group_cpu(leader: int) -> float:
    """CPU seconds of leader's process group."""
    total = 0.0
    for pid in group_pids(leader):
        with suppress(OSError):
            total += process_cpu(pid)
    return total


def group_rss(leader: int) -> int:
    """Resident bytes of leader's process group."""
    total = 0
    for pid in group_pids(leader):
        with suppress(OSError):
            total += rss_bytes(pid)
    return total


def wait_listening(port: int, timeout: float, proc: subprocess.Popen[str]) -> bool:
    """Whether 127.0.0.1:port accepts a connection within timeout s while proc runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
        time.sleep(0.05)
    return False


def tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log, on one line."""
    text = path.read_text(errors="replace").strip() if path.exists() else ""
    return " | ".join(text.splitlines()[-lines:])[-400:] or "(no output)"


def ensure_uvloop(workdir: Path) -> list[str] | None:
    """PYTHONPATH entries under which uvloop imports: none needed, the install's, or None."""
    check = [sys.executable, "-c", "import uvloop"]
    if subprocess.run(check, capture_output=True, timeout=60).returncode == 0:
        return []
    target = CACHE / "uvloop"
    env = {**os.environ, "PYTHONPATH": str(target)}
    if subprocess.run(check, capture_output=True, env=env, timeout=60).returncode == 0:
        return [str(target)]
    print(f"  installing {UVLOOP_SPEC} into {target.relative_to(ROOT)} (once)", flush=True)
    log = workdir / "uvloop-install.log"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--target", str(target), UVLOOP_SPEC]  # fmt: skip
    installed = run_bounded(command, INSTALL_TIMEOUT, log)
    if (
        installed
        and subprocess.run(check, capture_output=True, env=env, timeout=60).returncode == 0
    ):
        return [str(target)]
    print(f"  NOTE uvloop skipped: it could not be installed: {tail(log)}")
    return None


def ensure_litellm(workdir: Path) -> Path | None:
    """The litellm command of a venv of its own, installed there once; None if that fails."""
    venv = CACHE / "litellm-venv"
    program = venv / "bin" / "litellm"
    stamp = venv / f".installed-{LITELLM_SPEC.split('==')[-1]}"
    if stamp.exists() and program.exists():
        return program
    print(
        f"  installing {LITELLM_SPEC} into {venv.relative_to(ROOT)} (once, up to "
        f"{INSTALL_TIMEOUT / 60:.0f} min)",
        flush=True,
    )
    shutil.rmtree(venv, ignore_errors=True)
    log = workdir / "litellm-install.log"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    if (
        run_bounded([sys.executable, "-m", "venv", str(venv)], 120, log)
        and run_bounded([*pip, "--disable-pip-version-check", LITELLM_SPEC], INSTALL_TIMEOUT, log)
        and program.exists()
    ):
        stamp.touch()
        return program
    print(f"  NOTE LiteLLM skipped: it could not be installed: {tail(log)}")
    return None


# --- the load generator ------------------------------------------------------------------------


@dataclass
class Reply:
    """One answer as the client saw it: status, body, when its first body byte and end came."""

    status: int = 0
    body: bytes = b""
    first: float = 0.0
    end: float = 0.0
    close: bool = False
    cache: str = ""  # the X-Cache header, lower case: "hit" when the gateway's cache answered


class _Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, its answer timed as it comes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Reply] | None = None
        self.buffer = bytearray()
        self.reply = Reply()
        self.body_at = -1
        self.length: int | None = None
        self.chunked = False
        self.pieces: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to send on."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes) -> asyncio.Future[Reply]:
        """Send a request; the future of its reply."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.buffer.clear()
        self.reply, self.body_at, self.length, self.chunked = Reply(), -1, None, False
        self.pieces = []
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        """Parse what came: the head once, then the body by length, by chunk, or to the close."""
        now = time.perf_counter()
        self.buffer += data
        if self.body_at < 0 and not self._head():
            return
        if self.chunked:
            self._chunks(now)
        elif self.length is not None:
            if len(self.buffer) > self.body_at and not self.reply.first:
                self.reply.first = now
            if len(self.buffer) >= self.body_at + self.length:
                self.pieces.append(bytes(self.buffer[self.body_at : self.body_at + self.length]))
                self._finish(now)
        elif len(self.buffer) > self.body_at and not self.reply.first:
            self.reply.first = now

    def _head(self) -> bool:
        """Parse the status line and headers once they are all in; whether they are."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        self.reply.status = int(lines[0].split(" ")[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                self.length = int(value)
            elif name == "transfer-encoding":
                self.chunked = "chunked" in value
            elif name == "connection":
                self.reply.close = value == "close"
            elif name == "x-cache":
                self.reply.cache = value
        self.body_at = end + 4
        return True

    def _chunks(self, now: float) -> None:
        """Take every whole chunk from the buffer; finish at the last one."""
        while True:
            line_end = self.buffer.find(b"\r\n", self.body_at)
            if line_end < 0:
                return
            size = int(bytes(self.buffer[self.body_at : line_end]).split(b";")[0], 16)
            if size == 0:
                if self.buffer.find(b"\r\n\r\n", line_end) == line_end:
                    self._finish(now)
                return
            if len(self.buffer) < line_end + 2 + size + 2:
                return
            self.pieces.append(bytes(self.buffer[line_end + 2 : line_end + 2 + size]))
            if not self.reply.first:
                self.reply.first = now
            self.body_at = line_end + 2 + size + 2

    def _finish(self, now: float) -> None:
        """Resolve the waiter with the whole reply."""
        self.reply.body = b"".join(self.pieces)
        self.reply.end = now
        if self.reply.close and self.transport is not None:
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.reply)

    def connection_lost(self, exc: Exception | None) -> None:
        """End a body read to the close, or fail the request under way."""
        self.transport = None
        if self.waiter is None or self.waiter.done():
            return
        if self.body_at >= 0 and self.length is None and not self.chunked:
            self.pieces.append(bytes(self.buffer[self.body_at :]))
            self._finish(time.perf_counter())
        else:
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))


def request_bytes(port: int, stream: bool, content: str = "Say hello.", pad: int = 0) -> bytes:
    """An OpenAI chat completion request, as a client sends it: deterministic (temperature 0),
    so that a gateway's cache may answer it when it is not streamed; pad asks the upstream
    for an answer with that many bytes of content."""
    document: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "stream": stream,
    }
    if pad:
        document["pad"] = pad
    body = _json(document)
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def good(reply: Reply, stream: bool) -> bool:
    """Whether a reply is a whole, successful answer."""
    if reply.status != 200:
        return False
    return reply.body.rstrip().endswith(b"data: [DONE]") if stream else reply.body[:1] == b"{"


@dataclass
class Batch:
    """What one batch of requests measured."""

    latencies: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    sent: int = 0
    errors: int = 0
    error: str = ""
    wall: float = 0.0
    cpu: float = 0.0
    load_cpu: float = 0.0
    hits: int = 0  # timed replies with X-Cache: HIT

    def cpu_us(self) -> float:
        """The proxy's CPU microseconds per timed request that succeeded."""
        return self.cpu / len(self.latencies) * 1e6 if self.latencies else NAN

    def p50_us(self) -> float:
        """The median latency in microseconds."""
        return pct(self.latencies, 50) * 1000


async def _connect(port: int) -> _Client:
    """A new connection to 127.0.0.1:port."""
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(_Client, "127.0.0.1", port)
    return client


class _Load:
    """Connections to one port, sending requests until a count or a deadline is reached."""

    def __init__(self, port: int, concurrency: int, stream: bool, batch: Batch) -> None:
        self.port = port
        self.concurrency = concurrency
        self.stream = stream
        self.batch = batch
        self.clients: list[_Client] = []
        self.left = 0
        self.deadline = 0.0

    async def exchange(self, index: int, request: bytes) -> Reply:
        """Send one request on connection index, opening a new one if the server closed it."""
        client = self.clients[index]
        if client.transport is None or client.transport.is_closing():
            client = self.clients[index] = await _connect(self.port)
        self.batch.sent += 1
        return await client.send(request)

    async def warm(self, index: int, count: int) -> None:
        """Untimed plain requests that open the way: connections, pools, caches."""
        for _ in range(count):
            await self.exchange(index, request_bytes(self.port, False))

    async def work(self, index: int) -> None:
        """Timed requests on connection index while any are left and time remains."""
        request = request_bytes(self.port, self.stream)
        batch = self.batch
        if self.stream:
            # Streams start spread over one stream's length, as they would under steady load,
            # not all at once: the first byte then waits behind chunks, not behind a burst.
            await asyncio.sleep(index * CHUNKS * CHUNK_INTERVAL / self.concurrency)
        while self.left > 0 and time.perf_counter() < self.deadline:
            self.left -= 1
            started = time.perf_counter()
            try:
                reply = await self.exchange(index, request)
            except OSError as exc:
                batch.errors += 1
                batch.error = batch.error or repr(exc)
                continue
            if not good(reply, self.stream):
                batch.errors += 1
                batch.error = batch.error or f"status {reply.status}: {reply.body[:120]!r}"
                continue
            batch.latencies.append(reply.end - started)
            batch.firsts.append(reply.first - started)
            batch.hits += reply.cache == "hit"

    async def run(self, count: int, budget: float, proxy: int | None, upstream: int) -> None:
        """Connect and warm up, then time count requests within budget seconds."""
        self.clients = [await _connect(self.port) for _ in range(self.concurrency)]
        warmups = 1 if self.stream else max(2, 10 // self.concurrency)
        await asyncio.wait_for(
            asyncio.gather(*(self.warm(i, warmups) for i in range(self.concurrency))),
            REQUEST_TIMEOUT,
        )
        before = group_cpu(proxy) if proxy else 0.0, cpu_seconds(upstream) + time.process_time()
        started = time.perf_counter()
        self.left, self.deadline = count, started + budget
        with suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(self.work(i) for i in range(self.concurrency))),
                budget + REQUEST_TIMEOUT,
            )
        self.batch.wall = time.perf_counter() - started
        self.batch.cpu = (group_cpu(proxy) if proxy else 0.0) - before[0]
        self.batch.load_cpu = cpu_seconds(upstream) + time.process_time() - before[1]

    def close(self) -> None:
        """Close every connection."""
        for client in self.clients:
            if client.transport is not None:
                client.transport.close()


async def run_batch(
    port: int,
    concurrency: int,
    count: int,
    budget: float,
    stream: bool,
    pids: tuple[int | None, int],
) -> Batch:
    """One batch against a port; pids are the proxy's (None when direct) and the upstream's."""
    batch = Batch()
    load = _Load(port, concurrency, stream, batch)
    try:
        await load.run(count, budget, *pids)
    except (OSError, TimeoutError) as exc:
        batch.errors += 1
        batch.error = batch.error or f"batch failed: {exc!r}"
    finally:
        load.close()
    return batch


async def fetch_once(port: int, stream: bool) -> Reply:
    """One request on a fresh connection: its reply, body empty unless the status was 200."""
    client = await _connect(port)
    try:
        reply = await asyncio.wait_for(client.send(request_bytes(port, stream)), REQUEST_TIMEOUT)
        if reply.status != 200:
            reply.body = b""
        return reply
    finally:
        if client.transport is not None:
            client.transport.close()


async def send_all(port: int, requests: list[bytes], concurrency: int) -> Batch:
    """Every request, in order, over concurrency connections; what came back."""
    batch = Batch()
    pending = iter(requests)
    clients = [await _connect(port) for _ in range(concurrency)]

    async def worker(index: int) -> None:
        for request in pending:
            started = time.perf_counter()
            client = clients[index]
            try:
                if client.transport is None or client.transport.is_closing():
                    client = clients[index] = await _connect(port)
                batch.sent += 1
                reply = await asyncio.wait_for(client.send(request), REQUEST_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                batch.errors += 1
                batch.error = batch.error or repr(exc)
                continue
            if not good(reply, False):
                batch.errors += 1
                batch.error = batch.error or f"status {reply.status}: {reply.body[:120]!r}"
                continue
            batch.latencies.append(reply.end - started)
            batch.hits += reply.cache == "hit"

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.close()
    batch.wall = time.perf_counter() - started
    return batch


# --- contenders --------------------------------------------------------------------------------


PHASES = ("c=1", f"c={CONCURRENCY}", "stream")
# The latency columns: a phase, and whether it is the time to the first body byte.
COLUMNS = ((PHASES[0], False), (PHASES[1], False), (PHASES[2], True), (PHASES[2], False))


@dataclass
class Contender:
    """One way to reach the upstream, and what was measured through it."""

    name: str
    port: int
    pid: int | None
    share: float = 1.0
    floor: str = ""
    # "queue" or "cache" for the gateways with one; "" for the others.
    role: str = ""
    phases: tuple[str, ...] = PHASES
    batches: dict[str, list[Batch]] = field(default_factory=lambda: {p: [] for p in PHASES})
    metrics_port: int | None = None
    rss: int = 0
    identical: str = ""
    counted: str = ""
    series: dict[str, float] = field(default_factory=dict)  # its /metrics after the rounds

    def values(self, phase: str, first: bool = False) -> list[float]:
        """Every timed latency (or time to first byte) of a phase, in seconds."""
        return [v for b in self.batches[phase] for v in (b.firsts if first else b.latencies)]

    def total(self, phase: str, attr: str) -> float:
        """The sum of one Batch attribute over a phase."""
        return float(sum(getattr(b, attr) for b in self.batches[phase]))

    def requests(self, phase: str) -> int:
        """Timed requests that succeeded in a phase."""
        return len(self.values(phase))

    def cpu_us(self, phase: str) -> float:
        """CPU microseconds per successful request in a phase."""
        n = self.requests(phase)
        return self.total(phase, "cpu") / n * 1e6 if n else NAN

    def rps(self) -> float:
        """Requests per second at 16 connections."""
        wall = self.total(PHASES[1], "wall")
        return self.requests(PHASES[1]) / wall if wall else NAN

    def core_share(self, phase: str = PHASES[1]) -> float:
        """The share of a core the proxy used during a phase's batches."""
        wall = self.total(phase, "wall")
        return self.total(phase, "cpu") / wall if wall and self.pid else NAN

    def load_share(self, phase: str = PHASES[1]) -> float:
        """The share of a core this process and the upstream used during a phase's batches."""
        wall = self.total(phase, "wall")
        return self.total(phase, "load_cpu") / wall if wall else NAN


def pct(values: list[float], q: int) -> float:
    """The q-th percentile of values in seconds, in milliseconds."""
    if len(values) < 2:
        return values[0] * 1000 if values else NAN
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def exporter_config(
    path: Path, upstream: int, gateway: int | None, settings: Sequence[str] = ()
) -> None:
    """An exporter configuration with one openai provider, relayed by a gateway if a port,
    with settings (YAML lines) under `gateway:`."""
    lines = [
        "providers:",
        "  - name: up",
        "    kind: openai",
        f"    url: http://127.0.0.1:{upstream}",
    ]
    if gateway is not None:
        lines += ["    gateway:", f"      listen: 127.0.0.1:{gateway}"]
        lines += [f"      {line}" for line in settings]
    path.write_text("\n".join(lines) + "\n")


UVLOOP_MAIN = (
    "import sys, uvloop; uvloop.install(); "
    "from exporter.cli import main; sys.exit(main(sys.argv[1:]))"
)


def start_exporter(
    procs: Group,
    workdir: Path,
    name: str,
    upstream: int,
    gateway: bool,
    uvloop: list[str] | None,
    settings: Sequence[str] = (),
) -> tuple[subprocess.Popen[str], int, int | None]:
    """Start an exporter (on uvloop if paths are given; its gateway with settings) and wait
    until it is ready."""
    config, log = workdir / f"{name}.yml", workdir / f"{name}.log"
    listen = free_port() if gateway else None
    exporter_config(config, upstream, listen, settings)
    port = free_port()
    entry = ["-m", "exporter"] if uvloop is None else ["-c", UVLOOP_MAIN]
    with log.open("w") as err:
        proc = procs.start(
            [*entry, "--config.file", str(config), "--web.listen-address", f"127.0.0.1:{port}",
             "--log.level", "warn"],
            err,
            stdout=err,
            paths=uvloop or (),
        )  # fmt: skip
    wait_ready(proc, port, log)
    return proc, port, listen


def gateway_accepted(workdir: Path, upstream: int) -> str:
    """Why the exporter rejects a gateway configuration, or "" when it accepts it."""
    config = workdir / "check.yml"
    exporter_config(config, upstream, free_port())
    check = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.file", str(config), "--config.check"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check.returncode == 0:
        return ""
    return " ".join((check.stderr or check.stdout).split())[:300]


def start_gateways(
    procs: Group,
    workdir: Path,
    upstream: int,
    uvloop: list[str] | None,
    proxy_cores: set[int] | None,
) -> tuple[list[Contender], subprocess.Popen[str] | None, int | None]:
    """The gateway contenders (without and with uvloop), the reference exporter, its port."""
    problem = gateway_accepted(workdir, upstream)
    if problem:
        print(f"  NOTE gateway skipped: the exporter rejects a gateway configuration: {problem}")
        return [], None, None
    found = []
    # name, PYTHONPATH for uvloop, its floor, role, its gateway settings
    variants: list[tuple[str, list[str] | None, str, str, Sequence[str]]] = [
        ("gateway", None, "floor", "", ()),
        ("gateway+queue", None, "floor", "queue", QUEUE_SETTINGS),
        ("gateway again", None, "floor", "twin", ()),
        ("gateway+cache", None, "answer floor", "cache", CACHE_SETTINGS),
    ]
    if uvloop is not None:
        variants.append(("gateway+uvloop", uvloop, "floor+uvloop", "", ()))
    for name, paths, floor, role, settings in variants:
        try:
            proc, port, listen = start_exporter(
                procs, workdir, name, upstream, True, paths, settings
            )
        except RuntimeError as exc:
            print(f"  NOTE {name} skipped: {' '.join(str(exc).split())[:400]}")
            continue
        assert listen is not None
        if not wait_listening(listen, LISTEN_TIMEOUT, proc):
            print(
                f"  NOTE {name} skipped: nothing listens on its gateway port {listen} "
                f"{LISTEN_TIMEOUT:g}s after /-/ready: {tail(workdir / f'{name}.log')}"
            )
            procs.stop(proc)
            continue
        pin(proc.pid, proxy_cores)
        # Streams bypass the cache: through gateway+cache they would measure the gateway again;
        # the twin is there for the queue's aim, which concerns plain requests.
        phases = PHASES[:2] if role in ("cache", "twin") else PHASES
        found.append(
            Contender(
                name,
                listen,
                proc.pid,
                floor=floor,
                role=role,
                phases=phases,
                metrics_port=port,
            )
        )
    reference: subprocess.Popen[str] | None = None
    reference_port = None
    if found:
        reference, reference_port, _ = start_exporter(
            procs, workdir, "exporter-alone", upstream, False, None
        )
        pin(reference.pid, proxy_cores)
    return found, reference, reference_port


def start_floors(
    procs: Group, upstream: int, uvloop: list[str] | None, proxy_cores: set[int] | None
) -> list[Contender]:
    """The floor contenders, without and with uvloop."""
    floors = []
    variants: list[tuple[str, list[str] | None]] = [("floor", None)]
    if uvloop is not None:
        variants.append(("floor+uvloop", uvloop))
    for name, paths in variants:
        flags = ["--uvloop"] if paths is not None else []
        proc = procs.start(
            [str(Path(__file__).resolve()), "--serve-floor", str(upstream), *flags],
            paths=paths or (),
        )
        (port,) = read_ports(proc)
        pin(proc.pid, proxy_cores)
        floors.append(Contender(name, port, proc.pid))
    # The floor of a cache hit: plain requests only, like gateway+cache.
    proc = procs.start([str(Path(__file__).resolve()), "--serve-answer"])
    (port,) = read_ports(proc)
    pin(proc.pid, proxy_cores)
    floors.append(Contender("answer floor", port, proc.pid, role="answer", phases=PHASES[:2]))
    return floors


def start_litellm(
    procs: Group, workdir: Path, program: Path, upstream: int, proxy_cores: set[int] | None
) -> Contender | None:
    """LiteLLM's proxy relaying model m to the upstream, or None with a note."""
    config, log_path = workdir / "litellm.yaml", workdir / "litellm.log"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{upstream}/v1\n"
        "      api_key: x\n"
        f"general_settings:\n  master_key: {API_KEY}\n"
    )
    port = free_port()
    with log_path.open("w") as log:
        proc = procs.start(
            ["--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            log,
            program=str(program),
            stdout=log,
            env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"},
        )
    deadline = time.monotonic() + LITELLM_START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        with suppress(OSError):
            if get(port, "/health/liveliness", {}, timeout=2.0)[0] == 200:
                pin(proc.pid, proxy_cores)
                return Contender("litellm", port, proc.pid, share=SLOW_SHARE)
        time.sleep(0.25)
    print(f"  NOTE LiteLLM skipped: not ready within {LITELLM_START_TIMEOUT:g}s: {tail(log_path)}")
    procs.stop(proc)
    return None


# --- the run -----------------------------------------------------------------------------------


async def check_bodies(contenders: list[Contender]) -> None:
    """Whether each proxy relays the upstream's bodies unchanged, plain and streamed; and
    whether a cache answers a repeated request with the same body, marked as a hit."""
    direct = contenders[0]
    plain, streamed = [(await fetch_once(direct.port, stream)).body for stream in (False, True)]
    for contender in contenders[1:]:
        checks = [("plain", False, plain), ("stream", True, streamed)]
        if contender.role == "cache":
            checks = [("plain", False, plain), ("plain again", False, plain)]
        elif contender.role == "answer":
            checks = [("plain", False, plain)]
        got = []
        for label, stream, body in checks:
            try:
                reply = await fetch_once(contender.port, stream)
            except (OSError, TimeoutError) as exc:
                got.append(f"{label} failed ({exc!r})")
                continue
            hit = f" (X-Cache: {reply.cache or 'none'})" if contender.role == "cache" else ""
            got.append(f"{label} {'same' if reply.body == body else 'differs'}{hit}")
        contender.identical = ", ".join(got)


async def measure(contenders: list[Contender], plan: Plan, upstream_pid: int) -> None:
    """Interleaved rounds: every phase of every contender, in a rotating order."""
    sizes = {PHASES[0]: plan.single, PHASES[1]: plan.many, PHASES[2]: plan.streams}
    await check_bodies(contenders)
    for round_ in range(plan.rounds):
        started = time.monotonic()
        order = [contenders[0], *_rotate(contenders[1:], round_)]
        for phase in PHASES:
            stream = phase == "stream"
            concurrency = 1 if phase == PHASES[0] else CONCURRENCY
            for contender in order:
                if phase not in contender.phases:
                    continue
                count = max(concurrency, int(sizes[phase] * contender.share))
                budget = plan.stream_budget if stream else plan.budget
                batch = await run_batch(
                    contender.port,
                    concurrency,
                    count,
                    budget,
                    stream,
                    (contender.pid, upstream_pid),
                )
                contender.batches[phase].append(batch)
        print(
            f"  round {round_ + 1}/{plan.rounds} in {time.monotonic() - started:.1f}s", flush=True
        )


def _rotate(items: list[Contender], by: int) -> list[Contender]:
    """items rotated left by `by` places."""
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


def scrape_series(port: int) -> tuple[int, dict[str, float]]:
    """An exporter's /metrics: its status, and each series (name{labels}) with its value."""
    status, body = get(port, "/metrics", PLAIN_HEADERS)
    series = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with suppress(ValueError):
                series[name] = float(value)
    return status, series


def metric(series: dict[str, float], name: str, label: str = "") -> float:
    """The sum of a metric's series, those with label (as name="value") only if given."""
    return sum(
        value
        for key, value in series.items()
        if key.partition("{")[0] == name and (not label or label in key)
    )


def read_counted(contender: Contender) -> None:
    """What the exporter's llm_gateway_requests_total says it relayed, against what was sent."""
    # Every request of every batch, warm-ups included, and the two of check_bodies.
    sent = sum(b.sent for phase in PHASES for b in contender.batches[phase]) + 2
    assert contender.metrics_port is not None
    try:
        status, contender.series = scrape_series(contender.metrics_port)
    except OSError as exc:
        contender.counted = f"/metrics failed: {exc!r}"
        return
    total = metric(contender.series, "llm_gateway_requests_total")
    contender.counted = (
        f"/metrics (status {status}): llm_gateway_requests_total {total:.0f}; sent {sent}"
    )


@dataclass
class FillPass:
    """One pass of filling the bounded cache: what was sent, and what the exporter held after."""

    answers: int
    content_bytes: int  # the answers' content, as asked for
    batch: Batch
    rss: int
    series: dict[str, float]


@dataclass
class Fill:
    """The exporter whose cache was filled past its bound, and what it held."""

    max_bytes: int = FILL_MAX_BYTES
    warm: Batch = field(default_factory=Batch)
    baseline_rss: int = 0  # after the warm-up, before filling
    passes: list[FillPass] = field(default_factory=list)
    note: str = ""  # why it was not measured

    def growth(self) -> float:
        """The most RSS grew over the baseline after any pass, in bytes."""
        return max(p.rss for p in self.passes) - self.baseline_rss if self.passes else NAN


def fill_requests(port: int, start: int, content_bytes: int) -> tuple[list[bytes], int, int]:
    """Distinct deterministic requests from number start on whose answers' content adds up to
    content_bytes or just more, sizes spread over FILL_MIN_PAD..FILL_MAX_PAD; the requests,
    the next number, and their answers' content bytes."""
    requests, index, total = [], start, 0
    while total < content_bytes:
        size = FILL_MIN_PAD + index * 12289 % (FILL_MAX_PAD - FILL_MIN_PAD + 1)
        requests.append(request_bytes(port, False, f"fill {index}", size))
        total += size
        index += 1
    return requests, index, total


def run_fill(
    procs: Group, workdir: Path, upstream: int, passes: int, proxy_cores: set[int] | None
) -> Fill:
    """An exporter whose gateway cache holds at most FILL_MAX_BYTES, filled passes times over."""
    fill = Fill()
    name = "gateway-fill"
    try:
        proc, port, listen = start_exporter(
            procs, workdir, name, upstream, True, None, FILL_SETTINGS
        )
    except RuntimeError as exc:
        fill.note = " ".join(str(exc).split())[:400]
        return fill
    assert listen is not None
    try:
        if not wait_listening(listen, LISTEN_TIMEOUT, proc):
            fill.note = f"nothing listens on its gateway port: {tail(workdir / f'{name}.log')}"
            return fill
        pin(proc.pid, proxy_cores)
        # Small answers first, so that what every request uses once is in the baseline.
        warm = [request_bytes(listen, False, f"warm {i}", 1024) for i in range(FILL_WARMUPS)]
        fill.warm = asyncio.run(send_all(listen, warm, CONCURRENCY))
        scrape_series(port)
        fill.baseline_rss = group_rss(proc.pid)
        index = 0
        for _ in range(passes):
            requests, index, size = fill_requests(listen, index, fill.max_bytes)
            batch = asyncio.run(send_all(listen, requests, CONCURRENCY))
            _, series = scrape_series(port)
            fill.passes.append(FillPass(len(requests), size, batch, group_rss(proc.pid), series))
    except OSError as exc:
        fill.note = f"failed: {exc!r}"
    finally:
        procs.stop(proc)
    return fill


def run(plan: Plan, cores: tuple[set[int], set[int]] | None) -> tuple[list[Contender], int, Fill]:
    """Start every contender, measure them all, read their memory, fill a bounded cache, stop
    everything."""
    procs = Group(ROOT)
    proxy_cores = cores[0] if cores else None
    reference_rss = 0
    fill = Fill(note="not run")
    try:
        with tempfile.TemporaryDirectory(prefix="llm-exporter-gateway-bench-") as tmp:
            workdir = Path(tmp)
            uvloop = ensure_uvloop(workdir)
            litellm_program = ensure_litellm(workdir) if plan.litellm else None
            upstream_proc = procs.start([str(Path(__file__).resolve()), "--serve-upstream"])
            (upstream,) = read_ports(upstream_proc)
            contenders = [Contender("direct", upstream, None)]
            floors = start_floors(procs, upstream, uvloop, proxy_cores)
            gateways, reference, _ = start_gateways(procs, workdir, upstream, uvloop, proxy_cores)
            contenders += [floors[0], *gateways, *floors[1:]]
            if litellm_program is not None:
                litellm = start_litellm(procs, workdir, litellm_program, upstream, proxy_cores)
                if litellm is not None:
                    contenders.append(litellm)
            print(f"  contenders: {', '.join(c.name for c in contenders)}", flush=True)
            asyncio.run(measure(contenders, plan, upstream_proc.pid))
            for contender in contenders:
                if contender.pid is not None:
                    contender.rss = group_rss(contender.pid)
                if contender.metrics_port is not None:
                    read_counted(contender)
            if reference is not None:
                reference_rss = rss_bytes(reference.pid)
            print("  filling a bounded cache", flush=True)
            fill = run_fill(procs, workdir, upstream, plan.fill_passes, proxy_cores)
    finally:
        procs.stop_all()
    return contenders, reference_rss, fill


# --- the report --------------------------------------------------------------------------------


def _pair(a: float, b: float, width: int = 13) -> str:
    """Two numbers as a/b, right-aligned; "-" when there are none."""
    if math.isnan(a) and math.isnan(b):
        return "-".rjust(width)
    return f"{a:.2f}/{b:.2f}".rjust(width)


def _cell(value: float, spec: str, width: int) -> str:
    """A number formatted by spec (a trailing % printed as is), or "-" when there is none."""
    text = "-" if math.isnan(value) else format(value, spec.rstrip("%")) + "%" * spec.endswith("%")
    return text.rjust(width)


def print_tables(contenders: list[Contender], reference_rss: int) -> None:
    """The latency table (added over direct) and the cost table."""
    direct = contenders[0]
    base = {
        (phase, first): (pct(direct.values(phase, first), 50), pct(direct.values(phase, first), 99))
        for phase in PHASES
        for first in (False, True)
    }
    print(
        "\nlatency in ms, p50/p99: direct absolute, the others added over direct "
        "(their percentile minus direct's)"
    )
    header = (
        f"{'':<15} | {'c=1':>13} | {'c=16':>13} | {'stream TTFB':>13} | {'stream last':>13} | "
        f"{'timed c=1/c=16/streams':>22} | errors"
    )
    print(header)
    print("-" * len(header))
    for c in contenders:
        cells = []
        for phase, first in COLUMNS:
            p50, p99 = pct(c.values(phase, first), 50), pct(c.values(phase, first), 99)
            if c is not direct:
                p50, p99 = p50 - base[phase, first][0], p99 - base[phase, first][1]
            cells.append(_pair(p50, p99))
        counts = "/".join(str(c.requests(p)) if p in c.phases else "-" for p in PHASES)
        errors = sum(int(c.total(p, "errors")) for p in PHASES)
        print(f"{c.name:<15} | {' | '.join(cells)} | {counts:>22} | {errors}")
    print(
        "\ncost: requests/s at c=16 with the proxy on one core; the proxy's and the load's "
        "(this process and the upstream) share of a core then; CPU us per request"
    )
    header = (
        f"{'':<15} | {'req/s':>7} | {'proxy core':>10} | {'load core':>9} | "
        f"{'CPU us c=1':>10} | {'c=16':>6} | {'stream':>7} | {'x floor c=1/c=16':>16} | "
        f"{'RSS MiB':>7}"
    )
    print(header)
    print("-" * len(header))
    by_name = {c.name: c for c in contenders}
    for c in contenders:
        floor = by_name.get(c.floor)
        ratios = [c.cpu_us(p) / floor.cpu_us(p) if floor else NAN for p in PHASES[:2]]
        cells = [
            _cell(c.rps(), ".0f", 7),
            _cell(c.core_share() * 100, ".0f%", 10),
            _cell(c.load_share() * 100, ".0f%", 9),
            *(
                _cell(c.cpu_us(p) if c.pid else NAN, ".0f", w)
                for p, w in zip(PHASES, (10, 6, 7), strict=True)
            ),
            _pair(ratios[0], ratios[1], 16) if floor else _cell(NAN, "", 16),
            _cell(c.rss / 2**20 if c.rss else NAN, ".1f", 7),
        ]
        print(f"{c.name:<15} | {' | '.join(cells)}")
    if reference_rss:
        print(f"exporter without a gateway, idle: RSS {reference_rss / 2**20:.1f} MiB")
    for c in contenders:
        problems = [b.error for p in PHASES for b in c.batches[p] if b.error]
        if problems:
            print(f"  {c.name}: first error: {problems[0][:200]}")
        if c.identical:
            print(f"  {c.name}: bodies relayed vs direct: {c.identical}")
        if c.counted:
            print(f"  {c.name}: {c.counted}")


def verdicts(contenders: list[Contender]) -> list[str]:
    """One line per aim and gateway variant: met or not, with the number."""
    direct = contenders[0]
    by_name = {c.name: c for c in contenders}
    lines = []
    for c in contenders:
        if not c.name.startswith("gateway") or c.role:
            continue
        floor = by_name.get(c.floor)
        added = pct(c.values(PHASES[0]), 50) - pct(direct.values(PHASES[0]), 50)
        ttfb = pct(c.values("stream", True), 50) - pct(direct.values("stream", True), 50)
        ratios = [c.cpu_us(p) / floor.cpu_us(p) if floor else NAN for p in PHASES[:2]]
        rss_mb = c.rss / 1e6
        checks = [
            (added <= AIM_ADDED_P50_MS, f"added p50 at c=1 <= {AIM_ADDED_P50_MS} ms: {added:.2f} ms"),
            (c.rps() >= AIM_RPS, f"req/s on one core >= {AIM_RPS:,.0f}: {c.rps():,.0f}"),
            (
                max(ratios) <= AIM_CPU_RATIO,
                f"CPU per request <= {AIM_CPU_RATIO}x {c.floor}'s: {ratios[0]:.2f}x at c=1, "
                f"{ratios[1]:.2f}x at c=16",
            ),
            (ttfb <= AIM_TTFB_MS, f"stream first byte added p50 at c=16 <= {AIM_TTFB_MS} ms: {ttfb:.2f} ms"),
            (rss_mb <= AIM_RSS_MB, f"RSS <= {AIM_RSS_MB:g} MB: {rss_mb:.1f} MB ({c.rss / 2**20:.1f} MiB)"),
        ]  # fmt: skip
        lines += [_verdict(c.name, ok, text) for ok, text in checks]
    return lines


UNCLEAR = "unclear"


def _verdict(name: str, ok: bool | str, text: str) -> str:
    """One aim's line: met, not met, or unclear (the measurement cannot tell)."""
    status = ok if isinstance(ok, str) else "met" if ok else "NOT met"
    return f"{name:<15} {status:<7}  {text}"


def _noise(twin: Contender | None, plain: Contender, phase: str, latency: bool) -> float:
    """Two standard errors of a pooled difference from the gateway, in us, as the twin's
    round-by-round differences from it show them (the same work: only noise); NaN without."""
    if twin is None:
        return NAN
    cost = queue_cost(twin, plain)
    rounds = cost.p50_rounds if latency else cost.cpu_rounds[phase]
    rounds = [r for r in rounds if not math.isnan(r)]
    if len(rounds) < 2:
        return NAN
    return 2 * statistics.stdev(rounds) / math.sqrt(len(rounds))


def _judge(difference: float, noise: float) -> bool | str:
    """Met or not against AIM_QUEUE_US; unclear when the noise is larger than the aim."""
    if not math.isnan(noise) and noise > AIM_QUEUE_US:
        return UNCLEAR
    return difference <= AIM_QUEUE_US


def _spread(values: list[float]) -> str:
    """The range of values, signed, as min..max; "-" if there are none."""
    values = [v for v in values if not math.isnan(v)]
    return f"{min(values):+.0f}..{max(values):+.0f}" if values else "-"


@dataclass
class QueueCost:
    """What the queue adds: gateway+queue minus the gateway, in microseconds, pooled over the
    rounds and round by round."""

    p50: float  # latency p50 at c=1
    p50_rounds: list[float]
    cpu: dict[str, float]  # CPU per request, by phase
    cpu_rounds: dict[str, list[float]]


def queue_cost(queued: Contender, plain: Contender) -> QueueCost:
    """The queue's cost per request, from batches that ran in the same rounds."""

    def rounds(phase: str, measure: Callable[[Batch], float]) -> list[float]:
        pairs = zip(queued.batches[phase], plain.batches[phase], strict=False)
        return [measure(a) - measure(b) for a, b in pairs]

    c1 = PHASES[0]
    return QueueCost(
        p50=(pct(queued.values(c1), 50) - pct(plain.values(c1), 50)) * 1000,
        p50_rounds=rounds(c1, Batch.p50_us),
        cpu={p: queued.cpu_us(p) - plain.cpu_us(p) for p in PHASES},
        cpu_rounds={p: rounds(p, Batch.cpu_us) for p in PHASES},
    )


def _print_difference(label: str, cost: QueueCost, phases: tuple[str, ...]) -> None:
    """One contender minus the gateway: latency p50 at c=1 and CPU per request, in us."""
    print(
        f"  {label}: latency p50 at c=1 {cost.p50:+.1f} (rounds {_spread(cost.p50_rounds)}); "
        "CPU per request "
        + ", ".join(
            f"{'per stream' if p == 'stream' else p} {cost.cpu[p]:+.1f} "
            f"(rounds {_spread(cost.cpu_rounds[p])})"
            for p in phases
        )
    )


def print_queue_and_cache(
    contenders: list[Contender], reference_rss: int, fill: Fill, costs: dict[str, float]
) -> None:
    """What the queue costs, what a cache hit costs, and what a full cache holds."""
    by_role = {c.role: c for c in contenders if c.role}
    by_name = {c.name: c for c in contenders}
    direct, plain = contenders[0], by_name.get("gateway")
    queued, twin, cached = by_role.get("queue"), by_role.get("twin"), by_role.get("cache")
    if queued is not None and plain is not None:
        print(
            "\nadmission queue, uncontended (max_concurrent 64): each minus the gateway, same "
            "rounds; us, pooled (round by round min..max)"
        )
        print(
            f"  the gateway itself: latency p50 at c=1 {pct(plain.values(PHASES[0]), 50):.3f} "
            "ms; CPU per request "
            + ", ".join(
                f"{'per stream' if p == 'stream' else p} {plain.cpu_us(p):.0f} us" for p in PHASES
            )
        )
        _print_difference("gateway+queue", queue_cost(queued, plain), PHASES)
        if twin is not None:
            _print_difference(
                "gateway again, configured as the gateway: the noise",
                queue_cost(twin, plain),
                twin.phases,
            )
            noises = [
                f"latency p50 at c=1 +-{_noise(twin, plain, PHASES[0], True):.0f}",
                *(f"CPU at {p} +-{_noise(twin, plain, p, False):.0f}" for p in twin.phases),
            ]
            print(
                "  noise of a pooled difference (two standard errors of gateway again's "
                f"round-by-round differences): {', '.join(noises)} us"
            )
        if "admission_us" in costs:
            print(
                f"  admission alone (admit, then release), in one process: "
                f"{costs['admission_us']:.1f} us per request"
            )
        if "lifecycle_us" in costs:
            print(
                "  the model lifecycle's begin and end of a request, in one process: "
                f"{costs['lifecycle_us']:.1f} us, {costs['lifecycle_limited_us']:.1f} us"
                " with max_loaded set (the model loaded)"
            )
    if cached is not None:
        c1, c16 = PHASES[0], PHASES[1]
        timed = sum(cached.requests(p) for p in cached.phases)
        hits = sum(int(cached.total(p, "hits")) for p in cached.phases)
        counts = {
            result: metric(cached.series, "llm_gateway_cache_lookups_total", f'result="{result}"')
            for result in ("hit", "miss", "bypass")
        }
        lookups = ", ".join(f"{result} {count:.0f}" for result, count in counts.items())
        print(
            "\nresponse cache: gateway+cache, every request deterministic (temperature 0), "
            "not streamed"
        )
        print(
            f"  {hits} of {timed} timed replies carried X-Cache: HIT; its /metrics: lookups "
            f"{lookups}; entries {metric(cached.series, 'llm_gateway_cache_entries'):.0f}"
        )
        hit_p50, direct_p50 = pct(cached.values(c1), 50), pct(direct.values(c1), 50)
        print(
            f"  c=1: hit p50 {hit_p50:.3f} ms, p99 {pct(cached.values(c1), 99):.3f} ms; direct "
            f"p50 {direct_p50:.3f} ms, so {hit_p50 - direct_p50:+.3f} ms over direct; the "
            f"gateway's {cached.cpu_us(c1):.0f} us of CPU per hit"
        )
        print(
            f"  c=16: {cached.rps():,.0f} hits/s with the gateway on one core, which it used "
            f"{cached.core_share() * 100:.0f}%, the load generator's core {cached.load_share() * 100:.0f}%; "
            f"{cached.cpu_us(c16):.0f} us of CPU per hit (one core's worth: "
            f"{1e6 / cached.cpu_us(c16):,.0f}/s)"
        )
        print(
            f"  load generator: direct at c=16 it sent {direct.rps():,.0f} req/s while sharing "
            f"its core with the upstream ({direct.load_share() * 100:.0f}% of it): alone it "
            "sends at least that many"
        )
        answer = by_role.get("answer")
        if answer is not None:
            print(
                f"  answer floor (bare aiohttp, answering from memory): c=1 p50 "
                f"{pct(answer.values(c1), 50):.3f} ms; c=16 {answer.rps():,.0f} req/s, its core "
                f"{answer.core_share() * 100:.0f}%; CPU per request {answer.cpu_us(c1):.0f} us "
                f"at c=1, {answer.cpu_us(c16):.0f} us at c=16"
            )
        if "hit_us" in costs:
            print(
                f"  the cache's own work per hit (key from canonical JSON, lookup, answer), in "
                f"one process: {costs['hit_us']:.1f} us"
            )
        if cached.rps() < AIM_HIT_RPS and cached.core_share() < 0.9:
            print(
                f"  NOTE the gateway used {cached.core_share() * 100:.0f}% of its core at c=16: "
                "something besides its CPU held its hits/s back (the round trips of 16 "
                "connections, or other work on its core: compare the other proxies' share)"
            )
    print(
        f"\ncache filled past its bound: max_bytes {fill.max_bytes >> 20} MiB, answers of "
        f"{FILL_MIN_PAD >> 10}-{FILL_MAX_PAD >> 10} KiB of content, {CONCURRENCY} connections"
    )
    if fill.note:
        print(f"  NOTE not measured: {fill.note}")
        return
    print(
        f"  after {fill.warm.sent} small answers ({fill.warm.errors} errors), before filling: "
        f"RSS {fill.baseline_rss / 2**20:.1f} MiB"
        + (
            f"; the exporter without a gateway, idle: {reference_rss / 2**20:.1f} MiB"
            if reference_rss
            else ""
        )
    )
    for number, done in enumerate(fill.passes, 1):
        series = done.series
        evicted = metric(series, "llm_gateway_cache_evictions_total")
        print(
            f"  pass {number}: {done.answers} answers ({done.content_bytes / 2**20:.1f} MiB of "
            f"content) in {done.batch.wall:.1f}s, {done.batch.errors} errors, {done.batch.hits} "
            f"hits: RSS {done.rss / 2**20:.1f} MiB ({(done.rss - fill.baseline_rss) / 2**20:+.1f}); "
            f"cache {metric(series, 'llm_gateway_cache_bytes') / 2**20:.1f} MiB in "
            f"{metric(series, 'llm_gateway_cache_entries'):.0f} entries, {evicted:.0f} evicted"
        )
        if done.batch.error:
            print(f"    first error: {done.batch.error[:200]}")


def queue_and_cache_verdicts(
    contenders: list[Contender], fill: Fill, costs: dict[str, float]
) -> list[str]:
    """One line per aim of the queue and the cache: met or not, with the number."""
    by_role = {c.role: c for c in contenders if c.role}
    by_name = {c.name: c for c in contenders}
    direct, plain = contenders[0], by_name.get("gateway")
    queued, cached = by_role.get("queue"), by_role.get("cache")
    lines = []
    if queued is not None and plain is not None:
        twin = by_role.get("twin")
        cost = queue_cost(queued, plain)
        c1, c16 = PHASES[0], PHASES[1]
        p50_noise = _noise(twin, plain, c1, True)
        lines.append(
            _verdict(
                queued.name,
                _judge(cost.p50, p50_noise),
                f"admission adds <= {AIM_QUEUE_US:g} us to the p50 at c=1: {cost.p50:+.1f} us "
                f"(noise +-{p50_noise:.0f} us)",
            )
        )
        for phase in (c1, c16):
            noise = _noise(twin, plain, phase, False)
            lines.append(
                _verdict(
                    queued.name,
                    _judge(cost.cpu[phase], noise),
                    f"admission adds <= {AIM_QUEUE_US:g} us of CPU per request at {phase}: "
                    f"{cost.cpu[phase]:+.1f} us (noise +-{noise:.0f} us)",
                )
            )
        if "admission_us" in costs:
            lines.append(
                _verdict(
                    queued.name,
                    costs["admission_us"] <= AIM_QUEUE_US,
                    f"admission alone, in one process, <= {AIM_QUEUE_US:g} us: "
                    f"{costs['admission_us']:.1f} us",
                )
            )
    if cached is not None:
        timed = sum(cached.requests(p) for p in cached.phases)
        hits = sum(int(cached.total(p, "hits")) for p in cached.phases)
        all_hits = bool(timed) and hits == timed
        proof = "" if all_hits else f" (but only {hits} of {timed} replies were hits)"
        hit_p50 = pct(cached.values(PHASES[0]), 50)
        answer = by_role.get("answer")
        floor_p50 = floor_rps = ""
        if answer is not None:
            floor_p50 = f", answer floor {pct(answer.values(PHASES[0]), 50):.3f} ms"
            floor_rps = f", answer floor {answer.rps():,.0f}"
        bound = ""
        if cached.rps() < AIM_HIT_RPS:
            bound = (
                f"; gateway core {cached.core_share() * 100:.0f}%, load generator's ceiling "
                f">= {direct.rps():,.0f} req/s"
            )
        lines += [
            _verdict(
                cached.name,
                all_hits and hit_p50 <= AIM_HIT_P50_MS,
                f"cache hit p50 at c=1 <= {AIM_HIT_P50_MS} ms: {hit_p50:.3f} ms "
                f"(direct {pct(direct.values(PHASES[0]), 50):.3f} ms{floor_p50}){proof}",
            ),
            _verdict(
                cached.name,
                all_hits and cached.rps() >= AIM_HIT_RPS,
                f"cache hits/s on one core >= {AIM_HIT_RPS:,.0f}: {cached.rps():,.0f}"
                f"{floor_rps}{bound}{proof}",
            ),
        ]
    if not fill.note and fill.passes:
        limit = fill.max_bytes + AIM_FILL_OVERHEAD_MIB * 2**20
        last = fill.passes[-1].series
        lines.append(
            _verdict(
                "gateway-fill",
                fill.growth() <= limit,
                f"RSS growth with the cache filled {len(fill.passes)}x past max_bytes <= "
                f"{fill.max_bytes >> 20} MiB + {AIM_FILL_OVERHEAD_MIB:g} MiB: "
                f"{fill.growth() / 2**20:.1f} MiB (cache "
                f"{metric(last, 'llm_gateway_cache_bytes') / 2**20:.1f} MiB, "
                f"{metric(last, 'llm_gateway_cache_evictions_total'):.0f} evicted)",
            )
        )
    return lines


def choose_cores() -> tuple[set[int], set[int]] | None:
    """One core for the proxies, another for this process and the upstream; None if one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, {cpus[1]}


def main() -> int:
    """Parse the flags, run the bench or one of its child roles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests: under a minute")
    parser.add_argument(
        "--litellm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure LiteLLM's proxy too (default: in the full run, not with --quick)",
    )
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-answer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--uvloop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--component-costs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.component_costs is not None:
        _component_costs(args.component_costs)
        return 0
    if args.uvloop:  # on PYTHONPATH from .cache/bench/uvloop, not a dependency of the tree
        importlib.import_module("uvloop").install()
    if args.serve_upstream:
        asyncio.run(_serve_upstream())
        return 0
    if args.serve_floor is not None:
        asyncio.run(_serve_floor(args.serve_floor))
        return 0
    if args.serve_answer:
        asyncio.run(_serve_answer())
        return 0
    plan = QUICK if args.quick else FULL
    if args.litellm is not None:
        plan = replace(plan, litellm=args.litellm)
    cores = choose_cores()
    if cores is not None:
        os.sched_setaffinity(0, cores[1])
    started = time.monotonic()
    print(
        f"llm-exporter gateway bench: {'quick' if args.quick else 'full'}, {plan.rounds} rounds, "
        f"{os.cpu_count()} CPUs, "
        + (
            f"proxies on CPU {min(cores[0])}, load and upstream on CPU {min(cores[1])}"
            if cores
            else "one CPU: nothing pinned"
        ),
        flush=True,
    )
    contenders, reference_rss, fill = run(plan, cores)
    # Timed alone, after everything else has stopped.
    costs = component_costs(cores[0] if cores else None)
    print_tables(contenders, reference_rss)
    print_queue_and_cache(contenders, reference_rss, fill, costs)
    lines = verdicts(contenders) + queue_and_cache_verdicts(contenders, fill, costs)
    if lines:
        print("\naims")
        print("\n".join(lines))
    print(f"total {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
