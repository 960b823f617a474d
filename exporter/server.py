"""The HTTP server: /metrics, /health, /-/healthy, /-/ready, /-/reload and a landing page."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import psutil
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from . import __version__
from .client import ConnectionStats
from .collector import Collection, Collector
from .config import Config, load_config
from .connections import limit_connections
from .errors import ConfigError
from .gateway import Gateway, GatewayStats
from .health import Status, iso_time, plural
from .lifecycle import Lifecycle, LifecycleStats
from .logs import BadRequestFilter, fields
from .metrics import HttpState, ReloadState, render, render_probe
from .multitarget import Prober, Refused, targets_document
from .probes import ProbeRunner, ProbeStats
from .providers.base import ModelSnapshot
from .webconfig import WebConfigFile

log = logging.getLogger(__name__)

EXPORTER_KEY: web.AppKey[Exporter] = web.AppKey("exporter")
# Prometheus sends its scrape timeout; answer before it gives up, whatever the provider does.
MIN_DEADLINE = 0.1
# At least this much of a scrape's deadline is kept for rendering the answer, at most
# this share of it (a loaded machine must not starve the collection).
MIN_RENDER_RESERVE = 0.02
MAX_RENDER_SHARE = 0.25
# Collections in progress at once (callers with other deadlines), and the longest deadline.
MAX_COLLECTIONS = 4
MAX_BUDGET_SECONDS = 300.0
# A scrape that joins a collection in progress waits this much past its own deadline.
GUARD_SECONDS = 0.05
# Pages with more samples are encoded in a worker thread, not on the event loop.
ENCODE_IN_THREAD_SAMPLES = 5000
RELOAD_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 512
IDLE_TIMEOUT_SECONDS = 15.0
# On shutdown, requests in progress get this long to finish.
SHUTDOWN_TIMEOUT_SECONDS = 1.0
# Model lifecycle events listed on the landing page (/models has the last 200).
EVENTS_SHOWN = 20
# Where the documentation lives (the alert rules' runbook_url points there too).
DOCS_URL = "https://github.com/llm-exporter/llm-exporter/blob/main/docs"


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
        rediscover: Callable[[], Awaitable[Config]] | None = None,
        enable_lifecycle: bool = False,
        web_config: WebConfigFile | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.rediscover = rediscover
        self.enable_lifecycle = enable_lifecycle
        self.stats = ConnectionStats()
        self.probe_stats = ProbeStats()
        self.http = HttpCounters()
        self.gateway_stats = GatewayStats()
        self.lifecycle_stats = LifecycleStats()
        self.lifecycle = Lifecycle(self.lifecycle_stats, wall_clock=wall_clock)
        # --web.config.file: auth and headers on every endpoint here, TLS here and on gateways.
        self.web_config = web_config
        tls = web_config.ssl_context if web_config is not None else None
        self.gateway = Gateway(self.gateway_stats, uses=self.lifecycle, ssl_context=tls)
        self.prober = Prober()
        self.registry = registry if registry is not None else _default_registry()
        self._collector_options: dict[str, Any] = {"ps": ps, "nvml": nvml}
        self.wall_clock = wall_clock
        self.collector = self._new_collector(config)
        self.probes: ProbeRunner | None = None
        self.last: Collection | None = None
        self.reload_state = ReloadState(successful=True, success_timestamp=wall_clock())
        self._reload_lock = asyncio.Lock()
        # Collections in progress by their deadline (rounded), and every one not done yet.
        self._collecting: dict[float, asyncio.Task[Collection]] = {}
        self._tasks: set[asyncio.Task[Collection]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._up: dict[str, bool] = {}
        self._render_seconds = 0.0

    def _new_collector(self, config: Config) -> Collector:
        return Collector(
            config,
            stats=self.stats,
            probe_stats=self.probe_stats,
            gateway_stats=self.gateway_stats,
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
            lifecycle=self.lifecycle,
        )
        self.probes.start()

    def start_lifecycle(self) -> None:
        """Watch the providers' models (and run the lifecycle policy) as configured now."""
        self.lifecycle.apply(self.config, self.collector.by_name)

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
        """The providers' state now, within the deadline.

        Callers with the same deadline share one collection: a flood of scrapes costs the
        providers one collection, and a caller with another deadline (set by whoever sends
        the header) never cuts anyone else's short. At most MAX_COLLECTIONS run at once;
        past that a caller joins the one whose deadline is nearest. A caller whose deadline
        passes first gets the latest finished collection.
        """
        budget = self.config.global_.scrape_timeout if deadline is None else deadline
        budget = min(budget, MAX_BUDGET_SECONDS)
        key = round(budget, 1)
        running = {k: t for k, t in self._collecting.items() if not t.done()}
        task = running.get(key)
        if task is None and len(running) >= MAX_COLLECTIONS:
            task = running[min(running, key=lambda other: abs(other - key))]
        if task is None:
            task = asyncio.ensure_future(self._collect(self.collector, budget))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            running[key] = task
        self._collecting = running
        try:
            return await asyncio.wait_for(asyncio.shield(task), budget + GUARD_SECONDS)
        except TimeoutError:
            if self.last is not None:
                return self.last
            return await asyncio.shield(task)

    async def _collect(self, collector: Collector, budget: float) -> Collection:
        collection = await collector.collect(budget)
        # Only a collection of the running configuration that no short deadline cut off
        # speaks for the providers beyond its own caller: /health, probes and the log.
        timeouts = [p.timeout for p in collector.config.providers]
        full = budget >= min(max(timeouts, default=0.0), self.config.global_.scrape_timeout)
        if collector is self.collector and (full or self.last is None):
            self.last = collection
            self._log_changes(collection)
            for result in collection.providers:
                if result.snapshot.up:
                    models = (model.name for model in result.snapshot.models)
                    self.gateway.note_models(result.config.name, models)
        return collection

    def _log_changes(self, collection: Collection) -> None:
        """One line when a provider goes down or comes back, with the reason."""
        reasons = {c.provider: c.reason for c in collection.health.components if c.provider}
        for result in collection.providers:
            name, up = result.config.name, result.snapshot.up
            if self._up.get(name) == up:
                continue
            self._up[name] = up
            extra = fields(provider=name, kind=result.config.kind, reason=reasons.get(name, ""))
            if up:
                log.info("provider up", extra=extra)
            else:
                log.warning("provider down", extra=extra)

    async def fresh(self) -> Collection:
        """The latest collection, collecting again if it is older than health.max_age."""
        last = self.last
        if last is not None and self.wall_clock() - last.finished_at <= self.config.health.max_age:
            return last
        return await self.collect()

    def metrics(self, collection: Collection) -> Iterable[Metric]:
        """The families of one scrape: the exporter's own process, then the collection."""
        yield from self.registry.collect()
        yield from render(
            collection,
            self.stats,
            self.probe_stats,
            self.reload_state,
            self.http.state(),
            self.gateway_stats,
            self.lifecycle_stats,
        )

    @property
    def render_reserve(self) -> float:
        """Seconds of a scrape's deadline kept for rendering and sending the answer."""
        return max(MIN_RENDER_RESERVE, 2 * self._render_seconds)

    def note_render(self, seconds: float) -> None:
        """Remember how long rendering took (a moving average), for the next deadline."""
        self._render_seconds = 0.7 * self._render_seconds + 0.3 * seconds

    async def _load(self) -> Config:
        if self.web_config is not None:  # a bad one refuses the whole reload
            await asyncio.to_thread(self.web_config.reload)
        if self.config_path is not None:
            return await asyncio.to_thread(load_config, self.config_path)
        if self.rediscover is not None:
            return await self.rediscover()
        raise ConfigError("", "no configuration file to reload")

    async def reload(self) -> bool:
        """Load the configuration again and swap it in; True if it changed.

        An invalid configuration is refused and the running one kept. Reloads run one at
        a time; collections in progress finish on the clients they started with, which
        are closed only after them.
        """
        async with self._reload_lock:
            try:
                config = await asyncio.wait_for(self._load(), RELOAD_TIMEOUT_SECONDS)
            except ConfigError:
                self.reload_state = ReloadState(False, self.reload_state.success_timestamp)
                raise
            except Exception as exc:  # whatever the file did, the running config stays
                self.reload_state = ReloadState(False, self.reload_state.success_timestamp)
                reason = (
                    f"not read within {RELOAD_TIMEOUT_SECONDS:g}s"
                    if isinstance(exc, TimeoutError)
                    else f"cannot be loaded ({type(exc).__name__})"
                )
                raise ConfigError("", reason, file=str(self.config_path or "")) from None
            self.reload_state = ReloadState(True, self.wall_clock())
            log_warnings(config)
            # A CA file may have been replaced under the same name: new clients read it again.
            rereads = any(p.tls_config.ca_file is not None for p in config.providers)
            if config == self.config and not rereads:
                log.info("configuration reloaded: unchanged")
                return False
            probing = self.probes is not None
            await self.stop_probes()
            old, in_flight = self.collector, list(self._tasks)
            self.collector, self.config, self._collecting = self._new_collector(config), config, {}
            names = {p.name for p in config.providers}
            self._up = {name: up for name, up in self._up.items() if name in names}
            retiring = asyncio.ensure_future(self._retire(old, in_flight, names))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
            if probing:
                self.start_probes()
            self.start_lifecycle()
            try:
                await self.gateway.apply(config)
            except ConfigError as exc:  # a gateway that cannot listen: the others run
                log.error("gateway not started", extra=fields(error=exc))
            log.info("configuration reloaded", extra=fields(providers=len(config.providers)))
            return True

    async def _retire(
        self, collector: Collector, in_flight: list[asyncio.Task[Collection]], names: set[str]
    ) -> None:
        """Once the collections of a replaced collector are done: forget the providers that
        are gone (those collections still counted them) and close its clients."""
        await asyncio.gather(*in_flight, return_exceptions=True)
        self.stats.forget_except(names)
        self.probe_stats.forget_except(names)
        await collector.aclose()

    def cancel_collection(self) -> None:
        """Stop every collection in progress (on shutdown: nobody waits for the answers)."""
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        """Stop probing, watching and collecting, and close the provider clients."""
        await self.stop_probes()
        await self.lifecycle.aclose()
        self.cancel_collection()
        await asyncio.gather(*self._tasks, *self._retiring, return_exceptions=True)
        await self.collector.aclose()
        await self.gateway.aclose()


class HttpCounters:
    """What the exporter's own HTTP server saw: connections and malformed requests."""

    def __init__(self) -> None:
        self.connections = 0
        self.connections_closed = 0
        self.bad_requests = BadRequestFilter()

    def state(self) -> HttpState:
        """The counts as plain data, for the renderer."""
        return HttpState(self.connections, self.connections_closed, self.bad_requests.count)


def log_warnings(config: Config) -> None:
    """Log what in a configuration is valid but probably not meant, one line each."""
    for warning in config.warnings:
        log.warning("configuration warning", extra=fields(warning=warning))


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
    if not (math.isfinite(timeout) and timeout > 0):
        timeout = config.global_.scrape_timeout
    return max(MIN_DEADLINE, timeout - config.global_.scrape_timeout_margin)


async def handle_metrics(request: web.Request) -> web.Response:
    """Collect every provider now and answer in the format the scraper asked for.

    The collection gets the scrape's deadline less what rendering takes, so the answer
    reaches the scraper in time even when the providers use all of theirs.
    """
    exporter = request.app[EXPORTER_KEY]
    deadline = scrape_deadline(
        request.headers.get("X-Prometheus-Scrape-Timeout-Seconds"), exporter.config
    )
    reserve = min(exporter.render_reserve, MAX_RENDER_SHARE * deadline)
    collection = await exporter.collect(max(MIN_DEADLINE, deadline - reserve))
    started = time.perf_counter()
    families = list(exporter.metrics(collection))
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    if sum(len(family.samples) for family in families) > ENCODE_IN_THREAD_SAMPLES:
        body = await asyncio.to_thread(encoder, _Scrape(families))
    else:
        body = encoder(_Scrape(families))
    exporter.note_render(time.perf_counter() - started)
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
        "last_check": iso_time(collection.finished_at),
    }


async def handle_health(request: web.Request) -> web.Response:
    """Health verdict as JSON: 200 when healthy or degraded, 503 when unhealthy."""
    collection = await request.app[EXPORTER_KEY].fresh()
    status = 503 if collection.health.status is Status.UNHEALTHY else 200
    return web.json_response(health_document(collection), status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2)


async def handle_models(request: web.Request) -> web.Response:
    """The last model lifecycle events, newest first, and each watched model's state, as JSON."""
    lifecycle = request.app[EXPORTER_KEY].lifecycle
    document = {"events": lifecycle.events(), "models": lifecycle.models()}
    return web.json_response(document, dumps=_dumps)


async def handle_probe(request: web.Request) -> web.Response:
    """Collect one target now (blackbox_exporter's /probe): a configured provider by name, or
    a URL that a module of the configuration allows."""
    exporter = request.app[EXPORTER_KEY]
    target = request.query.get("target", "")
    if not target:
        return web.Response(text="target parameter is missing\n", status=400)
    deadline = scrape_deadline(
        request.headers.get("X-Prometheus-Scrape-Timeout-Seconds"), exporter.config
    )
    try:
        probed = await exporter.prober.probe(
            exporter.config,
            exporter.collector.collect_provider,
            target,
            request.query.get("module"),
            deadline,
        )
    except Refused as refused:
        return web.Response(text=f"{refused.reason}\n", status=refused.status)
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(_Scrape(render_probe(probed)))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def handle_targets(request: web.Request) -> web.Response:
    """The configured providers in Prometheus' HTTP service discovery format."""
    document = targets_document(request.app[EXPORTER_KEY].config)
    return web.json_response(document, dumps=_dumps)


async def handle_healthy(request: web.Request) -> web.Response:
    """The process is alive."""
    return web.Response(text="OK\n")


async def handle_ready(request: web.Request) -> web.Response:
    """The configuration is loaded and the first collection is done."""
    if request.app[EXPORTER_KEY].ready:
        return web.Response(text="OK\n")
    return web.Response(text="not ready: first collection not done\n", status=503)


async def handle_reload(request: web.Request) -> web.Response:
    """Reload the configuration file (POST), as SIGHUP does; only with --web.enable-lifecycle."""
    exporter = request.app[EXPORTER_KEY]
    if not exporter.enable_lifecycle:
        return web.Response(
            text="lifecycle API is not enabled: start with --web.enable-lifecycle"
            " (SIGHUP always reloads)\n",
            status=403,
        )
    try:
        changed = await exporter.reload()
    except ConfigError as exc:
        log.error("configuration reload failed, keeping the running one", extra=fields(error=exc))
        return web.Response(text=f"{exc}\n", status=500)
    return web.Response(text="OK\n" if changed else "OK (unchanged)\n")


async def handle_index(request: web.Request) -> web.Response:
    """A landing page: the overall verdict, then each provider's state, models and probes."""
    exporter = request.app[EXPORTER_KEY]
    collection = exporter.last
    page = landing_page(
        exporter.config,
        collection,
        exporter.probe_stats,
        exporter.gateway.addresses,
        exporter.lifecycle.events()[:EVENTS_SHOWN],
    )
    return web.Response(text=page, content_type="text/html")


def landing_page(
    config: Config,
    collection: Collection | None,
    probes: ProbeStats,
    gateways: Mapping[str, str] | None = None,
    events: Iterable[Mapping[str, Any]] = (),
) -> str:
    """The landing page's HTML; gateways: the address each provider's gateway listens on;
    events: the latest model lifecycle events, newest first."""
    verdicts = {c.provider: c for c in collection.health.components} if collection else {}
    results = {r.config.name: r for r in collection.providers} if collection else {}
    by_provider = probes.by_provider()
    rows = []
    for provider in config.providers:
        verdict = verdicts.get(provider.name)
        state = verdict.status.value if verdict else "not collected yet"
        result = results.get(provider.name)
        loaded = [m.name for m in result.snapshot.models if m.loaded] if result else []
        speeds = [
            f"{model}: {stats.tokens_per_second:.1f} tokens/s"
            for model, stats in sorted(by_provider.get(provider.name, {}).items())
            if stats.tokens_per_second is not None
        ]
        gateway = (gateways or {}).get(provider.name)
        where = display_url(provider.url) + (f" (gateway: {gateway})" if gateway else "")
        cells = (
            _cell(provider.name),
            _cell(provider.kind),
            _cell(where),
            f'<td class="{html.escape(state.split()[0])}">{html.escape(state)}</td>',
            _cell(verdict.reason if verdict else ""),
            _cell(_listed(loaded) or "none"),
            _cell(_listed(speeds) or "not probed"),
        )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    if collection is None:
        overall, summary = "unknown", "not collected yet"
    else:
        overall = collection.health.status.value
        bad = [c for c in collection.health.components if c.status is not Status.HEALTHY]
        summary = "; ".join(f"{c.key}: {c.reason}" for c in bad) or "every component healthy"
    return _INDEX.format(
        version=__version__,
        docs=DOCS_URL,
        overall=html.escape(overall),
        summary=html.escape(summary),
        count=plural(len(config.providers), "provider"),
        rows="\n".join(rows) or '<tr><td colspan="7">no providers configured</td></tr>',
        events="\n".join(_event_row(event) for event in events)
        or '<tr><td colspan="6">none seen yet</td></tr>',
    )


def _event_row(event: Mapping[str, Any]) -> str:
    seconds = event.get("load_seconds")
    cells = (
        event.get("time", ""),
        event.get("provider", ""),
        event.get("model", ""),
        str(event.get("event", "")).replace("_", " "),
        event.get("cause") or event.get("detail") or "",
        f"{seconds:g} s" if isinstance(seconds, int | float) else "",
    )
    return "<tr>" + "".join(_cell(str(cell)) for cell in cells) + "</tr>"


def _cell(text: str) -> str:
    return f"<td>{html.escape(text)}</td>"


def _listed(items: list[str], limit: int = 10) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# A path segment shown as it is: a short word, not something that may be a token.
_PLAIN_SEGMENT = re.compile(r"^[A-Za-z][A-Za-z0-9._~-]{0,23}$")


def display_url(url: str) -> str:
    """A URL fit to show: no user info, query or fragment, and path parts that may be
    tokens (long, or with more than four digits) replaced by ***."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    segments = [
        s if _PLAIN_SEGMENT.match(s) and sum(c.isdigit() for c in s) <= 4 else "***"
        for s in parts.path.split("/")[1:]
        if s
    ]
    path = "/" + "/".join(segments) if segments else ""
    return f"{parts.scheme}://{netloc}{path}"


_INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>llm-exporter</title>
<style>
body{{font-family:sans-serif;margin:2em;color:#222}}
td,th{{padding:.3em 1em;text-align:left;vertical-align:top}}
tr:nth-child(even){{background:#f6f6f6}}
.verdict{{font-size:1.4em;padding:.5em 1em;border-radius:.3em;display:inline-block}}
.healthy{{background:#d4f4dd;color:#135e2a}}
.degraded{{background:#fff1c2;color:#7a5200}}
.unhealthy{{background:#fbd5d5;color:#8a1111}}
.unknown,.not{{background:#e6e6e6;color:#444}}
</style>
</head><body>
<h1>llm-exporter {version}</h1>
<p class="verdict {overall}">Overall: <b>{overall}</b></p>
<p>{summary}</p>
<h2>Providers ({count})</h2>
<table><tr><th>name</th><th>kind</th><th>url</th><th>state</th><th>reason</th>
<th>loaded models</th><th>last probe speed</th></tr>
{rows}
</table>
<h2>Model events</h2>
<table><tr><th>time</th><th>provider</th><th>model</th><th>event</th><th>cause</th>
<th>load</th></tr>
{events}
</table>
<h2>Endpoints</h2>
<ul>
<li><a href="metrics">/metrics</a>: Prometheus metrics (collects every provider now)</li>
<li><a href="health">/health</a>: health verdict as JSON</li>
<li><a href="models">/models</a>: the last 200 model loads and unloads, and each model's state, as JSON</li>
<li><a href="targets">/targets</a>: the providers in Prometheus' HTTP service discovery format, for
<code>/probe?target=NAME</code> (one provider's series, collected now)</li>
<li><a href="-/healthy">/-/healthy</a> and <a href="-/ready">/-/ready</a>: liveness and readiness</li>
</ul>
<h2>Documentation</h2>
<ul>
<li><a href="{docs}/metrics.md">metrics</a>: every series and where it comes from</li>
<li><a href="{docs}/configuration.md">configuration</a>: every key, the flags, reloading</li>
<li><a href="{docs}/runbooks.md">runbooks</a>: what each alert and reason means, and how to fix it</li>
<li><a href="{docs}/../README.md#troubleshooting">troubleshooting</a>: reason, then fix</li>
</ul>
</body></html>
"""


def create_app(exporter: Exporter) -> web.Application:
    """The aiohttp application serving one exporter."""
    app = web.Application()
    app[EXPORTER_KEY] = exporter
    if exporter.web_config is not None:
        exporter.web_config.install(app)
    app.router.add_get("/", handle_index)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/models", handle_models)
    app.router.add_get("/probe", handle_probe)
    app.router.add_get("/targets", handle_targets)
    app.router.add_get("/-/healthy", handle_healthy)
    app.router.add_get("/-/ready", handle_ready)
    app.router.add_post("/-/reload", handle_reload)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    exporter = app[EXPORTER_KEY]
    logging.getLogger("aiohttp.server").addFilter(exporter.http.bad_requests)
    await exporter.gateway.apply(exporter.config)
    exporter.start_probes()
    exporter.start_lifecycle()


async def _stop(app: web.Application) -> None:
    exporter = app[EXPORTER_KEY]
    logging.getLogger("aiohttp.server").removeFilter(exporter.http.bad_requests)
    await exporter.stop_probes()
    await exporter.lifecycle.aclose()
    await exporter.gateway.aclose()


async def start_runner(
    exporter: Exporter,
    *,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
) -> web.AppRunner:
    """A set-up runner for the exporter's app whose client connections are bounded.

    A connection that sends no complete request within idle_timeout (an idle keep-alive,
    or headers sent slowly) is closed, and at most max_connections stay open.
    """
    runner = web.AppRunner(
        create_app(exporter),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=idle_timeout,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
    )
    await runner.setup()
    assert runner.server is not None
    limit_connections(runner.server, max_connections, exporter.http)
    return runner
