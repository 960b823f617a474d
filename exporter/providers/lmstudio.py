"""LM Studio, through its native REST API.

The url is the server's root (http://localhost:1234). GET /api/v1/models (LM Studio 0.4.0
and later) lists every downloaded model with its loaded instances; the provider is up when
the list is read:

    {"key": "google/gemma-4-26b-a4b", "architecture": "gemma4", "quantization": {"name": "Q4_K_M"},
     "size_bytes": 17990911801, "params_string": "26B-A4B",
     "loaded_instances": [{"id": "google/gemma-4-26b-a4b", "config": {"context_length": 4096}}]}
      -> llm_model_loaded{model="google/gemma-4-26b-a4b"} 1
         llm_model_size_bytes{...} 17990911801, llm_model_context_tokens{...} 4096

An older LM Studio answers that path 200 with {"error": "Unexpected endpoint or method. ..."}
(as it answers every path it does not know), and /api/v0/models (0.3.6 and later) is read
instead, each model with "state": "loaded" or "not-loaded".

LM Studio has no /metrics and no queue: its latency comes from probes, streamed POST
/api/v1/chat requests whose closing chat.end event carries LM Studio's own stats
(tokens_per_second, time_to_first_token_seconds, model_load_time_seconds). Before 0.4.0
probes use the OpenAI-compatible /v1/chat/completions, which reports no such stats. POST
/api/v1/models/load and /api/v1/models/unload (by loaded instance) load and unload models.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import FailureClass, ProviderError
from .base import (
    Findings,
    ModelSnapshot,
    ModelState,
    ProbeMeasurement,
    ProbeSpec,
    ProviderSnapshot,
    Residence,
    expect,
    number,
    text,
)
from .chat import measurement, probe_chat

if TYPE_CHECKING:
    from ..client import ProviderClient, Reply, Stream
    from ..config import ProviderConfig

V1_MODELS = "/api/v1/models"
V0_MODELS = "/api/v0/models"
LOAD = "/api/v1/models/load"
UNLOAD = "/api/v1/models/unload"
CHAT = "/api/v1/chat"
OPENAI_CHAT = "/v1/chat/completions"
# A load moves gigabytes into memory; an unload only frees them.
LOAD_TIMEOUT_SECONDS = 600.0
UNLOAD_TIMEOUT_SECONDS = 60.0
# How long a server found without the v1 API is read through v0 before v1 is asked again
# (LM Studio may have been updated in the meantime).
V0_RECHECK_SECONDS = 300.0
NO_V1 = "LM Studio before 0.4.0 has no API to load or unload models"
# What LM Studio answers, with status 200, for a path it does not serve.
_UNKNOWN_PATH = "Unexpected endpoint or method"
# Events of /api/v1/chat whose content is generated text.
_GENERATED = frozenset(["message.delta", "reasoning.delta"])


@dataclass(frozen=True)
class _Listing:
    """A model listing, with the loaded instances of each model (v1 only)."""

    models: tuple[ModelSnapshot, ...]
    seconds: float
    native: bool  # read from /api/v1/models
    # Per model name: its loaded instances' ids exactly as the server spells them.
    instances: dict[str, tuple[str, ...]] = field(default_factory=dict)


class _NoV1:
    """/api/v1/models answered the way LM Studio answers a path it does not know."""


_NO_V1 = _NoV1()


def _v1_models(reply: Reply) -> _Listing | _NoV1:
    body = expect(reply.json(), dict, "the body", reply.endpoint)
    error = body.get("error")
    if "models" not in body and isinstance(error, str) and error.startswith(_UNKNOWN_PATH):
        return _NO_V1
    models = []
    instances: dict[str, tuple[str, ...]] = {}
    for entry in expect(body.get("models"), list, "models", reply.endpoint):
        model, ids = _v1_model(entry, reply.endpoint)
        models.append(model)
        if ids:
            instances[model.name] = ids
    return _Listing(tuple(models), reply.seconds, native=True, instances=instances)


def _v1_model(entry: object, endpoint: str) -> tuple[ModelSnapshot, tuple[str, ...]]:
    entry = expect(entry, dict, "a model", endpoint)
    name = text(expect(entry.get("key"), str, "a model key", endpoint))
    loaded = entry.get("loaded_instances")
    loaded = loaded if isinstance(loaded, list) else []
    ids = tuple(i["id"] for i in loaded if isinstance(i, dict) and isinstance(i.get("id"), str))
    contexts = [
        number(i["config"].get("context_length"))
        for i in loaded
        if isinstance(i, dict) and isinstance(i.get("config"), dict)
    ]
    served = [c for c in contexts if c is not None]
    quantization = entry.get("quantization")
    quantization = quantization if isinstance(quantization, dict) else {}
    size = number(entry.get("size_bytes"))
    is_loaded = bool(loaded)
    return (
        ModelSnapshot(
            name=name,
            loaded=is_loaded,
            family=text(entry.get("architecture")),
            parameter_size=text(entry.get("params_string")),
            quantization=text(quantization.get("name")),
            format=text(entry.get("format")),
            size_bytes=size,
            # LM Studio tells no memory: a loaded model's weights take their size on disk.
            memory_bytes=size if is_loaded else None,
            context_length=max(served) if served else None,
        ),
        ids,
    )


def _v0_models(reply: Reply) -> _Listing:
    body = expect(reply.json(), dict, "the body", reply.endpoint)
    models = []
    for entry in expect(body.get("data"), list, "data", reply.endpoint):
        entry = expect(entry, dict, "a model", reply.endpoint)
        loaded = entry.get("state") == "loaded"
        models.append(
            ModelSnapshot(
                name=text(expect(entry.get("id"), str, "a model id", reply.endpoint)),
                loaded=loaded,
                family=text(entry.get("arch")),
                quantization=text(entry.get("quantization")),
                format=text(entry.get("compatibility_type")),
                # Not in LM Studio's docs, but sent by releases that load with a context.
                context_length=number(entry.get("loaded_context_length")) if loaded else None,
            )
        )
    return _Listing(tuple(models), reply.seconds, native=False)


def _done(what: str) -> Callable[[Reply], None]:
    """A parser of a load or unload answer: an object without an error."""

    def parse(reply: Reply) -> None:
        body = expect(reply.json(), dict, "the body", reply.endpoint)
        error = body.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            raise ProviderError(
                FailureClass.INVALID_RESPONSE,
                text(str(message), 200) or f"the {what} failed",
                endpoint=reply.endpoint,
            )

    return parse


async def _read_chat(stream: Stream) -> ProbeMeasurement:
    """/api/v1/chat's event stream: deltas of generated text, then chat.end with the stats."""
    token_times: list[float] = []
    result: Any = None
    finished = stream.started
    async for arrived, line in stream.lines():
        finished = arrived
        if not line.startswith(b"data:"):
            continue  # "event:" lines name the type the data says again
        event = expect(json.loads(line[5:]), dict, "an event", stream.endpoint)
        kind = event.get("type")
        if kind in _GENERATED and event.get("content"):
            token_times.append(arrived)
        elif kind == "error":
            raise ProviderError(
                FailureClass.INVALID_RESPONSE, "error in the stream", endpoint=stream.endpoint
            )
        elif kind == "chat.end":
            result = event.get("result")
            break
    if not isinstance(result, dict):
        raise ProviderError(
            FailureClass.INVALID_RESPONSE, "stream ended before chat.end", endpoint=stream.endpoint
        )
    stats = result.get("stats")
    stats = stats if isinstance(stats, dict) else {}
    return measurement(
        stream,
        finished,
        token_times,
        stats.get("total_output_tokens"),
        stats.get("input_tokens"),
        # Present only when the request had to load the model.
        load_duration=number(stats.get("model_load_time_seconds")),
        provider_tokens_per_second=number(stats.get("tokens_per_second")),
        # LM Studio's time to first token: the prompt's evaluation and the first token.
        provider_prompt_seconds=number(stats.get("time_to_first_token_seconds")),
    )


class LmStudioProvider:
    """Reads an LM Studio server; loads and unloads its models (LM Studio 0.4.0 and later)."""

    kind: ClassVar[str] = "lmstudio"

    def __init__(self, config: ProviderConfig, client: ProviderClient) -> None:
        self.config = config
        self.client = client
        # When the server was last found without the v1 API (None: it has it, or not known).
        self._v0_since: float | None = None

    @property
    def _v0(self) -> bool:
        return self._v0_since is not None and time.monotonic() - self._v0_since < V0_RECHECK_SECONDS

    async def _list(self) -> _Listing:
        """The model listing, from v1 where the server has it, else from v0."""
        try:
            if not self._v0:
                # optional: a server answering 404 (a proxy, a future LM Studio) is asked v0.
                listing = await self.client.fetch(V1_MODELS, _v1_models, optional=True)
                if isinstance(listing, _Listing):
                    self._v0_since = None
                    return listing
            answer = await self.client.fetch(V0_MODELS, _v0_models)
            assert answer is not None  # not optional: a failure raised
            if self._v0_since is None:
                self._v0_since = time.monotonic()
            return answer
        except ProviderError as exc:
            if exc.failure is FailureClass.CONNECT:
                # Whatever comes back on the port may be another release: ask v1 again.
                self._v0_since = None
            raise

    async def snapshot(self) -> ProviderSnapshot:
        """List the models with their loaded instances; up when the list is read."""
        findings = Findings()
        (listing,) = await findings.gather(self._list())
        if listing is None:
            return findings.snapshot(up=False)
        return findings.snapshot(
            up=True,
            ready=True,
            response_time_seconds=listing.seconds,
            models=listing.models,
        )

    async def model_states(self) -> tuple[ModelState, ...]:
        """The models with a loaded instance; the listing never loads one or keeps one loaded."""
        listing = await self._list()
        return tuple(
            ModelState(model.name, Residence.LOADED, memory_bytes=model.memory_bytes)
            for model in listing.models
            if model.loaded
        )

    async def load_model(self, model: str, *, pin: bool) -> None:
        """Load a model unless an instance of it is loaded (a second load would start a second
        instance). pin changes nothing: a model loaded through the API has no idle TTL unless
        one is asked for, and stays until it is unloaded."""
        listing = await self._native(LOAD)
        if listing.instances.get(model):
            return
        await self.client.post(LOAD, {"model": model}, _done("load"), timeout=LOAD_TIMEOUT_SECONDS)

    async def unload_model(self, model: str) -> None:
        """Unload every loaded instance of a model; none loaded is done already."""
        listing = await self._native(UNLOAD)
        for instance in listing.instances.get(model, ()):
            await self.client.post(
                UNLOAD, {"instance_id": instance}, _done("unload"), timeout=UNLOAD_TIMEOUT_SECONDS
            )

    async def _native(self, endpoint: str) -> _Listing:
        """The v1 listing, or a refusal naming endpoint where the server has no v1 API."""
        listing = await self._list()
        if not listing.native:
            raise ProviderError(FailureClass.HTTP_4XX, NO_V1, endpoint=endpoint)
        return listing

    async def probe(self, model: str, spec: ProbeSpec) -> ProbeMeasurement:
        """One streamed /api/v1/chat request, with LM Studio's own stats; before LM Studio
        0.4.0 a streamed OpenAI-compatible chat completion.

        store: false keeps the probe out of LM Studio's stored chats.
        """
        if self._v0:
            return await probe_chat(self.client, OPENAI_CHAT, model, spec)
        body = {
            "model": model,
            "input": spec.prompt,
            "stream": True,
            "max_output_tokens": spec.max_tokens,
            "store": False,
        }
        return await self.client.stream(CHAT, body, _read_chat, timeout=spec.timeout)
