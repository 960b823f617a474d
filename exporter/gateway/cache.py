"""The response cache: complete, successful, non-streamed answers to deterministic
generation and embedding requests, replayed byte for byte to the same credential.

The key covers the credential (a hash of the headers that carry one: one user never
receives another's answer), the method, the path with its query, the headers that change
the answer's bytes (Accept, Accept-Encoding) and the request body in canonical JSON (keys
sorted, no spaces), so the same question asked with its keys in another order is the
same question. Bounded by ttl, max_entries and max_bytes; least recently used goes first.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, MultiMapping

from ..config import CacheConfig
from .meter import EMBEDDINGS
from .stats import CacheStats

HIT, MISS, BYPASS = "hit", "miss", "bypass"
# Why a request bypassed the cache.
STREAM = "stream"  # a streamed answer is new bytes (ids, timings) every time
SAMPLING = "sampling"  # temperature above 0 without a seed: each answer may differ
NO_CACHE = "no_cache"  # the client sent Cache-Control: no-cache or no-store
BODY = "body"  # not a JSON object, or too large to read whole
# Why an entry was dropped.
EXPIRED, MAX_ENTRIES, MAX_BYTES = "expired", "max_entries", "max_bytes"

CACHE_HEADER = "X-Cache"  # "HIT" on answers from the cache, with Age
# Headers whose values identify who asks (any of them, as the provider reads them).
CREDENTIAL_HEADERS = ("Authorization", "X-Api-Key", "Api-Key")
# Request headers that change the bytes of the answer.
VARY_HEADERS = ("Accept", "Accept-Encoding")
# Answer headers not replayed: set anew for each answer.
UNREPLAYED = frozenset(("content-length", "date", "age", "x-cache"))
# Ollama streams unless told not to; the OpenAI API and llama.cpp answer whole unless asked.
STREAMED_BY_DEFAULT = frozenset(("/api/chat", "/api/generate"))
STREAMED_TYPES = ("text/event-stream", "application/x-ndjson", "application/ndjson")
# What an entry costs beyond its bytes (the objects holding them), so max_bytes bounds memory.
ENTRY_OVERHEAD_BYTES = 512
# An answer larger than this share of max_bytes is not stored: one cannot flush the rest.
MAX_ENTRY_SHARE = 8


@dataclass(frozen=True)
class Plan:
    """What the cache does for one request: look up and/or store under key, or bypass."""

    key: bytes | None = None
    lookup: bool = False
    store: bool = False
    bypass: str = ""  # the reason, when it neither looks up nor is served from the cache


@dataclass(frozen=True)
class Entry:
    """One stored answer and what producing it cost the provider."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float
    size: int
    input_tokens: int
    output_tokens: int
    seconds: float


def _directives(headers: Mapping[str, str]) -> set[str]:
    return {d.strip().lower() for d in headers.get("Cache-Control", "").split(",")}


def _samples(path: str, document: dict[str, Any]) -> bool:
    """Whether a generation request asks for sampling: temperature above 0 (every API's
    default is above 0) without a fixed seed (llama.cpp's -1 means a random one)."""
    settings = document
    if path.startswith("/api/") and isinstance(document.get("options"), dict):
        settings = document["options"]
    temperature = settings.get("temperature", 1.0)
    seed = settings.get("seed")
    seeded = isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0
    if not isinstance(temperature, int | float) or isinstance(temperature, bool):
        return True
    return temperature > 0 and not seeded


def _streams(path: str, document: dict[str, Any]) -> bool:
    return document.get("stream", path.rstrip("/") in STREAMED_BY_DEFAULT) is not False


class ResponseCache:
    """One provider's stored answers, least recently used first."""

    def __init__(self, config: CacheConfig, stats: CacheStats) -> None:
        self.config = config
        self.stats = stats
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()  # least recently used first
        # The same entries in the order stored: with one ttl for all, also expiry order.
        self._by_age: OrderedDict[bytes, Entry] = OrderedDict()
        stats.max_entries, stats.max_bytes = config.max_entries, config.max_bytes
        # Bytes of answers being read to be stored: at most max_bytes, so the answers on
        # their way in cannot take more memory than the cache itself.
        self.pending = 0

    @property
    def max_entry_bytes(self) -> int:
        """The largest answer stored."""
        return self.config.max_bytes // MAX_ENTRY_SHARE

    def configure(self, config: CacheConfig, now: float) -> None:
        """Take new bounds: entries beyond them are dropped at once."""
        self.config = config
        self.stats.max_entries, self.stats.max_bytes = config.max_entries, config.max_bytes
        self._expire(now)
        self._shrink()

    def clear(self) -> None:
        """Drop every entry (the provider behind the gateway changed)."""
        self._entries.clear()
        self._by_age.clear()
        self.stats.entries = self.stats.bytes = 0

    def plan(
        self,
        method: str,
        path_qs: str,
        headers: MultiMapping[str],
        document: Any,
        operation: str,
    ) -> Plan:
        """Whether and under which key a generation or embedding request uses the cache.
        document: its body parsed as JSON (None if it is not JSON or too large to read
        whole)."""
        directives = _directives(headers)
        if "no-store" in directives:
            return Plan(bypass=NO_CACHE)
        if method != "POST" or not isinstance(document, dict):
            return Plan(bypass=BODY)
        path = path_qs.partition("?")[0]
        if operation != EMBEDDINGS:
            if _streams(path, document):
                return Plan(bypass=STREAM)
            if not self.config.sampled and _samples(path, document):
                return Plan(bypass=SAMPLING)
        digest = hashlib.sha256()
        for name in CREDENTIAL_HEADERS:
            for value in headers.getall(name, ()):
                digest.update(f"{name}\0{value}\0".encode())
        digest.update(f"{method}\0{path_qs}\0".encode())
        for name in VARY_HEADERS:
            digest.update(f"{headers.get(name, '')}\0".encode())
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
        digest.update(canonical.encode())
        lookup = "no-cache" not in directives
        return Plan(
            key=digest.digest(), lookup=lookup, store=True, bypass="" if lookup else NO_CACHE
        )

    def get(self, key: bytes, now: float) -> Entry | None:
        """The stored answer for key, if it is there and fresh; it becomes the most recent."""
        self._expire(now)
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry

    def keep(self, size: int) -> bool:
        """Take size more bytes of an answer on its way in, to store it; False if answers on
        their way in already take max_bytes."""
        if self.pending + size > self.config.max_bytes:
            return False
        self.pending += size
        return True

    def unkeep(self, size: int) -> None:
        """Give back bytes taken by keep (the answer is stored, or will not be)."""
        self.pending -= size

    def storable(self, status: int, headers: Mapping[str, str], size: int) -> bool:
        """Whether an answer may be stored: a whole 200, not a stream, not personalised
        (no Set-Cookie), not marked no-store, and not too large."""
        content_type = headers.get("Content-Type", "").lower()
        return (
            status == 200
            and size <= self.max_entry_bytes
            and not content_type.startswith(STREAMED_TYPES)
            and "Set-Cookie" not in headers
            and not {"no-store", "private"} & _directives(headers)
        )

    def put(
        self,
        key: bytes,
        status: int,
        reason: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        now: float,
        input_tokens: int = 0,
        output_tokens: int = 0,
        seconds: float = 0.0,
    ) -> None:
        """Store an answer (the caller checked storable); older ones make room."""
        kept = tuple(
            (name, value) for name, value in headers.items() if name.lower() not in UNREPLAYED
        )
        size = len(body) + len(key) + sum(len(n) + len(v) for n, v in kept) + ENTRY_OVERHEAD_BYTES
        entry = Entry(status, reason, kept, body, now, size, input_tokens, output_tokens, seconds)
        old = self._entries.pop(key, None)
        if old is not None:
            del self._by_age[key]
            self._account(old, -1)
        self._entries[key] = self._by_age[key] = entry
        self._account(entry, 1)
        self._expire(now)
        self._shrink()

    def answer(self, entry: Entry, now: float) -> web.Response:
        """A stored answer as the client gets it: the same status, headers and body, marked
        as coming from the cache, with its age."""
        headers = CIMultiDict(entry.headers)
        headers["Age"] = str(max(0, int(now - entry.stored_at)))
        headers[CACHE_HEADER] = "HIT"
        return web.Response(
            status=entry.status, reason=entry.reason, headers=headers, body=entry.body
        )

    def _account(self, entry: Entry, sign: int) -> None:
        self.stats.entries += sign
        self.stats.bytes += sign * entry.size

    def _drop(self, key: bytes, reason: str) -> None:
        entry = self._entries.pop(key)
        del self._by_age[key]
        self._account(entry, -1)
        self.stats.evicted(reason)

    def _expire(self, now: float) -> None:
        oldest = self._by_age
        while oldest:
            key, entry = next(iter(oldest.items()))
            if entry.stored_at + self.config.ttl > now:
                break
            self._drop(key, EXPIRED)

    def _shrink(self) -> None:
        while len(self._entries) > self.config.max_entries:
            self._drop(next(iter(self._entries)), MAX_ENTRIES)
        while self.stats.bytes > self.config.max_bytes:
            self._drop(next(iter(self._entries)), MAX_BYTES)
