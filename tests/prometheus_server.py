"""A real Prometheus (Debian's package) on a free 127.0.0.1 port, for tests that need one."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from tests.helpers import stop_process

T = TypeVar("T")


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def prometheus(config: dict[str, Any], work: Path) -> Iterator[str]:
    """Run Prometheus with config for the block; yield its base URL once it is ready (while
    it starts, its API answers 503 in plain text)."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make test` installs Debian's prometheus package"
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (work / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        until(lambda: _ready(base), "Prometheus ready", 60)
        yield base
    finally:
        stop_process(process)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result; [] while Prometheus does not answer."""
    try:
        answer = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
        result: list[dict[str, Any]] = answer.json()["data"]["result"]
    except (httpx.TransportError, KeyError, ValueError):
        return []
    return result


def until(check: Callable[[], T | None], what: str, seconds: float = 60) -> T:
    """Poll check (every 0.25 s, bounded in time and count) until it gives a value."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds * 4) + 1):
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(0.25)
    raise AssertionError(f"no {what} within {seconds:g}s")
