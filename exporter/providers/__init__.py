"""Provider kinds: one module each, registered here by kind name."""

from .base import Provider
from .llamacpp import LlamaCppProvider
from .lmstudio import LmStudioProvider
from .ollama import OllamaProvider
from .openai import OpenAIProvider
from .sglang import SglangProvider
from .tgi import TgiProvider
from .trtllm import TrtllmProvider
from .vllm import VllmProvider

KINDS: dict[str, type[Provider]] = {
    kind.kind: kind
    for kind in (
        LlamaCppProvider,
        LmStudioProvider,
        OllamaProvider,
        OpenAIProvider,
        SglangProvider,
        TgiProvider,
        TrtllmProvider,
        VllmProvider,
    )
}

__all__ = ["KINDS", "Provider"]
