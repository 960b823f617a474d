"""llama.cpp's llama-server, serving one model or, in router mode, many.

One model (started with -m): reads GET /health (503 while the model loads: up, not
ready), /v1/models, /props, /slots (busy or idle only: slot prompts are never read into
a snapshot) and /metrics, whose llamacpp:* series map onto the normalized ones:

    llamacpp:prompt_tokens_total 221       -> llm_tokens_total{type="input"} 305
    llamacpp:prompt_tokens_cached_total 84 -> llm_input_tokens_cached_total 84
    llamacpp:tokens_predicted_total 360    -> llm_tokens_total{type="output"} 360
    llamacpp:requests_processing 2         -> llm_requests_running 2
    llamacpp:requests_deferred 3           -> llm_requests_waiting 3

Router mode (started without -m; tools/server/server-models.cpp upstream): GET /models
lists every model the router knows with its status,

    {"id": "qwen3-8b", "status": {"value": "loaded", "args": [...]}}
    {"id": "gemma-3", "status": {"value": "unloaded", "failed": true, "exit_code": 1}}

and each loaded model's engine series are read as /metrics?model=qwen3-8b&autoload=false
and /slots?model=...&autoload=false, so that reading never loads or wakes a model:
unloaded, loading, sleeping and failed models are never named in a request (a sleeping
model's /slots would wake it). POST /models/load and /models/unload with {"model": name}
load and unload models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import FailureClass, ProviderError
from .base import (
    EngineSnapshot,
    Findings,
    ModelSnapshot,
    ModelState,
    ProbeMeasurement,
    ProbeSpec,
    ProviderSnapshot,
    Residence,
    expect,
    number,
    ready_when_200,
    text,
)
from .chat import probe_chat
from .promtext import parse_samples

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..client import ProviderClient, Reply
    from ..config import ProviderConfig

_METRICS = {
    "llamacpp:prompt_tokens_total": "input_tokens_total",
    "llamacpp:tokens_predicted_total": "output_tokens_total",
    "llamacpp:prompt_tokens_cached_total": "cached_input_tokens_total",
    "llamacpp:prompt_seconds_total": "input_seconds_total",
    "llamacpp:tokens_predicted_seconds_total": "output_seconds_total",
    "llamacpp:prompt_tokens_seconds": "input_tokens_per_second",
    "llamacpp:predicted_tokens_seconds": "output_tokens_per_second",
    "llamacpp:requests_processing": "requests_running",
    "llamacpp:requests_deferred": "requests_waiting",
    "llamacpp:kv_cache_usage_ratio": "kv_cache_usage_ratio",
}

METRICS_OFF = "engine metrics off: start llama-server with --metrics"
SINGLE_MODEL = "single-model llama-server cannot load or unload models"
# The router's status values (server_model_status_to_string); a failed load is reported
# as "unloaded" with "failed": true and the child's exit code.
_RESIDENCES = {
    "loaded": Residence.LOADED,
    "loading": Residence.LOADING,
    "sleeping": Residence.SLEEPING,
}
_HELD = frozenset([Residence.LOADED, Residence.LOADING, Residence.SLEEPING])
# A per-model read's answers: 2xx, and the router's 400 for a model no longer running.
_PER_MODEL_STATUSES = frozenset([*range(200, 300), 400])


@dataclass(frozen=True)
class _Listed:
    """One model of a model listing, with the router's status where there is one."""

    model: ModelSnapshot
    residence: Residence
    # Its id exactly as the server spells it, if that is a clean label value; None if it
    # is not, and then it is never named in a request (a cleaned name is another model).
    asked_as: str | None
    detail: str = ""


@dataclass(frozen=True)
class _Listing:
    """A /v1/models or /models answer."""

    models: tuple[_Listed, ...]
    router: bool  # some entry carries a router status object
    beyond: int = 0  # entries past the bound, left unread


class _Gone:
    """A per-model read the router refused with 400: the model left after it was listed."""


_GONE = _Gone()


def _listing(limit: int | None = None) -> Callable[[Reply], _Listing]:
    """A parser of a model listing that reads at most limit entries."""

    def parse(reply: Reply) -> _Listing:
        body = expect(reply.json(), dict, "the body", reply.endpoint)
        entries = expect(body.get("data"), list, "data", reply.endpoint)
        kept = entries if limit is None else entries[:limit]
        listed = tuple(_listed(entry, reply.endpoint) for entry in kept)
        router = any(isinstance(e, dict) and isinstance(e.get("status"), dict) for e in kept)
        return _Listing(listed, router, len(entries) - len(kept))

    return parse


def _listed(entry: object, endpoint: str) -> _Listed:
    entry = expect(entry, dict, "a model", endpoint)
    model_id = expect(entry.get("id"), str, "a model id", endpoint)
    name = text(model_id)
    meta = entry.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    size = number(meta.get("size"))
    status = entry.get("status")
    residence, detail = Residence.LOADED, ""
    if isinstance(status, dict):
        residence = _RESIDENCES.get(str(status.get("value")), Residence.UNLOADED)
        if status.get("failed") is True:
            residence = Residence.FAILED
            code = status.get("exit_code")
            detail = f"exit code {code}" if isinstance(code, int) else "load failed"
    loaded = residence is Residence.LOADED
    model = ModelSnapshot(
        name=name,
        loaded=loaded,
        format="gguf",
        quantization=text(meta.get("ftype")),
        size_bytes=size,
        memory_bytes=size if loaded else None,
        context_length=number(meta.get("n_ctx")),
    )
    return _Listed(model, residence, model_id if name == model_id else None, detail)


def _props(reply: Reply) -> dict[str, Any]:
    return expect(reply.json(), dict, "the body", reply.endpoint)


def _slots(reply: Reply) -> tuple[float, float]:
    slots = expect(reply.json(), list, "the body", reply.endpoint)
    busy = sum(
        1 for slot in slots if expect(slot, dict, "a slot", reply.endpoint).get("is_processing")
    )
    return float(busy), float(len(slots) - busy)


def _engine_values(reply: Reply) -> dict[str, float]:
    samples = parse_samples(reply.text(), _METRICS, reply.endpoint)
    values = {_METRICS[s.name]: s.value for s in samples if s.name in _METRICS}
    # llama.cpp counts only the prompt tokens it evaluated; input tokens, as OpenTelemetry
    # and every other kind count them, are all prompt tokens, cached or not.
    if "input_tokens_total" in values:
        values["input_tokens_total"] += values.get("cached_input_tokens_total", 0.0)
    return values


def _success(reply: Reply) -> None:
    body = expect(reply.json(), dict, "the body", reply.endpoint)
    if body.get("success") is not True:
        raise ProviderError(
            FailureClass.INVALID_RESPONSE, 'expected {"success": true}', endpoint=reply.endpoint
        )


def _residence_of(model: str) -> Callable[[Reply], Residence | None]:
    """A parser finding one model's residence in the router's listing; None if the listing
    does not hold it with a router's status."""

    def parse(reply: Reply) -> Residence | None:
        body = expect(reply.json(), dict, "the body", reply.endpoint)
        for entry in expect(body.get("data"), list, "data", reply.endpoint):
            if isinstance(entry, dict) and entry.get("id") == model:
                if not isinstance(entry.get("status"), dict):
                    return None
                return _listed(entry, reply.endpoint).residence
        return None

    return parse


def _is_router(listing: _Listing | None, props: dict[str, Any] | None) -> bool | None:
    """What the answers say of the server's mode: True router, False one model, None unknown.

    The router's listing carries status objects and its /props says role "router"; a
    single-model server's have neither (an empty router listing tells nothing).
    """
    if (listing is not None and listing.router) or (props or {}).get("role") == "router":
        return True
    if props is not None or (listing is not None and listing.models):
        return False
    return None


def _state(listed: _Listed) -> ModelState:
    return ModelState(
        name=listed.model.name,
        residence=listed.residence,
        memory_bytes=listed.model.memory_bytes,
        detail=listed.detail,
    )


class LlamaCppProvider:
    """Reads a llama-server; loads and unloads the models of one in router mode."""

    kind: ClassVar[str] = "llamacpp"

    def __init__(self, config: ProviderConfig, client: ProviderClient) -> None:
        self.config = config
        self.client = client
        # Router or single-model mode, as the server last said (None: not known yet), and a
        # single-model server's model; both forgotten when the server does not answer, since
        # whatever comes back on that port may have been started otherwise.
        self._router: bool | None = None
        self._served: str | None = None

    def _forget(self) -> None:
        self._router = None
        self._served = None

    def _learn(self, listing: _Listing | None, props: dict[str, Any] | None) -> None:
        router = _is_router(listing, props)
        if router is not None:
            self._router = router
        if router is False and listing is not None and listing.models:
            self._served = listing.models[0].model.name

    async def snapshot(self) -> ProviderSnapshot:
        """Read health first; the rest concurrently once the server answers."""
        findings = Findings()
        (health,) = await findings.gather(
            self.client.fetch("/health", ready_when_200, statuses=(200, 503))
        )
        if health is None:
            self._forget()
            return findings.snapshot(up=False)
        ready, seconds = health
        if not ready:
            return findings.snapshot(up=True, ready=False, response_time_seconds=seconds)
        if self._router:
            return await self._router_snapshot(findings, seconds)
        if self._router is None:
            # Not known yet: the listing and /props say which mode, before anything that
            # only one mode answers is asked.
            listing, props = await findings.gather(
                self.client.fetch("/v1/models", _listing()),
                self.client.fetch("/props", _props, optional=True),
            )
            self._learn(listing, props)
            if self._router:
                return await self._router_snapshot(findings, seconds, listing, props)
            slots, values = await findings.gather(
                self.client.fetch("/slots", _slots, optional=True),
                self.client.fetch("/metrics", _engine_values, optional=True),
            )
        else:
            listing, props, slots, values = await findings.gather(
                self.client.fetch("/v1/models", _listing()),
                self.client.fetch("/props", _props, optional=True),
                self.client.fetch("/slots", _slots, optional=True),
                self.client.fetch("/metrics", _engine_values, optional=True),
            )
            self._learn(listing, props)
            if self._router:
                # Restarted as a router between two scrapes, on the same port: this scrape's
                # /slots and /metrics asked it for no model, which is no fault of its own.
                return await self._router_snapshot(Findings(), seconds, listing, props)
        return self._single(findings, seconds, listing, props, slots, values)

    def _single(
        self,
        findings: Findings,
        seconds: float,
        listing: _Listing | None,
        props: dict[str, Any] | None,
        slots: tuple[float, float] | None,
        values: dict[str, float] | None,
    ) -> ProviderSnapshot:
        """The snapshot of a single-model server from what it answered."""
        models = [listed.model for listed in listing.models] if listing is not None else []
        props = props or {}
        model = models[0].name if models else text(props.get("model_alias"))
        engines: tuple[EngineSnapshot, ...] = ()
        if values is not None or slots is not None:
            busy, idle = slots if slots is not None else (None, None)
            fields: dict[str, Any] = values or {}
            engines = (EngineSnapshot(model=model, slots_busy=busy, slots_idle=idle, **fields),)
        failed = {failure.endpoint for failure in findings.failures}
        notes = (METRICS_OFF,) if values is None and "/metrics" not in failed else ()
        return findings.snapshot(
            up=True,
            ready=True,
            version=text(props.get("build_info")),
            response_time_seconds=seconds,
            models=tuple(models),
            engines=engines,
            notes=notes,
        )

    async def _router_snapshot(
        self,
        findings: Findings,
        seconds: float,
        listing: _Listing | None = None,
        props: dict[str, Any] | None = None,
    ) -> ProviderSnapshot:
        """Every model the router lists; engine series of the loaded ones only."""
        limit = self.config.max_models
        if listing is None:
            listing, props = await findings.gather(
                self.client.fetch("/models", _listing(limit)),
                self.client.fetch("/props", _props, optional=True),
            )
            # A single-model server restarted on the port says so here: asked for its one
            # model by name, it answers as it would without, and is read as such next time.
            self._learn(listing, props)
        listed = listing.models[:limit] if listing is not None else ()
        beyond = len(listing.models) - len(listed) + listing.beyond if listing is not None else 0
        asked = [m.asked_as for m in listed if m.residence is Residence.LOADED and m.asked_as]
        queries = [{"model": name, "autoload": "false"} for name in asked]
        reads = await findings.gather(
            *(self._read("/metrics", _engine_values, query) for query in queries),
            *(self._read("/slots", _slots, query) for query in queries),
        )
        engines = []
        metrics_off = False
        for index, name in enumerate(asked):
            values, slots = reads[index], reads[len(asked) + index]
            metrics_off = metrics_off or values is None
            values = values if isinstance(values, dict) else None
            slots = slots if isinstance(slots, tuple) else None
            if values is None and slots is None:
                continue
            busy, idle = slots if slots is not None else (None, None)
            fields: dict[str, Any] = values or {}
            engines.append(
                EngineSnapshot(model=text(name), slots_busy=busy, slots_idle=idle, **fields)
            )
        failed = {failure.endpoint for failure in findings.failures}
        notes = [METRICS_OFF] if metrics_off and "/metrics" not in failed else []
        if beyond:
            notes.append(f"{beyond} more models listed than max_models ({limit}): not read")
        return findings.snapshot(
            up=True,
            ready=True,
            version=text((props or {}).get("build_info")),
            response_time_seconds=seconds,
            models=tuple(m.model for m in listed),
            engines=tuple(engines),
            notes=tuple(notes),
        )

    async def _read(
        self, endpoint: str, parse: Callable[[Reply], Any], query: dict[str, str]
    ) -> Any:
        """One loaded model's engine endpoint, asked never to load or wake it.

        The router's 400 ("model is not loaded", "not found") means the model was unloaded
        between the listing and this read, which is no fault: it gives _GONE.
        """

        def read(reply: Reply) -> Any:
            return _GONE if reply.status == 400 else parse(reply)

        return await self.client.fetch(
            endpoint, read, optional=True, statuses=_PER_MODEL_STATUSES, params=query
        )

    async def model_states(self) -> tuple[ModelState, ...]:
        """The router's models by status, or the one model by /health; never loads or wakes one."""
        try:
            if self._router:
                listing = await self.client.fetch("/models", _listing(self.config.max_models))
                assert listing is not None  # not optional: a failure raised
                return tuple(_state(m) for m in listing.models)
            ready, _ = await self._health()
            if not ready:
                # Loading (or starting): a single-model server says no more until it is done.
                name = self._served
                return (ModelState(name, Residence.LOADING),) if name else ()
            if self._served is None or self._router is None:
                listing = await self._detect()
                if self._router:
                    return tuple(_state(m) for m in listing.models[: self.config.max_models])
            return (ModelState(self._served, Residence.LOADED),) if self._served else ()
        except ProviderError as exc:
            if exc.failure is FailureClass.CONNECT:
                self._forget()
            raise

    async def load_model(self, model: str, *, pin: bool) -> None:
        """Ask the router to load a model (pin changes nothing: a router keeps what it loads
        until it is unloaded or pushed out by --models-max)."""
        await self._act("/models/load", model, _HELD)

    async def unload_model(self, model: str) -> None:
        """Ask the router to unload a model now."""
        await self._act("/models/unload", model, frozenset([Residence.UNLOADED, Residence.FAILED]))

    async def _act(self, endpoint: str, model: str, done: frozenset[Residence]) -> None:
        """POST a load or unload; a refusal because it is already done is no failure."""
        try:
            if self._router is None:
                ready, _ = await self._health()
                if ready:
                    await self._detect()
            if self._router is None:
                raise ProviderError(
                    FailureClass.HTTP_5XX, "cannot tell its mode: not ready", endpoint=endpoint
                )
            if not self._router:
                raise ProviderError(FailureClass.HTTP_4XX, SINGLE_MODEL, endpoint=endpoint)
            try:
                await self.client.post(
                    endpoint, {"model": model}, _success, timeout=self.config.timeout
                )
            except ProviderError as exc:
                # The router answers 400 to loading a running model and to unloading one
                # that is not running: asked twice, the second is done already.
                if exc.failure is not FailureClass.HTTP_4XX:
                    raise
                residence = await self.client.fetch("/models", _residence_of(model))
                if residence not in done:
                    raise
        except ProviderError as exc:
            if exc.failure is FailureClass.CONNECT:
                self._forget()
            raise

    async def _health(self) -> tuple[bool, float]:
        health = await self.client.fetch("/health", ready_when_200, statuses=(200, 503))
        assert health is not None  # not optional: a failure raised
        return health

    async def _detect(self) -> _Listing:
        """Learn the server's mode (and a single-model server's model) from its listing,
        and from /props only if the listing is empty."""
        listing = await self.client.fetch("/v1/models", _listing(self.config.max_models))
        assert listing is not None  # not optional: a failure raised
        self._learn(listing, None)
        if self._router is None:
            self._learn(listing, await self.client.fetch("/props", _props, optional=True))
        return listing

    async def probe(self, model: str, spec: ProbeSpec) -> ProbeMeasurement:
        """One streamed chat completion, measured."""
        return await probe_chat(self.client, "/v1/chat/completions", model, spec)
