"""Helpers shared by the tests: run the exporter on loopback and read what it serves."""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import Config, parse_config
from exporter.server import Exporter, create_app

T = TypeVar("T")


@dataclass
class Scrape:
    """One parsed /metrics page."""

    text: str
    samples: list[tuple[str, dict[str, str], float]]

    def value(self, name: str, /, **labels: str) -> float | None:
        """The value of the one sample with this name and (at least) these labels; None if none."""
        found = [v for n, got, v in self.samples if n == name and labels.items() <= got.items()]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
        return found[0] if found else None

    def all(self, name: str, /, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Every sample with this name and these labels."""
        return [
            (got, v) for n, got, v in self.samples if n == name and labels.items() <= got.items()
        ]

    def all_of(self, **labels: str) -> list[tuple[str, dict[str, str], float]]:
        """Every sample with these labels, whatever its name."""
        return [sample for sample in self.samples if labels.items() <= sample[1].items()]

    def names(self) -> set[str]:
        """The sample names present."""
        return {n for n, _, _ in self.samples}


def parse(text: str) -> Scrape:
    """Parse the Prometheus text format (with prometheus_client's own parser)."""
    samples = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            value = sample.value
            assert not math.isnan(value), sample
            samples.append((sample.name, dict(sample.labels), value))
    return Scrape(text, samples)


def provider_yaml(name: str, kind: str, url: str, **extra: Any) -> str:
    """One providers[] entry as YAML."""
    lines = [f"  - name: {name}", f"    kind: {kind}", f"    url: {url}"]
    for key, value in extra.items():
        lines.append(f"    {key}: {value}")
    return "\n".join(lines)


def config_of(*providers: str, rest: str = "") -> Config:
    """A Config from provider_yaml() entries and more YAML."""
    body = "providers:\n" + "\n".join(providers) if providers else "providers: []"
    return parse_config(body + "\n" + rest)


@dataclass
class Running:
    """An exporter serving on loopback, and an HTTP client for it."""

    exporter: Exporter
    url: str
    http: httpx.AsyncClient

    async def scrape(self, timeout_header: float | None = None) -> Scrape:
        """GET /metrics and parse it."""
        headers = {}
        if timeout_header is not None:
            headers["X-Prometheus-Scrape-Timeout-Seconds"] = str(timeout_header)
        response = await self.http.get("/metrics", headers=headers)
        assert response.status_code == 200, response.text
        assert "Traceback" not in response.text
        return parse(response.text)


@asynccontextmanager
async def running(config: Config, **options: Any) -> AsyncIterator[Running]:
    """Serve an Exporter for config on a free 127.0.0.1 port for the duration of the block."""
    exporter = Exporter(config, **options)
    server = TestServer(create_app(exporter), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url("")), timeout=60) as http:
            yield Running(exporter, str(server.make_url("")), http)
    finally:
        await server.close()
        await exporter.aclose()


async def watch_queue(
    exporter: Running,
    provider: str,
    requests: list[asyncio.Task[T]],
    until: Callable[[float, float], bool],
) -> list[tuple[float, float]]:
    """Scrape while requests run, and return every (running, waiting) pair seen.

    Stops at the first scrape where `until(running, waiting)` holds, once every request has
    finished, or after 60 s; then cancels the requests still running (a request that failed
    fails the test). A server passes through other states on the way, such as requests that
    arrived but are not yet scheduled, so a test looks for the state it expects among all seen.
    """
    seen: list[tuple[float, float]] = []
    deadline = time.monotonic() + 60
    try:
        for _ in range(2000):
            scrape = await exporter.scrape()
            pair = (
                scrape.value("llm_requests_running", provider=provider) or 0,
                scrape.value("llm_requests_waiting", provider=provider) or 0,
            )
            seen.append(pair)
            if until(*pair) or all(r.done() for r in requests) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
    finally:
        for request in requests:
            request.cancel()
        outcomes = await asyncio.gather(*requests, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    return seen


def stop_process(process: subprocess.Popen[Any]) -> None:
    """Terminate a process a test started; kill it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
