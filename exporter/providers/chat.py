"""Probing through the OpenAI-compatible streamed chat API (llama.cpp, vLLM, generic servers).

POST /v1/chat/completions with stream_options.include_usage; the answer is a
server-sent event stream whose last chunk carries the token counts:

    data: {"choices":[{"delta":{"content":" are"}}]}
    data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":8}}
    data: [DONE]
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import FailureClass, ProviderError
from .base import ProbeMeasurement, ProbeSpec, number

if TYPE_CHECKING:
    from ..client import ProviderClient, Stream


def measurement(
    stream: Stream,
    finished: float,
    token_times: list[float],
    output_count: object,
    input_count: object,
    **reported: float | None,
) -> ProbeMeasurement:
    """A measurement from the arrival times of the chunks that carried generated text.

    The token counts are what the provider said: non-numbers count as unknown.
    """
    output, given_input = number(output_count), number(input_count)
    output_tokens = int(output) if output is not None else None
    input_tokens = int(given_input) if given_input is not None else None
    if not token_times or output_tokens == 0:
        raise ProviderError(
            FailureClass.EMPTY_RESPONSE, "no generated token", endpoint=stream.endpoint
        )
    first, last = token_times[0], token_times[-1]
    per_token = None
    if output_tokens is not None and output_tokens > 1 and last > first:
        per_token = (last - first) / (output_tokens - 1)
    return ProbeMeasurement(
        duration=finished - stream.started,
        time_to_first_token=first - stream.started,
        output_tokens=output_tokens,
        input_tokens=input_tokens,
        time_per_output_token=per_token,
        tokens_per_second=1 / per_token if per_token else None,
        **reported,
    )


async def _read_events(stream: Stream) -> ProbeMeasurement:
    token_times: list[float] = []
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    finished = stream.started
    async for arrived, line in stream.lines():
        finished = arrived
        if not line.startswith(b"data:"):
            continue  # comments and other SSE fields
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise ValueError("chunk is not an object")
        if "error" in chunk:
            raise ProviderError(
                FailureClass.INVALID_RESPONSE, "error in the stream", endpoint=stream.endpoint
            )
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                token_times.append(arrived)
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):  # llama.cpp's own per-request timings
            timings = chunk["timings"]
    prompt_ms = number(timings.get("prompt_ms"))
    return measurement(
        stream,
        finished,
        token_times,
        usage.get("completion_tokens"),
        usage.get("prompt_tokens"),
        provider_tokens_per_second=number(timings.get("predicted_per_second")),
        provider_prompt_seconds=prompt_ms / 1000 if prompt_ms is not None else None,
    )


async def probe_chat(
    client: ProviderClient, endpoint: str, model: str, spec: ProbeSpec
) -> ProbeMeasurement:
    """One streamed chat completion, measured."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return await client.stream(endpoint, body, _read_events, timeout=spec.timeout)
