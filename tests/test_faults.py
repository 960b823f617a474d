"""A dead, hanging, slow or lying provider: classified, bounded, and never breaks a scrape."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from dataclasses import dataclass

import pytest

from tests.helpers import config_of, provider_yaml, running
from tests.standins import (
    Handler,
    StandIn,
    closed_port,
    delayed,
    hang,
    huge,
    json_reply,
    llamacpp_routes,
    ollama_routes,
    reply,
)


@dataclass(frozen=True)
class Fault:
    """A misbehaving provider and what the exporter must make of it."""

    kind: str
    routes: dict[str, Handler]
    up: float
    failure: str
    endpoint: str


VERSION = "/api/version"
FAULTS = {
    "hangs": Fault("ollama", ollama_routes(**{VERSION: hang()}), 0, "timeout", VERSION),
    "slower than its timeout": Fault(
        "ollama",
        ollama_routes(**{VERSION: delayed(5, json_reply({"version": "0.5.1"}))}),
        0,
        "timeout",
        VERSION,
    ),
    "answers 500": Fault("ollama", ollama_routes(**{VERSION: reply("oops", 500, "text/plain")}), 0, "http_5xx", VERSION),
    "answers 404": Fault("ollama", ollama_routes(**{VERSION: reply("404 page not found", 404, "text/plain")}), 0, "http_4xx", VERSION),
    "answers HTML": Fault(
        "ollama",
        ollama_routes(**{VERSION: reply("<html><body>Bad gateway</body></html>", 200, "text/html")}),
        0,
        "invalid_response",
        VERSION,
    ),
    "answers truncated JSON": Fault("ollama", ollama_routes(**{VERSION: reply('{"version": "0.5')}), 0, "invalid_response", VERSION),
    "answers JSON of the wrong shape": Fault("ollama", ollama_routes(**{VERSION: json_reply(["0.5.1"])}), 0, "invalid_response", VERSION),
    "answers a 50 MB body": Fault("ollama", ollama_routes(**{VERSION: huge(50)}), 0, "invalid_response", VERSION),
    # Partial answers: the provider is up, and the part that lied is named.
    "lists models of the wrong shape": Fault(
        "ollama", ollama_routes(**{"/api/tags": json_reply({"models": "all of them"})}), 1, "invalid_response", "/api/tags"
    ),
    "serves malformed metrics": Fault(
        "llamacpp",
        llamacpp_routes(**{"/metrics": reply("llamacpp:prompt_tokens_total{oops 1\n", 200, "text/plain")}),
        1,
        "invalid_response",
        "/metrics",
    ),
    "serves a slots list of numbers": Fault(
        "llamacpp", llamacpp_routes(**{"/slots": json_reply([1, 2, 3])}), 1, "invalid_response", "/slots"
    ),
    "fails its models listing with 503": Fault(
        "llamacpp", llamacpp_routes(**{"/v1/models": reply("busy", 503, "text/plain")}), 1, "http_5xx", "/v1/models"
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault_is_classified_and_bounded(name: str) -> None:
    fault = FAULTS[name]
    async with StandIn(fault.routes) as bad, StandIn(ollama_routes()) as good:
        config = config_of(
            provider_yaml("bad", fault.kind, bad.url, timeout="1s"),
            provider_yaml("good", "ollama", good.url),
        )
        async with running(config) as exporter:
            tracemalloc.start()
            started = time.monotonic()
            scrape = await exporter.scrape()
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_provider_up", provider="bad") == fault.up
    assert scrape.value("llm_exporter_scrape_success", provider="bad") == 0
    assert (
        scrape.value(
            "llm_provider_requests_total",
            provider="bad",
            endpoint=fault.endpoint,
            outcome=fault.failure,
        )
        == 1
    )
    assert (
        f"{fault.endpoint} {fault.failure}"
        in " ".join(health["components"]["provider/bad"]["details"]["failures"])
        + health["components"]["provider/bad"]["reason"]
    )
    assert health["components"]["provider/bad"]["status"] == (
        "unhealthy" if fault.up == 0 else "degraded"
    )
    # The healthy neighbour keeps every series.
    assert scrape.value("llm_provider_up", provider="good") == 1
    assert scrape.value("llm_model_loaded", provider="good", model="mistral:latest") == 1
    # Bounded: the provider's 1 s timeout plus slack for a loaded machine, not the fault's 5 s or forever.
    assert elapsed < 4.5
    assert peak < 24 * 1024 * 1024


async def test_refused_connection_is_connect_failure() -> None:
    port = closed_port()
    config = config_of(provider_yaml("gone", "vllm", f"http://127.0.0.1:{port}"))
    async with running(config) as exporter:
        scrape = await exporter.scrape()
        health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_provider_up", provider="gone") == 0
    assert (
        scrape.value(
            "llm_provider_requests_total", provider="gone", endpoint="/health", outcome="connect"
        )
        == 1
    )
    assert health["components"]["provider/gone"]["reason"].startswith(
        "unreachable: /health connect"
    )


async def test_scrape_deadline_from_prometheus_bounds_a_hanging_provider() -> None:
    """With a 30 s provider timeout, Prometheus' 2 s scrape timeout still wins."""
    async with StandIn(ollama_routes(**{VERSION: hang()})) as bad:
        config = config_of(provider_yaml("bad", "ollama", bad.url, timeout="30s"))
        async with running(config) as exporter:
            started = time.monotonic()
            scrape = await exporter.scrape(timeout_header=2)
            elapsed = time.monotonic() - started
    assert scrape.value("llm_provider_up", provider="bad") == 0
    assert scrape.value("llm_exporter_scrape_duration_seconds", provider="bad") == pytest.approx(
        1.5, abs=0.5
    )
    assert elapsed < 10


async def test_slow_provider_reports_its_true_response_time() -> None:
    """A stand-in with a known 300 ms delay: the exporter reports at least that, and is up."""
    slow = delayed(0.3, json_reply({"version": "0.5.1"}))
    async with StandIn(ollama_routes(**{VERSION: slow})) as server:
        async with running(
            config_of(provider_yaml("slow", "ollama", server.url, timeout="3s"))
        ) as exporter:
            scrape = await exporter.scrape()
    assert scrape.value("llm_provider_up", provider="slow") == 1
    seconds = scrape.value("llm_provider_response_time_seconds", provider="slow")
    assert seconds is not None and 0.3 <= seconds < 3


async def test_server_closing_a_kept_alive_connection_is_retried_not_failed() -> None:
    """Like llama-server after 100 requests: the connection is closed before any answer byte."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        try:
            for _ in range(2):  # answer two requests on each connection, then drop the third
                await reader.readuntil(b"\r\n\r\n")
                served += 1
                body = json.dumps({"data": [{"id": "m"}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = config_of(provider_yaml("flaky", "openai", f"http://127.0.0.1:{port}/v1"))
        async with running(config) as exporter:
            for _ in range(6):
                await exporter.exporter.collect()
            scrape = await exporter.scrape()
    finally:
        server.close()
        await server.wait_closed()
    assert scrape.value("llm_provider_requests_total", provider="flaky", outcome="success") == 7
    assert scrape.all("llm_provider_requests_total", outcome="connect") == []
    assert (scrape.value("llm_provider_request_retries_total", provider="flaky") or 0) >= 3
    assert served == 7
