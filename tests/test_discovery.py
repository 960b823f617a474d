"""Finding providers on this host's default ports, for a start without a configuration file."""

from __future__ import annotations

from exporter.discovery import LLAMACPP, LMSTUDIO, OLLAMA, SGLANG, VLLM, discover
from tests.standins import StandIn, closed_port, json_reply, ollama_routes, reply, vllm_routes

# LM Studio's native REST API, GET /api/v0/models (lmstudio.ai/docs/api/rest-api).
LMSTUDIO_MODELS = {
    "object": "list",
    "data": [
        {
            "id": "qwen2-vl-7b-instruct",
            "object": "model",
            "type": "vlm",
            "publisher": "mlx-community",
            "arch": "qwen2_vl",
            "compatibility_type": "mlx",
            "quantization": "4bit",
            "state": "not-loaded",
            "max_context_length": 32768,
        }
    ],
}
# SGLang's GET /get_model_info (sgl-project/sglang, python/sglang/srt/entrypoints/http_server.py).
SGLANG_MODEL_INFO = {
    "model_path": "meta-llama/Llama-3.1-8B-Instruct",
    "tokenizer_path": "meta-llama/Llama-3.1-8B-Instruct",
    "is_generation": True,
}


async def test_each_kind_is_told_apart_by_its_own_endpoint() -> None:
    async with (
        StandIn(ollama_routes()) as ollama,
        StandIn(vllm_routes()) as vllm,
        StandIn({"/api/v0/models": json_reply(LMSTUDIO_MODELS)}) as lmstudio,
        StandIn({"/get_model_info": json_reply(SGLANG_MODEL_INFO)}) as sglang,
        StandIn({"/health": reply('{"status": "ok"}')}) as not_llamacpp,
    ):
        config = await discover(
            ports={
                ollama.port: (OLLAMA,),
                vllm.port: (VLLM, LLAMACPP),
                lmstudio.port: (LMSTUDIO,),
                sglang.port: (SGLANG,),
                # Answers /health, but is not llama-server (no "Server: llama.cpp").
                not_llamacpp.port: (LLAMACPP,),
                closed_port(): (OLLAMA,),
            }
        )
    found = {(p.name, p.kind, p.url) for p in config.providers}
    assert found == {
        ("ollama", "ollama", ollama.url),
        ("vllm", "vllm", vllm.url),
        ("lmstudio", "openai", f"{lmstudio.url}/v1"),
        ("sglang", "openai", f"{sglang.url}/v1"),
    }


async def test_nothing_found_still_serves_the_host() -> None:
    config = await discover(ports={closed_port(): (OLLAMA,)})
    assert config.providers == ()
    assert config.host.enabled


async def test_two_servers_of_one_kind_get_names_by_port() -> None:
    async with StandIn(ollama_routes()) as first, StandIn(ollama_routes()) as second:
        config = await discover(ports={first.port: (OLLAMA,), second.port: (OLLAMA,)})
    assert sorted(p.name for p in config.providers) == sorted(
        [f"ollama-{first.port}", f"ollama-{second.port}"]
    )
