"""Collection: what every provider kind's snapshot goes through before it is rendered."""

from __future__ import annotations

from exporter.collector import bounded
from exporter.providers.base import EngineSnapshot, ModelSnapshot, ProviderSnapshot
from tests.helpers import config_of, provider_yaml, running
from tests.standins import StandIn, ollama_routes


async def test_max_models_bounds_the_model_labels_on_metrics() -> None:
    """The Ollama stand-in has two models; with max_models 1, one model label reaches /metrics."""
    async with StandIn(ollama_routes()) as server:
        config = config_of(provider_yaml("ollama", "ollama", server.url, max_models=1))
        async with running(config) as exporter:
            scrape = await exporter.scrape()
    models = {labels["model"] for _, labels, _ in scrape.samples if "model" in labels}
    assert len(models) == 1, models
    assert scrape.value("llm_provider_up", provider="ollama") == 1


def test_bounded_caps_models_and_engines_alike() -> None:
    snapshot = ProviderSnapshot(
        up=True,
        models=tuple(ModelSnapshot(name=f"m{i}") for i in range(3)),
        engines=tuple(EngineSnapshot(model=f"m{i}") for i in range(3)),
    )
    capped = bounded(snapshot, 2)
    assert [m.name for m in capped.models] == ["m0", "m1"]
    assert [e.model for e in capped.engines] == ["m0", "m1"]
    assert bounded(snapshot, 100) == snapshot
