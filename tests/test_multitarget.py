"""/probe and /targets: blackbox_exporter's multi-target pattern, and never a key to any URL."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from exporter.config import TargetAllowlist, parse_config
from exporter.multitarget import (
    MAX_TARGET_CHARS,
    Refused,
    allowed,
    checked_target,
)
from tests.helpers import Running, config_of, parse, provider_yaml, running
from tests.prometheus_server import prometheus, query, until
from tests.standins import StandIn, closed_port, ollama_chat, ollama_routes, vllm_routes

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_the_allowlist_takes_names_networks_and_a_whole_url_pattern() -> None:
    allow = TargetAllowlist(
        hosts=("vllm-0", "*.inference.svc"),
        cidrs=(ip_network("10.0.0.0/8"),),
        regex=r"https://gpu-[0-9]+\.lab:8443",
    )
    assert allowed(allow, "http://vllm-0:8000")
    assert allowed(allow, "http://VLLM-0.:8000")  # names are case-free, a final dot changes nothing
    assert allowed(allow, "http://a.inference.svc:8000")
    assert allowed(allow, "http://b.a.inference.svc")
    assert not allowed(allow, "http://inference.svc")  # *. is below the domain, not it
    assert not allowed(allow, "http://evil-inference.svc")
    assert allowed(allow, "http://10.1.2.3:8000")
    assert not allowed(allow, "http://11.1.2.3:8000")
    # A name that may resolve into the network is not looked up: it could change after.
    assert not allowed(allow, "http://localhost.10.in-addr.arpa")
    assert allowed(allow, "https://gpu-12.lab:8443")
    assert not allowed(allow, "https://gpu-12.lab:8443/x")  # the pattern matches the whole URL
    assert not allowed(TargetAllowlist(hosts=("a",)), "http://b")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("ftp://vllm-0", "http:// or https://"),
        ("vllm-0:8000", "http:// or https://"),
        ("http://user:pw@vllm-0", "credentials"),
        ("http://vllm-0/?key=1", "query"),
        ("http://vllm-0:99999", "not a URL"),
        ("http://vllm-0/" + "a" * MAX_TARGET_CHARS, "longer than"),
    ],
)
def test_a_target_of_the_wrong_shape_is_refused(target: str, reason: str) -> None:
    with pytest.raises(Refused) as refused:
        checked_target(target)
    assert refused.value.status == 400 and reason in refused.value.reason


def recording(routes: dict[str, Any], seen: list[tuple[str, str]]) -> dict[str, Any]:
    """The routes, each noting its path and the Authorization it was sent."""

    def wrap(handler: Any) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            seen.append((request.path, request.headers.get("Authorization", "")))
            return await handler(request)

        return handle

    return {path: wrap(handler) for path, handler in routes.items()}


@asynccontextmanager
async def two_servers() -> AsyncIterator[tuple[StandIn, StandIn, list[Any], list[Any]]]:
    allowed_seen: list[tuple[str, str]] = []
    other_seen: list[tuple[str, str]] = []
    async with (
        StandIn(recording(vllm_routes(), allowed_seen)) as allowed_server,
        StandIn(recording(vllm_routes(), other_seen)) as other,
    ):
        yield allowed_server, other, allowed_seen, other_seen


def modules_yaml(key_file: Path) -> str:
    """A module for vLLM servers at 127.0.0.0/8 addresses, with a key from key_file."""
    return (
        f"modules:\n  cluster:\n    kind: vllm\n    api_key_file: {key_file}\n"
        "    targets: {cidrs: [127.0.0.0/8]}\n"
    )


async def test_probe_collects_a_configured_provider_as_metrics_does(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-module-key\n")
    async with two_servers() as (server, _, _, _):
        provider = provider_yaml("vllm-a", "vllm", server.url, labels="{cluster: eu-1}")
        async with running(config_of(provider, rest=modules_yaml(key))) as exporter:
            probed = await exporter.http.get("/probe", params={"target": "vllm-a"})
            scraped = await exporter.scrape()
            targets = (await exporter.http.get("/targets")).json()
    assert probed.status_code == 200
    probe = parse(probed.text)
    assert probe.value("probe_success") == 1
    assert (probe.value("probe_duration_seconds") or 0) > 0
    for name in ("llm_requests_running", "llm_requests_waiting", "llm_kv_cache_usage_ratio"):
        assert probe.value(name, provider="vllm-a") == scraped.value(name, provider="vllm-a")
    assert targets == [
        {"targets": ["vllm-a"], "labels": {"provider": "vllm-a", "kind": "vllm", "cluster": "eu-1"}}
    ]


async def test_a_module_sends_its_key_to_an_allowed_target_and_nothing_elsewhere(
    tmp_path: Path,
) -> None:
    key = tmp_path / "key"
    key.write_text("sk-module-key\n")
    async with two_servers() as (server, other, allowed_seen, other_seen):
        config = parse_config("providers: []\n" + modules_yaml(key))
        # The allowlist names 127.0.0.0/8: the same server by name is not allowed.
        by_name = other.url.replace("127.0.0.1", "localhost")
        async with running(config) as exporter:
            good = await exporter.http.get(
                "/probe", params={"target": server.url, "module": "cluster"}
            )
            refused = await exporter.http.get(
                "/probe", params={"target": by_name, "module": "cluster"}
            )
            unknown = await exporter.http.get(
                "/probe", params={"target": server.url, "module": "nope"}
            )
            nameless = await exporter.http.get("/probe", params={"target": "vllm-b"})
            scraped = await exporter.scrape()
    assert good.status_code == 200
    probe = parse(good.text)
    port = server.url.rsplit(":", 1)[1]
    assert probe.value("llm_provider_up", provider=f"127.0.0.1:{port}", kind="vllm") == 1
    assert {auth for _, auth in allowed_seen} == {"Bearer sk-module-key"}
    assert (refused.status_code, other_seen) == (403, [])
    assert "not allowed" in refused.text and "sk-module-key" not in refused.text
    assert (unknown.status_code, nameless.status_code) == (400, 400)
    # A probed target leaves nothing behind in /metrics, and without probe settings the
    # module sends no generation: its probe costs no GPU time.
    assert not [s for s in scraped.samples if port in str(s)]
    assert [path for path, _ in allowed_seen if "chat" in path or "generate" in path] == []
    assert probe.all("probe_generation_success") == []


async def test_a_dead_target_is_probe_success_0_within_the_deadline(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    config = config_of(provider_yaml("gone", "vllm", dead))
    async with running(config) as exporter:
        started = time.monotonic()
        answer = await exporter.http.get(
            "/probe",
            params={"target": "gone"},
            headers={"X-Prometheus-Scrape-Timeout-Seconds": "2"},
        )
        took = time.monotonic() - started
    assert answer.status_code == 200 and took < 10
    probe = parse(answer.text)
    assert probe.value("probe_success") == 0
    assert probe.value("llm_provider_up", provider="gone", kind="vllm") == 0


def documented_job(discovery: str) -> dict[str, Any]:
    """The docs' Prometheus job that finds its targets with discovery (http_sd_configs: every
    configured provider through /targets; file_sd_configs: URLs probed with a module)."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOCS.read_text(), re.MULTILINE | re.DOTALL)
    for block in blocks:
        document = yaml.safe_load(block)
        if isinstance(document, dict) and "scrape_configs" in document:
            job: dict[str, Any] = document["scrape_configs"][0]
            if job.get(discovery):
                return job
    raise AssertionError(f"docs/configuration.md shows no job with {discovery}")


async def test_prometheus_scrapes_each_provider_as_its_own_target_as_documented(
    tmp_path: Path,
) -> None:
    """A real Prometheus with the documented job: one target per provider, each with its
    own up, and the series keep their provider label (no exported_provider)."""
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: `make test` installs Debian's prometheus package"
    dead = f"http://127.0.0.1:{closed_port()}"
    async with StandIn(vllm_routes()) as server:
        config = config_of(
            provider_yaml("vllm-a", "vllm", server.url, labels="{cluster: eu-1}"),
            provider_yaml("gone", "vllm", dead),
        )
        async with running(config) as exporter:
            job = documented_job("http_sd_configs")
            host_port = exporter.url.split("//", 1)[1].rstrip("/")
            job["http_sd_configs"][0]["url"] = f"http://{host_port}/targets"
            job["http_sd_configs"][0]["refresh_interval"] = "1s"
            result = await asyncio.to_thread(
                scrape_with_prometheus, prometheus, exporter, job, tmp_path
            )
    ups = {r["metric"]["instance"]: float(r["value"][1]) for r in result["up"]}
    assert ups == {"vllm-a": 1.0, "gone": 1.0}  # the exporter answered both probes
    success = {r["metric"]["provider"]: float(r["value"][1]) for r in result["probe_success"]}
    assert success == {"vllm-a": 1.0, "gone": 0.0}
    running_series = result["llm_requests_running"]
    assert running_series and all("exported_provider" not in r["metric"] for r in running_series)
    assert {r["metric"]["cluster"] for r in running_series} == {"eu-1"}


async def test_prometheus_probes_listed_urls_with_a_module_as_documented(tmp_path: Path) -> None:
    """The docs' file_sd job: each URL in the file is a target of its own, probed with the
    module, its file labels attached."""
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: `make test` installs Debian's prometheus package"
    key = tmp_path / "key"
    key.write_text("sk-module-key\n")
    dead = f"http://127.0.0.1:{closed_port()}"
    async with two_servers() as (server, _, allowed_seen, _):
        config = parse_config("providers: []\n" + modules_yaml(key))
        async with running(config) as exporter:
            job = documented_job("file_sd_configs")
            job["params"] = {"module": ["cluster"]}
            listed = tmp_path / "targets.yml"
            listed.write_text(
                yaml.safe_dump([{"targets": [server.url, dead], "labels": {"cluster": "eu-1"}}])
            )
            job["file_sd_configs"][0] = {"files": [str(listed)], "refresh_interval": "1s"}
            result = await asyncio.to_thread(
                scrape_with_prometheus, prometheus, exporter, job, tmp_path
            )
    ups = {r["metric"]["instance"]: float(r["value"][1]) for r in result["up"]}
    assert ups == {server.url: 1.0, dead: 1.0}
    success = {r["metric"]["instance"]: float(r["value"][1]) for r in result["probe_success"]}
    assert success == {server.url: 1.0, dead: 0.0}
    port = server.url.rsplit(":", 1)[1]
    series = result["llm_requests_running"]
    assert {(r["metric"]["provider"], r["metric"]["cluster"]) for r in series} == {
        (f"127.0.0.1:{port}", "eu-1")
    }
    assert {auth for _, auth in allowed_seen} == {"Bearer sk-module-key"}


def scrape_with_prometheus(
    prometheus_binary: str, exporter: Running, job: dict[str, Any], work: Path
) -> dict[str, Any]:
    """Run Prometheus with one job (made to scrape every second, at this exporter) until it
    has scraped two targets; what it then holds of up, probe_success and a provider series."""
    host_port = exporter.url.split("//", 1)[1].rstrip("/")
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    job["relabel_configs"][-1]["replacement"] = host_port
    with prometheus({"scrape_configs": [job]}, work) as base:

        def scraped() -> dict[str, Any] | None:
            found = {name: query(base, name) for name in WANTED}
            both = len(found["up"]) == 2 and len(found["probe_success"]) == 2
            return found if both and found["llm_requests_running"] else None

        return until(scraped, "scrape of both targets through /probe")


WANTED = ("up", "probe_success", "llm_requests_running")


async def test_a_module_with_probe_settings_also_generates_and_reports_it(tmp_path: Path) -> None:
    words = ("Hello", " there", "!")
    chat = ollama_chat(words, first_load_ns=2_000_000_000, later_load_ns=1_000_000)
    seen: list[tuple[str, str]] = []
    module = (
        "modules:\n  gen:\n    kind: ollama\n    targets: {cidrs: [127.0.0.0/8]}\n"
        "    probe: {model: 'mistral:latest', max_tokens: 3, timeout: 5s}\n"
    )
    async with StandIn(recording(ollama_routes(**{"/api/chat": chat}), seen)) as server:
        async with running(parse_config("providers: []\n" + module)) as exporter:
            answer = await exporter.http.get(
                "/probe", params={"target": server.url, "module": "gen"}
            )
            refused = await exporter.http.get(
                "/probe",
                params={"target": server.url.replace("127.0.0.1", "localhost"), "module": "gen"},
            )
    probe = parse(answer.text)
    model = {"model": "mistral:latest"}
    assert probe.value("probe_success") == 1
    assert probe.value("probe_generation_success", **model) == 1
    assert probe.value("probe_generation_output_tokens", **model) == len(words)
    first = probe.value("probe_generation_time_to_first_token_seconds", **model)
    total = probe.value("probe_generation_duration_seconds", **model)
    assert first is not None and total is not None and 0 < first <= total
    assert [path for path, _ in seen].count("/api/chat") == 1  # the refused one sent none
    assert refused.status_code == 403
