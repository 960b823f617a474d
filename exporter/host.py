"""Host and provider-process resources, read with psutil (blocking: run it in a thread)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import psutil

from .config import HostConfig, ProcessMatch
from .logs import fields

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskSnapshot:
    """Space on one mounted filesystem."""

    mountpoint: str
    used_bytes: float
    total_bytes: float


@dataclass(frozen=True)
class HostSnapshot:
    """The host's CPU, memory and disks."""

    cpu_usage_ratio: float
    cpu_count: int
    memory_used_bytes: float
    memory_available_bytes: float
    memory_total_bytes: float
    boot_time_seconds: float
    disks: tuple[DiskSnapshot, ...]


@dataclass(frozen=True)
class ProcessSnapshot:
    """One provider's process."""

    pid: int
    resident_memory_bytes: float
    cpu_seconds_total: float
    start_time_seconds: float
    open_fds: float | None


class HostReader:
    """Reads host resources; psutil is injected so tests can point it elsewhere."""

    def __init__(self, config: HostConfig, ps: ModuleType = psutil) -> None:
        self.config = config
        self.ps = ps
        self._warned: set[str] = set()
        self.ps.cpu_percent(interval=None)  # the first reading only starts the interval

    def read(self) -> HostSnapshot:
        """CPU use since the previous read, memory, and the configured mounts."""
        memory = self.ps.virtual_memory()
        disks = []
        for mount in self.config.mounts:
            try:
                usage = self.ps.disk_usage(mount)
            except OSError as exc:
                if mount not in self._warned:
                    self._warned.add(mount)
                    log.warning(
                        "cannot read disk usage", extra=fields(mount=mount, error=exc.strerror)
                    )
                continue
            disks.append(DiskSnapshot(mount, float(usage.used), float(usage.total)))
        return HostSnapshot(
            cpu_usage_ratio=self.ps.cpu_percent(interval=None) / 100.0,
            cpu_count=self.ps.cpu_count() or 1,
            memory_used_bytes=float(memory.total - memory.available),
            memory_available_bytes=float(memory.available),
            memory_total_bytes=float(memory.total),
            boot_time_seconds=float(self.ps.boot_time()),
            disks=tuple(disks),
        )


class ProcessFinder:
    """Finds a provider's process and reads it; remembers the pid while it lives."""

    def __init__(self, match: ProcessMatch, ps: ModuleType = psutil) -> None:
        self.match = match
        self.ps = ps
        self._process: psutil.Process | None = None

    def read(self) -> ProcessSnapshot | None:
        """The process's resources, or None if it cannot be found now."""
        process = self._process if self._process is not None else self._find()
        if process is None:
            return None
        try:
            with process.oneshot():
                cpu = process.cpu_times()
                try:
                    fds: float | None = float(process.num_fds())
                except (AttributeError, self.ps.AccessDenied):
                    fds = None
                snapshot = ProcessSnapshot(
                    pid=process.pid,
                    resident_memory_bytes=float(process.memory_info().rss),
                    cpu_seconds_total=cpu.user + cpu.system,
                    start_time_seconds=process.create_time(),
                    open_fds=fds,
                )
        except (self.ps.NoSuchProcess, self.ps.ZombieProcess, self.ps.AccessDenied):
            self._process = None
            return None
        self._process = process
        return snapshot

    def _find(self) -> psutil.Process | None:
        try:
            pid = self._find_pid()
            return self.ps.Process(pid) if pid is not None else None
        except (self.ps.Error, OSError, ValueError):
            return None

    def _find_pid(self) -> int | None:
        if self.match.pid_file is not None:
            return int(Path(self.match.pid_file).read_text().strip())
        if self.match.name is not None:
            for process in self.ps.process_iter(["name", "cmdline"]):
                cmdline = process.info.get("cmdline") or [""]
                if self.match.name in (process.info.get("name"), Path(cmdline[0]).name):
                    return int(process.pid)
            return None
        for conn in self.ps.net_connections(kind="tcp"):
            if (
                conn.status == self.ps.CONN_LISTEN
                and conn.laddr
                and conn.laddr.port == self.match.port
            ):
                return int(conn.pid) if conn.pid else None
        return None
