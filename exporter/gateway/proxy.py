"""Forwarding one provider's traffic: headers, bodies, the streamed relay, retries and
cancellation, with every request measured on the way."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..client import KEEPALIVE_EXPIRY, ssl_context
from ..config import ProviderConfig
from ..logs import fields
from .meter import METERED, ModelScanner, Reading, ResponseMeter, Usage, model_in, operation_of
from .stats import (
    ABANDONED,
    COMPLETE,
    FROM_CHUNKS,
    FROM_USAGE,
    TIMEOUT,
    UPSTREAM_FAILED,
    Measurement,
    ProviderTraffic,
)

log = logging.getLogger(__name__)

# Request bodies up to this size are read whole before forwarding (so a stale connection
# can be retried with them); larger ones stream through as they arrive.
MAX_READ_BODY_BYTES = 1024 * 1024
# Headers that concern one connection only (RFC 9110, section 7.6.1), never forwarded;
# Host is set for the provider, Expect answered here, Proxy-Authorization meant for a proxy.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",
    )
)
# Errors that mean a pooled connection was already closed by the provider: the request
# never reached a model, so it is sent once more on a new connection.
STALE_CONNECTION_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def _forwarded(headers: Any) -> CIMultiDict[str]:
    """The headers to pass on: all but hop-by-hop ones and those the Connection header names."""
    forwarded = CIMultiDict(headers)
    for value in headers.getall("Connection", ()):
        for name in value.split(","):
            forwarded.popall(name.strip(), None)
    for name in HOP_BY_HOP:
        forwarded.popall(name, None)
    return forwarded


def upstream_root(provider: ProviderConfig) -> str:
    """Where the gateway's paths start at the provider: its url, less the /v1 that an
    openai kind's url ends in (clients of the gateway send /v1/... themselves)."""
    if provider.kind == "openai":
        return provider.url.removesuffix("/v1")
    return provider.url


def status_class(status: int) -> str:
    """The code label of a status: 2xx, 4xx, ..."""
    return f"{status // 100}xx"


def error_response(path: str, status: int, message: str) -> web.Response:
    """An error in the shape the client's API expects: Ollama's for /api/, else OpenAI's."""
    if path.startswith("/api/"):
        document: dict[str, Any] = {"error": message}
    else:
        kind = "timeout_error" if status == 504 else "upstream_error"
        document = {"error": {"message": message, "type": kind, "code": status}}
    return web.Response(
        status=status, body=json.dumps(document).encode(), content_type="application/json"
    )


# Set by the handler of each request, read by _PoolConnector (both run in its task).
_reused: ContextVar[list[bool] | None] = ContextVar("reused", default=None)


class _PoolConnector(aiohttp.TCPConnector):
    """A pool that notes, for the request asking, whether it got a connection used before."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._used: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        connection = await super().connect(req, traces, timeout)
        note, protocol = _reused.get(), connection.protocol
        if note is not None:
            note.append(protocol in self._used)
        self._used.add(protocol)
        return connection


class Proxy:
    """Forwards every request to one provider and measures what it did."""

    def __init__(
        self,
        provider: ProviderConfig,
        traffic: ProviderTraffic,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        assert provider.gateway is not None
        self.provider = provider
        self.root = upstream_root(provider)
        self.traffic = traffic
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._fresh_session: aiohttp.ClientSession | None = None
        self.active = 0  # requests in progress
        self._idle = asyncio.Event()
        self._idle.set()

    def _sessions(self) -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
        # Created on first use: a session belongs to the event loop that runs it.
        if self._session is None or self._fresh_session is None:
            self._session = self._new_session(pooled=True)
            self._fresh_session = self._new_session(pooled=False)
        return self._session, self._fresh_session

    def _new_session(self, *, pooled: bool) -> aiohttp.ClientSession:
        gateway = self.provider.gateway
        assert gateway is not None
        options: dict[str, Any] = {
            "limit": gateway.max_connections,
            "ssl": ssl_context(self.provider),
        }
        connector = (
            _PoolConnector(keepalive_timeout=KEEPALIVE_EXPIRY, **options)
            if pooled
            else aiohttp.TCPConnector(force_close=True, **options)
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.provider.timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False,
        )

    async def aclose_when_idle(self, limit: float) -> None:
        """Close the connections to the provider once no request uses them (or after limit)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), limit)
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections to the provider."""
        for session in (self._session, self._fresh_session):
            if session is not None:
                await session.close()
        self._session = self._fresh_session = None

    def client_of(self, request: web.BaseRequest) -> str:
        """The client a request comes from, as the configuration attributes it ("" if not)."""
        gateway = self.provider.gateway
        assert gateway is not None
        if gateway.client_keys:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and token:
                digest = hashlib.sha256(token.strip().encode()).hexdigest()
                for prefix, name in gateway.client_keys.items():
                    if digest.startswith(prefix):
                        return name
        if gateway.client_header is not None:
            named = request.headers.get(gateway.client_header)
            if named:
                return self.traffic.clients.label(named)
        return ""

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Forward one request and relay the provider's answer as it comes."""
        started = self._clock()
        operation = operation_of(request.path)
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body, scanner, rest = await self._body(request)
        except (aiohttp.ClientError, ValueError) as exc:  # a malformed or broken request body
            log.debug("gateway: request body not read", extra=fields(error=type(exc).__name__))
            return error_response(request.path, 400, "llm-exporter gateway: bad request body")
        requested = model_in(body) if scanner is None else scanner.model
        model = self.traffic.models.label(requested) if requested else ""
        call = _Call(self, request, operation, model, started)
        self.traffic.started(model)
        self.active += 1
        self._idle.clear()
        try:
            return await call.run(body, rest, scanner)
        except asyncio.CancelledError:  # the client went away: aiohttp cancels its handler
            call.outcome = ABANDONED
            raise
        finally:
            self.traffic.finished(call.measurement(self._clock()), in_flight=model)
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def _body(
        self, request: web.BaseRequest
    ) -> tuple[bytes, ModelScanner | None, AsyncIterator[bytes] | None]:
        """The request body whole if it is small; else its head, a scanner for its model, and
        an iterator over the head and the rest as it arrives."""
        length = request.content_length
        if length is not None and length <= MAX_READ_BODY_BYTES:
            return await request.read(), None, None
        head = bytearray()
        while len(head) <= MAX_READ_BODY_BYTES:
            chunk = await request.content.read(MAX_READ_BODY_BYTES + 1 - len(head))
            if not chunk:
                return bytes(head), None, None
            head += chunk
        scanner = ModelScanner()
        scanner.feed(bytes(head))

        async def stream() -> AsyncIterator[bytes]:
            yield bytes(head)
            async for chunk in request.content.iter_any():
                scanner.feed(chunk)
                yield chunk

        return b"", scanner, stream()


class _Watchdog:
    """One timer per request that cancels its task when no progress came within limit
    seconds of the last (cheaper than a timeout rescheduled at every chunk)."""

    def __init__(self, limit: float, soonest: float) -> None:
        """Allow limit seconds now; soonest is the shortest limit it will be changed to (the
        first check comes then: one timer, never moved, serves every later limit)."""
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.limit = limit
        self.last = self.loop.time()
        self.fired = False
        first_check = self.last + min(limit, soonest)
        self._handle: asyncio.TimerHandle | None = self.loop.call_at(first_check, self._check)

    def _check(self) -> None:
        due = self.last + self.limit
        if self.loop.time() < due:
            self._handle = self.loop.call_at(due, self._check)
            return
        self.fired, self._handle = True, None
        self.task.cancel()

    def change_limit(self, limit: float) -> None:
        """From now on, allow limit seconds without progress (at least the soonest)."""
        self.limit, self.last = limit, self.loop.time()

    def uncancel(self) -> None:
        """Take back the cancellation this watchdog caused."""
        self.task.uncancel()

    def stop(self) -> None:
        """No more checks."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _ClientGone(Exception):
    """The client closed its connection while its answer was being written."""


class _Call:
    """One request on its way through the gateway."""

    def __init__(
        self, proxy: Proxy, request: web.BaseRequest, operation: str, model: str, started: float
    ) -> None:
        self.proxy = proxy
        self.request = request
        self.operation = operation
        self.model = model
        self.started = started
        self.client = proxy.client_of(request)
        self.code = "none"
        self.outcome = COMPLETE
        self.reading: Reading | None = None
        self.response: web.StreamResponse | None = None

    async def run(
        self, body: bytes, rest: AsyncIterator[bytes] | None, scanner: ModelScanner | None
    ) -> web.StreamResponse:
        """Send the request on and relay the answer; an error answer if there is none."""
        gateway = self.proxy.provider.gateway
        assert gateway is not None
        watchdog = _Watchdog(gateway.first_byte_timeout, gateway.idle_timeout)
        try:
            upstream = await self._send(body, rest)
            if scanner is not None and not self.model and scanner.model:
                self.model = self.proxy.traffic.models.label(scanner.model)
            watchdog.change_limit(gateway.idle_timeout)  # from the headers on: between chunks
            try:
                await self._relay(upstream, watchdog)
            except BaseException:
                upstream.close()  # at once: the provider stops generating for nobody
                raise
            upstream.release()
        except _ClientGone:
            self.outcome = ABANDONED
        except asyncio.CancelledError:
            if not watchdog.fired:
                raise
            watchdog.uncancel()
            return self._fail(504, TIMEOUT, "gave no answer within the gateway's timeout")
        except (aiohttp.ClientError, OSError) as exc:
            return self._fail(502, UPSTREAM_FAILED, _reason(exc))
        finally:
            watchdog.stop()
        assert self.response is not None
        return self.response

    async def _send(self, body: bytes, rest: AsyncIterator[bytes] | None) -> aiohttp.ClientResponse:
        """The provider's answer (its headers); a request that found a pooled connection
        closed by the provider is sent once more on a new one."""
        proxy, request = self.proxy, self.request
        pooled, fresh = proxy._sessions()
        # As the client encoded it: yarl would otherwise normalise the escapes.
        url = URL(proxy.root + request.rel_url.raw_path_qs, encoded=True)
        headers = _forwarded(request.headers)
        if rest is None:
            headers.popall("Content-Length", None)  # set again for the bytes sent
        data: Any = rest if rest is not None else (body or None)
        reused: list[bool] = []
        token = _reused.set(reused)
        try:
            return await pooled.request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            )
        except STALE_CONNECTION_ERRORS:
            if reused != [True] or rest is not None:
                raise
        finally:
            _reused.reset(token)
        proxy.traffic.retries += 1
        return await fresh.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        )

    def _fail(self, status: int, outcome: str, reason: str) -> web.StreamResponse:
        """The answer when the provider gave none; a cut connection when its answer broke off."""
        self.outcome = outcome
        if self.response is not None:  # the answer had begun: end it as the provider did
            transport = self.request.transport
            if transport is not None:
                transport.close()
            return self.response
        provider = self.proxy.provider.name
        log.warning(
            "gateway: no answer from the provider",
            extra=fields(provider=provider, status=status, reason=reason),
        )
        self.code = status_class(status)
        message = f"llm-exporter gateway: provider {provider} {reason}"
        return error_response(self.request.path, status, message)

    async def _relay(self, upstream: aiohttp.ClientResponse, watchdog: _Watchdog) -> None:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=_forwarded(upstream.headers),
        )
        meter = None
        if self.operation in METERED and 200 <= upstream.status < 300:
            meter = ResponseMeter(
                upstream.headers.get("Content-Type", ""),
                upstream.headers.get("Content-Encoding", ""),
            )
        try:
            await response.prepare(self.request)
        except ConnectionError:
            raise _ClientGone from None
        self.response, self.code = response, status_class(upstream.status)
        clock, content, now = self.proxy._clock, upstream.content, watchdog.loop.time
        while True:
            watchdog.last = now()
            chunk = await content.readany()
            if not chunk:
                break
            try:
                await response.write(chunk)
            except ConnectionError:
                raise _ClientGone from None
            if meter is not None and meter.format is not None:
                meter.feed(chunk, clock())
        watchdog.stop()
        if meter is not None:
            self.reading = meter.finish()
            if self.reading.error_in_stream:
                self.outcome = UPSTREAM_FAILED
        try:
            await response.write_eof()
        except ConnectionError:
            raise _ClientGone from None

    def measurement(self, now: float) -> Measurement:
        """What the request did, once it is over."""
        reading, traffic = self.reading, self.proxy.traffic
        model = self.model
        if not model and reading is not None and reading.model:
            model = traffic.models.label(reading.model)
        duration = now - self.started
        if reading is None:
            return Measurement(
                model, self.operation, self.code, self.outcome, self.client, duration
            )
        if reading.unmetered is not None:
            traffic.count_unmetered(reading.unmetered)
        usage = reading.usage or Usage()
        output, source = usage.output_tokens, FROM_USAGE
        if output is None and reading.content_chunks:
            output, source = reading.content_chunks, FROM_CHUNKS
        first, last = reading.first_content_at, reading.last_content_at
        per_token = None
        if first is not None and last is not None and output and output > 1 and last > first:
            per_token = (last - first) / (output - 1)
        return Measurement(
            model,
            self.operation,
            self.code,
            self.outcome,
            self.client,
            duration,
            time_to_first_token=None if first is None else first - self.started,
            time_per_output_token=per_token,
            input_tokens=usage.input_tokens,
            output_tokens=output,
            cached_input_tokens=usage.cached_input_tokens,
            token_source=source,
        )


def _reason(exc: BaseException) -> str:
    """Why the provider could not be reached, in words that hold no URL or credential."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"unreachable ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "closed the connection without answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "broke off its answer"
    if isinstance(exc, OSError):
        return f"failed ({exc.strerror or type(exc).__name__})"
    return f"failed ({type(exc).__name__})"
