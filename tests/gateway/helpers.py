"""A real llama.cpp server behind the gateway: the pieces the gateway's tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from llamacpp_server import LlamaCppServer
from tests.helpers import Running, Scrape, config_of, provider_yaml, running

LABELS = {"provider": "llama", "model": "tiny-llama"}


@asynccontextmanager
async def through_gateway(
    server: LlamaCppServer, options: str = ""
) -> AsyncIterator[tuple[Running, str]]:
    """An exporter with a gateway (with more options, as YAML flow entries) in front of
    server; the gateway's base URL."""
    gateway = f"{{listen: '127.0.0.1:0'{', ' + options if options else ''}}}"
    config = config_of(provider_yaml("llama", "llamacpp", server.url, gateway=gateway))
    async with running(config) as exporter:
        await exporter.scrape()  # the provider's models are known from here on
        yield exporter, f"http://{exporter.exporter.gateway.addresses['llama']}"


@asynccontextmanager
async def gatewayed(
    url: str, kind: str = "openai", gateway: str = "", **extra: Any
) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    """An exporter whose provider "p" at url has a gateway; a client of that gateway."""
    listen = f"{{listen: '127.0.0.1:0'{', ' + gateway if gateway else ''}}}"
    config = config_of(provider_yaml("p", kind, url, gateway=listen, **extra))
    async with running(config) as exporter:
        address = exporter.exporter.gateway.addresses["p"]
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=30) as client:
            yield exporter, client


async def own_metrics(url: str) -> dict[str, float]:
    """llama.cpp's own /metrics as {name: value}."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{url}/metrics")).text
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def tokens(scrape: Scrape, kind: str) -> float:
    """The gateway's tokens of one type for the llama provider, summed over its labels."""
    return sum(v for _, v in scrape.all("llm_gateway_tokens_total", type=kind, **LABELS))


def chat_body(index: int, stream: bool, max_tokens: int = 6, **extra: Any) -> dict[str, Any]:
    """A deterministic chat request, different for each index."""
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": f"Question {index}: what is {index} + 1?"}],
        "max_tokens": max_tokens,
        "stream": stream,
        "temperature": 0,
        "seed": 7,
        **extra,
    }


async def requests_processing(url: str) -> float:
    """What llama.cpp says it is processing now."""
    return (await own_metrics(url)).get("llamacpp:requests_processing", -1)
