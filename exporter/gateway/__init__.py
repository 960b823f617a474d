"""The measuring gateway: one listener per provider with gateway.listen, forwarding every
request to that provider and measuring what it did.

    client -> listener -> Proxy (forward, relay, meter) -> provider
    meter -> GatewayStats, rendered by metrics.py at scrape time
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import time
from collections.abc import Callable, Iterable

from aiohttp import web

from ..config import Config, GatewayConfig, ProviderConfig
from ..connections import limit_connections
from ..errors import ConfigError
from ..logs import fields
from .cache import ResponseCache
from .proxy import ModelUses, Proxy
from .queue import AdmissionQueue
from .stats import CacheStats, GatewayStats, ProviderTraffic, QueueStats

__all__ = ["Gateway", "GatewayStats", "ModelUses", "ProviderTraffic"]

log = logging.getLogger(__name__)

# A client's idle keep-alive connection is closed after this (nginx's default).
KEEPALIVE_SECONDS = 75.0
# On shutdown or when a listener moves, requests in progress get this long to finish.
SHUTDOWN_SECONDS = 1.0
# A replaced proxy's connections close once its requests are done, or after this.
RETIRE_SECONDS = 3600.0


class _Listener:
    """One provider's gateway: its server, and the proxy its requests go through."""

    def __init__(self, proxy: Proxy, address: str) -> None:
        self.proxy = proxy
        self.address = address
        self.runner: web.ServerRunner | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self.proxy.handle(request)


class Gateway:
    """Starts, moves and stops the providers' gateway listeners as the configuration says."""

    def __init__(
        self,
        stats: GatewayStats,
        *,
        uses: ModelUses | None = None,
        clock: Callable[[], float] = time.perf_counter,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.stats = stats
        self.uses = uses
        # TLS from --web.config.file, never its basic auth: clients' own Authorization
        # headers are the provider's to check.
        self.ssl_context = ssl_context
        self._clock = clock
        self._listeners: dict[str, _Listener] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def addresses(self) -> dict[str, str]:
        """The address each provider's gateway listens on (host:port, as bound)."""
        return {name: listener.address for name, listener in self._listeners.items()}

    async def apply(self, config: Config) -> None:
        """Make the listeners match config: start new ones, move or stop changed ones, and
        let the others forward to the provider as now configured.

        A listener that cannot start raises ConfigError naming its key; the others run.
        """
        wanted = {p.name: p for p in config.providers if p.gateway is not None}
        for name in [name for name in self._listeners if name not in wanted]:
            await self._stop(name)
        self.stats.forget_except(set(wanted))
        failures: list[ConfigError] = []
        for index, provider in enumerate(config.providers):
            if provider.gateway is None:
                continue
            listener = self._listeners.get(provider.name)
            if listener is not None and _same_listener(listener.proxy.provider, provider):
                self._swap(listener, provider)
                continue
            kept: tuple[AdmissionQueue | None, ResponseCache | None] = (None, None)
            if listener is not None:  # moved: a new listener, with the queue and cache kept
                await self._stop(provider.name)
                kept = self._kept(listener.proxy, provider)
            try:
                await self._start(provider, *kept)
            except OSError as exc:
                in_use = exc.errno == errno.EADDRINUSE
                reason = f"cannot listen: {'address already in use' if in_use else exc.strerror}"
                failures.append(ConfigError(f"providers[{index}].gateway.listen", reason))
        if failures:
            raise failures[0]

    def note_models(self, provider: str, names: Iterable[str]) -> None:
        """The models the provider serves now: always kept as model labels."""
        listener = self._listeners.get(provider)
        if listener is not None:
            gateway = listener.proxy.provider.gateway
            assert gateway is not None
            listener.proxy.traffic.models.known = frozenset((*names, *gateway.models))

    async def _start(
        self,
        provider: ProviderConfig,
        queue: AdmissionQueue | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        gateway = provider.gateway
        assert gateway is not None
        traffic = self.stats.of(provider.name)
        traffic.models.known = traffic.models.known | frozenset(gateway.models)
        queue, cache = self._queue_and_cache(provider, traffic, queue, cache)
        proxy = Proxy(
            provider, traffic, queue=queue, cache=cache, uses=self.uses, clock=self._clock
        )
        listener = _Listener(proxy, gateway.listen)
        server = web.Server(
            listener.handle,
            handler_cancellation=True,  # a client that goes away cancels its request upstream
            auto_decompress=False,  # bodies pass as they came
            access_log=None,
            keepalive_timeout=KEEPALIVE_SECONDS,
        )
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=SHUTDOWN_SECONDS)
        await runner.setup()
        assert runner.server is not None
        limit_connections(runner.server, gateway.max_connections, traffic)
        host, port = gateway.address
        site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            await proxy.aclose()
            raise
        listener.runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        listener.address = (
            f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
        )
        self._listeners[provider.name] = listener
        log.info(
            "gateway listening",
            extra=fields(
                provider=provider.name,
                address=listener.address,
                tls="true" if self.ssl_context is not None else "false",
            ),
        )

    def _swap(self, listener: _Listener, provider: ProviderConfig) -> None:
        """Send new requests through a proxy for the provider as configured now; the old
        one closes its connections once its requests are done."""
        old = listener.proxy
        if old.provider == provider:
            return
        queue, cache = self._queue_and_cache(provider, old.traffic, *self._kept(old, provider))
        listener.proxy = Proxy(
            provider, old.traffic, queue=queue, cache=cache, uses=self.uses, clock=self._clock
        )
        task = asyncio.ensure_future(old.aclose_when_idle(RETIRE_SECONDS))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @staticmethod
    def _kept(
        old: Proxy, provider: ProviderConfig
    ) -> tuple[AdmissionQueue | None, ResponseCache | None]:
        """The queue and cache a provider's gateway keeps from its old proxy: the cache
        emptied if the provider's url changed (its answers were another server's)."""
        if old.cache is not None and old.provider.url != provider.url:
            old.cache.clear()
        return old.queue, old.cache

    def _queue_and_cache(
        self,
        provider: ProviderConfig,
        traffic: ProviderTraffic,
        queue: AdmissionQueue | None,
        cache: ResponseCache | None,
    ) -> tuple[AdmissionQueue | None, ResponseCache | None]:
        """The queue and cache the provider's gateway is configured with: the ones it has,
        with new limits, where it keeps them."""
        gateway = provider.gateway
        assert gateway is not None
        clients = set(gateway.client_keys.values())
        if gateway.queue is not None:
            clients.update(gateway.queue.client_priorities)
        traffic.clients.known = frozenset(clients)
        now = self._clock()
        if gateway.queue is None:
            queue, traffic.queue = None, None
        elif queue is None:
            traffic.queue = QueueStats()
            queue = AdmissionQueue(gateway.queue, traffic.queue)
        else:
            queue.configure(gateway.queue, now)
        if not gateway.cache.enabled:
            cache, traffic.cache = None, None
        elif cache is None:
            traffic.cache = CacheStats()
            cache = ResponseCache(gateway.cache, traffic.cache)
        else:
            cache.configure(gateway.cache, now)
        return queue, cache

    async def _stop(self, name: str) -> None:
        listener = self._listeners.pop(name)
        if listener.runner is not None:
            await listener.runner.cleanup()
        await listener.proxy.aclose()

    async def aclose(self) -> None:
        """Stop every listener and close every connection to the providers."""
        for name in list(self._listeners):
            await self._stop(name)
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)


def _same_listener(old: ProviderConfig, new: ProviderConfig) -> bool:
    """Whether a provider's gateway keeps its listener (same address and connection cap)."""
    a, b = old.gateway, new.gateway
    assert isinstance(a, GatewayConfig) and isinstance(b, GatewayConfig)
    return (a.listen, a.max_connections) == (b.listen, b.max_connections)
