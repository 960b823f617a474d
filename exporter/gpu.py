"""GPUs through NVML, when there are any: no NVML or no GPU means no series, never an error."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .logs import fields

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSnapshot:
    """One GPU's memory, load, temperature, power and per-process memory."""

    index: int
    name: str
    uuid: str
    memory_used_bytes: float
    memory_total_bytes: float
    utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    process_memory_bytes: dict[int, float] = field(default_factory=dict)


def _load_nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class GpuReader:
    """Reads every GPU; nvml (the pynvml module or a stand-in) is injected."""

    def __init__(self, nvml: Any = None) -> None:
        self.nvml = nvml if nvml is not None else _load_nvml()
        self.available = False
        if self.nvml is None:
            log.info("no GPU metrics: nvidia-ml-py is not installed")
            return
        try:
            self.nvml.nvmlInit()
            self.count = int(self.nvml.nvmlDeviceGetCount())
        except Exception as exc:  # NVMLError has many subclasses; all mean "no GPU here"
            log.info("no GPU metrics: NVML is not usable (%s)", type(exc).__name__)
            return
        self.available = self.count > 0
        if not self.available:
            log.info("no GPU metrics: NVML sees no GPU")

    def read(self) -> tuple[GpuSnapshot, ...]:
        """One snapshot per GPU; a GPU that fails to answer is left out."""
        if not self.available:
            return ()
        gpus = []
        for index in range(self.count):
            try:
                gpus.append(self._read_one(index))
            except Exception as exc:  # a lost GPU must not break the scrape
                log.warning("cannot read GPU", extra=fields(gpu=index, error=type(exc).__name__))
        return tuple(gpus)

    def _read_one(self, index: int) -> GpuSnapshot:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        uuid = nvml.nvmlDeviceGetUUID(handle)
        return GpuSnapshot(
            index=index,
            name=name.decode() if isinstance(name, bytes) else str(name),
            uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            memory_used_bytes=float(memory.used),
            memory_total_bytes=float(memory.total),
            utilization_ratio=self._optional(
                lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            ),
            temperature_celsius=self._optional(
                lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            ),
            power_watts=self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            process_memory_bytes=self._processes(handle),
        )

    def _optional(self, read: Any) -> float | None:
        try:
            return float(read())
        except Exception:  # not every GPU reports every value (NVML_ERROR_NOT_SUPPORTED)
            return None

    def _processes(self, handle: Any) -> dict[int, float]:
        try:
            processes = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:
            return {}
        return {
            int(p.pid): float(p.usedGpuMemory)
            for p in processes
            if isinstance(getattr(p, "usedGpuMemory", None), int)
        }
