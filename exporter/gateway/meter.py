"""What one request did, read from the bytes passing through: operation, model, time to
first token, token usage.

The meter reads copies of what the relay already sent; a parse failure costs the
measurement, never the answer. It keeps no text: each event is parsed, its counts and
times kept, and dropped. Answers it reads:

    OpenAI SSE   data: {"choices":[{"delta":{"content":" the"}}]}     content chunk
                 data: {"choices":[],"usage":{"prompt_tokens":11,...}}  usage (include_usage)
    llama.cpp    data: {..., "timings":{"prompt_n":1,"cache_n":21,"predicted_n":4}}
    Ollama NDJSON {"message":{"content":" the"},"done":false}
                 {"done":true,"prompt_eval_count":26,"eval_count":259,...}
    JSON         {"usage": {...}} / {"prompt_eval_count": ...} (non-streamed answers)
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

# Operation names: OpenTelemetry GenAI's where it has one (gen_ai.operation.name).
CHAT = "chat"
TEXT_COMPLETION = "text_completion"
EMBEDDINGS = "embeddings"
GENERATE = "generate"  # Ollama's /api/generate
OTHER_OPERATION = "other"
OPERATIONS = {
    "/v1/chat/completions": CHAT,
    "/chat/completions": CHAT,
    "/v1/responses": CHAT,
    "/v1/messages": CHAT,  # Anthropic's Messages API (llama.cpp serves it)
    "/api/chat": CHAT,
    "/v1/completions": TEXT_COMPLETION,
    "/completions": TEXT_COMPLETION,
    "/completion": TEXT_COMPLETION,  # llama.cpp's own
    "/infill": TEXT_COMPLETION,
    "/api/generate": GENERATE,
    "/v1/embeddings": EMBEDDINGS,
    "/embeddings": EMBEDDINGS,
    "/embedding": EMBEDDINGS,
    "/api/embed": EMBEDDINGS,
    "/api/embeddings": EMBEDDINGS,
}
# Operations whose requests are metered (the others pass through, counted as "other").
METERED = frozenset((CHAT, TEXT_COMPLETION, EMBEDDINGS, GENERATE))

# A streamed event (one line) longer than this is not parsed; the answer still passes.
MAX_EVENT_BYTES = 1024 * 1024
# A non-streamed answer longer than this is relayed unmetered.
MAX_JSON_ANSWER_BYTES = 8 * 1024 * 1024
# Decompressed bytes one chunk of a compressed answer may grow into before the meter gives up.
MAX_INFLATED_CHUNK_BYTES = 4 * 1024 * 1024
# No sane count is above this; a provider that says so is not believed.
MAX_TOKENS = 10**9

_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
SSE, NDJSON, JSON = "sse", "ndjson", "json"
_FORMATS = {
    "text/event-stream": SSE,
    "application/x-ndjson": NDJSON,
    "application/ndjson": NDJSON,
    "application/jsonl": NDJSON,
    "application/json": JSON,
}
_CONTENT_DELTA_KEYS = ("content", "reasoning_content", "reasoning", "tool_calls", "function_call")
# Streamed events of the Responses and Anthropic Messages APIs that carry generated text.
_CONTENT_EVENT_TYPES = frozenset(
    ("response.output_text.delta", "response.reasoning_text.delta", "content_block_delta")
)


def operation_of(path: str) -> str:
    """The operation a request path asks for."""
    return OPERATIONS.get(path.rstrip("/") or "/", OTHER_OPERATION)


def request_document(body: bytes) -> Any:
    """A request body parsed as JSON, or None if it is not JSON."""
    if not body or body[:1] not in b"{[ \t\r\n":
        return None
    try:
        return json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        return None


def model_of(document: Any) -> str | None:
    """The "model" of a parsed JSON request body, or None."""
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else None


def model_in(body: bytes) -> str | None:
    """The "model" of a JSON request body, or None."""
    return model_of(request_document(body))


class ModelScanner:
    """Finds "model" in a request body too large to read whole, chunk by chunk."""

    OVERLAP = 300

    def __init__(self) -> None:
        self.model: str | None = None
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        """Look at the next piece of the body."""
        if self.model is not None:
            return
        window = self._tail + chunk
        match = _MODEL_RE.search(window)
        if match is not None:
            self.model = match.group(1).decode("utf-8", "replace")
        self._tail = window[-self.OVERLAP :]


# Most streamed events carry only a piece of text: they are recognised without decoding
# them. An event that may say more (usage, timings, an error, an event type) is decoded.
_DECODE = re.compile(rb'"(?:usage|timings|error|eval_count|prompt_eval_count|type)"')
_CONTENT = re.compile(
    rb'"(?:content|reasoning_content|reasoning|text|response|thinking)"\s*:\s*"(?!")'
    rb'|"tool_calls"\s*:\s*\[\s*\{|"function_call"\s*:\s*\{\s*"'
)


def looks_like_content(event: bytes) -> bool:
    """Whether an event that needs no decoding (see _DECODE) carries generated output."""
    return _CONTENT.search(event) is not None


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if 0 <= value <= MAX_TOKENS else None


def has_content(event: dict[str, Any]) -> bool:
    """Whether a streamed event carries generated output (a role-only chunk does not)."""
    choices = event.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and any(delta.get(k) for k in _CONTENT_DELTA_KEYS):
                return True
            if choice.get("text"):  # completions
                return True
        return False
    message = event.get("message")
    if isinstance(message, dict):  # Ollama /api/chat
        return bool(message.get("content") or message.get("thinking") or message.get("tool_calls"))
    if event.get("type") in _CONTENT_EVENT_TYPES:
        return True
    for key in ("response", "thinking", "content"):  # Ollama /api/generate, llama.cpp /completion
        value = event.get(key)
        if isinstance(value, str) and value:
            return True
    return False


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer, as the provider gave them (None: not given)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None


@dataclass(frozen=True)
class Reading:
    """What the meter read from one answer."""

    usage: Usage | None  # None: the answer carried no usage
    content_chunks: int
    first_content_at: float | None
    last_content_at: float | None
    model: str | None
    error_in_stream: bool
    unmetered: str | None  # why the answer could not be read, if it could not
    load_seconds: float | None = None  # Ollama: time spent loading the model for this request


class ResponseMeter:
    """Reads an answer as its chunks pass: content chunks and their times, and usage."""

    def __init__(self, content_type: str, content_encoding: str = "") -> None:
        self.format = _FORMATS.get(content_type.partition(";")[0].strip().lower())
        self.content_chunks = 0
        self.first_content_at: float | None = None
        self.last_content_at: float | None = None
        self.model: str | None = None
        self.error_in_stream = False
        self.unmetered: str | None = None
        self._usage: dict[str, int] = {}  # OpenAI, Responses and Anthropic usage objects
        self._timings: dict[str, int] = {}  # llama.cpp
        self._ollama: dict[str, int] = {}
        self._pending = b""
        self._last_at = 0.0
        self._inflate: Any = None
        encoding = content_encoding.strip().lower()
        if self.format is not None and encoding not in ("", "identity"):
            if encoding in ("gzip", "x-gzip", "deflate"):
                self._inflate = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)
            else:
                self._give_up("encoding")

    @property
    def reading(self) -> bool:
        """Whether the meter still reads the answer."""
        return self.format is not None

    def _give_up(self, reason: str) -> None:
        self.unmetered, self.format, self._pending = reason, None, b""

    def feed(self, chunk: bytes, now: float) -> None:
        """Read the next chunk of the answer, which arrived at now."""
        if self.format is None:
            return
        self._last_at = now
        try:
            if self._inflate is not None:
                chunk = self._inflate.decompress(chunk, MAX_INFLATED_CHUNK_BYTES)
                if self._inflate.unconsumed_tail:
                    self._give_up("too_large")
                    return
            if self.format == JSON:
                self._pending += chunk
                if len(self._pending) > MAX_JSON_ANSWER_BYTES:
                    self._give_up("too_large")
                return
            self._lines(chunk, now)
        except zlib.error:
            self._give_up("encoding")

    def _lines(self, chunk: bytes, now: float) -> None:
        data = self._pending + chunk if self._pending else chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_EVENT_BYTES:
            self._give_up("too_large")
            return
        for line in lines:
            if self.format == SSE:
                if not line.startswith(b"data:"):
                    continue  # comments, event names, blank separators
                line = line[5:].strip()
                if line == b"[DONE]":
                    continue
            elif not line.strip():
                continue
            self._event(line, now)

    def _event(self, text: bytes, now: float | None) -> None:
        if self.model is not None and _DECODE.search(text) is None:
            if now is not None and looks_like_content(text):
                self._content(now)
            return
        try:
            event = json.loads(text)
        except ValueError:
            self.unmetered = self.unmetered or "invalid_json"
            return
        if not isinstance(event, dict):
            return
        if self.model is None and isinstance(event.get("model"), str):
            self.model = event["model"]
        if event.get("error"):
            self.error_in_stream = True
        if now is not None and has_content(event):
            self._content(now)
        self._counts(event)

    def _content(self, now: float) -> None:
        self.content_chunks += 1
        if self.first_content_at is None:
            self.first_content_at = now
        self.last_content_at = now

    def _counts(self, event: dict[str, Any]) -> None:
        usage = event.get("usage")
        if isinstance(usage, dict):
            _merge_usage(self._usage, usage)
        for holder in (event.get("response"), event.get("message")):  # Responses, Anthropic
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                _merge_usage(self._usage, holder["usage"])
        timings = event.get("timings")
        if isinstance(timings, dict):
            for key in ("prompt_n", "cache_n", "predicted_n"):
                count = _count(timings.get(key))
                if count is not None:
                    self._timings[key] = count
        if "eval_count" in event or "prompt_eval_count" in event:
            for key in ("prompt_eval_count", "eval_count", "load_duration"):
                count = _count(event.get(key))
                if count is not None:
                    self._ollama[key] = count

    def finish(self) -> Reading:
        """What the whole answer said (call once, after the last chunk)."""
        if self.format == JSON and self._pending:
            self._event(self._pending, None)  # a whole answer: no chunk and no first token
        elif self.format in (SSE, NDJSON) and self._pending.strip():
            self._lines(b"\n", self._last_at)  # a last line without its newline
        self._pending = b""
        return Reading(
            usage=self._final_usage(),
            content_chunks=self.content_chunks,
            first_content_at=self.first_content_at,
            last_content_at=self.last_content_at,
            model=self.model,
            error_in_stream=self.error_in_stream,
            unmetered=self.unmetered,
            load_seconds=(
                self._ollama["load_duration"] / 1e9 if "load_duration" in self._ollama else None
            ),
        )

    def _final_usage(self) -> Usage | None:
        if self._usage:
            return Usage(
                self._usage.get("input"), self._usage.get("output"), self._usage.get("cached")
            )
        if self._timings:  # llama.cpp: prompt_n counts only the tokens not taken from cache
            prompt, cached = self._timings.get("prompt_n"), self._timings.get("cache_n")
            total = None if prompt is None else prompt + (cached or 0)
            return Usage(total, self._timings.get("predicted_n"), cached)
        if self._ollama:
            return Usage(self._ollama.get("prompt_eval_count"), self._ollama.get("eval_count"))
        return None


# Keys of a usage object, by what they count: OpenAI chat and completions, then the
# Responses and Anthropic Messages APIs.
_USAGE_KEYS = {
    "input": ("prompt_tokens", "input_tokens"),
    "output": ("completion_tokens", "output_tokens"),
}
_CACHED_KEYS = (
    ("prompt_tokens_details", "cached_tokens"),
    ("input_tokens_details", "cached_tokens"),
)


def _merge_usage(into: dict[str, int], usage: dict[str, Any]) -> None:
    for kind, keys in _USAGE_KEYS.items():
        for key in keys:
            count = _count(usage.get(key))
            if count is not None:
                into[kind] = count
                break
    for details_key, key in _CACHED_KEYS:
        details = usage.get(details_key)
        count = _count(details.get(key)) if isinstance(details, dict) else None
        if count is not None:
            into["cached"] = count
    # Anthropic counts cache reads apart from input_tokens; OpenTelemetry's input includes them.
    cache_read = _count(usage.get("cache_read_input_tokens"))
    if cache_read is not None:
        into["cached"] = cache_read
        if "input" in into and "prompt_tokens" not in usage:
            into["input"] += cache_read
