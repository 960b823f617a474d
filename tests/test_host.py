"""Host and provider-process resources against what /proc says, and GPUs through a stand-in NVML."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from exporter.config import HostConfig, ProcessMatch
from exporter.gpu import GpuReader
from exporter.host import HostReader, ProcessFinder
from llamacpp_server import free_port
from tests.helpers import config_of, running

MIB = 1024 * 1024


def meminfo_bytes(field: str) -> int:
    """A /proc/meminfo field in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def vm_rss(pid: int) -> int:
    """A process's resident memory from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def test_host_memory_and_disk_match_the_kernel() -> None:
    snapshot = HostReader(HostConfig(mounts=("/",))).read()
    assert snapshot.memory_total_bytes == meminfo_bytes("MemTotal")
    assert abs(snapshot.memory_available_bytes - meminfo_bytes("MemAvailable")) < 256 * MIB
    stat = os.statvfs("/")
    (disk,) = snapshot.disks
    assert disk.mountpoint == "/"
    assert disk.total_bytes == stat.f_blocks * stat.f_frsize
    assert 0 <= snapshot.cpu_usage_ratio <= 1
    assert snapshot.cpu_count == os.cpu_count()


def test_missing_mount_is_skipped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    reader = HostReader(HostConfig(mounts=("/", "/no/such/mount")))
    with caplog.at_level(logging.WARNING):
        first, second = reader.read(), reader.read()
    assert [d.mountpoint for d in first.disks] == ["/"] == [d.mountpoint for d in second.disks]
    assert (
        sum(r.__dict__.get("fields", {}).get("mount") == "/no/such/mount" for r in caplog.records)
        == 1
    )


@pytest.fixture
def ballast(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int, float]]:
    """A process holding 64 MiB and listening on a port, with a pid file."""
    port = free_port()
    code = (
        "import socket, time\n"
        "ballast = bytearray(64 * 1024 * 1024)\n"
        f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
        "time.sleep(60)\n"
    )
    started = time.time()
    process = subprocess.Popen([sys.executable, "-c", code])
    pid_file = tmp_path / "provider.pid"
    pid_file.write_text(f"{process.pid}\n")
    for _ in range(200):  # until it listens
        if f":{port:04X}" in Path("/proc/net/tcp").read_text():
            break
        time.sleep(0.02)
    try:
        yield process, pid_file, port, started
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("how", ["pid_file", "port"])
def test_provider_process_found_and_read(how: str, ballast: Any) -> None:
    process, pid_file, port, started = ballast
    match = ProcessMatch(pid_file=pid_file) if how == "pid_file" else ProcessMatch(port=port)
    snapshot = ProcessFinder(match).read()
    assert snapshot is not None
    assert snapshot.pid == process.pid
    assert snapshot.resident_memory_bytes >= 64 * MIB
    assert abs(snapshot.resident_memory_bytes - vm_rss(process.pid)) < 8 * MIB
    assert started - 2 <= snapshot.start_time_seconds <= time.time()
    assert snapshot.open_fds == len(os.listdir(f"/proc/{process.pid}/fd"))
    assert snapshot.cpu_seconds_total >= 0


def test_provider_process_found_by_name(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        snapshot = ProcessFinder(ProcessMatch(name="sleep")).read()
        assert snapshot is not None
        assert Path(f"/proc/{snapshot.pid}/comm").read_text().strip() == "sleep"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_process_that_exits_is_gone_then_found_again(tmp_path: Path) -> None:
    pid_file = tmp_path / "p.pid"
    first = subprocess.Popen(["sleep", "30"])
    pid_file.write_text(str(first.pid))
    finder = ProcessFinder(ProcessMatch(pid_file=pid_file))
    assert (finder.read() or SimpleNamespace(pid=None)).pid == first.pid
    first.kill()
    first.wait()
    assert finder.read() is None
    second = subprocess.Popen(["sleep", "30"])
    pid_file.write_text(str(second.pid))
    try:
        assert (finder.read() or SimpleNamespace(pid=None)).pid == second.pid
    finally:
        second.kill()
        second.wait()


class StandInNvml:
    """Answers the NVML calls the exporter makes, like one 24 GB GPU would (no GPU here)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, provider_pid: int, power_milliwatts: int | None = 285_000) -> None:
        self.provider_pid = provider_pid
        self.power_milliwatts = power_milliwatts

    def nvmlInit(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        return SimpleNamespace(used=6 * 1024**3, total=24 * 1024**3, free=18 * 1024**3)

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA GeForce RTX 4090"

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return "GPU-6b1f0d3e-0000-0000-0000-000000000000"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 61

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        if self.power_milliwatts is None:  # some boards do not report power
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return self.power_milliwatts

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        return [
            SimpleNamespace(pid=self.provider_pid, usedGpuMemory=5 * 1024**3),
            SimpleNamespace(pid=1, usedGpuMemory=None),  # NVML hides other users' usage
        ]


async def test_gpu_series_and_the_provider_process_gpu_memory(ballast: Any) -> None:
    process, pid_file, _, _ = ballast
    config = config_of(
        f"  - name: local\n    kind: ollama\n    url: http://127.0.0.1:{free_port()}\n"
        f"    process:\n      pid_file: {pid_file}"
    )
    async with running(config, nvml=StandInNvml(process.pid, power_milliwatts=None)) as exporter:
        scrape = await exporter.scrape()
    assert scrape.value("llm_gpu_info", gpu="0", name="NVIDIA GeForce RTX 4090") == 1
    assert scrape.value("llm_gpu_memory_used_bytes", gpu="0") == 6 * 1024**3
    assert scrape.value("llm_gpu_memory_total_bytes", gpu="0") == 24 * 1024**3
    assert scrape.value("llm_gpu_utilization_ratio", gpu="0") == 0.37
    assert scrape.value("llm_gpu_temperature_celsius", gpu="0") == 61
    assert scrape.value("llm_gpu_power_watts", gpu="0") is None
    assert (
        scrape.value("llm_provider_process_gpu_memory_bytes", provider="local", gpu="0")
        == 5 * 1024**3
    )


def test_no_nvml_means_no_gpu_series_and_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    class Absent:
        def nvmlInit(self) -> None:
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    with caplog.at_level(logging.INFO):
        reader = GpuReader(Absent())
    assert reader.read() == ()
    messages = [r for r in caplog.records if "GPU" in r.getMessage()]
    assert len(messages) == 1 and messages[0].levelno == logging.INFO


async def test_hung_disk_read_leaves_host_series_out_not_the_scrape() -> None:
    """A hung network mount blocks psutil; the scrape still answers within its deadline."""
    import psutil

    class HungMount:
        """psutil, except that disk_usage hangs like a dead NFS mount."""

        def __getattr__(self, name: str) -> Any:
            return getattr(psutil, name)

        def disk_usage(self, path: str) -> Any:
            time.sleep(3)
            return psutil.disk_usage(path)

    config = config_of(rest="global:\n  scrape_timeout: 1s\n  scrape_timeout_margin: 100ms\n")
    async with running(config, ps=HungMount()) as exporter:
        started = time.monotonic()
        scrape = await exporter.scrape()
        elapsed = time.monotonic() - started
    assert scrape.value("llm_host_memory_total_bytes") is None
    assert scrape.value("llm_exporter_build_info") == 1
    assert elapsed < 2.5
