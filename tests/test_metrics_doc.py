"""docs/metrics.md lists exactly what a real scrape serves, and promtool accepts the scrape."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamacpp_server import LlamaCppServer
from tests.helpers import Running, config_of, provider_yaml, running
from tests.ollama_standin import OllamaLifecycle
from tests.standins import (
    StandIn,
    ollama_chat,
    ollama_routes,
    openai_routes,
    reply,
    vllm_routes,
)
from tests.test_host import StandInNvml
from tests.test_probes import first_probe

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
ROW = re.compile(r"^\| `([a-z_:]+)` \| (\w+) \| ([^|]*) \|")


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, label names) from the catalogue's tables."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match:
            labels = frozenset(re.findall(r"`(\w+)`", match.group(3)))
            assert match.group(1) not in rows, f"{match.group(1)} is documented twice"
            rows[match.group(1)] = (match.group(2), labels)
    return rows


def served(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, label names) from an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        found[name] = (family.type, labels)
    return found


@pytest.fixture(scope="module")
def scrapes(llama_server: LlamaCppServer) -> tuple[str, ...]:
    """/metrics of an exporter watching every provider kind, a provider process and a GPU;
    then its /probe of a configured provider, and of two targets by modules whose
    generation succeeds (Ollama's chat) and fails (the vLLM stand-in has no chat)."""
    return asyncio.run(scrape_everything(llama_server))


async def scrape_everything(llama_server: LlamaCppServer) -> tuple[str, ...]:
    """Scrape an exporter watching every provider kind, a provider process, a GPU and probes."""
    chat = ollama_chat(("Hi", "!"), first_load_ns=1_500_000_000, later_load_ns=1_000_000)
    # An answer the gateway's meter cannot read: it passes, counted as unmetered.
    broken = reply(b'{"model": "llama3.2", "response": ', content_type="application/json")
    # A pinned model and one a probe may load: the lifecycle series and every action's.
    scheduler = OllamaLifecycle(("pinned", "probed"), load_seconds=0.02)
    async with (
        StandIn(ollama_routes(**{"/api/chat": chat, "/api/generate": broken})) as ollama,
        StandIn(vllm_routes(metrics="vllm_metrics_after.txt")) as vllm,
        StandIn(openai_routes()) as openai,
        StandIn(scheduler.routes()) as lifecycle,
    ):
        config = config_of(
            provider_yaml(
                "llama",
                "llamacpp",
                llama_server.url,
                process=f"{{port: {llama_server.port}}}",
                gateway="{listen: '127.0.0.1:0', queue: {max_concurrent: 4},"
                " cache: {enabled: true, max_entries: 1}}",
            ),
            provider_yaml(
                "ollama",
                "ollama",
                ollama.url,
                probes="{interval: 1h, jitter: 0}",
                gateway="{listen: '127.0.0.1:0'}",
            ),
            provider_yaml("vllm", "vllm", vllm.url),
            # Two models, one allowed: the dropped one shows in llm_exporter_series_dropped.
            provider_yaml("api", "openai", f"{openai.url}/v1", max_models=1),
            provider_yaml(
                "lifecycle",
                "ollama",
                lifecycle.url,
                lifecycle="{watch_interval: 50ms, pin: [pinned]}",
                probes="{interval: 1h, jitter: 0, models: [{name: probed, allow_load: true}]}",
            ),
            rest=MODULES,
        )
        assert llama_server.pid is not None
        async with running(config, nvml=StandInNvml(llama_server.pid)) as exporter:
            await first_probe(exporter, "ollama")
            await first_probe(exporter, "lifecycle")
            await through_the_gateways(exporter)
            await seen_loaded(exporter, {"pinned", "probed"})
            probes = [
                await exporter.http.get("/probe", params=params)
                for params in (
                    {"target": "vllm"},
                    {"target": ollama.url, "module": "ollama-chat"},
                    {"target": vllm.url, "module": "vllm-chat"},
                )
            ]
            metrics = (await exporter.http.get("/metrics")).text
            return (metrics, *(probe.text for probe in probes))


# Modules for /probe, each with a generation: Ollama's stand-in answers it, vLLM's has no chat.
MODULES = """
modules:
  ollama-chat:
    kind: ollama
    targets: {cidrs: [127.0.0.0/8]}
    probe: {model: "mistral:latest", max_tokens: 2}
  vllm-chat:
    kind: vllm
    targets: {cidrs: [127.0.0.0/8]}
    probe: {model: tiny, max_tokens: 2}
"""


async def seen_loaded(exporter: Running, models: set[str]) -> None:
    """Wait until the lifecycle watcher has seen each model load (bounded)."""
    for _ in range(500):
        events = (await exporter.http.get("/models")).json()["events"]
        if models <= {e["model"] for e in events if e["event"] == "loaded"}:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not every one of {sorted(models)} seen loaded within 10 s")


async def through_the_gateways(exporter: Running) -> None:
    """Streamed chats through the llama.cpp gateway (the second reuses the prompt cache),
    deterministic ones its cache misses, stores, evicts (it holds one) and hits, and an
    unreadable answer through Ollama's."""
    addresses = exporter.exporter.gateway.addresses
    async with httpx.AsyncClient(timeout=30) as client:
        # Sixteen tokens whatever the sampled text (ignore_eos), so they come in more than one
        # read and time per token is observed.
        body = {
            "model": "tiny-llama",
            "messages": [],
            "max_tokens": 16,
            "stream": True,
            "ignore_eos": True,
        }
        for _ in range(2):
            chat = await client.post(f"http://{addresses['llama']}/v1/chat/completions", json=body)
        generate = await client.post(
            f"http://{addresses['ollama']}/api/generate", json={"model": "llama3.2"}
        )
        answers = []
        for index in (1, 2, 2):
            body = {"model": "tiny-llama", "prompt": f"{index}", "max_tokens": 2, "temperature": 0}
            completion = f"http://{addresses['llama']}/v1/completions"
            answers.append((await client.post(completion, json=body)).headers.get("X-Cache"))
    assert (chat.status_code, generate.status_code) == (200, 200)
    assert answers == [None, None, "HIT"]


@pytest.fixture(scope="module")
def full_scrape(scrapes: tuple[str, ...]) -> str:
    """/metrics of the exporter watching everything."""
    return scrapes[0]


def test_catalogue_equals_a_real_scrape(scrapes: tuple[str, ...]) -> None:
    """The catalogue lists what /metrics and /probe serve, with their types and labels."""
    docs, scrape = documented(), {}
    for text in reversed(scrapes):
        scrape |= served(text)
    assert sorted(set(scrape) - set(docs)) == [], "served but not documented"
    assert sorted(set(docs) - set(scrape)) == [], "documented but not served"
    for name, (kind, labels) in scrape.items():
        assert docs[name] == (kind, labels), name


@pytest.mark.parametrize(
    "which", [0, 1, 2, 3], ids=["metrics", "probe", "probe-generated", "probe-generation-failed"]
)
def test_promtool_accepts_the_scrape(scrapes: tuple[str, ...], which: int) -> None:
    full_scrape = scrapes[which]
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs Debian's prometheus package"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=full_scrape, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
