"""Tests of the tiny GGUF test model and of the llama.cpp server subprocess helper."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from gguf import GGUFReader, TokenType

from llamacpp_server import LlamaCppServer, free_port
from tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny model, written once per module."""
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[LlamaCppServer]:
    """A real llama.cpp server (4 slots) serving the tiny model."""
    with LlamaCppServer(model_path) as srv:
        yield srv


def scrape(url: str) -> dict[str, float]:
    """The llamacpp:* samples of GET /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).raise_for_status().text
    return {m[0]: float(m[1]) for m in re.findall(r"^(llamacpp:\w+) (\S+)$", text, re.M)}


def test_gguf_is_deterministic(model_path: Path, tmp_path: Path) -> None:
    again = write_tiny_gguf(tmp_path / "again.gguf")
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert again.read_bytes() == model_path.read_bytes()
    assert other.read_bytes() != model_path.read_bytes()


def test_gguf_vocab_and_output_rows(model_path: Path) -> None:
    reader = GGUFReader(model_path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 429
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert {"<|im_start|>", "<|im_end|>", "\u2581the", "\u2581"} <= set(tokens)
    assert reader.fields["general.name"].contents() == "tiny-llama"
    assert "<|im_start|>assistant" in reader.fields["tokenizer.chat_template"].contents()
    types = np.array(reader.fields["tokenizer.ggml.token_type"].contents())
    out = next(t for t in reader.tensors if t.name == "output.weight").data
    assert out.shape[0] == len(types)
    assert not out[types != TokenType.NORMAL].any()
    assert (out[types == TokenType.NORMAL, 0] > 0).all()


def test_models_lists_alias(server: LlamaCppServer) -> None:
    body = httpx.get(f"{server.url}/v1/models", timeout=5).raise_for_status().json()
    assert [m["id"] for m in body["data"]] == ["tiny-llama"]
    assert body["data"][0]["meta"]["n_ctx"] == 256


def test_exact_token_counts_match_metrics(server: LlamaCppServer) -> None:
    before = scrape(server.url)
    usages = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i in range(3):
            req = {"messages": [{"role": "user", "content": f"hello world {i}"}], "max_tokens": 16}
            body = client.post("/v1/chat/completions", json=req).raise_for_status().json()
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"]["completion_tokens"] == 16
            usages.append(body["usage"])
    after = scrape(server.url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}

    assert delta["llamacpp:tokens_predicted_total"] == sum(u["completion_tokens"] for u in usages)
    # What holds exactly: usage.prompt_tokens counts the whole prompt, cached part included;
    # prompt_tokens_total counts only the evaluated (non-cached) part and
    # prompt_tokens_cached_total the part reused from the slot's KV cache
    # (usage.prompt_tokens_details.cached_tokens). Hence their sum is sum(usage.prompt_tokens).
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    assert cached > 0  # the shared chat-template prefix is reused between requests
    assert delta["llamacpp:prompt_tokens_cached_total"] == cached
    assert delta["llamacpp:prompt_tokens_total"] == prompt - cached
    assert (
        delta["llamacpp:prompt_tokens_total"] + delta["llamacpp:prompt_tokens_cached_total"]
        == prompt
    )


def test_stop_refuses_connections(model_path: Path) -> None:
    srv = LlamaCppServer(model_path, parallel=1)
    with srv:
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
    assert srv.returncode == 0  # exited cleanly on SIGTERM
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
    srv.stop()  # idempotent


def test_startup_failure_raises_with_log(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match="during startup"):
        LlamaCppServer(bogus, port=free_port()).start()
