"""Provider kinds: one module each, registered here by kind name."""

from .base import Provider
from .llamacpp import LlamaCppProvider
from .ollama import OllamaProvider
from .openai import OpenAIProvider
from .vllm import VllmProvider

KINDS: dict[str, type[Provider]] = {
    kind.kind: kind
    for kind in (
        LlamaCppProvider,
        OllamaProvider,
        OpenAIProvider,
        VllmProvider,
    )
}

__all__ = ["KINDS", "Provider"]
