"""Multi-target probing, blackbox_exporter's pattern, and target discovery for it.

    GET /probe?target=NAME             collects the configured provider NAME now
    GET /probe?target=URL&module=M     collects URL the way module M says, if M's allowlist
                                       allows URL: never with a key to a URL someone typed
    GET /targets                       the configured providers, Prometheus' HTTP SD format

A probe answers the provider's series, as /metrics has them, and probe_success and
probe_duration_seconds, within the scrape's deadline. It reads the provider's state only,
and costs no GPU time, unless the module has `probe` settings: then it also sends one small
streamed generation to the target (which the allowlist allowed) and reports what it took.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .client import DEADLINE, ConnectionStats
from .collector import Collector, ProviderResult
from .config import (
    Config,
    HostConfig,
    LifecycleConfig,
    ModuleConfig,
    ModuleProbe,
    ProviderConfig,
    TargetAllowlist,
)
from .errors import FailureClass, ProviderError
from .providers import Provider
from .providers.base import ProbeMeasurement, ProbeSpec

MAX_TARGET_CHARS = 2048
# Probes in progress at once; one more is answered 503 at once (Prometheus retries at its
# next interval), so a flood of /probe requests cannot open unbounded connections.
MAX_PROBES = 16


class Refused(Exception):
    """A /probe request that is not carried out: its HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def allowed(allow: TargetAllowlist, target: str) -> bool:
    """Whether an allowlist lets a module probe a target URL (already checked for shape)."""
    host = (urlsplit(target).hostname or "").lower().rstrip(".")
    for pattern in allow.hosts:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    if allow.cidrs:
        # Literal addresses only: a name is not resolved here, as it could resolve to
        # another address by the time the request connects.
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None and any(address in network for network in allow.cidrs):
            return True
    return allow.regex is not None and re.fullmatch(allow.regex, target) is not None


def checked_target(target: str) -> str:
    """The target URL if its shape may be probed; Refused (400) if not."""
    if len(target) > MAX_TARGET_CHARS:
        raise Refused(400, f"target longer than {MAX_TARGET_CHARS} characters")
    try:
        parts = urlsplit(target)
        port = parts.port
    except ValueError:
        raise Refused(400, "target is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused(400, "target must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise Refused(400, "target must not carry credentials: the module holds them")
    if parts.query or parts.fragment:
        raise Refused(400, "target must not have a query or fragment")
    del port  # read only to refuse a bad one
    return target


def module_provider(module: ModuleConfig, target: str) -> ProviderConfig:
    """The provider a module makes of a target: the target's host and port name it."""
    parts = urlsplit(target)
    host = parts.hostname or ""
    name = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        name = f"{name}:{parts.port}"
    return ProviderConfig(
        name=name,
        kind=module.kind,
        url=target.rstrip("/"),
        api_key=module.api_key,
        timeout=module.timeout,
        headers=module.headers,
        tls_config=module.tls_config,
        max_models=module.max_models,
        max_series=module.max_series,
        lifecycle=LifecycleConfig(watch=False),
    )


# A generation left less than this of the scrape's deadline is not started.
MIN_GENERATION_SECONDS = 0.1


@dataclass(frozen=True)
class Generation:
    """What the generation of a module's probe did: its measurement, or why it failed."""

    model: str
    measurement: ProbeMeasurement | None
    failure: str = ""


@dataclass(frozen=True)
class Probed:
    """One /probe: the target's collection, how long the probe took, and its generation."""

    result: ProviderResult
    seconds: float
    generation: Generation | None = None


class Prober:
    """Carries out /probe requests: at most MAX_PROBES at once."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.running = 0

    async def probe(
        self,
        config: Config,
        configured: Callable[[str, float], Awaitable[ProviderResult]],
        target: str,
        module: str | None,
        budget: float,
    ) -> Probed:
        """Collect one target within budget: its result and how long that took.

        configured collects a configured provider by name (with the exporter's own clients);
        a module's target gets a client of its own, closed after.
        """
        if self.running >= MAX_PROBES:
            raise Refused(503, f"{MAX_PROBES} probes in progress: try again")
        self.running += 1
        started = self.clock()
        generation = None
        try:
            if module is None:
                names = {p.name for p in config.providers}
                if target not in names:
                    reason = "no configured provider of that name: give module= for a URL"
                    raise Refused(400, reason)
                result = await configured(target, budget)
            else:
                result, generation = await self._module(config, target, module, budget)
        finally:
            self.running -= 1
        return Probed(result, self.clock() - started, generation)

    async def _module(
        self, config: Config, target: str, module_name: str, budget: float
    ) -> tuple[ProviderResult, Generation | None]:
        module = config.modules.get(module_name)
        if module is None:
            raise Refused(400, "no module of that name in the configuration")
        url = checked_target(target)
        if not allowed(module.targets, url):
            raise Refused(403, f"target not allowed by module {module_name}'s targets")
        provider = module_provider(module, url)
        # Its own client and counters: a target someone names adds no series to /metrics.
        one = Config(providers=(provider,), host=HostConfig(enabled=False))
        collector = Collector(one, stats=ConnectionStats())
        started = self.clock()
        try:
            result = await collector.collect_provider(provider.name, budget)
            if module.probe is None or not result.snapshot.up:
                return result, None
            left = budget - (self.clock() - started)
            generated = await self._generate(collector.providers[0], module.probe, left)
            return result, generated
        finally:
            await collector.aclose()

    async def _generate(self, provider: Provider, probe: ModuleProbe, left: float) -> Generation:
        """One small streamed generation, within what is left of the deadline."""
        timeout = min(probe.timeout, left)
        if timeout < MIN_GENERATION_SECONDS:
            return Generation(probe.model, None, FailureClass.TIMEOUT.value)
        # The collection's deadline is still set in this context: the generation has its own.
        token = DEADLINE.set(self.clock() + timeout)
        try:
            spec = ProbeSpec(probe.prompt, probe.max_tokens, timeout)
            return Generation(probe.model, await provider.probe(probe.model, spec))
        except ProviderError as exc:
            return Generation(probe.model, None, exc.failure.value)
        finally:
            DEADLINE.reset(token)


def targets_document(config: Config) -> list[dict[str, Any]]:
    """The configured providers as Prometheus HTTP service discovery lists them: one target
    group each, its target the provider's name (for /probe?target=), its labels the
    provider's name and kind and the labels the configuration gives it."""
    return [
        {
            "targets": [provider.name],
            "labels": {"provider": provider.name, "kind": provider.kind, **provider.labels},
        }
        for provider in config.providers
    ]
