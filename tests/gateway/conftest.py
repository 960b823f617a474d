"""Fixtures of the gateway's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamacpp_server import LlamaCppServer


@pytest.fixture
def long_generation(long_context_model: Path) -> LlamaCppServer:
    """A llama.cpp server (not started) with one slot and room for a long generation."""
    return LlamaCppServer(long_context_model, parallel=1, ctx=8192)
