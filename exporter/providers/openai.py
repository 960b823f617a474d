"""Any OpenAI-compatible server (LM Studio, LiteLLM, hosted APIs).

The url is the API base as OpenAI clients take it (for example
http://localhost:1234/v1); the adapter reads GET {url}/models, and the provider
is up when that answers:

    {"data": [{"id": "gpt-4o-mini", ...}]} -> llm_model_info{model="gpt-4o-mini"} 1
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .base import (
    Findings,
    ModelSnapshot,
    ProbeMeasurement,
    ProbeSpec,
    ProviderSnapshot,
    expect,
    text,
)
from .chat import probe_chat

if TYPE_CHECKING:
    from ..client import ProviderClient, Reply
    from ..config import ProviderConfig


def _models(reply: Reply) -> tuple[list[ModelSnapshot], float]:
    body = expect(reply.json(), dict, "the body", reply.endpoint)
    models = []
    for entry in expect(body.get("data"), list, "data", reply.endpoint):
        entry = expect(entry, dict, "a model", reply.endpoint)
        models.append(
            ModelSnapshot(name=text(expect(entry.get("id"), str, "a model id", reply.endpoint)))
        )
    return models, reply.seconds


class OpenAIProvider:
    """Reads an OpenAI-compatible server."""

    kind: ClassVar[str] = "openai"

    def __init__(self, config: ProviderConfig, client: ProviderClient) -> None:
        self.config = config
        self.client = client

    async def snapshot(self) -> ProviderSnapshot:
        """List the models; the provider is up when the list is read."""
        findings = Findings()
        (listing,) = await findings.gather(self.client.fetch("/models", _models))
        if listing is None:
            return findings.snapshot(up=False)
        models, seconds = listing
        return findings.snapshot(
            up=True,
            ready=True,
            response_time_seconds=seconds,
            models=tuple(models),
        )

    async def probe(self, model: str, spec: ProbeSpec) -> ProbeMeasurement:
        """One streamed chat completion, measured."""
        return await probe_chat(self.client, "/chat/completions", model, spec)
