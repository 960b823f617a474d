"""A stand-in for llama-server in router mode (started without -m: one server, many models).

The shapes follow llama.cpp's own source and README, read at ggml-org/llama.cpp commits
00dd0816129a5210351c78bb90e0828f8eb69f99 (tools/server/server-models.cpp and
server-models.h: the router's routes, status values and refusals; tools/server/server.cpp:
which routes the router proxies) and 00dc8057ab28c9cb4c79a6dd6dfce07fe779f63b
(tools/server/README.md, "Using multiple models" and "Sleeping on Idle"):

- GET /models and /v1/models (one handler in router mode): {"data": [{"id", "object",
  "owned_by", "created", "status": {"value": "loaded"|"loading"|"unloaded"|"sleeping",
  "args": [...]}}], "object": "list"}; a failed load is "unloaded" with "failed": true and
  "exit_code"; a running model's entry carries its own /v1/models info ("meta").
- GET /props without ?model= answers for the router ("role": "router").
- GET /metrics, /slots and /props?model=NAME are proxied to that model's own server. A
  model that is not running is loaded first (and the request waits for it), unless the
  request says autoload=false (or the router runs with --no-models-autoload): then 400
  "model is not loaded". No ?model= is 400 "model name is missing from the request".
- POST /models/load {"model"}: 404 for an unknown model, 400 "model is already running",
  else {"success": true} while the model starts loading. POST /models/unload: 400 "model
  is not running", else {"success": true}.
- GET /health answers 200 {"status": "ok"} for the router itself.
- A sleeping model wakes on any request but GET /health, /props, /models and /metrics
  (README, "Sleeping on Idle"): its /slots wakes it.

Not modelled: --models-max's least-recently-used unloading, /models/sse, downloads.

The real llama.cpp server used elsewhere in the tests (PyPI xllamacpp 2026.10.11549)
disables router mode: its server refuses to start without a model ("params.model.path is
required: xllamacpp disabled the router server feature"), hence this stand-in.

Every request is recorded with the state its model was in when it arrived, so a test can
show that nothing was asked of a model that was not loaded and that nothing autoloaded one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

from tests.standins import Handler, fixture

LOADED, LOADING, UNLOADED, SLEEPING, FAILED = "loaded", "loading", "unloaded", "sleeping", "failed"
RUNNING = frozenset([LOADED, LOADING, SLEEPING])
BUILD = "b8000-router-stand-in"


@dataclass
class Model:
    """One model the router knows, and what its own server would report."""

    state: str = UNLOADED
    # Counter values of its /metrics page; the rest of the page is the recorded one.
    prompt_tokens: int = 0
    predicted_tokens: int = 0
    processing: int = 0
    slots: int = 4
    busy: int = 0
    context: int = 4096
    size: int = 1_000_000
    exit_code: int = 1  # what a failed load exited with
    fail_next_load: bool = False


@dataclass(frozen=True)
class Seen:
    """One request the router received."""

    method: str
    path: str
    query: Mapping[str, str]
    # The state of the model the request named (by ?model= or its JSON body), as it arrived.
    state: str | None


@dataclass
class Router:
    """The router's models and handlers; serve them with StandIn(router.routes())."""

    models: dict[str, Model] = field(default_factory=dict)
    load_seconds: float = 0.0  # how long a load stays "loading"
    autoload: bool = True  # --models-autoload, the default
    metrics: bool = True  # children started with --metrics
    seen: list[Seen] = field(default_factory=list)
    autoloaded: list[str] = field(default_factory=list)
    woken: list[str] = field(default_factory=list)
    _loads: set[asyncio.Task[None]] = field(default_factory=set)

    def set_state(self, name: str, state: str) -> None:
        """Put a model in a state at once."""
        self.models[name].state = state

    def asked_of(self, name: str) -> list[Seen]:
        """The requests that named a model."""
        return [seen for seen in self.seen if seen.query.get("model") == name]

    def metrics_page(self, name: str) -> str:
        """The model's /metrics: the recorded page with this model's numbers."""
        model = self.models[name]
        values = {
            "llamacpp:prompt_tokens_total": model.prompt_tokens,
            "llamacpp:tokens_predicted_total": model.predicted_tokens,
            "llamacpp:requests_processing": model.processing,
        }
        lines = []
        for line in fixture("llamacpp_metrics.body").splitlines():
            sample = line.split(" ", 1)[0]
            lines.append(f"{sample} {values[sample]}" if sample in values else line)
        return "\n".join(lines) + "\n"

    def routes(self, **overrides: Handler) -> dict[str, Handler]:
        """The router's routes (as StandIn takes them), each recording what it was asked."""
        routes: dict[str, Handler] = {
            "/health": self._health,
            "/models": self._models_route,
            "/v1/models": self._models_route,
            "/props": self._props,
            "/metrics": self._proxied,
            "/slots": self._proxied,
            "/models/load": self._load,
            "/models/unload": self._unload,
            **overrides,
        }
        return {path: self._recorded(handler) for path, handler in routes.items()}

    def _recorded(self, handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            query = dict(request.query)
            name = query.get("model")
            if request.method == "POST" and request.can_read_body:
                body = await request.json()
                name = body.get("model") if isinstance(body, dict) else None
            model = self.models.get(name) if isinstance(name, str) else None
            state = model.state if model is not None else None
            self.seen.append(Seen(request.method, request.path, query, state))
            return await handler(request)

        return handle

    async def _health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _models_route(self, request: web.Request) -> web.Response:
        created = int(time.time())
        data = []
        for name, model in self.models.items():
            value = UNLOADED if model.state == FAILED else model.state
            status: dict[str, object] = {"value": value, "args": ["llama-server", "-c", "4096"]}
            if model.state == FAILED:
                status["exit_code"] = model.exit_code
                status["failed"] = True
            entry: dict[str, object] = {
                "id": name,
                "aliases": [],
                "tags": [],
                "object": "model",
                "owned_by": "llamacpp",
                "created": created,
                "status": status,
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "source": "models_dir",
                "can_remove": False,
            }
            if model.state in RUNNING:
                # The running model's own /v1/models info, merged in by the router.
                entry["meta"] = {"n_ctx": model.context, "size": model.size, "ftype": "Q4_K_M"}
            data.append(entry)
        return _json({"data": data, "object": "list"})

    async def _props(self, request: web.Request) -> web.Response:
        if "model" not in request.query:
            return _json(
                {
                    "role": "router",
                    "max_instances": 4,
                    "models_autoload": self.autoload,
                    "model_alias": "llama-server",
                    "model_path": "none",
                    "default_generation_settings": {"params": {}, "n_ctx": 0},
                    "build_info": BUILD,
                }
            )
        return await self._proxied(request)

    async def _proxied(self, request: web.Request) -> web.Response:
        name = request.query.get("model", "")
        if not name:
            return _error(400, "model name is missing from the request")
        model = self.models.get(name)
        if model is None:
            return _error(400, f"model '{name}' not found")
        wanted = request.query.get("autoload", "")
        autoload = self.autoload if not wanted else wanted in ("true", "1")
        if not autoload:
            if model.state not in RUNNING:
                return _error(400, "model is not loaded")
            if model.state == LOADING:
                # Proxied to the model's own server, which answers so while it loads.
                return _error(503, "Loading model", "unavailable_error")
            return self._answer_for(request.path, name)
        if model.state not in RUNNING:
            self.autoloaded.append(name)
            self._start_load(name)
        while model.state == LOADING:
            await asyncio.sleep(0.01)
        if model.state not in RUNNING:
            return _error(500, f"model name={name} failed to load", "server_error")
        return self._answer_for(request.path, name)

    def _answer_for(self, path: str, name: str) -> web.Response:
        """What the model's own server answers."""
        model = self.models[name]
        if path == "/slots" and model.state == SLEEPING:
            self.woken.append(name)
            model.state = LOADED
        if path == "/metrics":
            if not self.metrics:
                message = "This server does not support metrics endpoint."
                return _error(501, message, "not_supported_error")
            return web.Response(text=self.metrics_page(name), content_type="text/plain")
        if path == "/slots":
            slots = [{"id": i, "is_processing": i < model.busy} for i in range(model.slots)]
            return _json(slots)
        return _json({"model_alias": name, "is_sleeping": model.state == SLEEPING})

    async def _load(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("model")
        model = self.models.get(name)
        if model is None:
            return _error(404, "model is not found", "not_found_error")
        if model.state in RUNNING:
            return _error(400, "model is already running")
        self._start_load(name)
        return _json({"success": True})

    async def _unload(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("model")
        model = self.models.get(name)
        if model is None:
            return _error(400, "model is not found")
        if model.state not in RUNNING:
            return _error(400, "model is not running")
        model.state = UNLOADED
        return _json({"success": True})

    def _start_load(self, name: str) -> None:
        model = self.models[name]
        model.state = LOADING

        async def finish() -> None:
            await asyncio.sleep(self.load_seconds)
            if model.state == LOADING:
                model.state = FAILED if model.fail_next_load else LOADED
                model.fail_next_load = False

        task = asyncio.ensure_future(finish())
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(value), status=status, content_type="application/json")


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return _json({"error": {"code": status, "message": message, "type": kind}}, status)


def router_routes(**overrides: Handler) -> dict[str, Handler]:
    """A router with one model in each state, for tables of cases."""
    router = Router(
        {
            "qwen3-8b": Model(LOADED, prompt_tokens=221, predicted_tokens=360),
            "gemma-3-4b": Model(UNLOADED),
            "llama-3.2-1b": Model(SLEEPING),
        }
    )
    return router.routes(**overrides)
