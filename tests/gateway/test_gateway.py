"""Gateway listeners follow the configuration: a reload moves, repoints and stops them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from exporter.config import load_config
from exporter.errors import ConfigError
from exporter.gateway import Gateway, GatewayStats
from tests.helpers import config_of, provider_yaml, running
from tests.standins import StandIn, closed_port, json_reply

ANSWER = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}


def gateway_file(path: Path, url: str, listen: str | None, options: str = "") -> Path:
    gateway = f"{{listen: '{listen}'{', ' + options if options else ''}}}" if listen else None
    extra = {"gateway": gateway} if gateway else {}
    path.write_text("providers:\n" + provider_yaml("p", "openai", f"{url}/v1", **extra) + "\n")
    return path


async def ask(address: str, body: dict[str, object] | None = None) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        url = f"http://{address}/v1/chat/completions"
        response = await client.post(url, json=body or {"model": "m"})
    return str(response.json()["id"])


async def test_a_reload_repoints_moves_and_stops_the_listener(tmp_path: Path) -> None:
    routes_a = {"/v1/chat/completions": json_reply({**ANSWER, "id": "a"})}
    routes_b = {"/v1/chat/completions": json_reply({**ANSWER, "id": "b"})}
    async with StandIn(routes_a) as a, StandIn(routes_b) as b:
        file = gateway_file(tmp_path / "c.yml", a.url, "127.0.0.1:0")
        async with running(load_config(file), config_path=file) as served:
            gateway = served.exporter.gateway
            first = gateway.addresses["p"]
            assert await ask(first) == "a"

            gateway_file(file, b.url, first)  # same address, another provider url
            await served.exporter.reload()
            assert gateway.addresses["p"] == first
            assert await ask(first) == "b"

            moved = f"127.0.0.1:{closed_port()}"
            gateway_file(file, b.url, moved)
            await served.exporter.reload()
            assert gateway.addresses["p"] == moved
            assert await ask(moved) == "b"
            with pytest.raises(httpx.ConnectError):
                await ask(first)
            scrape = await served.scrape()
            assert scrape.value("llm_gateway_connections", provider="p") is not None

            gateway_file(file, b.url, None)
            await served.exporter.reload()
            assert gateway.addresses == {}
            with pytest.raises(httpx.ConnectError):
                await ask(moved)
            scrape = await served.scrape()
    assert not [n for n in scrape.names() if n.startswith("llm_gateway_")]


async def test_an_address_in_use_is_refused_with_its_key() -> None:
    async with StandIn({}) as taken:
        config = config_of(
            provider_yaml(
                "p",
                "openai",
                "http://127.0.0.1:1/v1",
                gateway=f"{{listen: '127.0.0.1:{taken.port}'}}",
            )
        )
        gateway = Gateway(GatewayStats())
        try:
            with pytest.raises(
                ConfigError, match=r"providers\[0\]\.gateway\.listen: cannot listen"
            ):
                await gateway.apply(config)
            assert gateway.addresses == {}
        finally:
            await gateway.aclose()


async def test_the_landing_page_says_where_the_gateway_listens() -> None:
    config = config_of(
        provider_yaml(
            "p", "ollama", f"http://127.0.0.1:{closed_port()}", gateway="{listen: '127.0.0.1:0'}"
        )
    )
    async with running(config) as served:
        page = (await served.http.get("/")).text
        address = served.exporter.gateway.addresses["p"]
    assert f"(gateway: {address})" in page


async def test_a_reload_keeps_the_queue_and_the_cache_of_the_same_provider(tmp_path: Path) -> None:
    routes_a = {"/v1/chat/completions": json_reply({**ANSWER, "id": "a"})}
    routes_b = {"/v1/chat/completions": json_reply({**ANSWER, "id": "b"})}
    deterministic = {"model": "m", "messages": [], "temperature": 0}
    both = "queue: {max_concurrent: %d}, cache: {enabled: true, max_entries: %d}"
    async with StandIn(routes_a) as a, StandIn(routes_b) as b:
        file = gateway_file(tmp_path / "c.yml", a.url, "127.0.0.1:0", both % (1, 10))
        async with running(load_config(file), config_path=file) as served:
            address = served.exporter.gateway.addresses["p"]
            assert await ask(address, deterministic) == "a"

            # New limits: the queue and the cache (and what it holds) stay.
            gateway_file(file, a.url, address, both % (3, 5))
            assert await served.exporter.reload()
            scrape = await served.scrape()
            assert scrape.value("llm_gateway_queue_max_concurrent", provider="p") == 3
            assert scrape.value("llm_gateway_cache_max_entries", provider="p") == 5
            assert scrape.value("llm_gateway_cache_entries", provider="p") == 1
            assert await ask(address, deterministic) == "a"
            assert a.hits["/v1/chat/completions"] == 1  # answered from the cache

            # Another server behind the same gateway: its answers are not the old server's.
            gateway_file(file, b.url, address, both % (3, 5))
            assert await served.exporter.reload()
            assert await ask(address, deterministic) == "b"

            gateway_file(file, b.url, address)  # neither any more
            assert await served.exporter.reload()
            scrape = await served.scrape()
    assert not [
        n for n in scrape.names() if n.startswith(("llm_gateway_queue", "llm_gateway_cache"))
    ]
