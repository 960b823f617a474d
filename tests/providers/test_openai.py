"""The openai adapter against a stand-in OpenAI-compatible server."""

from __future__ import annotations

from tests.helpers import config_of, provider_yaml, running
from tests.standins import StandIn, json_reply, openai_routes


async def test_models_listed_and_key_sent() -> None:
    seen: list[str] = []
    routes = openai_routes()
    listing = routes["/v1/models"]

    async def models(request):  # type: ignore[no-untyped-def]
        seen.append(request.headers.get("Authorization", ""))
        return await listing(request)

    async with StandIn({"/v1/models": models}) as server:
        config = config_of(provider_yaml("api", "openai", f"{server.url}/v1", api_key="sk-abc"))
        async with running(config) as exporter:
            scrape = await exporter.scrape()
    assert seen == ["Bearer sk-abc"]
    assert scrape.value("llm_provider_up", provider="api", kind="openai") == 1
    assert scrape.value("llm_model_info", provider="api", model="gpt-4o-mini") == 1
    assert scrape.value("llm_model_info", provider="api", model="text-embedding-3-small") == 1
    # A hosted API does not say what is loaded: no llm_model_loaded rather than a guess.
    assert scrape.all("llm_model_loaded") == []


async def test_rejected_key_is_down_with_http_4xx() -> None:
    denied = json_reply({"error": {"message": "Incorrect API key provided"}}, 401)
    async with StandIn({"/v1/models": denied}) as server:
        config = config_of(provider_yaml("api", "openai", f"{server.url}/v1", api_key="sk-wrong"))
        async with running(config) as exporter:
            scrape = await exporter.scrape()
            health = (await exporter.http.get("/health")).json()
    assert scrape.value("llm_provider_up", provider="api") == 0
    assert scrape.value("llm_provider_requests_total", provider="api", outcome="http_4xx") == 1
    assert health["components"]["provider/api"]["reason"] == (
        "the server answered HTTP 401 to GET /models: check api_key"
    )
    assert (
        "/models http_4xx: HTTP 401" in health["components"]["provider/api"]["details"]["failures"]
    )
    assert "sk-wrong" not in scrape.text + str(health)
