"""Small HTTP servers on 127.0.0.1 standing in for providers that cannot run here.

Each replays recorded real shapes (tests/fixtures/README.md says where each comes
from) or misbehaves in one chosen way.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fixture(name: str) -> str:
    """A recorded body from tests/fixtures."""
    return (FIXTURES / name).read_text(encoding="utf-8")


def reply(body: str | bytes, status: int = 200, content_type: str = "application/json") -> Handler:
    """A handler that always answers the same."""
    data = body.encode() if isinstance(body, str) else body

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=data, status=status, content_type=content_type)

    return handle


def json_reply(value: Any, status: int = 200) -> Handler:
    """A handler that answers a JSON document."""
    return reply(json.dumps(value), status)


def hang() -> Handler:
    """A handler that accepts the request and never answers."""

    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    return handle


def delayed(seconds: float, handler: Handler) -> Handler:
    """A handler that answers like another one, after a known delay."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await handler(request)

    return handle


def huge(megabytes: int) -> Handler:
    """A handler that streams a JSON-looking body of the given size."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b" " * (1024 * 1024)
        try:
            for _ in range(megabytes):
                await response.write(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading, as it should
        return response

    return handle


class StandIn:
    """An aiohttp server on a free 127.0.0.1 port serving fixed routes."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = dict(routes)
        self.hits: dict[str, int] = {}
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL."""
        return f"http://127.0.0.1:{self.port}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        handler = self.routes.get(request.path)
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        if handler is None:
            return web.Response(status=404, text="not found")
        return await handler(request)

    async def start(self) -> StandIn:
        """Start serving."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # A hanging handler must not hold the test up when the stand-in stops.
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        """Stop serving."""
        if self.runner is not None:
            await self.runner.cleanup()

    async def __aenter__(self) -> StandIn:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def closed_port() -> int:
    """A 127.0.0.1 port where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Ollama's documented shapes (ollama/ollama docs/api.md), all durations in nanoseconds.
OLLAMA_TAGS = {
    "models": [
        {
            "name": "codellama:13b",
            "modified_at": "2023-11-04T14:56:49.277302595-07:00",
            "size": 7365960935,
            "digest": "9f438cb9cd581fc025612d27f7c1a6669ff83a8bb0ed86c94fcf4c5440555697",
            "details": {
                "format": "gguf",
                "family": "llama",
                "families": None,
                "parameter_size": "13B",
                "quantization_level": "Q4_0",
            },
        },
    ]
}
OLLAMA_PS = {
    "models": [
        {
            "name": "mistral:latest",
            "model": "mistral:latest",
            "size": 5137025024,
            "digest": "2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "7.2B",
                "quantization_level": "Q4_0",
            },
            "expires_at": "2024-06-04T14:38:31.83753-07:00",
            "size_vram": 5137025024,
            # Newer releases add context_length (documented; the value is ours).
            "context_length": 4096,
        }
    ]
}


def ollama_routes(**overrides: Handler) -> dict[str, Handler]:
    """An Ollama server with one model on disk and another one loaded, as in its docs."""
    routes = {
        "/api/version": json_reply({"version": "0.5.1"}),
        "/api/tags": json_reply(OLLAMA_TAGS),
        "/api/ps": json_reply(OLLAMA_PS),
    }
    return {**routes, **overrides}


def llamacpp_routes(
    metrics: str = "llamacpp_metrics.body", **overrides: Handler
) -> dict[str, Handler]:
    """A llama-server replaying the recorded bodies."""
    routes = {
        "/health": reply(fixture("llamacpp_health.body")),
        "/v1/models": reply(fixture("llamacpp_models.body")),
        "/props": reply(fixture("llamacpp_props.body")),
        "/slots": reply(fixture("llamacpp_slots_idle.body")),
        "/metrics": reply(fixture(metrics), content_type="text/plain"),
    }
    return {**routes, **overrides}


def vllm_routes(metrics: str = "vllm_metrics_busy.txt", **overrides: Handler) -> dict[str, Handler]:
    """A vLLM server replaying recorded bodies."""
    routes = {
        "/health": reply(b"", content_type="application/json"),
        "/version": json_reply({"version": "0.32.0"}),
        "/v1/models": reply(fixture("vllm_models.json")),
        "/metrics": reply(fixture(metrics), content_type="text/plain"),
    }
    return {**routes, **overrides}


def sglang_routes(metrics: str = "sglang_metrics.txt", **overrides: Handler) -> dict[str, Handler]:
    """An SGLang server (tensor-parallel over two GPUs) in its source's shapes."""
    routes = {
        "/health": reply(b"", content_type="text/plain"),
        "/v1/models": reply(fixture("sglang_models.json")),
        "/server_info": reply(fixture("sglang_server_info.json")),
        "/metrics": reply(fixture(metrics), content_type="text/plain"),
    }
    return {**routes, **overrides}


def tgi_routes(metrics: str = "tgi_metrics.txt", **overrides: Handler) -> dict[str, Handler]:
    """A TGI server replaying a recorded /metrics page and its /info shape."""
    routes = {
        "/health": reply(b"", content_type="text/plain"),
        "/info": reply(fixture("tgi_info.json")),
        "/metrics": reply(fixture(metrics), content_type="text/plain"),
    }
    return {**routes, **overrides}


def openai_routes(**overrides: Handler) -> dict[str, Handler]:
    """An OpenAI-compatible server whose API base is /v1."""
    routes = {
        "/v1/models": json_reply(
            {
                "object": "list",
                "data": [
                    {"id": "gpt-4o-mini", "object": "model", "owned_by": "system"},
                    {"id": "text-embedding-3-small", "object": "model", "owned_by": "system"},
                ],
            }
        )
    }
    return {**routes, **overrides}


def lmstudio_routes(
    models: str = "lmstudio_models_v1.json", **overrides: Handler
) -> dict[str, Handler]:
    """An LM Studio 0.4 server replaying its docs' model listings (v1 and the older v0)."""
    routes = {
        "/api/v1/models": reply(fixture(models)),
        "/api/v0/models": reply(fixture("lmstudio_models_v0.json")),
    }
    return {**routes, **overrides}


def lmstudio_chat(
    words: tuple[str, ...], load_seconds: float | None = None, bodies: list[Any] | None = None
) -> Handler:
    """LM Studio's streamed POST /api/v1/chat (its docs' streaming events): a message.delta
    per word, then chat.end with the stats; bodies, if given, collects the requests."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if bodies is not None:
            bodies.append(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(data: dict[str, Any]) -> None:
            event = f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"
            await response.write(event.encode())

        instance = body["model"]
        await send({"type": "chat.start", "model_instance_id": instance})
        if load_seconds is not None:
            await send({"type": "model_load.start", "model_instance_id": instance})
            end = {"type": "model_load.end", "load_time_seconds": load_seconds}
            await send({**end, "model_instance_id": instance})
        await send({"type": "prompt_processing.start"})
        await send({"type": "prompt_processing.progress", "progress": 1})
        await send({"type": "prompt_processing.end"})
        await send({"type": "message.start"})
        for word in words:
            await send({"type": "message.delta", "content": word})
            await asyncio.sleep(0.002)
        await send({"type": "message.end"})
        stats: dict[str, Any] = {
            "input_tokens": 17,
            "total_output_tokens": len(words),
            "reasoning_output_tokens": 0,
            "tokens_per_second": 51.03762685242662,
            "time_to_first_token_seconds": 0.814,
        }
        if load_seconds is not None:
            stats["model_load_time_seconds"] = load_seconds
        output = [{"type": "message", "content": "".join(words)}]
        result = {"model_instance_id": instance, "output": output, "stats": stats}
        await send({"type": "chat.end", "result": result})
        return response

    return handle


def trtllm_routes(metrics: str = "trtllm_metrics.txt", **overrides: Handler) -> dict[str, Handler]:
    """A trtllm-serve started with return_perf_metrics: true, replaying its shapes."""
    routes = {
        "/health": reply(b"", content_type="text/plain"),
        "/version": json_reply({"version": "1.2.0"}),
        "/v1/models": reply(fixture("trtllm_models.json")),
        "/prometheus/metrics": reply(fixture(metrics), content_type="text/plain"),
    }
    return {**routes, **overrides}


def ollama_chat(words: tuple[str, ...], first_load_ns: int, later_load_ns: int) -> Handler:
    """Ollama's streamed /api/chat (docs/api.md shapes): a chunk per word, then the statistics.

    The first request reports a large load_duration, as when the model had to be loaded.
    """
    calls = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        stamp = "2023-08-04T08:52:19.385406455-07:00"
        for word in words:
            chunk = {
                "model": body["model"],
                "created_at": stamp,
                "message": {"role": "assistant", "content": word},
                "done": False,
            }
            await response.write(json.dumps(chunk).encode() + b"\n")
            await asyncio.sleep(0.002)
        final = {
            "model": body["model"],
            "created_at": stamp,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "total_duration": 10706818083,
            "load_duration": first_load_ns if calls == 1 else later_load_ns,
            "prompt_eval_count": 26,
            "prompt_eval_duration": 130079000,
            "eval_count": len(words),
            "eval_duration": 4232710000,
        }
        await response.write(json.dumps(final).encode() + b"\n")
        return response

    return handle


def sse_chat(
    words: tuple[str, ...], *, stall_after: int | None = None, usage: bool = True
) -> Handler:
    """An OpenAI-compatible streamed chat completion; stall_after words it stops sending."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, word in enumerate(words):
            if stall_after is not None and index == stall_after:
                await asyncio.sleep(3600)
            chunk = {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": word}}],
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if usage:
            counts = {
                "prompt_tokens": 11,
                "completion_tokens": len(words),
                "total_tokens": 11 + len(words),
            }
            final = {"object": "chat.completion.chunk", "choices": [], "usage": counts}
            await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    return handle
