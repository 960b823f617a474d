"""What the provider kinds' tests share: a page's own numbers, a scrape, a residency read."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from exporter.client import ConnectionStats, ProviderClient
from exporter.providers import KINDS
from exporter.providers.base import ModelControl, ModelResidency, ModelState
from tests.helpers import Scrape, config_of, provider_yaml, running
from tests.standins import Handler, StandIn


def page_total(page: str, name: str, **labels: str) -> float:
    """A server's own number: the sum of one series over the samples with these labels, as
    prometheus_client reads its page."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def scrape_of(kind: str, routes: dict[str, Handler], *, name: str = "") -> Scrape:
    """/metrics of an exporter watching a stand-in of kind, as provider name (else the kind)."""
    async with StandIn(routes) as server:
        provider = provider_yaml(name or kind, kind, server.url)
        async with running(config_of(provider)) as exporter:
            return await exporter.scrape()


async def model_states_of(
    kind: str, routes: dict[str, Handler], *, controls: bool = False
) -> tuple[ModelState, ...]:
    """A residency read of a stand-in of kind; controls: whether the kind loads and unloads."""
    async with StandIn(routes) as server:
        config = config_of(provider_yaml(kind, kind, server.url)).providers[0]
        async with ProviderClient(config, ConnectionStats()) as client:
            provider = KINDS[kind](config, client)
            assert isinstance(provider, ModelResidency)
            assert isinstance(provider, ModelControl) == controls
            return await provider.model_states()
