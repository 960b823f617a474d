"""`make run`: a real llama.cpp server with a tiny generated model, the exporter scraping it,
and the exporter's measuring gateway in front of it.

Prints the URLs, sends a chat completion through the gateway now and then so the counters
move, and stops both servers on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llamacpp_server import LlamaCppServer, free_port
from tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "demo"


def port_or_free(port: int) -> int:
    """port if nothing listens there, else a free one."""
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
    except httpx.TransportError:
        return port
    return free_port()


def main() -> int:
    """Run the demo until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exporter-port", type=int, default=9741)
    parser.add_argument("--llama-port", type=int, default=8080)
    parser.add_argument("--gateway-port", type=int, default=8081)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    model = CACHE / "tiny-llama.gguf"
    if not model.exists():
        write_tiny_gguf(model)
    llama_port = port_or_free(args.llama_port)
    exporter_port = port_or_free(args.exporter_port)
    gateway_port = port_or_free(args.gateway_port)
    config = CACHE / "llm-exporter.yml"
    with LlamaCppServer(model, port=llama_port) as llama:
        config.write_text(
            "# Written by `make run`: the demo llama.cpp server, its process found by port,"
            " probed every 15 s, with a measuring gateway (queue and cache on) in front of it.\n"
            "providers:\n"
            "  - name: demo-llama\n"
            "    kind: llamacpp\n"
            f"    url: {llama.url}\n"
            "    process:\n"
            f"      port: {llama_port}\n"
            "    probes:\n"
            "      interval: 15s\n"
            "    gateway:\n"
            f"      listen: 127.0.0.1:{gateway_port}\n"
            f"      queue: {{max_concurrent: {llama.parallel}}}  # the server's slots\n"
            "      cache: {enabled: true}\n"
        )
        exporter = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--config.file", str(config),
             "--web.listen-address", f"127.0.0.1:{exporter_port}"],
            cwd=ROOT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{exporter_port}"
        gateway = f"http://127.0.0.1:{gateway_port}"
        try:
            for _ in range(100):
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                        break
                if exporter.poll() is not None:
                    return exporter.returncode or 1
                time.sleep(0.1)
            print(
                f"\nllama.cpp server: {llama.url}  (model tiny-llama, pid {llama.pid})\n"
                f"exporter:         {url}/\n"
                f"  metrics:        {url}/metrics\n"
                f"  health:         {url}/health\n"
                f"gateway:          {gateway}/v1  (send OpenAI requests here: they reach llama.cpp"
                " and show on /metrics as llm_gateway_*)\n"
                f"config:           {config}\n"
                "A chat completion is sent through the gateway every 10 s so the counters move."
                " Ctrl-C stops.\n"
                f"Try (twice: the second answer comes from the gateway's cache, X-Cache: HIT):\n"
                f"  curl -i {gateway}/v1/chat/completions -H 'Content-Type: application/json'"
                """ -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,"""
                """ "temperature": 0}'\n""",
                flush=True,
            )
            while exporter.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(
                        f"{gateway}/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16},
                        timeout=30,
                    )
                time.sleep(10)
        except KeyboardInterrupt:
            print("\nstopping", flush=True)
        finally:
            if exporter.poll() is None:
                exporter.send_signal(signal.SIGTERM)
                try:
                    exporter.wait(10)
                except subprocess.TimeoutExpired:
                    exporter.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
