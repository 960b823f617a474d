"""An Ollama stand-in with Ollama's model lifecycle, for the lifecycle tests.

Ollama cannot run here. This server keeps models the way Ollama's scheduler does, as its
docs and source describe it (ollama/ollama docs/faq.md "How do I keep a model loaded in
memory or make it unload immediately?", docs/api.md keep_alive and /api/ps, and
server/sched.go, v0.33):

- A request for a model that is not loaded loads it first (load_seconds); while it loads it
  is not in /api/ps. If max_loaded models are loaded, an idle one is evicted first (Ollama's
  scheduler picks the idle runner with the shortest keep-alive, then by name); if none is
  idle, the request waits.
- When a model's last request ends, its expiry is set to the end plus its keep-alive: the
  request's keep_alive if it has one, else the model's current one, else the server's default
  (OLLAMA_KEEP_ALIVE, 5m). keep_alive 0 unloads it when idle; a negative one keeps it for ever
  (/api/ps then shows an expiry centuries ahead). /api/ps moves no expiry.
- An empty /api/generate (no prompt) only loads (done_reason "load") or, with keep_alive 0,
  unloads (done_reason "unload").
- keep_alive is a number of seconds or a Go duration string ("5m", "1h30m", "-1").

Every load and unload is written to `history` with its cause: the ground truth the
exporter's events are checked against.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .standins import StandIn

# Ollama turns a negative keep-alive into the longest Go duration: about 292 years.
FOREVER = 292 * 365 * 86400.0
NEVER_SET = "0001-01-01T00:00:00Z"  # Go's zero time: a runner whose timer never started
_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float | None:
    """Seconds from a keep_alive as Ollama's api.Duration reads it; None if not given."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts:
        raise ValueError(f"bad keep_alive {value!r}")
    return sum(float(number) * _UNIT[unit] for number, unit in parts)


@dataclass
class Runner:
    """One loaded model."""

    keep_alive: float  # seconds; negative: for ever
    expires_at: float = 0.0  # 0: not set yet (its first request is still running)
    busy: int = 0
    size: int = 4_000_000_000


@dataclass
class OllamaLifecycle:
    """Ollama's scheduler, in miniature."""

    on_disk: tuple[str, ...]
    default_keep_alive: float = 300.0
    load_seconds: float = 0.05
    generate_seconds: float = 0.01
    max_loaded: int = 3
    loaded: dict[str, Runner] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)
    history: list[tuple[float, str, str, str]] = field(default_factory=list)  # at, model, what, why
    chat_requests: list[dict[str, Any]] = field(default_factory=list)
    reported_loads: list[float] = field(default_factory=list)  # load_duration of loads, seconds
    server: StandIn | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def expire(self, now: float) -> None:
        """Unload the idle models whose keep-alive has run out."""
        for name, runner in list(self.loaded.items()):
            if runner.busy == 0 and 0 < runner.expires_at <= now:
                self._unload(name, "idle", now)

    def _unload(self, name: str, why: str, now: float) -> None:
        del self.loaded[name]
        self.history.append((now, name, "unloaded", why))

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def acquire(self, name: str, keep_alive: float | None) -> tuple[Runner, float]:
        """The model's runner, loaded first if need be; and the seconds the load took."""
        loaded_in = 0.0
        for _ in range(10_000):
            self.expire(time.time())
            runner = self.loaded.get(name)
            if runner is not None and name not in self.loading:
                runner.busy += 1
                return runner, loaded_in
            if name in self.loading:
                await asyncio.sleep(0.005)
                continue
            if len(self.loaded) >= self.max_loaded:
                # A negative keep-alive is Ollama's longest duration: such a model goes last.
                idle = [
                    (FOREVER if r.keep_alive < 0 else r.keep_alive, n)
                    for n, r in self.loaded.items()
                    if r.busy == 0
                ]
                if not idle:
                    async with self.changed:
                        await asyncio.wait_for(self.changed.wait(), 30)
                    continue
                self._unload(min(idle)[1], "evicted", time.time())
            self.loading.add(name)
            started = time.time()
            await asyncio.sleep(self.load_seconds)
            duration = keep_alive if keep_alive is not None else self.default_keep_alive
            self.loaded[name] = Runner(duration)
            self.loading.discard(name)
            loaded_in = time.time() - started
            self.history.append((time.time(), name, "loaded", ""))
        raise AssertionError("model never became available")

    def release(self, name: str, runner: Runner, keep_alive: float | None) -> None:
        """A request ended: restart the model's keep-alive timer."""
        runner.busy -= 1
        if keep_alive is not None:
            runner.keep_alive = keep_alive
        now = time.time()
        if runner.busy == 0:
            if runner.keep_alive == 0:
                self._unload(name, "requested", now)
            else:
                runner.expires_at = now + (FOREVER if runner.keep_alive < 0 else runner.keep_alive)

    def ps(self) -> dict[str, Any]:
        """/api/ps: the loaded models with their expiry."""
        self.expire(time.time())
        models = []
        for name, runner in sorted(self.loaded.items()):
            if name in self.loading:
                continue
            stamp = NEVER_SET
            if runner.expires_at:
                moment = datetime.fromtimestamp(runner.expires_at, UTC)
                stamp = moment.isoformat().replace("+00:00", "Z")
            models.append(
                {
                    "name": name,
                    "model": name,
                    "size": runner.size,
                    "size_vram": runner.size,
                    "details": {"format": "gguf", "family": "llama"},
                    "expires_at": stamp,
                }
            )
        return {"models": models}

    def routes(self) -> dict[str, Any]:
        """The stand-in's routes."""

        async def version(request: web.Request) -> web.Response:
            return web.json_response({"version": "0.33.0"})

        async def tags(request: web.Request) -> web.Response:
            models = [{"name": n, "size": 4_000_000_000, "details": {}} for n in self.on_disk]
            return web.json_response({"models": models})

        async def ps(request: web.Request) -> web.Response:
            return web.json_response(self.ps())

        async def chat(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.chat_requests.append(body)
            return await self._generate(request, body, stream=body.get("stream", True))

        async def generate(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if not body.get("prompt"):
                return await self._load_or_unload(body)
            return await self._generate(request, body, stream=body.get("stream", True))

        return {
            "/api/version": version,
            "/api/tags": tags,
            "/api/ps": ps,
            "/api/chat": chat,
            "/api/generate": generate,
        }

    async def _load_or_unload(self, body: dict[str, Any]) -> web.Response:
        name = body["model"]
        keep_alive = keep_alive_seconds(body.get("keep_alive"))
        if name not in self.on_disk:
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        if keep_alive == 0:
            runner = self.loaded.get(name)
            if runner is not None and runner.busy == 0:
                self._unload(name, "requested", time.time())
            await self._notify()
            return web.json_response({"model": name, "done": True, "done_reason": "unload"})
        runner, _ = await self.acquire(name, keep_alive)
        self.release(name, runner, keep_alive)
        await self._notify()
        return web.json_response({"model": name, "done": True, "done_reason": "load"})

    async def _generate(
        self, request: web.Request, body: dict[str, Any], *, stream: bool
    ) -> web.StreamResponse:
        name = body["model"]
        if name not in self.on_disk:
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        keep_alive = keep_alive_seconds(body.get("keep_alive"))
        runner, loaded_in = await self.acquire(name, keep_alive)
        reported_ns = int(loaded_in * 1e9) + 1000  # Ollama reports a little even when loaded
        if loaded_in:
            self.reported_loads.append(reported_ns / 1e9)
        try:
            await asyncio.sleep(self.generate_seconds)
            final = {
                "model": name,
                "created_at": "2026-12-01T00:00:00Z",
                "message": {"role": "assistant", "content": ""},
                "response": "",
                "done": True,
                "done_reason": "stop",
                "total_duration": int((loaded_in + self.generate_seconds) * 1e9),
                "load_duration": reported_ns,
                "prompt_eval_count": 3,
                "prompt_eval_duration": 1000,
                "eval_count": 2,
                "eval_duration": int(self.generate_seconds * 1e9),
            }
            if not stream:
                final["message"] = {"role": "assistant", "content": "Hi there"}
                final["response"] = "Hi there"
                return web.json_response(final)
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            for word in ("Hi", " there"):
                chunk = {"model": name, "message": {"role": "assistant", "content": word}}
                chunk |= {"response": word, "done": False}
                await response.write(json.dumps(chunk).encode() + b"\n")
            await response.write(json.dumps(final).encode() + b"\n")
            return response
        finally:
            self.release(name, runner, keep_alive)
            await self._notify()

    async def serve(self) -> StandIn:
        """A started stand-in server."""
        self.server = await StandIn(self.routes()).start()
        return self.server
