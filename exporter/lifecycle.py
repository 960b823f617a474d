"""Model lifecycle: a light watcher per provider that turns what its residency read shows
into events (loaded, unloaded with a cause, load failed, slept, woke), and the optional
policy that keeps the right models loaded.

    watcher (every watch_interval) -> provider.model_states() -> ProviderLifecycle.observe
        -> events (log line each, the last 200 at /models) and LifecycleStats (rendered at scrape)
    gateway and probes -> begin/end of each request: when a model was last used, how long the
        load a request waited for took, loads under way (a model evicted for another)
    policy -> pin, preload, idle_unload in the watcher's loop; max_loaded and max_memory before
        the gateway forwards a request for a model that is not loaded

Every action the policy takes is logged and counted with its outcome; a failed one never
blocks a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .client import DURATION_BUCKETS, Buckets
from .config import Config, ProviderConfig
from .errors import ProviderError
from .logs import fields
from .providers import Provider
from .providers.base import ModelControl, ModelResidency, ModelState, Residence

log = logging.getLogger(__name__)

MAX_EVENTS = 200
# Causes of an unload.
IDLE, EVICTED, REQUESTED, FAILED, UNKNOWN = "idle", "evicted", "requested", "failed", "unknown"
CAUSES = (IDLE, EVICTED, REQUESTED, FAILED, UNKNOWN)
# Kinds of event.
LOADED, UNLOADED, LOAD_FAILED, SLEPT, WOKE = "loaded", "unloaded", "load_failed", "slept", "woke"
# Outcomes of a policy action and of a watcher's read.
SUCCESS, FAILURE = "success", "failure"
# An expiry this close after the moment a model was found gone counts as reached: the
# provider's timer may fire a little early by the exporter's clock (clocks of one host, or
# hosts kept in step by NTP, differ by milliseconds).
EXPIRY_SLACK_SECONDS = 0.1
# An unload whose cause is not clear waits this many more reads for a load that explains it
# (Ollama lists a model only once it is loaded, after it evicted another for it).
UNDECIDED_READS = 2
# An unload asked for (by the policy, or a client's keep_alive: 0) explains one seen this soon.
REQUEST_MEMORY_SECONDS = 120.0
# A load's duration reported by the request that waited for it counts this long after the load
# was seen (the request's last chunk, with the duration, comes after the model is listed).
LOAD_REPORT_SECONDS = 600.0
# The provider's own load may take minutes; a policy action waits at most this long.
ACTION_TIMEOUT_SECONDS = 900.0
# A model let through to load counts as loaded this long before a read shows it.
EXPECTED_SECONDS = 60.0
# A model whose load failed is not asked for again by the policy for this long.
PIN_RETRY_SECONDS = 60.0
_HELD = (Residence.LOADED, Residence.SLEEPING)
_COMING = (Residence.LOADING, Residence.LOADED)


@dataclass(frozen=True)
class LifecycleEvent:
    """One change of a model's residence, with its cause where one can be told."""

    at: float
    provider: str
    model: str
    event: str
    cause: str = ""
    load_seconds: float | None = None
    detail: str = ""

    def document(self) -> dict[str, Any]:
        """The event as /models serves it."""
        document: dict[str, Any] = {
            "time": _iso(self.at),
            "provider": self.provider,
            "model": self.model,
            "event": self.event,
        }
        if self.cause:
            document["cause"] = self.cause
        if self.load_seconds is not None:
            document["load_seconds"] = round(self.load_seconds, 3)
        if self.detail:
            document["detail"] = self.detail
        return document


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


@dataclass
class ModelRecord:
    """What the exporter knows of one model's lifecycle since it started."""

    residence: Residence = Residence.UNLOADED
    loads: int = 0
    unloads: dict[str, int] = field(default_factory=dict)
    load_failures: int = 0
    sleeps: int = 0
    wakes: int = 0
    load_duration: Buckets = field(default_factory=lambda: Buckets(DURATION_BUCKETS))
    loaded_at: float | None = None  # when the exporter saw it load
    first_seen: float | None = None  # when the exporter first saw it held
    last_used: float | None = None  # the end of its last request through the gateway
    memory_bytes: float | None = None  # the last seen, kept after an unload to plan a load
    in_flight: int = 0  # requests through the gateway or probes now
    touched: float = 0.0  # last change of any kind, to forget the oldest first

    @property
    def last_active(self) -> float:
        """When it last did anything that a user asked of it: its last use, else its load."""
        return max(
            v for v in (self.last_used, self.loaded_at, self.first_seen, 0.0) if v is not None
        )


class ProviderLifecycle:
    """One provider's models: their last read, what changed, and the records of each."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.previous: dict[str, ModelState] | None = None  # None until the first read
        self.read_at: float | None = None
        self.records: dict[str, ModelRecord] = {}
        self.loading_since: dict[str, float] = {}
        self.requested: dict[str, float] = {}  # unloads asked for, by when
        self.load_reports: dict[str, tuple[float, float]] = {}  # (seconds, at) before the event
        self.awaiting_duration: dict[str, float] = {}  # loads seen without a duration, by when
        self.undecided: list[tuple[str, ModelState, float, int]] = []
        # Models let through to load (by the policy, or a request it made room for) that no
        # read has shown yet, by when: counted as loaded until a read shows them or
        # EXPECTED_SECONDS pass.
        self.expected: dict[str, float] = {}

    def record(self, model: str, now: float) -> ModelRecord:
        """A model's record, created on first mention; the least recently touched ones are
        forgotten past max_models."""
        record = self.records.get(model)
        if record is None:
            record = self.records[model] = ModelRecord()
            if len(self.records) > self.config.max_models:
                held = {name for name, r in self.records.items() if r.residence in _HELD}
                spare = [n for n in self.records if n != model and n not in held]
                if spare:
                    del self.records[min(spare, key=lambda n: self.records[n].touched)]
        record.touched = now
        return record

    def held(self) -> dict[str, ModelState]:
        """The models held in memory (loaded or sleeping) at the last read."""
        return {n: s for n, s in (self.previous or {}).items() if s.residence in _HELD}

    def coming_or_held(self) -> dict[str, ModelState]:
        """The models held or being loaded at the last read."""
        states = (self.previous or {}).items()
        return {n: s for n, s in states if s.residence in (*_HELD, Residence.LOADING)}

    def observe(self, states: Iterable[ModelState], now: float) -> list[LifecycleEvent]:
        """Turn one read into events, comparing it with the read before."""
        current: dict[str, ModelState] = {}
        for state in states:
            if len(current) >= self.config.max_models:
                break
            if state.residence is not Residence.UNLOADED:
                current.setdefault(state.name, state)
        before, self.previous = self.previous, current
        before_read = self.read_at
        for name, state in current.items():
            record = self.record(name, now)
            record.residence = state.residence
            if state.memory_bytes is not None:
                record.memory_bytes = state.memory_bytes
            if state.residence in _HELD and record.first_seen is None:
                record.first_seen = now
            self.expected.pop(name, None)
        for name, at in list(self.expected.items()):
            if now - at > EXPECTED_SECONDS:
                del self.expected[name]
        if before is None:  # the first read: what is loaded now was loaded before we looked
            for name, state in current.items():
                if state.residence is Residence.LOADING:
                    self.loading_since[name] = now
            self.read_at = now
            return []
        appeared = [
            n for n, s in current.items()
            if s.residence in _COMING and (n not in before or before[n].residence not in _HELD)
        ]  # fmt: skip
        events = self._decide_undecided(appeared, now)
        for name in sorted(set(before) | set(current)):
            old = before[name].residence if name in before else Residence.UNLOADED
            new = current[name].residence if name in current else Residence.UNLOADED
            if old is new:
                continue
            event = self._change(name, before.get(name), current.get(name), appeared, now)
            if event is not None:
                events.append(event)
            if new is Residence.UNLOADED:
                self.record(name, now).residence = new
        for name in [n for n in self.loading_since if n not in current]:
            del self.loading_since[name]
        self._expire(now, before_read)
        self.read_at = now
        return events

    def _change(
        self,
        name: str,
        old: ModelState | None,
        new: ModelState | None,
        appeared: list[str],
        now: float,
    ) -> LifecycleEvent | None:
        was = old.residence if old is not None else Residence.UNLOADED
        now_in = new.residence if new is not None else Residence.UNLOADED
        record = self.record(name, now)
        detail = new.detail if new is not None else ""
        if now_in is Residence.LOADING:
            self.loading_since.setdefault(name, now)
            return None
        if now_in is Residence.LOADED and was is Residence.SLEEPING:
            record.wakes += 1
            return self._event(now, name, WOKE)
        if now_in is Residence.LOADED:
            return self._loaded(name, record, now)
        if now_in is Residence.SLEEPING:
            if was is Residence.LOADED:
                record.sleeps += 1
                return self._event(now, name, SLEPT)
            return None
        held = was in _HELD
        if now_in is Residence.FAILED and not held:
            return self._load_failed(name, record, now, detail or "the load failed")
        if was is Residence.LOADING and name not in self.requested:
            return self._load_failed(name, record, now, "the load ended without the model loaded")
        if not held:
            return None
        assert old is not None
        cause = self._cause(name, old, now_in, appeared, now)
        if cause is None:
            self.undecided.append((name, old, now, 0))
            return None
        return self._unloaded(name, record, cause, now, detail)

    def _loaded(self, name: str, record: ModelRecord, now: float) -> LifecycleEvent:
        record.loads += 1
        record.loaded_at = now
        seconds = None
        report = self.load_reports.pop(name, None)
        since = self.loading_since.pop(name, None)
        if report is not None:
            seconds = report[0]
        elif since is not None:
            seconds = now - since
        if seconds is None:
            self.awaiting_duration[name] = now
        else:
            record.load_duration.observe(seconds)
        return self._event(now, name, LOADED, load_seconds=seconds)

    def _load_failed(
        self, name: str, record: ModelRecord, now: float, detail: str
    ) -> LifecycleEvent:
        record.load_failures += 1
        self.loading_since.pop(name, None)
        return self._event(now, name, LOAD_FAILED, detail=detail)

    def _unloaded(
        self, name: str, record: ModelRecord, cause: str, now: float, detail: str = ""
    ) -> LifecycleEvent:
        record.unloads[cause] = record.unloads.get(cause, 0) + 1
        record.loaded_at = None
        self.requested.pop(name, None)
        self.awaiting_duration.pop(name, None)
        return self._event(now, name, UNLOADED, cause=cause, detail=detail)

    def _cause(
        self, name: str, old: ModelState, new: Residence, appeared: list[str], now: float
    ) -> str | None:
        """Why a held model is gone; None while it cannot be told yet."""
        if name in self.requested:
            return REQUESTED
        if new is Residence.FAILED:
            return FAILED
        record = self.records.get(name)
        # A request after the last read moved the expiry that read showed.
        used_since = record is not None and (record.last_used or 0.0) > (self.read_at or 0.0)
        expiry = old.expires_at
        if expiry is not None and expiry <= now + EXPIRY_SLACK_SECONDS and not used_since:
            return IDLE
        if any(other != name for other in appeared) or self._loads_under_way(name):
            return EVICTED
        return None

    def _loads_under_way(self, name: str) -> bool:
        """Whether a request is waiting for another model that is not held: its load is
        under way, and may be why this one went."""
        held = self.held()
        return any(
            record.in_flight > 0 and other != name and other not in held
            for other, record in self.records.items()
        )

    def _decide_undecided(self, appeared: list[str], now: float) -> list[LifecycleEvent]:
        events = []
        waiting = []
        for name, old, seen, reads in self.undecided:
            if name in appeared:  # back already: it was replaced by nothing
                cause: str | None = UNKNOWN
            elif any(other != name for other in appeared):
                cause = EVICTED
            elif reads + 1 >= UNDECIDED_READS:
                cause = UNKNOWN
            else:
                waiting.append((name, old, seen, reads + 1))
                continue
            events.append(self._unloaded(name, self.record(name, now), cause or UNKNOWN, seen))
        self.undecided = waiting
        return events

    def _expire(self, now: float, before_read: float | None) -> None:
        for name, at in list(self.requested.items()):
            if now - at > REQUEST_MEMORY_SECONDS:
                del self.requested[name]
        for name, (_, at) in list(self.load_reports.items()):
            if before_read is not None and at < before_read:
                del self.load_reports[name]  # the load it measured was seen, or never happened
        for name, at in list(self.awaiting_duration.items()):
            if now - at > LOAD_REPORT_SECONDS:
                del self.awaiting_duration[name]

    def _event(self, now: float, model: str, kind: str, **more: Any) -> LifecycleEvent:
        return LifecycleEvent(now, self.config.name, model, kind, **more)

    def note_load(self, model: str, seconds: float, at: float) -> None:
        """A request says how long the provider spent loading the model for it."""
        if model in self.awaiting_duration:
            del self.awaiting_duration[model]
            self.record(model, at).load_duration.observe(seconds)
        elif self.previous is None:
            # Not watched (or not read yet): every request's load counts, as the provider says.
            self.record(model, at).load_duration.observe(seconds)
        elif model not in self.held():
            self.load_reports[model] = (seconds, at)


class LifecycleStats:
    """Every provider's lifecycle, the last events, and the policy's actions: the renderer's
    view."""

    def __init__(self) -> None:
        self.providers: dict[str, ProviderLifecycle] = {}
        self.events: deque[LifecycleEvent] = deque(maxlen=MAX_EVENTS)
        self.actions: dict[tuple[str, str, str, str], int] = {}  # provider, action, reason, outcome
        self.reads: dict[tuple[str, str], int] = {}  # provider, outcome

    def of(self, config: ProviderConfig) -> ProviderLifecycle:
        """A provider's lifecycle, created (or given its new configuration) on use."""
        lifecycle = self.providers.get(config.name)
        if lifecycle is None:
            lifecycle = self.providers[config.name] = ProviderLifecycle(config)
        lifecycle.config = config
        return lifecycle

    def add(self, events: Iterable[LifecycleEvent]) -> None:
        """Keep and log events, one info line each."""
        for event in events:
            self.events.append(event)
            extra = {k: v for k, v in event.document().items() if k not in ("time", "event")}
            log.info(f"model {event.event.replace('_', ' ')}", extra=fields(**extra))

    def count_action(self, provider: str, action: str, reason: str, outcome: str) -> None:
        """Count one action of the policy."""
        key = (provider, action, reason, outcome)
        self.actions[key] = self.actions.get(key, 0) + 1

    def count_read(self, provider: str, outcome: str) -> None:
        """Count one residency read."""
        self.reads[(provider, outcome)] = self.reads.get((provider, outcome), 0) + 1

    def forget_except(self, providers: set[str]) -> None:
        """Drop the providers that are no longer configured."""
        for name in [n for n in self.providers if n not in providers]:
            del self.providers[name]
        for action in [k for k in self.actions if k[0] not in providers]:
            del self.actions[action]
        for read in [k for k in self.reads if k[0] not in providers]:
            del self.reads[read]


class Lifecycle:
    """Runs every provider's watcher and policy, and answers the gateway and the probes."""

    def __init__(
        self,
        stats: LifecycleStats,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats
        self.wall_clock = wall_clock
        self.providers: Mapping[str, Provider] = {}
        self.configs: dict[str, ProviderConfig] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._pin_failed: dict[tuple[str, str], float] = {}  # when a load last failed

    def apply(self, config: Config, providers: Mapping[str, Provider]) -> None:
        """Watch the providers as configured now; a provider whose lifecycle settings did not
        change keeps its watcher (and what it has seen)."""
        self.providers = providers
        configs = {p.name: p for p in config.providers}
        for name in list(self._tasks):
            old, new = self.configs.get(name), configs.get(name)
            moved = (
                old is not None and new is not None and (old.kind, old.url) != (new.kind, new.url)
            )
            if new is None or old is None or old.lifecycle != new.lifecycle or moved:
                self._tasks.pop(name).cancel()
            if moved and new is not None:
                # Another server now: what the last read showed says nothing of it.
                self.stats.of(new).previous = None
        self.configs = configs
        self.stats.forget_except(set(configs))
        for name, provider in configs.items():
            self.stats.of(provider)
            watchable = isinstance(providers.get(name), ModelResidency)
            if provider.lifecycle.watch and watchable and name not in self._tasks:
                self._tasks[name] = asyncio.ensure_future(self._watch(provider))

    async def aclose(self) -> None:
        """Stop every watcher and action."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    # The watcher and the policy it runs.

    async def _watch(self, config: ProviderConfig) -> None:
        policy = config.lifecycle
        started = False
        # The policy acts beside the reads, one round at a time: a load that takes minutes
        # must not stop the watcher from seeing what happens meanwhile.
        acting: asyncio.Task[None] | None = None
        try:
            while True:
                config = self.configs.get(config.name, config)
                try:
                    read = await self.read(config.name) is not None
                except Exception as exc:  # a bug in one round must not end the watcher
                    read = False
                    log.warning(
                        "lifecycle read failed",
                        extra=fields(provider=config.name, error=type(exc).__name__),
                    )
                if read and policy.policy and (acting is None or acting.done()):
                    acting = asyncio.ensure_future(self._act(config, first=not started))
                started = started or read
                await asyncio.sleep(policy.watch_interval)
        finally:
            if acting is not None:
                acting.cancel()

    async def _act(self, config: ProviderConfig, *, first: bool) -> None:
        """One round of the policy: the start's loads first, then what keeps it true."""
        try:
            if first:
                await self._start_policy(config)
            await self._keep(config)
        except Exception as exc:  # a bug in one round must not stop the next
            log.warning(
                "lifecycle policy round failed",
                extra=fields(provider=config.name, error=type(exc).__name__),
            )

    async def read(self, provider: str) -> list[LifecycleEvent] | None:
        """Read one provider's models now and record what changed; None if it was not read."""
        config = self.configs.get(provider)
        reader = self.providers.get(provider)
        if config is None or not config.lifecycle.watch or not isinstance(reader, ModelResidency):
            return None
        lifecycle = self.stats.of(config)
        try:
            states = await reader.model_states()
        except ProviderError as exc:
            self.stats.count_read(provider, FAILURE)
            log.debug(
                "model states not read",
                extra=fields(provider=provider, error_class=exc.failure.value),
            )
            return None
        self.stats.count_read(provider, SUCCESS)
        events = lifecycle.observe(states, self.wall_clock())
        self.stats.add(events)
        return events

    async def _start_policy(self, config: ProviderConfig) -> None:
        lifecycle = self.stats.of(config)
        held = lifecycle.coming_or_held()
        pinned = set(config.lifecycle.pin)
        # Pinned models are asked for even when loaded: Ollama then keeps them for ever.
        for model in config.lifecycle.pin:
            await self._load(config, model, pin=True, reason="pin")
        for model in config.lifecycle.preload:
            if model not in pinned and model not in held:
                await self._load(config, model, pin=False, reason="preload")

    async def _keep(self, config: ProviderConfig) -> None:
        """Load pinned models that are gone; unload models idle for longer than idle_unload."""
        policy = config.lifecycle
        if not policy.policy:
            return
        lifecycle = self.stats.of(config)
        held = lifecycle.held()
        now = self.wall_clock()
        for model in policy.pin:
            if model in lifecycle.coming_or_held() or model in lifecycle.expected:
                continue
            failed_at = self._pin_failed.get((config.name, model))
            if failed_at is not None and now - failed_at < PIN_RETRY_SECONDS:
                continue
            await self._load(config, model, pin=True, reason="pin")
        if policy.idle_unload is None:
            return
        for model in held:
            record = lifecycle.records.get(model)
            if model in policy.pin or record is None or record.in_flight:
                continue
            if now - record.last_active >= policy.idle_unload:
                await self._unload(config, model, reason="idle")

    async def _load(self, config: ProviderConfig, model: str, *, pin: bool, reason: str) -> bool:
        control = self.providers.get(config.name)
        if not isinstance(control, ModelControl):
            return False
        lifecycle = self.stats.of(config)
        try:
            await asyncio.wait_for(control.load_model(model, pin=pin), ACTION_TIMEOUT_SECONDS)
        except (ProviderError, TimeoutError) as exc:
            self._pin_failed[(config.name, model)] = self.wall_clock()
            self._acted(config.name, "load", model, reason, exc)
            return False
        self._pin_failed.pop((config.name, model), None)
        lifecycle.expected[model] = self.wall_clock()
        self._acted(config.name, "load", model, reason, None)
        return True

    async def _unload(self, config: ProviderConfig, model: str, *, reason: str) -> bool:
        control = self.providers.get(config.name)
        if not isinstance(control, ModelControl):
            return False
        lifecycle = self.stats.of(config)
        lifecycle.requested[model] = self.wall_clock()
        try:
            await asyncio.wait_for(control.unload_model(model), ACTION_TIMEOUT_SECONDS)
        except (ProviderError, TimeoutError) as exc:
            lifecycle.requested.pop(model, None)
            self._acted(config.name, "unload", model, reason, exc)
            return False
        self._acted(config.name, "unload", model, reason, None)
        return True

    def _acted(
        self, provider: str, action: str, model: str, reason: str, error: Exception | None
    ) -> None:
        outcome = SUCCESS if error is None else FAILURE
        self.stats.count_action(provider, action, reason, outcome)
        extra: dict[str, object] = {"provider": provider, "model": model, "reason": reason}
        if error is None:
            log.info(f"lifecycle: {action}", extra=fields(**extra))
            return
        if isinstance(error, ProviderError):
            extra["error_class"] = error.failure.value
            extra["error"] = error.message
        else:
            extra["error_class"] = "timeout"
        log.warning(f"lifecycle: {action} failed", extra=fields(**extra))

    # What the gateway and the probes tell.

    async def begin(self, provider: str, model: str, document: Any = None) -> None:
        """A request for a model is about to be forwarded: make room for it if the policy
        bounds what is loaded. Never raises; an action that fails lets the request go on."""
        config = self.configs.get(provider)
        if config is None or not model:
            return
        lifecycle = self.stats.of(config)
        record = lifecycle.record(model, self.wall_clock())
        record.in_flight += 1
        if _unloads(document):
            lifecycle.requested[model] = self.wall_clock()
        if not config.lifecycle.limited or model in lifecycle.coming_or_held():
            return
        lock = self._locks.setdefault(provider, asyncio.Lock())
        try:
            async with lock:
                await self._make_room(config, lifecycle, model)
        except Exception as exc:  # making room is a favour: the request goes on regardless
            log.warning(
                "lifecycle: making room failed",
                extra=fields(provider=provider, model=model, error=type(exc).__name__),
            )

    async def _make_room(
        self, config: ProviderConfig, lifecycle: ProviderLifecycle, model: str
    ) -> None:
        policy = config.lifecycle
        held = lifecycle.coming_or_held()
        if model in held or model in lifecycle.expected:
            return
        # Held at the last read, let through to load since, or being loaded for a request
        # now: less those being unloaded.
        records = lifecycle.records
        present = {n: s.memory_bytes or 0.0 for n, s in held.items()}
        loading = [n for n, r in records.items() if r.in_flight and n != model]
        for name in (*lifecycle.expected, *loading):
            present.setdefault(name, records[name].memory_bytes or 0.0 if name in records else 0.0)
        present = {n: size for n, size in present.items() if n not in lifecycle.requested}
        need = lifecycle.records[model].memory_bytes or 0.0
        while present:
            over_count = policy.max_loaded is not None and len(present) + 1 > policy.max_loaded
            memory = sum(present.values()) + need
            over_memory = policy.max_memory is not None and memory > policy.max_memory
            if not (over_count or over_memory):
                break
            candidates = [
                n for n in present
                if n not in policy.pin and not (n in records and records[n].in_flight)
            ]  # fmt: skip
            if not candidates:
                break
            victim = min(candidates, key=lambda n: (_last_active(records.get(n)), n))
            reason = "max_loaded" if over_count else "max_memory"
            await self._unload(config, victim, reason=reason)
            lifecycle.expected.pop(victim, None)
            del present[victim]
        lifecycle.expected[model] = self.wall_clock()

    def end(
        self, provider: str, model: str, *, load_seconds: float | None = None, use: bool = True
    ) -> None:
        """A request for a model is done (use: it was a user's, not a probe's)."""
        config = self.configs.get(provider)
        if config is None or not model:
            return
        lifecycle = self.stats.of(config)
        now = self.wall_clock()
        record = lifecycle.record(model, now)
        record.in_flight = max(0, record.in_flight - 1)
        if use:
            record.last_used = now
        if load_seconds is not None:
            lifecycle.note_load(model, load_seconds, now)

    def note_load(self, provider: str, model: str, seconds: float) -> None:
        """A request outside the gateway (a probe) says how long the model's load took."""
        config = self.configs.get(provider)
        if config is not None:
            self.stats.of(config).note_load(model, seconds, self.wall_clock())

    def events(self) -> list[dict[str, Any]]:
        """The last events, newest first, as /models serves them."""
        return [event.document() for event in reversed(self.stats.events)]

    def models(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Each watched provider's models: where each is now and what happened to it."""
        documents: dict[str, dict[str, dict[str, Any]]] = {}
        for name, lifecycle in sorted(self.stats.providers.items()):
            pinned = set(lifecycle.config.lifecycle.pin)
            models = documents[name] = {}
            for model, record in sorted(lifecycle.records.items()):
                document: dict[str, Any] = {
                    "state": record.residence.value,
                    "pinned": model in pinned,
                    "loads": record.loads,
                    "unloads": dict(sorted(record.unloads.items())),
                }
                for key, at in (("loaded_at", record.loaded_at), ("last_used", record.last_used)):
                    if at is not None:
                        document[key] = _iso(at)
                models[model] = document
        return documents


def _last_active(record: ModelRecord | None) -> float:
    return record.last_active if record is not None else 0.0


def _unloads(document: Any) -> bool:
    """Whether an Ollama request asks to unload its model when done (keep_alive: 0)."""
    if not isinstance(document, dict):
        return False
    keep_alive = document.get("keep_alive")
    if isinstance(keep_alive, bool):
        return False
    if isinstance(keep_alive, int | float):
        return keep_alive == 0
    return isinstance(keep_alive, str) and keep_alive.strip() in ("0", "0s", "0m", "0h")
