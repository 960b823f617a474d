"""A dead, hanging, slow, lying or malicious provider: classified, bounded, never breaks a scrape.

FAULTS is the shared hostile-provider table: each case's answer is bounded in time,
series and memory, its failure is counted with its class on the endpoint that caused
it, the healthy neighbour keeps every series, and no line reaches the log twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from exporter.client import PARSE_IN_THREAD_BYTES, ConnectionStats, ProviderClient
from exporter.collector import MAX_BUCKETS, MAX_LABEL_VALUES
from exporter.server import MIN_RENDER_RESERVE, Exporter
from tests.helpers import Scrape, config_of, provider_yaml, running
from tests.router_standin import router_routes
from tests.standins import (
    Handler,
    StandIn,
    closed_port,
    delayed,
    fixture,
    hang,
    huge,
    json_reply,
    llamacpp_routes,
    lmstudio_routes,
    ollama_routes,
    reply,
    sglang_routes,
    tgi_routes,
    trtllm_routes,
    vllm_routes,
)


@dataclass(frozen=True)
class Fault:
    """A misbehaving provider and what the exporter must make of it.

    failure is None where the exporter bounds what it was sent and nothing failed.
    """

    kind: str
    routes: dict[str, Handler]
    up: float
    failure: str | None
    endpoint: str
    options: dict[str, str] = field(default_factory=dict)
    # Samples of the provider a bounded answer may have at most.
    max_samples: int = 1000
    # False where the failure is the exporter's verdict on an answer, not a failed request.
    counted: bool = True
    # What else the scrape must show for this case.
    check: Callable[[Scrape], None] = lambda scrape: None


def nested(depth: int) -> str:
    """A JSON bomb: valid JSON nested deeper than any parser's recursion limit."""
    return "[" * depth + "]" * depth


def vllm_page(*lines: str) -> Handler:
    """vLLM's recorded /metrics page with hostile lines added."""
    return reply(fixture("vllm_metrics_busy.txt") + "\n".join(lines) + "\n", 200, "text/plain")


def many(template: str, count: int) -> list[str]:
    """count lines from a template with {i} in it."""
    return [template.format(i=i) for i in range(count)]


def reasons_folded(scrape: Scrape) -> None:
    reasons = scrape.all("llm_requests_finished_total", provider="bad", model="tiny")
    assert len(reasons) == MAX_LABEL_VALUES
    # Folded, not lost: the total is the recorded page's plus the 100,000 added.
    assert sum(value for _, value in reasons) == pytest.approx(RECORDED_FINISHED + 100_000)
    assert scrape.value(
        "llm_exporter_series_dropped", provider="bad", family="llm_requests_finished_total"
    )


def buckets_thinned(scrape: Scrape) -> None:
    buckets = scrape.all("llm_time_to_first_token_seconds_bucket", provider="bad", model="bomb")
    assert 2 <= len(buckets) <= MAX_BUCKETS
    assert max(value for _, value in buckets) == 100_000


def models_capped(scrape: Scrape) -> None:
    assert len(scrape.all("llm_requests_running", provider="bad")) == 100
    assert scrape.value(
        "llm_exporter_series_dropped", provider="bad", family="llm_requests_running"
    )


def status_only(scrape: Scrape) -> None:
    assert scrape.all("llm_model_info", provider="bad") == []
    assert scrape.value("llm_exporter_series_dropped", provider="bad", family="all")


def no_bad_numbers(scrape: Scrape) -> None:
    assert scrape.all("llm_tokens_total", provider="bad") == []
    assert scrape.all("llm_requests_running", provider="bad") == []
    assert scrape.value("llm_requests_waiting", provider="bad") == 2


def broken_histograms_left_out(scrape: Scrape) -> None:
    assert scrape.all("llm_request_duration_seconds_bucket", model="nan-bound") == []
    assert scrape.all("llm_request_duration_seconds_bucket", model="going-down") == []
    assert scrape.all("llm_request_duration_seconds_bucket", model="tiny") != []


def twins_once(scrape: Scrape) -> None:
    assert len(scrape.all("llm_model_loaded", provider="bad", model="twin")) == 1


RECORDED_FINISHED = sum(
    float(line.rsplit(" ", 1)[1])
    for line in fixture("vllm_metrics_busy.txt").splitlines()
    if line.startswith("vllm:request_success_total{")
)
LLAMA_METRICS = "llamacpp:prompt_tokens_total 10\nllamacpp:tokens_predicted_total {value}\n"


def every_kind(
    kind: str,
    routes: Callable[..., dict[str, Handler]],
    status: str,
    listing: str,
    wrong_shape: object,
) -> dict[str, Fault]:
    """The faults every kind passes, named "KIND: fault": its status endpoint hangs, fails or
    sends 50 MB (the provider is down); its model listing answers HTML, truncated or
    wrong-shaped JSON (down where the listing is the status endpoint, else a partial answer)."""
    listed = 0 if listing == status else 1
    html = reply("<html><body>Bad gateway</body></html>", 200, "text/html")
    return {
        f"{kind}: hangs": Fault(kind, routes(**{status: hang()}), 0, "timeout", status),
        f"{kind}: answers 500": Fault(kind, routes(**{status: reply("oops", 500, "text/plain")}), 0, "http_5xx", status),
        f"{kind}: answers a 50 MB body": Fault(kind, routes(**{status: huge(50)}), 0, "invalid_response", status),
        f"{kind}: answers HTML": Fault(kind, routes(**{listing: html}), listed, "invalid_response", listing),
        f"{kind}: answers truncated JSON": Fault(kind, routes(**{listing: reply('{"data": [{"id"')}), listed, "invalid_response", listing),
        f"{kind}: answers JSON of the wrong shape": Fault(kind, routes(**{listing: json_reply(wrong_shape)}), listed, "invalid_response", listing),
    }  # fmt: skip


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
    "routes malformed metrics of a loaded model": Fault(
        "llamacpp", router_routes(**{"/metrics": reply("llamacpp:prompt_tokens_total{oops 1\n", 200, "text/plain")}), 1, "invalid_response", "/metrics"
    ),
    "serves a slots list of numbers": Fault(
        "llamacpp", llamacpp_routes(**{"/slots": json_reply([1, 2, 3])}), 1, "invalid_response", "/slots"
    ),
    "fails its models listing with 503": Fault(
        "llamacpp", llamacpp_routes(**{"/v1/models": reply("busy", 503, "text/plain")}), 1, "http_5xx", "/v1/models"
    ),
    # JSON bombs cost the endpoint that sent them, classified, never the provider as a timeout.
    "answers a JSON bomb for its version": Fault("ollama", ollama_routes(**{VERSION: reply(nested(100_000))}), 0, "invalid_response", VERSION),
    "lists models as a JSON bomb": Fault("ollama", ollama_routes(**{"/api/ps": reply(nested(100_000))}), 1, "invalid_response", "/api/ps"),
    # Label values and bounds from a provider's own /metrics are bounded per family.
    "reports 100,000 finish reasons": Fault(
        "vllm",
        vllm_routes(**{"/metrics": vllm_page(*many('vllm:request_success_total{{finished_reason="r{i}",model_name="tiny"}} 1', 100_000))}),
        1, None, "/metrics", {"timeout": "20s"}, check=reasons_folded,
    ),
    "reports a histogram of 100,000 bounds": Fault(
        "vllm",
        vllm_routes(**{"/metrics": vllm_page(*many('vllm:time_to_first_token_seconds_bucket{{le="{i}.5",model_name="bomb"}} {i}', 100_000), 'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="bomb"} 100000')}),
        1, None, "/metrics", {"timeout": "20s"}, check=buckets_thinned,
    ),
    "reports 20,000 models": Fault(
        "vllm",
        vllm_routes(**{"/metrics": vllm_page(*many('vllm:num_requests_running{{engine="0",model_name="m{i}"}} 1', 20_000))}),
        1, None, "/metrics", {"timeout": "5s"}, max_samples=2000, check=models_capped,
    ),
    "has more series than max_series": Fault("vllm", vllm_routes(), 1, "invalid_response", "/metrics", {"max_series": "50"}, max_samples=50, counted=False, check=status_only),
    # Numbers are checked as JSON numbers are: NaN, infinities and negatives are no value.
    "reports NaN, -Inf and negative values": Fault(
        "llamacpp",
        llamacpp_routes(**{"/metrics": reply("llamacpp:prompt_tokens_total NaN\nllamacpp:tokens_predicted_total -5\nllamacpp:requests_processing -Inf\nllamacpp:requests_deferred 2\n", 200, "text/plain")}),
        1, None, "/metrics", check=no_bad_numbers,
    ),
    "writes 1_000 for a number": Fault(
        "llamacpp", llamacpp_routes(**{"/metrics": reply(LLAMA_METRICS.format(value="1_000"), 200, "text/plain")}), 1, "invalid_response", "/metrics"
    ),
    "reports a bucket bound of nan and counts that go down": Fault(
        "vllm",
        vllm_routes(**{"/metrics": vllm_page(
            'vllm:e2e_request_latency_seconds_bucket{engine="0",le="nan",model_name="nan-bound"} 1',
            'vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="nan-bound"} 1',
            'vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="going-down"} 5',
            'vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="going-down"} 3',
        )}),
        1, None, "/metrics", check=broken_histograms_left_out,
    ),
    "names two models alike but for unprintable characters": Fault(
        "ollama",
        ollama_routes(**{"/api/ps": json_reply({"models": [{"name": "twin\u0007", "size": 1}, {"name": "twin", "size": 2}]})}),
        1, None, "/api/ps", check=twins_once,
    ),
}  # fmt: skip
FAULTS |= every_kind("lmstudio", lmstudio_routes, "/api/v1/models", "/api/v1/models", {"models": 1})
FAULTS |= every_kind("trtllm", trtllm_routes, "/health", "/v1/models", {"data": "all of them"})
FAULTS["trtllm: serves malformed metrics"] = Fault(
    "trtllm",
    trtllm_routes(**{"/prometheus/metrics": reply("trtllm_num_requests_running{oops 1\n", 200, "text/plain")}),
    1, "invalid_response", "/prometheus/metrics",
)  # fmt: skip
FAULTS |= every_kind("sglang", sglang_routes, "/health", "/v1/models", {"data": "all of them"})
FAULTS["sglang: serves malformed metrics"] = Fault(
    "sglang", sglang_routes(**{"/metrics": reply("sglang:num_running_reqs{oops 1\n", 200, "text/plain")}), 1, "invalid_response", "/metrics"
)  # fmt: skip
FAULTS |= every_kind("tgi", tgi_routes, "/health", "/info", ["bigscience/blomm-560m"])
FAULTS["tgi: serves malformed metrics"] = Fault(
    "tgi", tgi_routes(**{"/metrics": reply("tgi_queue_size{oops 1\n", 200, "text/plain")}), 1, "invalid_response", "/metrics"
)  # fmt: skip


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault_is_classified_and_bounded(name: str, caplog: pytest.LogCaptureFixture) -> None:
    fault = FAULTS[name]
    caplog.set_level(logging.INFO)
    async with StandIn(fault.routes) as bad, StandIn(ollama_routes()) as good:
        # The model watcher reads some of the same endpoints; the counts below are the scrape's.
        options = {"timeout": "1s", "lifecycle": "{watch: false}", **fault.options}
        config = config_of(
            provider_yaml("bad", fault.kind, bad.url, **options),
            provider_yaml("good", "ollama", good.url),
        )
        seconds = float(options["timeout"].removesuffix("s"))
        async with running(config) as exporter:
            tracemalloc.start()
            started = time.monotonic()
            scrape = await exporter.scrape(timeout_header=seconds + 1)
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            for _ in range(2):
                await exporter.scrape(timeout_header=seconds + 1)
            health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_provider_up", provider="bad") == fault.up
    assert len(scrape.all_of(provider="bad")) <= fault.max_samples
    repeated = Counter(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert all(count == 1 for count in repeated.values()), repeated
    # The healthy neighbour keeps every series.
    assert scrape.value("llm_provider_up", provider="good") == 1
    assert scrape.value("llm_model_loaded", provider="good", model="mistral:latest") == 1
    # Bounded: the provider's timeout plus slack for a loaded machine, not the fault's 5 s or forever.
    assert elapsed < seconds + 3.5
    # An 8 MiB page (the body limit) of hostile lines is read within about ten times its size.
    assert peak < 96 * 1024 * 1024
    fault.check(scrape)
    if fault.failure is None:
        assert scrape.value("llm_exporter_scrape_success", provider="bad") == 1
        return
    assert scrape.value("llm_exporter_scrape_success", provider="bad") == 0
    counted = scrape.value(
        "llm_provider_requests_total",
        provider="bad",
        endpoint=fault.endpoint,
        outcome=fault.failure,
    )
    assert counted == (1 if fault.counted else None)
    assert (
        f"{fault.endpoint} {fault.failure}"
        in " ".join(health["components"]["provider/bad"]["details"]["failures"])
        + health["components"]["provider/bad"]["reason"]
    )
    assert health["components"]["provider/bad"]["status"] == (
        "unhealthy" if fault.up == 0 else "degraded"
    )


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("vllm", "/health"),
        ("lmstudio", "/api/v1/models"),
        ("trtllm", "/health"),
        ("sglang", "/health"),
        ("tgi", "/health"),
    ],
)
async def test_refused_connection_is_connect_failure(kind: str, status: str) -> None:
    port = closed_port()
    # Unwatched: the model watcher reads some of the same endpoints; the count is the scrape's.
    url = f"http://127.0.0.1:{port}"
    config = config_of(provider_yaml("gone", kind, url, lifecycle="{watch: false}"))
    async with running(config) as exporter:
        scrape = await exporter.scrape()
        health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_provider_up", provider="gone") == 0
    assert (
        scrape.value(
            "llm_provider_requests_total", provider="gone", endpoint=status, outcome="connect"
        )
        == 1
    )
    reason = health["components"]["provider/gone"]["reason"]
    assert reason.startswith(f"unreachable: GET {status}: ")


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


async def test_a_large_answer_is_parsed_off_the_event_loop() -> None:
    """Regression: parsing a large body on the loop stalled every other scrape and /-/healthy."""
    big, small = "x" * (PARSE_IN_THREAD_BYTES + 1), "x"
    routes = {"/big": reply(big, 200, "text/plain"), "/small": reply(small, 200, "text/plain")}
    async with StandIn(routes) as server:
        config = config_of(provider_yaml("p", "openai", server.url)).providers[0]
        async with ProviderClient(config, ConnectionStats()) as client:
            parsed_in = await asyncio.gather(
                client.fetch("/big", lambda _: threading.current_thread()),
                client.fetch("/small", lambda _: threading.current_thread()),
            )
    assert parsed_in[0] is not threading.main_thread()
    assert parsed_in[1] is threading.main_thread()


def test_rendering_time_is_kept_out_of_the_collection_deadline() -> None:
    exporter = Exporter(config_of())
    assert exporter.render_reserve == MIN_RENDER_RESERVE
    for _ in range(20):
        exporter.note_render(0.3)
    assert exporter.render_reserve == pytest.approx(0.6, rel=0.01)
