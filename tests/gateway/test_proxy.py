"""The gateway passes every request and answer through unchanged, streams without buffering,
measures what passed, and answers honestly when the provider fails."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from tests.gateway.helpers import gatewayed
from tests.helpers import Scrape
from tests.standins import (
    Handler,
    StandIn,
    closed_port,
    hang,
    json_reply,
    ollama_chat,
    ollama_routes,
    openai_routes,
    sse_chat,
)


def echo() -> Handler:
    """Answers with what it received: method, path and query, headers, body digest."""

    async def handle(request: web.Request) -> web.Response:
        digest, length = hashlib.sha256(), 0
        async for piece in request.content.iter_any():
            digest.update(piece)
            length += len(piece)
        seen = {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "sha256": digest.hexdigest(),
            "length": length,
        }
        headers = {"X-Upstream": "yes", "Set-Cookie": "a=1"}
        return web.Response(status=207, text=json.dumps(seen), headers=headers)

    return handle


def requests_total(scrape: Scrape, **labels: str) -> float:
    return sum(value for _, value in scrape.all("llm_gateway_requests_total", **labels))


async def test_requests_and_answers_pass_unchanged() -> None:
    async with (
        StandIn({"/v1/anything": echo()}) as upstream,
        gatewayed(f"{upstream.url}/v1") as (exporter, client),
    ):
        body = b'{"model": "m", "input": "' + b"\xc3\xa9" * 1000 + b'"}'
        response = await client.request(
            "PATCH",
            "/v1/anything?a=1&b=%2F",
            content=body,
            headers={
                "Authorization": "Bearer sk-client-key",
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "dropped",
                "Content-Type": "application/json",
            },
        )
        seen = response.json()
        scrape = await exporter.scrape()
    assert response.status_code == 207
    assert response.headers["X-Upstream"] == "yes"
    assert response.headers["Set-Cookie"] == "a=1"
    assert seen["method"] == "PATCH"
    assert seen["path_qs"] == "/v1/anything?a=1&b=%2F"
    assert (seen["sha256"], seen["length"]) == (hashlib.sha256(body).hexdigest(), len(body))
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["authorization"] == "Bearer sk-client-key"  # the client's own, untouched
    assert headers["x-custom"] == "kept"
    assert headers["host"] == f"127.0.0.1:{upstream.port}"  # rewritten for the provider
    assert "x-hop" not in headers  # named in Connection: hop-by-hop
    assert "user-agent" in headers and "aiohttp" not in headers["user-agent"]
    assert "sk-client-key" not in str(scrape.all_of())
    assert requests_total(scrape, operation="other", code="2xx", outcome="complete") == 1


async def test_status_codes_head_and_empty_bodies_pass() -> None:
    routes = {
        "/v1/missing": json_reply({"error": {"message": "no such model"}}, status=404),
        "/v1/teapot": json_reply({"tea": True}, status=418),
        "/v1/echo": echo(),
    }
    async with StandIn(routes) as upstream, gatewayed(f"{upstream.url}/v1") as (_, client):
        missing = await client.post("/v1/missing", json={"model": "x"})
        teapot = await client.get("/v1/teapot")
        head = await client.head("/v1/echo")
        delete = await client.delete("/v1/echo")
    assert (missing.status_code, missing.json()) == (404, {"error": {"message": "no such model"}})
    assert teapot.status_code == 418
    assert (head.status_code, head.content) == (207, b"")
    assert delete.json()["method"] == "DELETE"
    assert delete.json()["length"] == 0


async def test_large_upload_and_download_stream_through() -> None:
    size = 24 * 1024 * 1024
    upload = bytes(range(256)) * (size // 256)

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for _ in range(size // (1024 * 1024)):
            await response.write(b"\x01" * (1024 * 1024))
        return response

    routes = {"/v1/embeddings": echo(), "/v1/files": download}
    async with StandIn(routes) as upstream, gatewayed(f"{upstream.url}/v1") as (_, client):

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, size, 1 << 20):
                yield upload[start : start + (1 << 20)]

        seen = (await client.post("/v1/embeddings", content=chunks())).json()
        got = await client.get("/v1/files")
    assert (seen["sha256"], seen["length"]) == (hashlib.sha256(upload).hexdigest(), size)
    assert got.content == b"\x01" * size


async def test_a_stream_is_relayed_chunk_by_chunk_not_buffered() -> None:
    """The stand-in sends its second chunk only once the client has the first one."""
    client_has_first = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
        await asyncio.wait_for(client_has_first.wait(), 10)
        await response.write(b"data: [DONE]\n\n")
        return response

    routes = {"/v1/chat/completions": stream}
    async with StandIn(routes) as upstream, gatewayed(f"{upstream.url}/v1") as (_, client):
        body = {"model": "m", "stream": True, "messages": []}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            received = []
            async for piece in response.aiter_raw():
                received.append(piece)
                client_has_first.set()
    assert b"".join(received).endswith(b"data: [DONE]\n\n")


def role_then_content(delay: float, words: int = 8) -> Handler:
    """Headers and a role-only chunk at once; content after a known delay (as the stand-in
    measured it: its send times are kept in .sent)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        arrived = time.perf_counter()
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        await response.write(b"data: " + json.dumps(role).encode() + b"\n\n")
        await asyncio.sleep(delay)
        handle.delays.append(time.perf_counter() - arrived)  # type: ignore[attr-defined]
        for index in range(words):
            piece = {"choices": [{"index": 0, "delta": {"content": f" w{index}"}}]}
            await response.write(b"data: " + json.dumps(piece).encode() + b"\n\n")
            await asyncio.sleep(0.002)
        usage = {"prompt_tokens": 5, "completion_tokens": words, "total_tokens": 5 + words}
        await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode())
        await response.write(b"\n\ndata: [DONE]\n\n")
        return response

    handle.delays = []  # type: ignore[attr-defined]
    return handle


async def test_time_to_first_token_is_the_first_content_chunk() -> None:
    """Against a known delay: never before the provider sent content (the role-only chunk and
    the headers come earlier), never after the client had it."""
    handler = role_then_content(delay=0.15)
    async with (
        StandIn({"/v1/chat/completions": handler}) as upstream,
        gatewayed(f"{upstream.url}/v1") as (exporter, client),
    ):
        client_ttfts = []
        for _ in range(5):
            body = {"model": "m", "stream": True, "messages": []}
            started = time.perf_counter()
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                first = None
                async for line in response.aiter_lines():
                    if first is None and '"content": " w0"' in line:
                        first = time.perf_counter() - started
            assert first is not None
            client_ttfts.append(first)
        scrape = await exporter.scrape()
    labels = {"provider": "p", "model": "m", "operation": "chat"}
    count = scrape.value("llm_gateway_time_to_first_token_seconds_count", **labels)
    total = scrape.value("llm_gateway_time_to_first_token_seconds_sum", **labels)
    assert count == 5 and total is not None
    mean = total / count
    assert sum(handler.delays) / 5 <= mean <= sum(client_ttfts) / 5  # type: ignore[attr-defined]
    tokens = {k["type"]: v for k, v in scrape.all("llm_gateway_tokens_total", source="usage")}
    assert tokens == {"input": 25, "output": 40}
    assert scrape.value("llm_gateway_time_per_output_token_seconds_count", **labels) == 5


async def test_ollama_streams_count_its_own_token_statistics() -> None:
    """Ollama's NDJSON shapes (docs/api.md), nanosecond durations included."""
    chat = ollama_chat(("The", " sky", " is"), first_load_ns=2_000_000_000, later_load_ns=1_000)
    async with (
        StandIn(ollama_routes(**{"/api/chat": chat})) as upstream,
        gatewayed(upstream.url, kind="ollama") as (exporter, client),
    ):
        for _ in range(3):
            body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
            response = await client.post("/api/chat", json=body)
            assert response.status_code == 200
            lines = [json.loads(line) for line in response.text.splitlines()]
            assert lines[-1]["done"] is True
        scrape = await exporter.scrape()
    labels = {"provider": "p", "model": "llama3.2"}
    tokens = {k["type"]: v for k, v in scrape.all("llm_gateway_tokens_total", **labels)}
    assert tokens == {"input": 3 * 26, "output": 3 * 3}
    assert requests_total(scrape, operation="chat", code="2xx", outcome="complete") == 3
    assert (
        scrape.value("llm_gateway_time_to_first_token_seconds_count", **labels, operation="chat")
        == 3
    )


async def test_a_stream_without_usage_counts_content_chunks_and_says_so() -> None:
    words = ("a", "b", "c", "d")
    routes = {"/v1/chat/completions": sse_chat(words, usage=False)}
    async with StandIn(routes) as upstream, gatewayed(f"{upstream.url}/v1") as (exporter, client):
        await client.post("/v1/chat/completions", json={"model": "m", "stream": True})
        scrape = await exporter.scrape()
    assert scrape.all("llm_gateway_tokens_total") == [
        (
            {
                "provider": "p",
                "model": "m",
                "type": "output",
                "source": "stream_chunks",
                "client": "",
            },
            4.0,
        )
    ]


async def test_model_labels_are_bounded() -> None:
    routes = openai_routes(**{"/v1/chat/completions": json_reply({"choices": []})})
    async with StandIn(routes) as upstream, gatewayed(f"{upstream.url}/v1") as (exporter, client):
        await exporter.scrape()  # the provider's own models are known from here on
        for index in range(60):
            await client.post("/v1/chat/completions", json={"model": f"junk-{index}"})
        await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini"})
        scrape = await exporter.scrape()
    models = {labels["model"] for labels, _ in scrape.all("llm_gateway_requests_total")}
    assert "gpt-4o-mini" in models and "other" in models
    assert len(models) == 16 + 2
    assert requests_total(scrape) == 61


async def test_clients_are_attributed_by_key_digest_never_by_key() -> None:
    key = "sk-team-a-secret"
    prefix = hashlib.sha256(key.encode()).hexdigest()[:12]
    gateway = f"client_keys: {{'{prefix}': team-a}}, client_header: X-Client"
    routes = {"/v1/chat/completions": json_reply({"choices": [], "usage": {"prompt_tokens": 3}})}
    async with (
        StandIn(routes) as upstream,
        gatewayed(f"{upstream.url}/v1", gateway=gateway) as (exporter, client),
    ):
        auth = {"Authorization": f"Bearer {key}"}
        await client.post("/v1/chat/completions", json={"model": "m"}, headers=auth)
        await client.post("/v1/chat/completions", json={"model": "m"}, headers={"X-Client": "ide"})
        await client.post("/v1/chat/completions", json={"model": "m"})
        text = (await exporter.http.get("/metrics")).text
        scrape = await exporter.scrape()
    assert key not in text
    clients = {labels["client"] for labels, _ in scrape.all("llm_gateway_requests_total")}
    assert clients == {"team-a", "ide", ""}


async def test_refused_provider_gets_a_502_in_the_apis_own_shape() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    async with gatewayed(url, kind="ollama") as (exporter, client):
        ollama = await client.post("/api/chat", json={"model": "m"})
        openai = await client.post("/v1/chat/completions", json={"model": "m"})
        scrape = await exporter.scrape()
    assert ollama.status_code == 502 and isinstance(ollama.json()["error"], str)
    assert openai.status_code == 502 and openai.json()["error"]["code"] == 502
    assert requests_total(scrape, code="5xx", outcome="upstream_failed") == 2


async def test_a_provider_that_never_answers_gets_a_504() -> None:
    routes = {"/v1/chat/completions": hang()}
    gateway = "first_byte_timeout: 300ms"
    async with (
        StandIn(routes) as upstream,
        gatewayed(f"{upstream.url}/v1", gateway=gateway) as (exporter, client),
    ):
        response = await client.post("/v1/chat/completions", json={"model": "m"})
        scrape = await exporter.scrape()
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"
    assert requests_total(scrape, code="5xx", outcome="timeout") == 1


async def test_a_stalled_stream_is_cut_after_the_idle_timeout() -> None:
    routes = {"/v1/chat/completions": sse_chat(("a", "b", "c"), stall_after=2)}
    gateway = "idle_timeout: 300ms"
    async with (
        StandIn(routes) as upstream,
        gatewayed(f"{upstream.url}/v1", gateway=gateway) as (exporter, client),
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v1/chat/completions", json={"model": "m", "stream": True})
        scrape = await exporter.scrape()
    assert requests_total(scrape, code="2xx", outcome="timeout") == 1


def dies_mid_stream() -> Handler:
    """Sends two content chunks, then drops the connection as a crashed server would."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("a", "b"):
            piece = {"choices": [{"delta": {"content": word}}]}
            await response.write(b"data: " + json.dumps(piece).encode() + b"\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    return handle


async def test_a_provider_dying_mid_stream_ends_the_clients_stream_and_counts_a_failure() -> None:
    routes = {"/v1/chat/completions": dies_mid_stream()}
    async with StandIn(routes) as upstream, gatewayed(f"{upstream.url}/v1") as (exporter, client):
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            body = {"model": "m", "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for piece in response.aiter_raw():
                    received += piece
        scrape = await exporter.scrape()
    assert received.count(b"data: ") == 2  # what the provider sent, nothing invented
    assert requests_total(scrape, code="2xx", outcome="upstream_failed") == 1


async def test_a_client_going_away_cancels_the_request_upstream() -> None:
    cancelled = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for _ in range(10_000):
                await response.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, ConnectionError):
            cancelled.set()
            raise
        return response

    async with (
        StandIn({"/v1/chat/completions": endless}) as upstream,
        gatewayed(f"{upstream.url}/v1") as (exporter, client),
    ):
        body = {"model": "m", "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for _ in response.aiter_raw():
                break
        await asyncio.wait_for(cancelled.wait(), 5)
        scrape = None
        for _ in range(50):
            scrape = await exporter.scrape()
            if requests_total(scrape, outcome="abandoned"):
                break
            await asyncio.sleep(0.05)
    assert scrape is not None and requests_total(scrape, outcome="abandoned") == 1
    assert scrape.value("llm_gateway_requests_in_flight", provider="p", model="m") == 0


async def test_a_client_going_away_before_the_answer_closes_the_providers_connection() -> None:
    closed = asyncio.Event()

    async def thinking(request: web.Request) -> web.StreamResponse:
        for _ in range(500):  # a long non-streamed generation, watching its connection
            if request.transport is None or request.transport.is_closing():
                closed.set()
                break
            await asyncio.sleep(0.01)
        return web.json_response({"choices": []})

    async with (
        StandIn({"/v1/chat/completions": thinking}) as upstream,
        gatewayed(f"{upstream.url}/v1") as (exporter, client),
    ):
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json={"model": "m"}, timeout=0.3)
        await asyncio.wait_for(closed.wait(), 3)
        scrape = await exporter.scrape()
    assert requests_total(scrape, code="none", outcome="abandoned") == 1


async def test_a_slow_client_holds_back_the_provider_not_the_gateways_memory() -> None:
    """The provider offers 256 MiB; a client that reads nothing lets only a few MiB through."""
    written = 0

    async def flood(request: web.Request) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        try:
            for _ in range(256):
                await response.write(b"\x00" * (1024 * 1024))
                written += 1024 * 1024
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response

    async with (
        StandIn({"/v1/files": flood}) as upstream,
        gatewayed(f"{upstream.url}/v1") as (_, client),
    ):
        async with client.stream("GET", "/v1/files") as response:
            async for _ in response.aiter_raw():
                break
            await asyncio.sleep(1.0)
            held = written
    assert held < 32 * 1024 * 1024


class StaleKeepAlive:
    """A server that answers one request per connection while advertising keep-alive, and
    closes a reused connection as soon as the next request arrives (llama-server does so
    after streamed answers and after 100 requests): the race a pooled client must survive."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.answered = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = True
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if not first:
                    return  # closed without an answer: the request never reached a model
                first = False
                body = b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Keep-Alive: timeout=5, max=100\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                if head.startswith(b"POST "):  # not the exporter's own status requests
                    self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> StaleKeepAlive:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_request_on_a_connection_the_provider_closed_is_sent_again() -> None:
    async with (
        StaleKeepAlive() as upstream,
        gatewayed(f"http://127.0.0.1:{upstream.port}/v1") as (exporter, client),
    ):
        statuses = []
        for _ in range(20):
            response = await client.post("/v1/chat/completions", json={"model": "m"})
            statuses.append(response.status_code)
        scrape = await exporter.scrape()
    assert statuses == [200] * 20
    assert upstream.answered == 20
    # Every second request finds the pooled connection closed: the one after a retry (on a
    # connection of its own) opens a new pooled connection, which answers once.
    assert scrape.value("llm_gateway_upstream_retries_total", provider="p") == 10
    assert requests_total(scrape, code="2xx", outcome="complete") == 20
