"""Session fixtures: the tiny models and real llama.cpp servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llamacpp_server import LlamaCppServer
from tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama GGUF: 2 layers, 64 wide; every completion runs to max_tokens."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def larger_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger variant (8 layers, 512 wide) that generates a few hundred tokens per second."""
    path = tmp_path_factory.mktemp("models") / "larger-llama.gguf"
    return write_tiny_gguf(path, layers=8, width=512, heads=8, ff=1024)


@pytest.fixture(scope="session")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The larger variant with an 8k context: a 4,000-token generation takes it many seconds."""
    path = tmp_path_factory.mktemp("models") / "long-llama.gguf"
    return write_tiny_gguf(path, layers=8, width=512, heads=8, ff=1024, ctx=8192)


@pytest.fixture(scope="module")
def llama_server(tiny_model: Path) -> Iterator[LlamaCppServer]:
    """A real llama.cpp server with 4 slots serving the tiny model, for one test module."""
    with LlamaCppServer(tiny_model) as server:
        yield server
