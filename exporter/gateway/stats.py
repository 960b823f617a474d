"""Long-lived counts of what the gateway's traffic did, with bounded label values."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..client import DURATION_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, Buckets

OTHER = "other"
# Names a request may bring (a model, a client) kept as label values beyond the known ones;
# later names count as "other", so no client can grow the series without bound.
MAX_NEW_NAMES = 16
MAX_NAME_LENGTH = 128

# How a request ended, as the outcome label says it.
COMPLETE = "complete"  # the provider's whole answer reached the client, whatever its status
ABANDONED = "abandoned"  # the client went away first
UPSTREAM_FAILED = "upstream_failed"  # the provider refused, reset or broke off its answer
TIMEOUT = "timeout"  # no first byte, or no next chunk, within the configured time
REJECTED = "rejected"  # the gateway's queue turned it away (full, or waited too long)
CACHED = "cached"  # answered from the gateway's cache, without the provider
# Outcomes of requests the provider never saw: counted, but not in latencies or tokens.
NOT_FORWARDED = frozenset((REJECTED, CACHED))

# How a request's wait in the queue ended (llm-d's flow control names).
DISPATCHED = "dispatched"
REJECTED_FULL = "rejected_full"
REJECTED_TIMEOUT = "rejected_timeout"
CANCELLED = "cancelled"
QUEUE_OUTCOMES = (DISPATCHED, REJECTED_FULL, REJECTED_TIMEOUT, CANCELLED)
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # fmt: skip
# Rejections remembered for /health (times within the last REJECTION_MEMORY_SECONDS).
REJECTION_MEMORY_SECONDS = 60.0
MAX_REMEMBERED_REJECTIONS = 1024

# Where token counts came from.
FROM_USAGE = "usage"  # the provider's own count (usage, eval_count, timings)
FROM_CHUNKS = "stream_chunks"  # a stream without usage: one content chunk counted as one token


class BoundedNames:
    """Label values from requests: known names as they are, then up to MAX_NEW_NAMES others in
    the order they came, then "other"."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        self.known: frozenset[str] = frozenset(known)
        self.seen: set[str] = set()

    def label(self, name: str) -> str:
        """The label value for a name a request brought."""
        if name in self.known or name in self.seen:
            return name
        if (
            len(self.seen) < MAX_NEW_NAMES
            and 0 < len(name) <= MAX_NAME_LENGTH
            and name.isprintable()
        ):
            self.seen.add(name)
            return name
        return OTHER


@dataclass(frozen=True)
class Measurement:
    """What one request through the gateway did (labels already bounded)."""

    model: str
    operation: str
    code: str  # status class the client got (2xx ... 5xx), "none" if it got no answer
    outcome: str
    client: str
    duration: float
    time_to_first_token: float | None = None
    time_per_output_token: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    token_source: str = FROM_USAGE


@dataclass
class Latencies:
    """The histograms of one model and operation."""

    duration: Buckets = field(default_factory=lambda: Buckets(DURATION_BUCKETS))
    time_to_first_token: Buckets = field(default_factory=lambda: Buckets(TTFT_BUCKETS))
    time_per_output_token: Buckets = field(default_factory=lambda: Buckets(TPOT_BUCKETS))


@dataclass
class QueueStats:
    """The state and history of one provider's admission queue."""

    max_concurrent: int = 0
    max_waiting: int = 0
    running: int = 0  # dispatched requests holding a slot
    waiting: int = 0
    waiting_by_priority: dict[int, int] = field(default_factory=lambda: {0: 0})
    wait: dict[str, Buckets] = field(
        default_factory=lambda: {o: Buckets(QUEUE_WAIT_BUCKETS) for o in QUEUE_OUTCOMES}
    )
    service_rate: float | None = None  # requests per second the provider serves when full
    # When recent rejections happened (clock time), newest last.
    rejections: deque[float] = field(
        default_factory=lambda: deque(maxlen=MAX_REMEMBERED_REJECTIONS)
    )

    def add_waiting(self, priority: int, change: int) -> None:
        """One more (1) or one fewer (-1) request of a priority waiting."""
        self.waiting += change
        self.waiting_by_priority[priority] = self.waiting_by_priority.get(priority, 0) + change

    def waited(self, outcome: str, seconds: float, now: float) -> None:
        """A request's wait ended as outcome says, after seconds."""
        self.wait[outcome].observe(seconds)
        if outcome in (REJECTED_FULL, REJECTED_TIMEOUT):
            self.rejections.append(now)

    def recent_rejections(self, now: float) -> int:
        """Requests turned away within the last REJECTION_MEMORY_SECONDS."""
        since = now - REJECTION_MEMORY_SECONDS
        return sum(1 for at in self.rejections if at >= since)


@dataclass
class CacheStats:
    """The size and history of one provider's response cache."""

    max_entries: int = 0
    max_bytes: int = 0
    entries: int = 0
    bytes: int = 0  # what the entries take, by the cache's own accounting
    lookups: dict[str, int] = field(default_factory=lambda: {"hit": 0, "miss": 0, "bypass": 0})
    bypasses: dict[str, int] = field(default_factory=dict)  # by reason
    evictions: dict[str, int] = field(default_factory=dict)  # by reason
    saved_tokens: dict[str, int] = field(default_factory=lambda: {"input": 0, "output": 0})
    saved_seconds: float = 0.0  # what the provider took for the answers hits repeated

    def looked_up(self, result: str, bypass_reason: str = "") -> None:
        """One lookup: hit, miss, or bypass (and why)."""
        self.lookups[result] += 1
        if bypass_reason:
            self.bypasses[bypass_reason] = self.bypasses.get(bypass_reason, 0) + 1

    def evicted(self, reason: str) -> None:
        """One entry dropped: expired, or to stay within max_entries or max_bytes."""
        self.evictions[reason] = self.evictions.get(reason, 0) + 1


@dataclass
class ProviderTraffic:
    """Everything one provider's gateway counted since the exporter started."""

    models: BoundedNames = field(default_factory=BoundedNames)
    clients: BoundedNames = field(default_factory=BoundedNames)
    # (model, operation, code, outcome, client) -> requests
    requests: dict[tuple[str, str, str, str, str], int] = field(default_factory=dict)
    latencies: dict[tuple[str, str], Latencies] = field(default_factory=dict)
    # (model, type, source, client) -> tokens
    tokens: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    cached_input_tokens: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    unmetered: dict[str, int] = field(default_factory=dict)
    connections: int = 0  # client connections open to the gateway
    connections_closed: int = 0  # closed because max_connections were open
    queue: QueueStats | None = None  # while the gateway has a queue
    cache: CacheStats | None = None  # while the gateway's cache is on

    def started(self, model: str) -> None:
        """A request for model is on its way to the provider."""
        self.in_flight[model] = self.in_flight.get(model, 0) + 1

    def finished(self, measurement: Measurement, *, in_flight: str | None = None) -> None:
        """A request has ended: count it (and, if it was forwarded, counted in flight under
        in_flight, no longer there)."""
        m = measurement
        if in_flight is not None:
            self.in_flight[in_flight] -= 1
        key = (m.model, m.operation, m.code, m.outcome, m.client)
        self.requests[key] = self.requests.get(key, 0) + 1
        if m.outcome in NOT_FORWARDED:
            return
        latencies = self.latencies.get((m.model, m.operation))
        if latencies is None:
            latencies = self.latencies[(m.model, m.operation)] = Latencies()
        latencies.duration.observe(m.duration)
        if m.time_to_first_token is not None:
            latencies.time_to_first_token.observe(m.time_to_first_token)
        if m.time_per_output_token is not None:
            latencies.time_per_output_token.observe(m.time_per_output_token)
        for kind, count in (("input", m.input_tokens), ("output", m.output_tokens)):
            if count:
                tokens_key = (m.model, kind, m.token_source, m.client)
                self.tokens[tokens_key] = self.tokens.get(tokens_key, 0) + count
        if m.cached_input_tokens:
            cached = self.cached_input_tokens.get(m.model, 0)
            self.cached_input_tokens[m.model] = cached + m.cached_input_tokens

    def count_unmetered(self, reason: str) -> None:
        """An answer passed through whose usage could not be read (why: reason)."""
        self.unmetered[reason] = self.unmetered.get(reason, 0) + 1


@dataclass
class GatewayStats:
    """The traffic of every provider's gateway, by provider name."""

    providers: dict[str, ProviderTraffic] = field(default_factory=dict)

    def of(self, provider: str) -> ProviderTraffic:
        """The provider's traffic counts, created on first use."""
        traffic = self.providers.get(provider)
        if traffic is None:
            traffic = self.providers[provider] = ProviderTraffic()
        return traffic

    def forget_except(self, providers: set[str]) -> None:
        """Drop the counts of providers whose gateway is gone."""
        for name in [name for name in self.providers if name not in providers]:
            del self.providers[name]
