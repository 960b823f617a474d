"""Long-lived counts of what the gateway's traffic did, with bounded label values."""

from __future__ import annotations

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

    def started(self, model: str) -> None:
        """A request for model is on its way to the provider."""
        self.in_flight[model] = self.in_flight.get(model, 0) + 1

    def finished(self, measurement: Measurement, *, in_flight: str) -> None:
        """A request that started (counted in flight as in_flight) has ended: count it."""
        m = measurement
        self.in_flight[in_flight] -= 1
        key = (m.model, m.operation, m.code, m.outcome, m.client)
        self.requests[key] = self.requests.get(key, 0) + 1
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
