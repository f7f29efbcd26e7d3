"""Peak memory of the case process: host RSS and device memory, sampled in a background thread.

RSS is read every 50 ms (psutil) and, at the end, combined with the kernel's own high-water mark
(ru_maxrss), which catches spikes shorter than the sampling period. Device memory is taken from the
caching allocator (max_memory_allocated / max_memory_reserved) and, where NVML answers, from the
driver's used-memory figure (what nvidia-smi shows: includes the CUDA context and NCCL buffers).
"""

from __future__ import annotations

import resource
import threading

import psutil
import torch

SAMPLE_PERIOD_S = 0.05


def kernel_max_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device_used_bytes(device: torch.device) -> int | None:
    try:
        return int(torch.cuda.device_memory_used(device))
    except Exception:  # NVML missing or not permitted: the allocator figures still stand
        return None


class PeakSampler:
    """Tracks peak host RSS and NVML device use from start() to stop(); mark() snapshots a phase."""

    def __init__(self, device: torch.device, period_s: float = SAMPLE_PERIOD_S):
        self.device = device
        self.period_s = period_s
        self.host_peak_bytes = 0
        self.device_used_peak_bytes: int | None = None
        self.phase_peaks: dict[str, int] = {}
        self._process = psutil.Process()
        self._read_device = device.type == "cuda"  # turned off at NVML's first failure
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def start(self) -> "PeakSampler":
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.host_peak_bytes = max(self.host_peak_bytes, kernel_max_rss_bytes())

    def mark(self, phase: str) -> int:
        """Record (and return) the host peak so far under `phase`, e.g. "init"."""
        self._sample()
        with self._lock:
            peak = max(self.host_peak_bytes, kernel_max_rss_bytes())
            self.phase_peaks[phase] = peak
        return peak

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def _sample(self) -> None:
        rss = self._process.memory_info().rss
        used = _device_used_bytes(self.device) if self._read_device else None
        self._read_device = used is not None
        with self._lock:
            self.host_peak_bytes = max(self.host_peak_bytes, rss)
            if used is not None:
                self.device_used_peak_bytes = max(self.device_used_peak_bytes or 0, used)
