"""Soak: does the exporter hold its memory and file descriptors under a long, rough run?

Run as `python bench/soak.py [--minutes 10]`. One process of the exporter (`python -m
exporter`) watches two stand-ins served by this process on 127.0.0.1: a steady Ollama and
a flapping one that is refused for 5 s, then answers for 5 s, over and over. This process
scrapes /metrics every 0.2 s, sends SIGHUP with a changed configuration every 10 s (so
every reload swaps the provider clients), and reads the exporter's RSS and open file
descriptors from /proc every 10 s. It prints the first and last minute's averages and
their growth; no growth is the pass.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
OLLAMA_PS = {"models": [{"name": "mistral:latest", "size": 5137025024, "size_vram": 5137025024}]}
OLLAMA_TAGS = {"models": [{"name": "mistral:latest", "size": 4109865159}]}


def free_port() -> int:
    """A free 127.0.0.1 port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ollama_app() -> web.Application:
    """An Ollama stand-in with its documented shapes."""
    app = web.Application()
    replies = {"/api/version": {"version": "0.5.1"}, "/api/tags": OLLAMA_TAGS, "/api/ps": OLLAMA_PS}
    for path, body in replies.items():

        async def handle(request: web.Request, body: object = body) -> web.Response:
            return web.json_response(body)

        app.router.add_get(path, handle)
    return app


async def serve(port: int) -> web.AppRunner:
    """Serve the Ollama stand-in on a port."""
    runner = web.AppRunner(ollama_app(), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    return runner


def config_text(steady: int, flapping: int, timeout: str) -> str:
    """The exporter's configuration; the timeout alternates so that each reload is a change."""
    return (
        "providers:\n"
        f"  - {{name: steady, kind: ollama, url: 'http://127.0.0.1:{steady}', timeout: {timeout}}}\n"
        f"  - {{name: flapping, kind: ollama, url: 'http://127.0.0.1:{flapping}', timeout: {timeout}}}\n"
        "host:\n  enabled: true\n"
    )


def resources(pid: int) -> tuple[float, int]:
    """RSS in MiB and open file descriptors of a process, from /proc."""
    with open(f"/proc/{pid}/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, fds


async def soak(minutes: float) -> int:
    """Run the soak; 0 if memory and descriptors held, 1 if they grew."""
    steady_port, flapping_port, port = free_port(), free_port(), free_port()
    steady = await serve(steady_port)
    flapping: web.AppRunner | None = await serve(flapping_port)
    workdir = Path(tempfile.mkdtemp(prefix="llm-exporter-soak-"))
    config = workdir / "llm-exporter.yml"
    config.write_text(config_text(steady_port, flapping_port, "2s"))
    log = (workdir / "exporter.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--config.file", str(config),
         "--web.listen-address", f"127.0.0.1:{port}"],
        cwd=ROOT, stderr=log,
    )  # fmt: skip
    samples: list[tuple[float, float, int]] = []
    scrapes = failures = reloads = 0
    started = time.monotonic()
    end = started + minutes * 60
    next_flap = next_reload = next_sample = started + 5
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for _ in range(200):
                try:
                    if (await http.get("/-/healthy")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            while (now := time.monotonic()) < end:
                try:
                    response = await http.get("/metrics")
                    scrapes += 1
                    failures += response.status_code != 200
                except httpx.HTTPError:
                    failures += 1
                if now >= next_flap:
                    next_flap += 5
                    if flapping is None:
                        flapping = await serve(flapping_port)
                    else:
                        await flapping.cleanup()
                        flapping = None
                if now >= next_reload:
                    next_reload += 10
                    reloads += 1
                    timeout = "2s" if reloads % 2 == 0 else "3s"
                    config.write_text(config_text(steady_port, flapping_port, timeout))
                    process.send_signal(signal.SIGHUP)
                if now >= next_sample:
                    next_sample += 10
                    samples.append((now - started, *resources(process.pid)))
                await asyncio.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        log.close()
        await steady.cleanup()
        if flapping is not None:
            await flapping.cleanup()
    # The first minute warms up (imports, pools, caches): the second is the baseline.
    first = [s for s in samples if 60 <= s[0] <= 125]
    last = [s for s in samples if s[0] >= samples[-1][0] - 60]
    rss_first, rss_last = statistics.mean(s[1] for s in first), statistics.mean(s[1] for s in last)
    fds_first, fds_last = statistics.mean(s[2] for s in first), statistics.mean(s[2] for s in last)
    print(f"duration          {samples[-1][0] / 60:.1f} min")
    print(f"scrapes           {scrapes} ({failures} failed), reloads {reloads}")
    print(f"RSS second minute {rss_first:.1f} MiB, last minute {rss_last:.1f} MiB "
          f"({rss_last / rss_first - 1:+.1%})")  # fmt: skip
    print(f"fds second minute {fds_first:.1f}, last minute {fds_last:.1f}")
    print(
        f"RSS max           {max(s[1] for s in samples):.1f} MiB; fds max {max(s[2] for s in samples)}"
    )
    grew = rss_last > rss_first * 1.10 or fds_last > fds_first + 5 or failures
    print("result            " + ("GREW" if grew else "held"))
    return 1 if grew else 0


def main() -> int:
    """Parse the flags and run the soak."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    return asyncio.run(soak(parser.parse_args().minutes))


if __name__ == "__main__":
    sys.exit(main())
