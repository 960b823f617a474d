"""The HTTP server: /metrics, /health, /-/healthy, /-/ready, /-/reload and a landing page."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from . import __version__
from .client import ConnectionStats
from .collector import Collection, Collector
from .config import Config, load_config
from .errors import ConfigError
from .health import Status
from .metrics import ReloadState, render
from .probes import ProbeRunner, ProbeStats
from .providers.base import ModelSnapshot

log = logging.getLogger(__name__)

EXPORTER_KEY: web.AppKey[Exporter] = web.AppKey("exporter")
# Prometheus sends its scrape timeout; answer before it gives up, whatever the provider does.
MIN_DEADLINE = 0.1


class Exporter:
    """The running exporter: its configuration, collector and latest collection."""

    def __init__(
        self,
        config: Config,
        config_path: str | Path | None = None,
        *,
        registry: CollectorRegistry | None = None,
        ps: ModuleType = psutil,
        nvml: Any = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.stats = ConnectionStats()
        self.probe_stats = ProbeStats()
        self.registry = registry if registry is not None else _default_registry()
        self._collector_options: dict[str, Any] = {"ps": ps, "nvml": nvml}
        self.wall_clock = wall_clock
        self.collector = self._new_collector(config)
        self.probes: ProbeRunner | None = None
        self.last: Collection | None = None
        self.reload_state = ReloadState(successful=True, success_timestamp=wall_clock())
        self._reload_lock = asyncio.Lock()
        self._collecting: asyncio.Task[Collection] | None = None

    def _new_collector(self, config: Config) -> Collector:
        return Collector(
            config,
            stats=self.stats,
            probe_stats=self.probe_stats,
            wall_clock=self.wall_clock,
            **self._collector_options,
        )

    def start_probes(self) -> None:
        """Start the probe loops of the current configuration."""
        self.probes = ProbeRunner(
            self.config,
            self.collector.by_name,
            self.probe_stats,
            self.models_of,
            wall_clock=self.wall_clock,
        )
        self.probes.start()

    async def stop_probes(self) -> None:
        """Stop the probe loops."""
        if self.probes is not None:
            await self.probes.stop()
            self.probes = None

    async def models_of(self, provider: str) -> tuple[ModelSnapshot, ...] | None:
        """A provider's models as recently collected; None if it is down or unknown."""
        collection = await self.fresh()
        for result in collection.providers:
            if result.config.name == provider and result.snapshot.up:
                return result.snapshot.models
        return None

    @property
    def ready(self) -> bool:
        """A configuration is loaded and the first collection is done."""
        return self.last is not None

    async def collect(self, deadline: float | None = None) -> Collection:
        """Collect now and remember the result."""
        collection = await self.collector.collect(deadline)
        self.last = collection
        return collection

    async def fresh(self) -> Collection:
        """The latest collection, collecting again if it is older than health.max_age.

        Callers that arrive while such a collection runs share it.
        """
        last = self.last
        if last is not None and self.wall_clock() - last.finished_at <= self.config.health.max_age:
            return last
        if self._collecting is None or self._collecting.done():
            self._collecting = asyncio.ensure_future(self.collect())
        return await asyncio.shield(self._collecting)

    def metrics(self, collection: Collection) -> Iterable[Metric]:
        """The families of one scrape: the exporter's own process, then the collection."""
        yield from self.registry.collect()
        yield from render(collection, self.stats, self.probe_stats, self.reload_state)

    async def reload(self) -> None:
        """Load the configuration file again; keep the running one if the new one is invalid."""
        async with self._reload_lock:
            if self.config_path is None:
                raise ConfigError("", "no configuration file to reload")
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError:
                self.reload_state = ReloadState(False, self.reload_state.success_timestamp)
                raise
            probing = self.probes is not None
            await self.stop_probes()
            old, self.collector = self.collector, self._new_collector(config)
            self.config = config
            names = {p.name for p in config.providers}
            self.stats.forget_except(names)
            self.probe_stats.forget_except(names)
            self.reload_state = ReloadState(True, self.wall_clock())
            await old.aclose()
            if probing:
                self.start_probes()
            log.info("configuration reloaded providers=%d", len(config.providers))
        await self.collect()

    async def aclose(self) -> None:
        """Stop probing and close the provider clients."""
        await self.stop_probes()
        await self.collector.aclose()


def _default_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


class _Scrape:
    """Adapts a list of families to what the prometheus_client encoders take."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def scrape_deadline(header: str | None, config: Config) -> float:
    """Seconds a scrape may take: Prometheus' timeout less a margin, or the configured default."""
    try:
        timeout = float(header) if header else config.global_.scrape_timeout
    except ValueError:
        timeout = config.global_.scrape_timeout
    if not timeout > 0:  # also rejects NaN
        timeout = config.global_.scrape_timeout
    return max(MIN_DEADLINE, timeout - config.global_.scrape_timeout_margin)


async def handle_metrics(request: web.Request) -> web.Response:
    """Collect every provider now and answer in the format the scraper asked for."""
    exporter = request.app[EXPORTER_KEY]
    deadline = scrape_deadline(
        request.headers.get("X-Prometheus-Scrape-Timeout-Seconds"), exporter.config
    )
    collection = await exporter.collect(deadline)
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(_Scrape(list(exporter.metrics(collection))))
    response = web.Response(body=body, headers={"Content-Type": content_type})
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        response.enable_compression(web.ContentCoding.gzip)
    return response


def health_document(collection: Collection) -> dict[str, Any]:
    """The /health JSON: overall status, each component, and when it was checked."""
    return {
        "status": collection.health.status.value,
        "components": {
            c.key: {"status": c.status.value, "reason": c.reason, "details": c.details}
            for c in collection.health.components
        },
        "last_check": datetime.fromtimestamp(collection.finished_at, UTC).isoformat(),
    }


async def handle_health(request: web.Request) -> web.Response:
    """Health verdict as JSON: 200 when healthy or degraded, 503 when unhealthy."""
    collection = await request.app[EXPORTER_KEY].fresh()
    status = 503 if collection.health.status is Status.UNHEALTHY else 200
    return web.json_response(health_document(collection), status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2)


async def handle_healthy(request: web.Request) -> web.Response:
    """The process is alive."""
    return web.Response(text="OK\n")


async def handle_ready(request: web.Request) -> web.Response:
    """The configuration is loaded and the first collection is done."""
    if request.app[EXPORTER_KEY].ready:
        return web.Response(text="OK\n")
    return web.Response(text="not ready: first collection not done\n", status=503)


async def handle_reload(request: web.Request) -> web.Response:
    """Reload the configuration file (POST), as SIGHUP does."""
    try:
        await request.app[EXPORTER_KEY].reload()
    except ConfigError as exc:
        log.error("configuration reload failed: %s", exc)
        return web.Response(text=f"{exc}\n", status=500)
    return web.Response(text="OK\n")


async def handle_index(request: web.Request) -> web.Response:
    """A landing page that links the endpoints and lists the providers with their state."""
    exporter = request.app[EXPORTER_KEY]
    rows = []
    verdicts = {c.provider: c for c in exporter.last.health.components} if exporter.last else {}
    for provider in exporter.config.providers:
        verdict = verdicts.get(provider.name)
        state = verdict.status.value if verdict else "not collected yet"
        reason = verdict.reason if verdict else ""
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(cell)}</td>"
                for cell in (provider.name, provider.kind, provider.url, state, reason)
            )
            + "</tr>"
        )
    page = _INDEX.format(
        version=__version__,
        rows="\n".join(rows) or '<tr><td colspan="5">no providers configured</td></tr>',
    )
    return web.Response(text=page, content_type="text/html")


_INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>llm-exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em 1em;text-align:left}}</style>
</head><body>
<h1>llm-exporter {version}</h1>
<ul>
<li><a href="metrics">/metrics</a>: Prometheus metrics (collects every provider now)</li>
<li><a href="health">/health</a>: health verdict as JSON</li>
<li><a href="-/healthy">/-/healthy</a> and <a href="-/ready">/-/ready</a>: liveness and readiness</li>
</ul>
<h2>Providers</h2>
<table><tr><th>name</th><th>kind</th><th>url</th><th>state</th><th>reason</th></tr>
{rows}
</table></body></html>
"""


def create_app(exporter: Exporter) -> web.Application:
    """The aiohttp application serving one exporter."""
    app = web.Application()
    app[EXPORTER_KEY] = exporter
    app.router.add_get("/", handle_index)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/-/healthy", handle_healthy)
    app.router.add_get("/-/ready", handle_ready)
    app.router.add_post("/-/reload", handle_reload)
    app.on_startup.append(_start_probes)
    app.on_cleanup.append(_stop_probes)
    return app


async def _start_probes(app: web.Application) -> None:
    app[EXPORTER_KEY].start_probes()


async def _stop_probes(app: web.Application) -> None:
    await app[EXPORTER_KEY].stop_probes()
