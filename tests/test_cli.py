"""The llm-exporter command as a user runs it: a real process, its signals, logs and exits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from exporter.config import dump_config, parse_config
from exporter.discovery import LLAMACPP, discover
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
    assert "cannot listen" in second.stderr
    assert f'address=127.0.0.1:{port} error="address already in use"' in second.stderr
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


def scrape_ignoring_the_end(url: str) -> None:
    """One scrape that the exporter may end by shutting down."""
    with contextlib.suppress(httpx.HTTPError):
        httpx.get(f"{url}/metrics", timeout=30)


def test_sigterm_does_not_wait_for_a_hanging_provider(tmp_path: Path) -> None:
    """Regression: shutdown waited for the slowest collection (24 s with a 25 s timeout)."""
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(16)  # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{hanging.getsockname()[1]}"
        config = tmp_path / "llm-exporter.yml"
        config.write_text(f"providers:\n{provider_yaml('stuck', 'vllm', url, timeout='25s')}\n")
        with exporter_process(config) as (process, exporter_url):
            scrape = threading.Thread(target=scrape_ignoring_the_end, args=(exporter_url,))
            scrape.start()
            time.sleep(1)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            status = process.wait(20)
            stopped_after = time.monotonic() - started
    finally:
        hanging.close()
    scrape.join(30)
    assert status == 0
    assert stopped_after < 10


def test_provider_state_changes_are_logged_once_with_fields(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "llm-exporter.yml"
    config.write_text(f"providers:\n{provider_yaml('gone', 'ollama', dead)}\n")
    with exporter_process(config, "--log.format", "json") as (process, url):
        for _ in range(3):
            httpx.get(f"{url}/metrics", timeout=10)
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        assert process.stderr is not None
        records = [json.loads(line) for line in process.stderr.read().strip().splitlines()]
    down = [r for r in records if r["msg"] == "provider down"]
    assert len(down) == 1
    assert down[0]["provider"] == "gone" and down[0]["level"] == "warn"
    assert down[0]["reason"].startswith("unreachable: GET /api/version: ")


def test_a_missing_config_file_names_its_absolute_path_and_the_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.file", "nowhere.yml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2
    assert str(tmp_path / "nowhere.yml") in result.stderr
    assert "llm-exporter.example.yml" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_config_finds_a_llamacpp_server_and_prints_it(
    tmp_path: Path, llama_server: LlamaCppServer
) -> None:
    """discover() on any port (the real llama-server's), and --config.print of what it found."""
    found = asyncio.run(discover(ports={llama_server.port: (LLAMACPP,)}))
    assert [(p.name, p.kind, p.url) for p in found.providers] == [
        ("llamacpp", "llamacpp", f"http://127.0.0.1:{llama_server.port}")
    ]
    assert parse_config(dump_config(found)).providers == found.providers


def port_is_free(port: int) -> bool:
    """Nothing listens on this 127.0.0.1 port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_no_arguments_on_a_host_running_llama_server_serves_it(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The user's first run: llama-server on its default port, `llm-exporter` with nothing."""
    default = next((p for p in (8080, 9931) if port_is_free(p)), None)
    assert default is not None, "both llama-server default ports 8080 and 9931 are taken here"
    port = free_port()
    with LlamaCppServer(tiny_model, port=default):
        printed = subprocess.run(
            [sys.executable, "-m", "exporter", "--config.print"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{port}"],
            cwd=tmp_path, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(200):
                try:
                    if httpx.get(f"{url}/-/healthy", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            wait_ready(url)
            scrape = parse(httpx.get(f"{url}/metrics", timeout=10).text)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(10)
    assert printed.returncode == 0, printed.stderr
    assert parse_config(printed.stdout).providers[0].url == f"http://127.0.0.1:{default}"
    assert scrape.value("llm_provider_up", provider="llamacpp", kind="llamacpp") == 1
    assert process.stderr is not None
    assert "found a provider" in process.stderr.read()
