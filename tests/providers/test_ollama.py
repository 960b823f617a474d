"""The ollama adapter against a stand-in replaying Ollama's documented shapes."""

from __future__ import annotations

from datetime import datetime

from tests.helpers import config_of, provider_yaml, running
from tests.standins import OLLAMA_PS, OLLAMA_TAGS, StandIn, json_reply, ollama_routes


async def test_models_on_disk_and_loaded_with_their_memory() -> None:
    async with StandIn(ollama_routes()) as server:
        async with running(config_of(provider_yaml("ollama", "ollama", server.url))) as exporter:
            scrape = await exporter.scrape()
    on_disk, loaded = OLLAMA_TAGS["models"][0], OLLAMA_PS["models"][0]
    assert scrape.value("llm_provider_up", provider="ollama", kind="ollama") == 1
    assert scrape.value("llm_provider_info", provider="ollama", version="0.5.1") == 1
    assert scrape.value("llm_model_loaded", model="codellama:13b") == 0
    assert scrape.value("llm_model_size_bytes", model="codellama:13b") == on_disk["size"]
    assert (
        scrape.value(
            "llm_model_info",
            model="codellama:13b",
            family="llama",
            parameter_size="13B",
            quantization="Q4_0",
            format="gguf",
        )
        == 1
    )
    assert scrape.value("llm_model_loaded", model="mistral:latest") == 1
    assert (
        scrape.value("llm_model_memory_bytes", model="mistral:latest", memory="total")
        == loaded["size"]
    )
    assert (
        scrape.value("llm_model_memory_bytes", model="mistral:latest", memory="vram")
        == loaded["size_vram"]
    )
    assert scrape.value("llm_model_context_tokens", model="mistral:latest") == 4096
    expires = datetime.fromisoformat("2024-06-04T14:38:31.83753-07:00").timestamp()
    assert scrape.value("llm_model_expiry_timestamp_seconds", model="mistral:latest") == expires
    # Ollama has no queue or token counters of its own: no such series, rather than zeros.
    assert scrape.value("llm_requests_waiting", provider="ollama") is None


async def test_model_that_disappears_disappears_from_metrics() -> None:
    routes = ollama_routes()
    async with StandIn(routes) as server:
        async with running(config_of(provider_yaml("ollama", "ollama", server.url))) as exporter:
            before = await exporter.scrape()
            server.routes["/api/ps"] = json_reply({"models": []})
            server.routes["/api/tags"] = json_reply({"models": []})
            after = await exporter.scrape()
    assert before.value("llm_model_loaded", model="mistral:latest") == 1
    assert after.all("llm_model_loaded") == []
    assert after.all("llm_model_info") == []
    assert after.value("llm_provider_up", provider="ollama") == 1


async def test_zero_expiry_means_none() -> None:
    """Ollama writes the zero time for a model kept loaded forever (keep_alive -1)."""
    forever = {"models": [{**OLLAMA_PS["models"][0], "expires_at": "0001-01-01T00:00:00Z"}]}
    async with StandIn(ollama_routes(**{"/api/ps": json_reply(forever)})) as server:
        async with running(config_of(provider_yaml("ollama", "ollama", server.url))) as exporter:
            scrape = await exporter.scrape()
    assert scrape.value("llm_model_loaded", model="mistral:latest") == 1
    assert scrape.value("llm_model_expiry_timestamp_seconds", model="mistral:latest") is None
