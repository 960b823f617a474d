"""The llm-exporter command as a user runs it: a real process, its signals, logs and exits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from llamacpp_server import LlamaCppServer, free_port
from tests.helpers import parse, provider_yaml

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-secret-do-not-log-4242"


@contextmanager
def exporter_process(
    config: Path, *flags: str, port: int | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run `python -m exporter` on a free loopback port until the block ends."""
    port = port or free_port()
    command = [
        sys.executable, "-m", "exporter",
        "--config.file", str(config),
        "--web.listen-address", f"127.0.0.1:{port}",
        *flags,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                if httpx.get(f"{url}/-/healthy", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield process, url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def wait_ready(url: str) -> None:
    """Poll /-/ready until the first collection is done (bounded)."""
    for _ in range(200):
        if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("never ready")


def test_serves_reloads_on_sighup_and_stops_cleanly_on_sigterm(
    tmp_path: Path, llama_server: LlamaCppServer
) -> None:
    config = tmp_path / "llm-exporter.yml"
    config.write_text(f"providers:\n{provider_yaml('local', 'llamacpp', llama_server.url)}\n")
    with exporter_process(config) as (process, url):
        wait_ready(url)
        scrape = parse(httpx.get(f"{url}/metrics", timeout=10).text)
        assert scrape.value("llm_provider_up", provider="local") == 1
        renamed = provider_yaml("renamed", "llamacpp", llama_server.url)
        config.write_text(f"providers:\n{renamed}\n")
        process.send_signal(signal.SIGHUP)
        for _ in range(100):
            scrape = parse(httpx.get(f"{url}/metrics", timeout=10).text)
            if scrape.value("llm_provider_up", provider="renamed") == 1:
                break
            time.sleep(0.05)
        assert scrape.value("llm_provider_up", provider="local") is None
        assert scrape.value("llm_provider_up", provider="renamed") == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert process.stderr is not None
        log = process.stderr.read()
    lines = log.strip().splitlines()
    assert all(line.startswith("ts=") and " level=" in line for line in lines), log
    assert any("configuration reloaded" in line for line in lines)
    assert "Traceback" not in log


def test_json_logs_and_secrets_kept_out_of_every_output(tmp_path: Path) -> None:
    """A provider that rejects the key: the key appears in no log line, metric or health text."""
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    dead = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "llm-exporter.yml"
    config.write_text(
        "providers:\n"
        + provider_yaml("keyed", "openai", f"{dead}/v1", api_key_file=str(key_file))
        + "\n"
    )
    with exporter_process(config, "--log.format", "json", "--log.level", "debug") as (process, url):
        wait_ready(url)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        health = httpx.get(f"{url}/health", timeout=10).text
        landing = httpx.get(f"{url}/", timeout=10).text
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        assert process.stderr is not None
        log = process.stderr.read()
    records = [json.loads(line) for line in log.strip().splitlines()]
    assert {record["level"] for record in records} >= {"info", "debug"}
    assert any("provider request failed" in record["msg"] for record in records)
    for text in (metrics, health, landing, log):
        assert SECRET not in text


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "llm-exporter.yml"
    config.write_text("providers: []\n")
    with exporter_process(config) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        second = subprocess.run(
            [sys.executable, "-m", "exporter", "--config.file", str(config),
             "--web.listen-address", f"127.0.0.1:{port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in second.stderr
    assert "Traceback" not in second.stderr


@pytest.mark.parametrize("address", ["9741", "localhost:http", ":99999"])
def test_bad_listen_address_exits_2(tmp_path: Path, address: str) -> None:
    config = tmp_path / "llm-exporter.yml"
    config.write_text("providers: []\n")
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.file", str(config),
         "--web.listen-address", address],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f'llm-exporter: invalid listen address "{address}": expected [host]:port'
    )


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--version"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.startswith("llm-exporter 0.")
