"""Finds inference servers listening on this host's default ports, for a start without config.

Each port is asked the one endpoint that tells its kind apart, with a short timeout:

    11434       GET /api/version        {"version": "0.5.1"}              -> ollama
    8080, 9931  GET /health             Server: llama.cpp                  -> llamacpp
    8000        GET /v1/models          {"data": [{"owned_by": "vllm"}]}   -> vllm
    1234        GET /api/v0/models      LM Studio's native model list      -> openai at /v1
    30000       GET /get_model_info     SGLang's {"model_path": ...}       -> openai at /v1
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from .config import Config, ProviderConfig
from .logs import fields

log = logging.getLogger(__name__)
TIMEOUT_SECONDS = 1.0
MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Candidate:
    """A kind that may listen on a port, and how to recognise it."""

    name: str
    kind: str
    endpoint: str
    recognise: Callable[[int, Mapping[str, str], Any], bool]
    api_base: str = ""  # appended to the server's root for the provider's url


def _is_ollama(status: int, headers: Mapping[str, str], body: Any) -> bool:
    return status == 200 and isinstance(body, dict) and isinstance(body.get("version"), str)


def _is_llamacpp(status: int, headers: Mapping[str, str], body: Any) -> bool:
    # llama-server names itself in every answer, 503 while it loads included.
    return headers.get("Server", "").startswith("llama.cpp")


def _is_vllm(status: int, headers: Mapping[str, str], body: Any) -> bool:
    data = body.get("data") if isinstance(body, dict) else None
    return (
        status == 200
        and isinstance(data, list)
        and any(isinstance(m, dict) and m.get("owned_by") == "vllm" for m in data)
    )


def _is_lmstudio(status: int, headers: Mapping[str, str], body: Any) -> bool:
    data = body.get("data") if isinstance(body, dict) else None
    return status == 200 and isinstance(data, list)


def _is_sglang(status: int, headers: Mapping[str, str], body: Any) -> bool:
    return status == 200 and isinstance(body, dict) and "model_path" in body


OLLAMA = Candidate("ollama", "ollama", "/api/version", _is_ollama)
LLAMACPP = Candidate("llamacpp", "llamacpp", "/health", _is_llamacpp)
VLLM = Candidate("vllm", "vllm", "/v1/models", _is_vllm)
LMSTUDIO = Candidate("lmstudio", "openai", "/api/v0/models", _is_lmstudio, "/v1")
SGLANG = Candidate("sglang", "openai", "/get_model_info", _is_sglang, "/v1")

DEFAULT_PORTS: dict[int, tuple[Candidate, ...]] = {
    11434: (OLLAMA,),
    8080: (LLAMACPP,),
    9931: (LLAMACPP,),
    8000: (VLLM, LLAMACPP),
    1234: (LMSTUDIO,),
    30000: (SGLANG,),
}


async def _ask(
    session: aiohttp.ClientSession, url: str
) -> tuple[int, Mapping[str, str], Any] | None:
    try:
        async with session.get(url, allow_redirects=False) as response:
            raw = b""
            async for chunk in response.content.iter_chunked(64 * 1024):
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    return None
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                body = None
            return response.status, response.headers, body
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def _identify(
    session: aiohttp.ClientSession, host: str, port: int, candidates: Sequence[Candidate]
) -> tuple[Candidate, str] | None:
    root = f"http://{host}:{port}"
    for candidate in candidates:
        answer = await _ask(session, root + candidate.endpoint)
        if answer is None:
            return None  # nothing listens, or it does not speak HTTP
        if candidate.recognise(*answer):
            return candidate, root + candidate.api_base
    return None


async def discover(
    host: str = "127.0.0.1", ports: Mapping[int, Sequence[Candidate]] = DEFAULT_PORTS
) -> Config:
    """A configuration serving every provider found on the host's default ports."""
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        found = await asyncio.gather(
            *(_identify(session, host, port, candidates) for port, candidates in ports.items())
        )
    providers: list[ProviderConfig] = []
    kinds = [hit[0].name for hit in found if hit is not None]
    for port, hit in zip(ports, found, strict=True):
        if hit is None:
            continue
        candidate, url = hit
        name = candidate.name if kinds.count(candidate.name) == 1 else f"{candidate.name}-{port}"
        providers.append(ProviderConfig(name=name, kind=candidate.kind, url=url))
        log.info("found a provider", extra=fields(provider=name, kind=candidate.kind, url=url))
    if not providers:
        log.warning(
            "no provider found on this host's default ports: serving host metrics only;"
            " write a configuration file (see llm-exporter.example.yml)",
            extra=fields(ports=",".join(str(port) for port in ports)),
        )
    return Config(providers=tuple(providers))
