"""Synthetic probes: small streamed generations on a schedule, and what they measured.

Each provider with a `probes` section gets a loop that wakes every interval (with
jitter), picks its models (by default only loaded ones: a probe must not force a
load unless a model allows it) and probes them; a model with an interval of its
own gets a loop of its own. At most global.probe_concurrency probes run at once
across all providers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

from .client import DURATION_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, Buckets
from .config import Config, ProbeConfig, ProviderConfig
from .errors import ProviderError
from .lifecycle import Lifecycle
from .logs import fields
from .providers import Provider
from .providers.base import (
    ModelResidency,
    ModelSnapshot,
    ModelState,
    ProbeMeasurement,
    ProbeSpec,
    Residence,
)

log = logging.getLogger(__name__)

SUCCESS = "success"
# A model not probed for this many of its provider's intervals (and at least this many
# seconds) is forgotten, its series with it.
FORGET_AFTER_INTERVALS = 5
FORGET_AFTER_MIN_SECONDS = 300.0
# An expiry further away than this is "never" (Ollama writes a date centuries ahead for a model
# kept with keep_alive -1).
FOREVER_SECONDS = 10 * 365 * 86400.0

ModelsOf = Callable[[str], Awaitable[tuple[ModelSnapshot, ...] | None]]


@dataclass
class ModelProbeStats:
    """Everything the probes of one model measured since the exporter started."""

    outcomes: dict[str, int] = field(default_factory=dict)
    duration: Buckets = field(default_factory=lambda: Buckets(DURATION_BUCKETS))
    time_to_first_token: Buckets = field(default_factory=lambda: Buckets(TTFT_BUCKETS))
    time_per_output_token: Buckets = field(default_factory=lambda: Buckets(TPOT_BUCKETS))
    input_tokens: int = 0
    output_tokens: int = 0
    tokens_per_second: float | None = None
    last_run: float | None = None
    last_success: float | None = None
    last_duration: float | None = None
    consecutive_failures: int = 0
    last_failure: str = ""


@dataclass
class ProbeStats:
    """Probe results per (provider, model)."""

    models: dict[tuple[str, str], ModelProbeStats] = field(default_factory=dict)

    def of(self, provider: str, model: str) -> ModelProbeStats:
        """The stats of one model, created empty on first use."""
        return self.models.setdefault((provider, model), ModelProbeStats())

    def by_provider(self) -> dict[str, dict[str, ModelProbeStats]]:
        """The stats grouped by provider."""
        grouped: dict[str, dict[str, ModelProbeStats]] = {}
        for (provider, model), stats in self.models.items():
            grouped.setdefault(provider, {})[model] = stats
        return grouped

    def record(self, provider: str, model: str, result: ProbeMeasurement, at: float) -> None:
        """Count a successful probe and what it measured."""
        stats = self.of(provider, model)
        stats.outcomes[SUCCESS] = stats.outcomes.get(SUCCESS, 0) + 1
        stats.duration.observe(result.duration)
        stats.time_to_first_token.observe(result.time_to_first_token)
        if result.time_per_output_token is not None:
            stats.time_per_output_token.observe(result.time_per_output_token)
        stats.input_tokens += result.input_tokens or 0
        stats.output_tokens += result.output_tokens or 0
        stats.tokens_per_second = result.tokens_per_second
        stats.last_run = stats.last_success = at
        stats.last_duration = result.duration
        stats.consecutive_failures = 0

    def record_failure(self, provider: str, model: str, error: ProviderError, at: float) -> None:
        """Count a failed probe by its class; its timings are not observed."""
        stats = self.of(provider, model)
        outcome = error.failure.value
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        stats.last_run = at
        stats.consecutive_failures += 1
        stats.last_failure = f"{outcome}: {error.message}"

    def forget_except(self, providers: set[str]) -> None:
        """Drop the stats of providers that are no longer configured."""
        for key in [key for key in self.models if key[0] not in providers]:
            del self.models[key]

    def forget_stale(self, provider: str, probed_before: float, keep: int) -> None:
        """Drop a provider's models last probed before a time, and all but its keep most
        recently probed: models come and go, their series must not pile up."""
        mine = sorted(
            ((stats.last_run or 0.0, model) for (name, model), stats in self.models.items()
             if name == provider),
            reverse=True,
        )  # fmt: skip
        for index, (last_run, model) in enumerate(mine):
            if index >= keep or last_run < probed_before:
                del self.models[(provider, model)]


def schedules(probes: ProbeConfig) -> list[ProbeConfig]:
    """A provider's probes split by schedule: one for each model with an interval of its own,
    and one for the rest (or for every loaded model when none is listed)."""
    split = [
        replace(probes, models=(m,), interval=m.interval, timeout=min(probes.timeout, m.interval))
        for m in probes.models
        if m.interval is not None
    ]
    rest = tuple(m for m in probes.models if m.interval is None)
    if rest or not probes.models:
        split.append(replace(probes, models=rest))
    return split


def targets(probes: ProbeConfig, models: tuple[ModelSnapshot, ...] | None) -> list[str]:
    """The models to probe now: the listed ones that are loaded (or may be loaded), or every loaded one."""
    loaded = {m.name for m in models or () if m.loaded is not False}
    known_loaded = {m.name for m in models or () if m.loaded is True}
    if probes.models:
        return [m.name for m in probes.models if m.allow_load or m.name in loaded]
    return sorted(known_loaded)[: probes.max_models]


class ProbeRunner:
    """Runs every provider's probe loop until stopped."""

    def __init__(
        self,
        config: Config,
        providers: Mapping[str, Provider],
        stats: ProbeStats,
        models_of: ModelsOf,
        *,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.config = config
        self.providers = providers
        self.stats = stats
        self.models_of = models_of
        self.lifecycle = lifecycle
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        self.limit = asyncio.Semaphore(config.global_.probe_concurrency)
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start a loop for every schedule of every provider that has probes."""
        for provider in self.config.providers:
            for probes in schedules(provider.probes) if provider.probes is not None else ():
                self.tasks.append(asyncio.create_task(self._loop(provider, probes)))

    async def stop(self) -> None:
        """Cancel every loop and wait for them."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()

    async def _loop(self, provider: ProviderConfig, probes: ProbeConfig) -> None:
        # Start within the first jitter window, so that schedules do not probe in step.
        await asyncio.sleep(self.rng.uniform(0, probes.jitter * probes.interval))
        while True:
            try:
                await self.run_once(provider, probes)
            except Exception as exc:  # a bug in one round must not end the loop
                log.warning(
                    "probe round failed",
                    extra=fields(provider=provider.name, error=type(exc).__name__),
                )
            spread = self.rng.uniform(-probes.jitter, probes.jitter)
            await asyncio.sleep(probes.interval * (1 + spread))

    async def run_once(self, provider: ProviderConfig, probes: ProbeConfig) -> None:
        """Probe this provider's models once, now.

        Where the provider can tell cheaply which models are in memory, that is read right
        before: a model unloaded or asleep since the last collection is not probed (which
        would load or wake it), and each probe asks to keep its model no longer than it had.
        """
        states = await self._states(provider.name)
        if states is None:
            models = targets(probes, await self.models_of(provider.name))
        else:
            models = targets(
                probes,
                tuple(
                    ModelSnapshot(s.name, loaded=s.residence is Residence.LOADED) for s in states
                ),
            )
        spec = ProbeSpec(probes.prompt, probes.max_tokens, probes.timeout)
        held = {state.name: state for state in states or ()}
        await asyncio.gather(
            *(
                self.probe(provider.name, model, self._spec(spec, provider.name, held.get(model)))
                for model in models
            )
        )
        # Any schedule of the provider may forget: use its longest interval, not this one's.
        every = provider.probes or probes
        longest = max([every.interval, *(m.interval or 0.0 for m in every.models)])
        forget_after = max(FORGET_AFTER_MIN_SECONDS, FORGET_AFTER_INTERVALS * longest)
        self.stats.forget_stale(
            provider.name, self.wall_clock() - forget_after, max(provider.max_models, len(models))
        )

    async def _states(self, provider: str) -> tuple[ModelState, ...] | None:
        """The provider's models in memory now, if it can tell cheaply; None if not."""
        reader = self.providers.get(provider)
        if not isinstance(reader, ModelResidency):
            return None
        try:
            return await reader.model_states()
        except ProviderError:
            return None

    def _spec(self, spec: ProbeSpec, provider: str, state: ModelState | None) -> ProbeSpec:
        """The probe's spec for one model: how long it may keep the model, from the model's
        expiry less what the model's last probe took (a provider restarts the timer when a
        request ends)."""
        if state is None or state.expires_at is None:
            return spec
        remaining = state.expires_at - self.wall_clock()
        if remaining > FOREVER_SECONDS:
            return replace(spec, keep_alive=-1)
        if remaining <= 0:
            # Listed past its expiry: busy with a request (Ollama shows the expiry of the one
            # before). Its stay is not known; a keep_alive of 0 would unload it when that
            # request ends.
            return spec
        last = self.stats.models.get((provider, state.name))
        took = last.last_duration if last is not None and last.last_duration else 0.0
        # Never 0 either: that would unload the model at the probe's end, not at its expiry.
        return replace(spec, keep_alive=max(remaining - took, min(remaining, 1.0)))

    async def probe(self, provider: str, model: str, spec: ProbeSpec) -> None:
        """One probe of one model, recorded."""
        async with self.limit:
            if self.lifecycle is not None:
                await self.lifecycle.begin(provider, model)
            load_seconds = None
            try:
                result = await self.providers[provider].probe(model, spec)
                load_seconds = result.load_duration
            except ProviderError as exc:
                log.debug(
                    "probe failed",
                    extra=fields(provider=provider, model=model, error_class=exc.failure.value),
                )
                self.stats.record_failure(provider, model, exc, self.wall_clock())
            else:
                self.stats.record(provider, model, result, self.wall_clock())
            finally:
                if self.lifecycle is not None:
                    self.lifecycle.end(provider, model, load_seconds=load_seconds, use=False)
