"""What a training run measures and writes: `metrics.jsonl`, throughput, GPU and host memory.

`metrics.jsonl` holds one JSON object per logged step; a resumed run appends to it.
GPU memory comes from NVML (what `nvidia-smi` shows for the whole device) and from the CUDA caching
allocator (this process's tensors); host memory from psutil. The number formatting here is shared by
every command, so torch is imported only where memory is read: importing this module does not load it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    import torch


# What the engine's model reports (`chunk_stats()`, `step_timings()`), named once for the records
# of `pstar train`, the profile and the benchmarks.
CHUNK_STAT_KEYS = (
    "param_chunks_device", "param_chunks_host", "param_bytes_device", "param_bytes_host",
    "optim_chunks_device", "optim_chunks_host", "optim_bytes_device", "optim_bytes_host",
    "step_h2d_bytes", "step_d2h_bytes", "step_h2d_moves", "step_d2h_moves",
    "total_h2d_bytes", "total_d2h_bytes", "total_h2d_moves", "total_d2h_moves",
    "step_gathers", "total_gathers",
    "device_budget_bytes", "host_budget_bytes", "model_data_bytes",
    "step_host_groups_streamed", "host_adam_params_per_s", "streamed_adam_params_per_s",
)  # fmt: skip
TIMING_LABELS = {  # the engine's step_timings() keys, and how `pstar profile` names them
    "forward": "forward",
    "backward": "backward",
    "optimizer_device": "optimizer on the device",
    "optimizer_host": "optimizer on the host",
    "transfer": "chunk transfers (within the phases above)",
    "moving": "moving chunks beyond the transfers (within them too)",
    "wait": "waiting",
}
TIMING_KEYS = tuple(TIMING_LABELS)
TIMING_WITHIN = ("transfer", "moving")  # seconds already counted in forward, backward or the step
TRAFFIC_KEYS = ("step_h2d_moves", "step_h2d_bytes", "step_d2h_moves", "step_d2h_bytes", "step_gathers")


class MetricsWriter:
    """Appends one JSON object per line; each line is flushed so a killed run loses nothing logged."""

    def __init__(self, path: Path, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def trim_metrics(path: Path, step: int) -> None:
    """Drop records past `step` from metrics.jsonl (a killed run logged steps that the resumed run
    will redo) and a last line cut short by the kill, so that appending gives one record per
    step; written atomically."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _record_step(line) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.trim")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _record_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # not a record: drop it



def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float  # all ranks together
    tflops: float  # per device: model FLOPs of the step / number of devices / step time


def measure_throughput(
    num_tokens: int, step_s: float, flops_per_token: float, num_devices: int
) -> Throughput:
    """Throughput of a step that processed `num_tokens` tokens (global) in `step_s` seconds."""
    if step_s <= 0:
        return Throughput(0.0, 0.0)
    flops = flops_per_token * num_tokens
    return Throughput(num_tokens / step_s, flops / num_devices / step_s / 1e12)


@dataclass(frozen=True)
class MemorySample:
    gpu_used_bytes: int | None  # whole device, as nvidia-smi shows it; None without a GPU
    gpu_total_bytes: int | None
    gpu_allocated_bytes: int | None  # this process's live tensors (CUDA caching allocator)
    gpu_peak_allocated_bytes: int | None
    host_rss_bytes: int
    host_peak_rss_bytes: int
    host_total_bytes: int


class MemoryProbe:
    """Reads GPU memory of one CUDA device (NVML) and this process's host memory (psutil)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._process = psutil.Process()
        self._nvml_handle = open_nvml_handle(device) if device.type == "cuda" else None
        from engine.device import host_total_bytes

        # what the engine budgets from: the machine's memory, or its cgroup's limit in a container
        self._host_total_bytes = host_total_bytes()

    def sample(self) -> MemorySample:
        import torch

        gpu_used = gpu_total = gpu_allocated = gpu_peak = None
        if self._nvml_handle is not None:
            import pynvml

            info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
            gpu_used, gpu_total = int(info.used), int(info.total)
        if self.device.type == "cuda":
            gpu_allocated = torch.cuda.memory_allocated(self.device)
            gpu_peak = torch.cuda.max_memory_allocated(self.device)
            if gpu_total is None:
                gpu_total = torch.cuda.get_device_properties(self.device).total_memory
        return MemorySample(
            gpu_used_bytes=gpu_used,
            gpu_total_bytes=gpu_total,
            gpu_allocated_bytes=gpu_allocated,
            gpu_peak_allocated_bytes=gpu_peak,
            host_rss_bytes=self._process.memory_info().rss,
            host_peak_rss_bytes=peak_rss_bytes(),
            host_total_bytes=self._host_total_bytes,
        )

    def close(self) -> None:
        if self._nvml_handle is not None:
            import pynvml

            self._nvml_handle = None
            pynvml.nvmlShutdown()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux updates the recorded peak lazily (when memory is unmapped), so it can lag behind the
    current RSS: the larger of the two is the peak."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    return max(peak_bytes, psutil.Process().memory_info().rss)


def open_nvml_handle(device: torch.device):
    """The NVML handle of a CUDA device, or None when NVML is unusable (memory then from torch only).

    NVML numbers GPUs physically while torch numbers the visible ones, so the device is matched by
    its UUID; the index is the fallback for drivers that do not report one.
    """
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver library, or no permission: report torch's numbers alone
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
    except Exception:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        physical = visible[index] if index < len(visible) and visible[index].isdigit() else str(index)
        try:
            return pynvml.nvmlDeviceGetHandleByIndex(int(physical))
        except Exception:
            pynvml.nvmlShutdown()
            return None


def format_count(num: int) -> str:
    """A parameter count to three figures in the unit that keeps it readable: 859 K, 1.31 B, 175 B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if num >= scale:
            return f"{num / scale:.3g} {unit}" if num < 100 * scale else f"{num / scale:,.0f} {unit}"
    return str(num)


def format_bytes(num_bytes: int | float | None) -> str:
    """`1.50 GiB`, `12.0 MiB`, `512 B`; `-` for an unknown size."""
    if num_bytes is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit_index = float(num_bytes), 0
    while abs(value) >= 1024 and unit_index < len(units) - 1:
        value /= 1024
        unit_index += 1
    if unit_index == 0:
        return f"{int(value)} B"
    return f"{value:.2f} {units[unit_index]}" if abs(value) < 10 else f"{value:.1f} {units[unit_index]}"
