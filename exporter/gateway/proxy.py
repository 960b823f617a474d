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
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..client import KEEPALIVE_EXPIRY, ssl_context
from ..config import ProviderConfig
from ..logs import fields
from .cache import BYPASS, HIT, MISS, Entry, Plan, ResponseCache
from .meter import (
    METERED,
    ModelScanner,
    Reading,
    ResponseMeter,
    Usage,
    model_of,
    operation_of,
    request_document,
)
from .queue import AdmissionQueue, Rejected, Ticket, clamp_priority
from .stats import (
    ABANDONED,
    CACHED,
    COMPLETE,
    FROM_CHUNKS,
    FROM_USAGE,
    OTHER,
    REJECTED,
    REJECTED_FULL,
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


# The OpenAI-style error type of each status the gateway answers itself.
ERROR_TYPES = {
    400: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "unavailable_error",
    504: "timeout_error",
}
NO_PLAN = Plan()


def error_response(
    path: str, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error in the shape the client's API expects: Ollama's for /api/, else OpenAI's."""
    if path.startswith("/api/"):
        document: dict[str, Any] = {"error": message}
    else:
        kind = ERROR_TYPES.get(status, "upstream_error")
        document = {"error": {"message": message, "type": kind, "code": status}}
    return web.Response(
        status=status,
        body=json.dumps(document).encode(),
        content_type="application/json",
        headers=headers,
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


class ModelUses(Protocol):
    """Who is told when a request for a model starts and ends (the model lifecycle)."""

    async def begin(self, provider: str, model: str, document: Any = None) -> None:
        """A request for a model is about to be forwarded (never raises)."""
        ...

    def end(
        self, provider: str, model: str, *, load_seconds: float | None = None, use: bool = True
    ) -> None:
        """The request is over; load_seconds: how long the provider said it spent loading."""
        ...


class Proxy:
    """Forwards every request to one provider and measures what it did."""

    def __init__(
        self,
        provider: ProviderConfig,
        traffic: ProviderTraffic,
        *,
        queue: AdmissionQueue | None = None,
        cache: ResponseCache | None = None,
        uses: ModelUses | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        assert provider.gateway is not None
        self.provider = provider
        self.root = upstream_root(provider)
        self.traffic = traffic
        self.queue = queue
        self.cache = cache
        self.uses = uses
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

    def priority_of(self, request: web.BaseRequest, client: str) -> int:
        """A request's queue priority: its priority header's, else its client's, else 0."""
        queue = self.queue
        assert queue is not None
        config = queue.config
        if config.priority_header is not None:
            value = request.headers.get(config.priority_header, "").strip()
            if value.lstrip("+-").isdigit() and len(value) <= 8:
                return clamp_priority(int(value))
        return config.client_priorities.get(client, 0)

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
        document = request_document(body) if scanner is None else None  # parsed once
        requested = model_of(document) if scanner is None else scanner.model
        model = self.traffic.models.label(requested) if requested else ""
        call = _Call(self, request, operation, model, started)
        call.document = document
        metered = operation in METERED
        if self.cache is not None and metered:
            call.plan = self.cache.plan(
                request.method,
                request.rel_url.raw_path_qs,
                request.headers,
                document,
                operation,
            )
            entry = self._cached(call)
            if entry is not None:
                return self._from_cache(call, entry)
        self.active += 1
        self._idle.clear()
        try:
            ticket = None
            if self.queue is not None and metered:
                try:
                    ticket = await self._admit(call)
                except Rejected as rejected:
                    return self._rejected(call, rejected)
            return await self._forward(call, body, rest, scanner, ticket)
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    def _cached(self, call: _Call) -> Entry | None:
        """The cache's answer to a call, counting the lookup."""
        cache, plan = self.cache, call.plan
        assert cache is not None
        if plan.key is None or not plan.lookup:
            cache.stats.looked_up(BYPASS, plan.bypass)
            return None
        entry = cache.get(plan.key, self._clock())
        cache.stats.looked_up(HIT if entry is not None else MISS)
        return entry

    def _from_cache(self, call: _Call, entry: Entry) -> web.StreamResponse:
        """The stored answer, counting what it spared the provider."""
        cache = self.cache
        assert cache is not None
        now = self._clock()
        stats = cache.stats
        stats.saved_tokens["input"] += entry.input_tokens
        stats.saved_tokens["output"] += entry.output_tokens
        stats.saved_seconds += entry.seconds
        call.code, call.outcome = status_class(entry.status), CACHED
        self.traffic.finished(call.measurement(now))
        return cache.answer(entry, now)

    async def _admit(self, call: _Call) -> Ticket:
        """A slot for the call (Rejected if the queue turns it away)."""
        queue = self.queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        priority = self.priority_of(call.request, call.client)
        try:
            return await queue.admit(priority, clock=self._clock, loop=loop)
        except asyncio.CancelledError:  # the client went away while waiting
            call.outcome = ABANDONED
            self.traffic.finished(call.measurement(self._clock()))
            raise

    def _rejected(self, call: _Call, rejected: Rejected) -> web.StreamResponse:
        """The answer to a request the queue turned away, in the shape of the client's API."""
        queue = self.queue
        assert queue is not None
        config = queue.config
        if rejected.outcome == REJECTED_FULL:
            why = f"queue full ({queue.waiting} waiting)"
        else:
            why = f"no slot within {config.max_wait:g}s"
        message = f"llm-exporter gateway: provider {self.provider.name} {why}"
        status = config.overflow_status
        call.code, call.outcome = status_class(status), REJECTED
        self.traffic.finished(call.measurement(self._clock()))
        retry_after = {"Retry-After": str(rejected.retry_after)}
        return error_response(call.request.path, status, message, retry_after)

    async def _forward(
        self,
        call: _Call,
        body: bytes,
        rest: AsyncIterator[bytes] | None,
        scanner: ModelScanner | None,
        ticket: Ticket | None,
    ) -> web.StreamResponse:
        in_flight = call.model
        uses = self.uses if in_flight not in ("", OTHER) and call.operation in METERED else None
        if uses is not None:
            try:
                await uses.begin(self.provider.name, in_flight, call.document)
            except asyncio.CancelledError:
                uses.end(self.provider.name, in_flight, use=False)
                raise
        self.traffic.started(in_flight)
        try:
            response = await call.run(body, rest, scanner)
        except asyncio.CancelledError:  # the client went away: aiohttp cancels its handler
            call.outcome = ABANDONED
            raise
        finally:
            now = self._clock()
            if uses is not None:
                load = call.reading.load_seconds if call.reading is not None else None
                uses.end(self.provider.name, in_flight, load_seconds=load)
            if ticket is not None:
                assert self.queue is not None
                self.queue.release(ticket, now)
            measurement = call.measurement(now)
            self.traffic.finished(measurement, in_flight=in_flight)
            kept, call.kept = call.kept, None
            if kept is not None:
                assert self.cache is not None
                self.cache.unkeep(len(kept))
        if kept is not None and call.outcome == COMPLETE:
            self._store(call, kept, measurement)
        return response

    def _store(self, call: _Call, kept: bytearray, measurement: Measurement) -> None:
        cache, plan, response = self.cache, call.plan, call.response
        assert cache is not None and plan.key is not None and response is not None
        if not cache.storable(response.status, response.headers, len(kept)):
            return
        cache.put(
            plan.key,
            response.status,
            response.reason,
            response.headers,
            bytes(kept),
            now=self._clock(),
            input_tokens=measurement.input_tokens or 0,
            output_tokens=measurement.output_tokens or 0,
            seconds=measurement.duration,
        )

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
        self.plan = NO_PLAN
        self.kept: bytearray | None = None  # the answer's bytes, for the cache to store
        self.document: Any = None  # the request body, parsed, if it was small enough

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
        cache = self.proxy.cache if self.plan.store and upstream.status == 200 else None
        if cache is not None:
            self.kept = bytearray()
            limit = cache.max_entry_bytes
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
            if self.kept is not None and cache is not None:
                if len(self.kept) + len(chunk) <= limit and cache.keep(len(chunk)):
                    self.kept += chunk
                else:  # too large to store, or too much being read to store: pass it on
                    cache.unkeep(len(self.kept))
                    self.kept = None
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
