"""The meter reads usage, content chunks and models from answers as they pass, in any chunking."""

from __future__ import annotations

import gzip
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.gateway.meter import (
    MAX_EVENT_BYTES,
    ModelScanner,
    Reading,
    ResponseMeter,
    Usage,
    has_content,
    looks_like_content,
    model_in,
    operation_of,
)


def sse(*events: object) -> bytes:
    """An SSE body: one data line per event, then [DONE]."""
    lines = [b"data: " + json.dumps(event).encode() + b"\n\n" for event in events]
    return b"".join(lines) + b"data: [DONE]\n\n"


def ndjson(*events: object) -> bytes:
    return b"".join(json.dumps(event).encode() + b"\n" for event in events)


def read(body: bytes, content_type: str, cuts: list[int] | None = None, **kw: str) -> Reading:
    """Feed body to a meter in pieces cut at the given offsets; chunk i arrives at time i."""
    meter = ResponseMeter(content_type, **kw)
    bounds = [0, *sorted(set(cuts or [])), len(body)]
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        meter.feed(body[start:end], float(index))
    return meter.finish()


def chunk(content: str | None = None, role: str | None = None) -> dict[str, object]:
    delta: dict[str, object] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "model": "m", "choices": [{"delta": delta}]}


# What OpenAI-compatible servers stream with stream_options.include_usage (vLLM, OpenAI):
# a role-only chunk first, content chunks, then usage in a chunk without choices.
OPENAI_STREAM = sse(
    chunk(role="assistant", content=""),
    chunk(" Hello"),
    chunk(" there"),
    chunk(None),
    {
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 8},
        },
    },
)


def test_openai_stream_usage_and_content_chunks() -> None:
    reading = read(OPENAI_STREAM, "text/event-stream; charset=utf-8")
    assert reading.usage == Usage(input_tokens=11, output_tokens=2, cached_input_tokens=8)
    assert reading.content_chunks == 2
    assert reading.model == "m"
    assert reading.unmetered is None


def test_role_only_chunk_is_not_the_first_token() -> None:
    """Each event in its own network chunk: chunk 0 is the role, chunk 1 the first content."""
    events = OPENAI_STREAM.split(b"\n\n")
    cuts, offset = [], 0
    for event in events[:-1]:
        offset += len(event) + 2
        cuts.append(offset)
    reading = read(OPENAI_STREAM, "text/event-stream", cuts)
    assert reading.first_content_at == 1.0
    assert reading.last_content_at == 2.0


# llama.cpp's streamed chat without include_usage: timings in the last chunk (recorded from
# xllamacpp's llama-server); prompt_n counts only the tokens not taken from the cache.
LLAMACPP_LAST = {
    "choices": [{"finish_reason": "length", "index": 0, "delta": {}}],
    "model": "tiny-llama",
    "object": "chat.completion.chunk",
    "timings": {"cache_n": 21, "prompt_n": 1, "prompt_ms": 0.29, "predicted_n": 4},
}


def test_llamacpp_timings_count_cached_prompt_tokens_as_input() -> None:
    body = sse(chunk(role="assistant"), chunk(" a"), chunk(" b"), LLAMACPP_LAST)
    reading = read(body, "text/event-stream")
    assert reading.usage == Usage(input_tokens=22, output_tokens=4, cached_input_tokens=21)


def test_usage_wins_over_timings() -> None:
    """llama.cpp's non-streamed answer carries both: usage is the OpenAI field clients read."""
    answer = {
        "choices": [{"message": {"role": "assistant", "content": "x"}}],
        "usage": {"completion_tokens": 4, "prompt_tokens": 22, "total_tokens": 26},
        "timings": {"cache_n": 21, "prompt_n": 1, "predicted_n": 4},
    }
    reading = read(json.dumps(answer).encode(), "application/json; charset=utf-8", [5, 40])
    assert reading.usage == Usage(22, 4, None)
    assert reading.first_content_at is None  # a whole answer has no first token


# Ollama's /api/chat stream (docs/api.md): NDJSON, statistics in the last line, durations in ns.
OLLAMA_STREAM = ndjson(
    {"model": "llama3.2", "message": {"role": "assistant", "content": "The"}, "done": False},
    {"model": "llama3.2", "message": {"role": "assistant", "content": " sky"}, "done": False},
    {
        "model": "llama3.2",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "total_duration": 4883583458,
        "load_duration": 1334875,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 342546000,
        "eval_count": 282,
        "eval_duration": 4535599000,
    },
)


def test_ollama_ndjson() -> None:
    reading = read(OLLAMA_STREAM, "application/x-ndjson", [3, 100])
    assert reading.usage == Usage(input_tokens=26, output_tokens=282)
    assert reading.content_chunks == 2
    assert reading.model == "llama3.2"


def test_ollama_generate_and_embed() -> None:
    generate = ndjson({"response": "Hi", "done": False}, {"done": True, "eval_count": 1})
    assert read(generate, "application/x-ndjson").content_chunks == 1
    embed = {"model": "all-minilm", "embeddings": [[0.01, -0.002]], "prompt_eval_count": 8}
    assert read(json.dumps(embed).encode(), "application/json").usage == Usage(8, None)


def test_stream_without_usage_reports_none() -> None:
    reading = read(sse(chunk(" a"), chunk(" b"), chunk(" c")), "text/event-stream")
    assert reading.usage is None
    assert reading.content_chunks == 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(OPENAI_STREAM)), max_size=30))
def test_any_chunking_reads_the_same(cuts: list[int]) -> None:
    whole = read(OPENAI_STREAM, "text/event-stream")
    pieces = read(OPENAI_STREAM, "text/event-stream", cuts)
    assert (pieces.usage, pieces.content_chunks, pieces.model) == (
        whole.usage,
        whole.content_chunks,
        whole.model,
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=10))
def test_garbage_never_raises(body: bytes, cuts: list[int]) -> None:
    for content_type in ("text/event-stream", "application/x-ndjson", "application/json"):
        read(body, content_type, [c for c in cuts if c <= len(body)])


def test_lying_counts_are_not_believed() -> None:
    body = {"usage": {"prompt_tokens": -5, "completion_tokens": 10**12}}
    assert read(json.dumps(body).encode(), "application/json").usage is None


def test_an_event_too_large_stops_the_meter_not_the_answer() -> None:
    meter = ResponseMeter("text/event-stream")
    meter.feed(b"data: " + b"x" * (MAX_EVENT_BYTES + 1), 0.0)
    assert not meter.reading
    assert meter.finish().unmetered == "too_large"


def test_gzip_answer_is_read() -> None:
    reading = read(gzip.compress(OPENAI_STREAM), "text/event-stream", [10], content_encoding="gzip")
    assert reading.usage == Usage(11, 2, 8)


def test_unknown_encoding_is_unmetered() -> None:
    assert read(b"\x00\x01", "application/json", content_encoding="br").unmetered == "encoding"


def test_error_event_in_stream() -> None:
    body = sse(chunk(" a"), {"error": {"message": "out of memory", "code": 500}})
    assert read(body, "text/event-stream").error_in_stream


def test_responses_and_anthropic_streams() -> None:
    responses = sse(
        {"type": "response.output_text.delta", "delta": "Hi"},
        {
            "type": "response.completed",
            "response": {
                "usage": {
                    "input_tokens": 9,
                    "output_tokens": 1,
                    "input_tokens_details": {"cached_tokens": 4},
                }
            },
        },
    )
    assert read(responses, "text/event-stream").usage == Usage(9, 1, 4)
    anthropic = sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "message_delta", "usage": {"output_tokens": 12}},
    )
    reading = read(anthropic, "text/event-stream")
    assert (reading.usage, reading.content_chunks) == (Usage(5, 12, None), 1)


def test_operations() -> None:
    assert operation_of("/v1/chat/completions") == "chat"
    assert operation_of("/api/chat") == "chat"
    assert operation_of("/v1/completions") == "text_completion"
    assert operation_of("/completion") == "text_completion"
    assert operation_of("/api/generate") == "generate"
    assert operation_of("/api/embed") == "embeddings"
    assert operation_of("/v1/embeddings/") == "embeddings"
    assert operation_of("/v1/models") == "other"


def test_model_of_request_bodies() -> None:
    assert model_in(b'{"model": "llama3.2", "messages": []}') == "llama3.2"
    assert model_in(b'{"model": 3}') is None
    assert model_in(b"not json") is None
    assert model_in(b"\xff\xfe") is None
    scanner = ModelScanner()
    body = b'{"messages": [{"content": "' + b"a" * 5000 + b'"}], "model": "big-one"}'
    for start in range(0, len(body), 7):
        scanner.feed(body[start : start + 7])
    assert scanner.model == "big-one"


# Streamed events as servers send them: content or not, decoded or recognised by pattern.
EVENTS = [
    chunk(role="assistant", content=""),
    chunk(role="assistant"),
    chunk(" Hello"),
    chunk('He said "content": "x"'),
    chunk("\n"),
    {"choices": [{"delta": {"content": None}}]},
    {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
    {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]},
    {"choices": [{"delta": {"tool_calls": []}}]},
    {"choices": [{"delta": {}, "finish_reason": "stop"}]},
    {"choices": [{"text": " once", "index": 0}]},
    {"choices": [{"text": "", "index": 0}]},
    {"model": "m", "message": {"role": "assistant", "content": "The"}, "done": False},
    {"model": "m", "message": {"role": "assistant", "content": ""}, "done": False},
    {"model": "m", "message": {"role": "assistant", "content": "", "thinking": "so"}},
    {"model": "m", "response": "Hi", "done": False},
    {"model": "m", "response": "", "done": False},
    {"content": " the", "stop": False, "id_slot": 0},  # llama.cpp's /completion
    {"content": "", "stop": False},
]


@pytest.mark.parametrize("event", EVENTS, ids=range(len(EVENTS)))
def test_events_recognised_without_decoding_agree_with_decoding(event: dict[str, object]) -> None:
    for text in (json.dumps(event), json.dumps(event, separators=(",", ":"))):
        assert looks_like_content(text.encode()) == has_content(event), text
