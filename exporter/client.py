"""HTTP calls to one provider: time and size limits, failure classes, and request accounting."""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from itertools import accumulate
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from . import __version__
from .errors import FailureClass, ProviderError
from .providers.base import HistogramData

MAX_BODY_BYTES = 8 * 1024 * 1024
# OpenTelemetry GenAI's operation-duration buckets: doubling from 10 ms to about 82 s.
# OpenTelemetry GenAI's recommended buckets: operation duration (doubling from 10 ms to
# 81.92 s), time to first token, time per output token.
DURATION_BUCKETS = tuple(0.01 * 2**i for i in range(14))
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# Shorter than the 5 s keep-alive that llama-server and uvicorn announce, so the pool
# drops a connection before the server does instead of racing it.
KEEPALIVE_EXPIRY = 4.0
SUCCESS = "success"
# The outcome of asking an optional endpoint the server does not offer: no failure.
UNSUPPORTED = "unsupported"
OK_STATUSES = range(200, 300)
# How long an optional endpoint that answered 404 or 501 is left alone: short enough that
# a server restarted with --metrics shows its metrics within a minute.
UNSUPPORTED_RECHECK_SECONDS = 60.0
# Bodies larger than this are parsed in a worker thread, so that a large answer does not
# hold the event loop (and every other scrape and health check) while it is read.
PARSE_IN_THREAD_BYTES = 256 * 1024
T = TypeVar("T")
# When the running collection must be done (on the client's clock): every request of
# a provider shares what is left of one budget, so a provider costs at most its timeout.
DEADLINE: ContextVar[float | None] = ContextVar("llm_exporter_deadline", default=None)

if TYPE_CHECKING:
    from .config import ProviderConfig


@dataclass
class Buckets:
    """A histogram being filled: upper bounds, per-bucket counts (the last for +Inf) and sum."""

    bounds: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(init=False)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    @property
    def observed(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    def observe(self, value: float) -> None:
        """Count one observation (le: a value equal to a bound falls in that bound's bucket)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def data(self) -> HistogramData:
        """The cumulative form the renderer takes."""
        bounds = (*self.bounds, math.inf)
        cumulative = map(float, accumulate(self.counts))
        return HistogramData(tuple(zip(bounds, cumulative, strict=True)), self.total)


@dataclass
class EndpointStats:
    """Long-lived counts of the exporter's requests to one provider endpoint."""

    outcomes: dict[str, int] = field(default_factory=dict)
    retries: int = 0


@dataclass
class ConnectionStats:
    """Counts of every request the exporter made to every provider, since start."""

    endpoints: dict[tuple[str, str], EndpointStats] = field(default_factory=dict)
    durations: dict[str, Buckets] = field(default_factory=dict)
    last_request: dict[str, float] = field(default_factory=dict)

    def observe(
        self, provider: str, endpoint: str, outcome: str, seconds: float, at: float
    ) -> None:
        """Count one finished request."""
        stats = self.endpoints.get((provider, endpoint))
        if stats is None:
            stats = self.endpoints[(provider, endpoint)] = EndpointStats()
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        self.durations.setdefault(provider, Buckets()).observe(seconds)
        self.last_request[provider] = at

    def count_retry(self, provider: str, endpoint: str) -> None:
        """Count a request retried on a fresh connection after a stale keep-alive."""
        self.endpoints.setdefault((provider, endpoint), EndpointStats()).retries += 1

    def forget_except(self, providers: set[str]) -> None:
        """Drop the counts of providers that are no longer configured."""
        for key in [key for key in self.endpoints if key[0] not in providers]:
            del self.endpoints[key]
        for table in (self.durations, self.last_request):
            for name in [name for name in table if name not in providers]:
                del table[name]


@dataclass(frozen=True)
class Reply:
    """A provider's answer: status and a size-bounded body."""

    endpoint: str
    status: int
    body: bytes
    content_type: str
    seconds: float

    def ok(self) -> Reply:
        """Return self if the status is 2xx, else raise a classified ProviderError."""
        if 200 <= self.status < 300:
            return self
        raise ProviderError(
            status_failure(self.status), f"HTTP {self.status}", endpoint=self.endpoint
        )

    def json(self) -> Any:
        """The body parsed as JSON."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            kind = "HTML" if self.body.lstrip()[:1] == b"<" else "malformed JSON"
            raise ProviderError(
                FailureClass.INVALID_RESPONSE, f"expected JSON, got {kind}", endpoint=self.endpoint
            ) from None

    def text(self) -> str:
        """The body decoded as UTF-8."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise ProviderError(
                FailureClass.INVALID_RESPONSE, "body is not UTF-8 text", endpoint=self.endpoint
            ) from None


def _shape_error(endpoint: str, exc: Exception) -> ProviderError:
    if isinstance(exc, RecursionError):
        message = "nested too deeply"
    elif isinstance(exc, MemoryError):
        message = "too large to read"
    else:
        message = f"unexpected shape ({type(exc).__name__})"
    return ProviderError(FailureClass.INVALID_RESPONSE, message, endpoint=endpoint)


def _parse(reply: Reply, parse: Callable[[Reply], T]) -> T:
    try:
        return parse(reply)
    except ProviderError:
        raise
    except Exception as exc:  # whatever the body made the parser do, it costs this endpoint only
        raise _shape_error(reply.endpoint, exc) from None


class Stream:
    """A streamed answer, read line by line with the time each line arrived."""

    def __init__(
        self,
        endpoint: str,
        response: aiohttp.ClientResponse,
        started: float,
        clock: Callable[[], float],
        max_bytes: int,
    ) -> None:
        self.endpoint = endpoint
        self.started = started
        self._response = response
        self._clock = clock
        self._max_bytes = max_bytes

    async def lines(self) -> AsyncIterator[tuple[float, bytes]]:
        """(arrival time on the client's clock, line without its end) for each non-empty line."""
        size = 0
        async for raw in self._response.content:
            size += len(raw)
            if size > self._max_bytes:
                raise ProviderError(
                    FailureClass.INVALID_RESPONSE,
                    "streamed answer too large",
                    endpoint=self.endpoint,
                )
            line = raw.strip()
            if line:
                yield self._clock(), line


def status_failure(status: int) -> FailureClass:
    """The failure class of a non-2xx HTTP status."""
    if 400 <= status < 500:
        return FailureClass.HTTP_4XX
    if status >= 500:
        return FailureClass.HTTP_5XX
    return FailureClass.INVALID_RESPONSE


def ssl_context(config: ProviderConfig) -> ssl.SSLContext | bool:
    """How to verify a provider's certificate: an SSL context, or True (the system's CAs) or False."""
    if config.tls_config.insecure_skip_verify:
        return False
    if config.tls_config.ca_file is not None:
        return ssl.create_default_context(cafile=str(config.tls_config.ca_file))
    return True


class ProviderClient:
    """Makes the requests of one provider and accounts for each of them."""

    def __init__(
        self,
        config: ProviderConfig,
        stats: ConnectionStats,
        *,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        headers = {"User-Agent": f"llm-exporter/{__version__}", **config.headers}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self.provider = config.name
        self.timeout = config.timeout
        self._base_url = config.url
        self._headers = headers
        self._ssl = ssl_context(config)
        self._secret = config.api_key
        self._stats = stats
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_body = max_body_bytes
        self._unsupported: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None
        self._stream_session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the event loop that runs it.
        if self._session is None:
            tracing = aiohttp.TraceConfig()
            tracing.on_connection_reuseconn.append(_count_connection)
            tracing.on_connection_create_start.append(_count_connection)
            self._session = self._new_session(
                aiohttp.TCPConnector(limit=20, keepalive_timeout=KEEPALIVE_EXPIRY, ssl=self._ssl),
                aiohttp.ClientTimeout(sock_connect=self.timeout, sock_read=self.timeout),
                tracing,
            )
        return self._session

    def _open_for_streams(self) -> aiohttp.ClientSession:
        # A POST is not retried, so it never takes a pooled connection that the server
        # may have closed meanwhile (llama-server does when its threads are busy); a new
        # connection per probe costs little at probe rates.
        if self._stream_session is None:
            tracing = aiohttp.TraceConfig()
            tracing.on_request_headers_sent.append(_note_sent)
            self._stream_session = self._new_session(
                aiohttp.TCPConnector(limit=20, force_close=True, ssl=self._ssl),
                aiohttp.ClientTimeout(sock_connect=self.timeout),
                tracing,
            )
        return self._stream_session

    def _new_session(
        self,
        connector: aiohttp.TCPConnector,
        timeout: aiohttp.ClientTimeout,
        *tracing: aiohttp.TraceConfig,
    ) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=timeout,
            trace_configs=list(tracing),
            trust_env=False,
        )

    async def fetch(
        self,
        endpoint: str,
        parse: Callable[[Reply], T],
        *,
        optional: bool = False,
        statuses: Container[int] = OK_STATUSES,
        params: Mapping[str, str] | None = None,
    ) -> T | None:
        """GET an endpoint and parse the reply; raise a classified ProviderError if either fails.

        A reply whose status is not in statuses is a failure, except that an optional
        endpoint the server does not offer (404, 501: llama-server without --slots or
        --metrics) gives None and is not asked for again for a while. Query params are
        sent but not part of the endpoint's name in the exporter's own series.
        """
        if self._unsupported.get(endpoint, -math.inf) > self._clock():
            return None

        async def run() -> tuple[T | None, str]:
            reply = await self._get(endpoint, params)
            if reply.status not in statuses:
                if optional and reply.status in (404, 501):
                    self._unsupported[endpoint] = self._clock() + UNSUPPORTED_RECHECK_SECONDS
                    return None, UNSUPPORTED
                reply.ok()
            if len(reply.body) > PARSE_IN_THREAD_BYTES:
                return await asyncio.to_thread(_parse, reply, parse), SUCCESS
            return _parse(reply, parse), SUCCESS

        return await self._accounted(endpoint, self.timeout, run)

    async def stream(
        self,
        endpoint: str,
        body: dict[str, Any],
        consume: Callable[[Stream], Awaitable[T]],
        *,
        timeout: float,
    ) -> T:
        """POST a JSON body and let consume read the streamed answer line by line.

        The request is accounted like any other: a stall past timeout is a timeout,
        and consume's complaints about the content are invalid_response.
        """

        async def run() -> tuple[T, str]:
            sending = _Sending(self._clock)
            try:
                async with self._open_for_streams().post(
                    self._base_url + endpoint,
                    json=body,
                    allow_redirects=False,
                    trace_request_ctx=sending,
                ) as response:
                    if response.status not in OK_STATUSES:
                        raise ProviderError(
                            status_failure(response.status),
                            f"HTTP {response.status}",
                            endpoint=endpoint,
                        )
                    # Timed from the request on the wire: the fresh connection's setup is not
                    # the model's time to first token.
                    started = sending.sent if sending.sent is not None else self._clock()
                    stream = Stream(endpoint, response, started, self._clock, self._max_body)
                    try:
                        return await consume(stream), SUCCESS
                    except (ProviderError, aiohttp.ClientError):
                        raise
                    except Exception as exc:  # a bomb in the stream costs this probe only
                        raise _shape_error(endpoint, exc) from None
            except aiohttp.ClientError as exc:
                raise self._classify(endpoint, exc) from None

        return await self._accounted(endpoint, timeout, run)

    async def _accounted(
        self, endpoint: str, timeout: float, run: Callable[[], Awaitable[tuple[T, str]]]
    ) -> T:
        """Run one request within its time budget and count it with its outcome."""
        started = self._clock()
        outcome = FailureClass.TIMEOUT.value
        deadline = DEADLINE.get()
        budget = timeout if deadline is None else min(timeout, deadline - started)
        try:
            if budget <= 0:
                raise ProviderError(FailureClass.TIMEOUT, "no time left", endpoint=endpoint)
            try:
                async with asyncio.timeout(budget):
                    value, outcome = await run()
            except TimeoutError:
                raise ProviderError(
                    FailureClass.TIMEOUT, f"no answer within {budget:.3g}s", endpoint=endpoint
                ) from None
            return value
        except ProviderError as exc:
            outcome = exc.failure.value
            if exc.failure is FailureClass.CONNECT:
                # The server went away: when it is back, it may be another build or have
                # other flags, so ask its optional endpoints again.
                self._unsupported.clear()
            raise
        except Exception as exc:  # never let a provider's answer escape classification
            outcome = FailureClass.INVALID_RESPONSE.value
            raise _shape_error(endpoint, exc) from None
        finally:
            # A cancelled request (the scrape deadline passed) is counted as a timeout.
            self._stats.observe(
                self.provider, endpoint, outcome, self._clock() - started, self._wall_clock()
            )

    async def post(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        parse: Callable[[Reply], T],
        *,
        timeout: float,
    ) -> T:
        """POST a JSON body (an action such as loading a model), never retried, and parse
        the reply; raise a classified ProviderError if either fails."""

        async def run() -> tuple[T, str]:
            started = self._clock()
            try:
                async with self._open_for_streams().post(
                    self._base_url + endpoint, json=dict(body), allow_redirects=False
                ) as response:
                    reply = await self._read(endpoint, response, started)
            except aiohttp.ClientError as exc:
                raise self._classify(endpoint, exc) from None
            reply.ok()
            return _parse(reply, parse), SUCCESS

        return await self._accounted(endpoint, timeout, run)

    async def _get(self, endpoint: str, params: Mapping[str, str] | None = None) -> Reply:
        started = self._clock()
        attempts = _Attempts()
        try:
            async with self._open().get(
                self._base_url + endpoint,
                params=params,
                allow_redirects=False,
                trace_request_ctx=attempts,
            ) as response:
                if attempts.connections > 1:
                    # The server closed a pooled keep-alive connection before answering
                    # (llama-server does after 100 requests) and aiohttp asked again on a
                    # fresh one: not a provider fault, but worth counting.
                    self._stats.count_retry(self.provider, endpoint)
                return await self._read(endpoint, response, started)
        except aiohttp.ClientError as exc:
            raise self._classify(endpoint, exc) from None

    async def _read(self, endpoint: str, response: aiohttp.ClientResponse, started: float) -> Reply:
        """A response's body, read up to the size bound."""
        declared = response.content_length
        if declared is not None and declared > self._max_body:
            raise self._too_large(endpoint)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > self._max_body:
                raise self._too_large(endpoint)
            chunks.append(chunk)
        return Reply(
            endpoint=endpoint,
            status=response.status,
            body=b"".join(chunks),
            content_type=response.headers.get("Content-Type", ""),
            seconds=self._clock() - started,
        )

    def _too_large(self, endpoint: str) -> ProviderError:
        return ProviderError(
            FailureClass.INVALID_RESPONSE,
            f"response body larger than {self._max_body // (1024 * 1024)} MiB",
            endpoint=endpoint,
        )

    def _classify(self, endpoint: str, exc: aiohttp.ClientError) -> ProviderError:
        if isinstance(exc, aiohttp.ServerTimeoutError):
            failure, message = FailureClass.TIMEOUT, f"no answer within {self.timeout:g}s"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            failure, message = FailureClass.CONNECT, exc.strerror or "connection failed"
        elif isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
            failure, message = FailureClass.INVALID_RESPONSE, "malformed HTTP response"
        elif isinstance(exc, aiohttp.ServerDisconnectedError):
            failure, message = FailureClass.CONNECT, "server closed the connection"
        else:
            failure, message = FailureClass.CONNECT, self._clean(str(exc)) or type(exc).__name__
        return ProviderError(failure, message, endpoint=endpoint)

    def _clean(self, message: str) -> str:
        if self._secret:
            message = message.replace(self._secret, "<secret>")
        return message[:200]

    async def aclose(self) -> None:
        """Close pooled connections."""
        for session in (self._session, self._stream_session):
            if session is not None:
                await session.close()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Sending:
    """When a request's headers went out."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.sent: float | None = None


async def _note_sent(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: object
) -> None:
    sending = context.trace_request_ctx
    if isinstance(sending, _Sending):
        sending.sent = sending.clock()


class _Attempts:
    """How many connections one request took (more than one: it was retried)."""

    def __init__(self) -> None:
        self.connections = 0


async def _count_connection(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: object
) -> None:
    attempts = context.trace_request_ctx
    if isinstance(attempts, _Attempts):
        attempts.connections += 1
