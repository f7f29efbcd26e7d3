"""The compute device, memory totals, and the copy engine that moves chunk buffers.

On CUDA, chunk uploads (H2D) run on one side stream and downloads (D2H) on another, from/to pinned
host buffers, ordered against the compute stream with events: the two directions of PCIe work at
the same time, and both overlap compute. On a CPU-only machine the CPU is the compute device:
"device" buffers are still separate allocations and every copy is a real (synchronous) memcpy, so
all movement paths run in CI.

Host memory limits are checked before the chunks are allocated: the memory cgroup's limit (pinned
pages can be neither swapped nor reclaimed, so going over it gets the process killed) and the
locked-memory limit (`ulimit -l`). The NVIDIA driver on Linux does not charge CUDA's page-locked
memory to RLIMIT_MEMLOCK, so a low `ulimit -l` is reported only if page-locking then fails, with
both limits in the message.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from engine.chunk import Chunk, ChunkGroup, Location
from engine.errors import EngineError

log = logging.getLogger("pstar.engine")

# cgroup v1 reports "no limit" as a huge number rather than "max".
_NO_CGROUP_LIMIT = 1 << 62


def pick_compute_device(local_rank: int, setting: str = "auto") -> torch.device:
    """Where a rank computes: `setting` is the engine's `compute_device` ("auto": the rank's GPU
    where CUDA is present, else the CPU; "cpu": the CPU even so)."""
    if setting == "auto" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def device_total_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total


def host_total_bytes() -> int:
    """The host memory this process may use: the machine's, or its memory cgroup's limit if lower
    (inside a container psutil reports the whole machine)."""
    total = psutil.virtual_memory().total
    limits = read_host_memory_limits()
    if limits.cgroup_bytes is not None:
        total = min(total, limits.cgroup_bytes)
    return total


def device_capacity_bytes(device: torch.device, resident_chunk_bytes: int) -> int | None:
    """What the chunks and the activations together can occupy on a CUDA device right now: the
    chunk bytes resident, plus what the driver has free, plus what torch's caching allocator holds
    unused. None on the CPU (the configured budget is the only bound there)."""
    if device.type != "cuda":
        return None
    free_bytes, _ = torch.cuda.mem_get_info(device)
    cached_bytes = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return resident_chunk_bytes + free_bytes + max(0, cached_bytes)


def host_adam_threads(compute_device: torch.device) -> int:
    """Intra-op threads for host Adam: this rank's share of the physical cores it may run on, less
    the cores its own compute keeps busy meanwhile (host Adam runs beside the next forward and the
    backward). Adam is memory-bound, so hyper-threads add nothing but contention; torchrun's
    OMP_NUM_THREADS=1 would leave host Adam on one core; and a thread team bigger than the cores
    left free stalls both sides (on 2 cores, a 2-thread host Adam beside a CPU forward took about
    18× its time alone). On a GPU the compute is the one thread that drives it; on a CPU it is the
    caller's own intra-op threads."""
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    usable = physical
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may run on (containers, taskset)
        usable = min(usable, len(os.sched_getaffinity(0)))
    quota = _cgroup_cpu_quota()
    if quota is not None:
        usable = min(usable, quota)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    compute_threads = 1 if compute_device.type == "cuda" else torch.get_num_threads()
    return max(1, usable // max(1, local_ranks) - compute_threads)


def to_device_without_sync(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`. A host tensor goes to a CUDA device from pinned memory, asynchronously:
    torch waits for the whole compute stream after a copy from pageable memory, which inside a
    step would stall the host until the GPU has caught up. The host tensor must be final (it is:
    host results are computed synchronously)."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# ---- host memory limits ----------------------------------------------------------------------

@dataclass(frozen=True)
class HostMemoryLimits:
    memlock_bytes: int | None  # RLIMIT_MEMLOCK soft limit (`ulimit -l`); None = unlimited
    cgroup_bytes: int | None  # the memory cgroup's limit; None = no limit
    cgroup_used_bytes: int = 0  # what the cgroup already holds that cannot be reclaimed


def read_host_memory_limits() -> HostMemoryLimits:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    memlock = None if soft == resource.RLIM_INFINITY else soft
    cgroup, used = _cgroup_memory()
    return HostMemoryLimits(memlock_bytes=memlock, cgroup_bytes=cgroup, cgroup_used_bytes=used)


def cgroup_problem(host_bytes: int, pinned_bytes: int, limits: HostMemoryLimits) -> str | None:
    """Why the host chunks cannot fit the memory cgroup (None: they fit)."""
    if limits.cgroup_bytes is None:
        return None
    room = limits.cgroup_bytes - limits.cgroup_used_bytes
    if host_bytes <= room:
        return None
    return (f"the host-resident chunks need {host_bytes:,} bytes ({pinned_bytes:,} of them "
            f"page-locked), but this process's memory cgroup allows {limits.cgroup_bytes:,} bytes "
            f"and {limits.cgroup_used_bytes:,} are in use already, so the kernel would kill the "
            "process part way: raise the container's memory limit, or keep more of the model on "
            "the device (device_memory_limit, client.mem_tracer.overall_gpu_mem_ratio), or train "
            "a smaller model")


def memlock_problem(pinned_bytes: int, limits: HostMemoryLimits) -> str | None:
    """Why the locked-memory limit looks too low for the pinned chunk buffers (None: it is not)."""
    if limits.memlock_bytes is None or pinned_bytes <= limits.memlock_bytes:
        return None
    return (f"{pinned_bytes:,} bytes of chunk buffers are page-locked for asynchronous copies, but "
            f"the locked-memory limit (ulimit -l) is {limits.memlock_bytes:,} bytes: raise it "
            "(`ulimit -l unlimited`, `docker run --ulimit memlock=-1`, or LimitMEMLOCK=infinity "
            "for a systemd service)")


def planned_host_bytes(groups: list[ChunkGroup], pins: bool) -> tuple[int, int]:
    """(all, page-locked) bytes of the host buffers the chunks get at init: param chunks (pinned
    when they move and `pins`) and fp32 masters; moments come later, with the optimizer placement."""
    total = pinned = 0
    for group in groups:
        for chunk in (group.param, group.grad, group.master):
            if chunk is None:
                continue
            total += chunk.nbytes
            if pins and chunk is not group.master and not group.host_only:
                pinned += chunk.nbytes
    return total, pinned


def _cgroup_dirs(controller: str) -> list[Path]:
    """This process's cgroup directories for `controller` (v1) or the unified tree (v2), from the
    process's own group up to the root: a limit anywhere on that path applies."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, names, path = line.split(":", 2)
        if names == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            root = Path("/sys/fs/cgroup")
        elif controller in names.split(","):
            root = Path("/sys/fs/cgroup") / controller
        else:
            continue
        parts = [p for p in path.split("/") if p]
        dirs = [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
        return [d for d in dirs if d.is_dir()]
    return []


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_memory() -> tuple[int | None, int]:
    """(limit, unreclaimable bytes in use) of the memory cgroup; (None, 0) without a limit."""
    limit, used = None, 0
    for directory in _cgroup_dirs("memory"):
        for name in ("memory.max", "memory.limit_in_bytes"):
            value = _read_int(directory / name)
            if value is not None and value < _NO_CGROUP_LIMIT and (limit is None or value < limit):
                limit, used = value, _cgroup_anon_bytes(directory)
    return limit, used


def _cgroup_anon_bytes(directory: Path) -> int:
    """Anonymous memory of the cgroup (page cache can be reclaimed, so it does not count)."""
    try:
        lines = (directory / "memory.stat").read_text().splitlines()
    except OSError:
        return 0
    stats = dict(line.split(" ", 1) for line in lines if " " in line)
    for key in ("anon", "total_rss"):
        if key in stats and stats[key].strip().isdigit():
            return int(stats[key])
    return 0


def _cgroup_cpu_quota() -> int | None:
    """Whole CPUs the cgroup's CPU quota allows (cpu.max / cfs_quota_us), or None."""
    for directory in _cgroup_dirs("cpu"):
        try:
            quota, period = (directory / "cpu.max").read_text().split()
            if quota != "max":
                return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError):
            pass
        quota_us = _read_int(directory / "cpu.cfs_quota_us")
        period_us = _read_int(directory / "cpu.cfs_period_us")
        if quota_us and period_us:
            return max(1, math.ceil(quota_us / period_us))
    return None


class Copier:
    """Allocates chunk buffers and copies them between host and device, timing what it does."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.is_cuda else None  # uploads (H2D)
        # Downloads get their own stream so that gradients going down never queue behind the
        # uploads of prefetched or updated chunks going up (PCIe moves both ways at once).
        self.download_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.transfer_s = 0.0  # host time spent issuing copies (whole copy time on CPU)
        self.wait_s = 0.0  # host time spent waiting for copies to finish
        self.pinned_bytes = 0  # host bytes page-locked for chunk buffers so far
        self._memlock_hint: str | None = None  # a low `ulimit -l`, named if page-locking fails
        # On a CPU compute device, the buffers of evicted chunks, kept for the next uploads: CUDA's
        # caching allocator keeps freed blocks, but glibc gives a large block freed at the top of
        # the heap back to the system, and the next buffer there is faulted in page by page
        # (measured on benchmarks.overhead's wide shape with moves: 3 000-8 000 page faults in each
        # backward, ~10 ms of its 145). Keyed by bytes.
        self._free_buffers: dict[int, list[torch.UntypedStorage]] = {}
        self._free_bytes = 0

    def placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        """A one-element NaN tensor on the device that stands in for evicted weights."""
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.full((), float("nan"), dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    def check_host_plan(self, host_bytes: int, pinned_bytes: int,
                        limits: HostMemoryLimits | None = None) -> None:
        """Before host chunk buffers are allocated: refuse a plan the memory cgroup cannot hold, and
        note a locked-memory limit below the pinned bytes (named again if page-locking fails)."""
        limits = read_host_memory_limits() if limits is None else limits
        problem = cgroup_problem(host_bytes, pinned_bytes, limits)
        if problem is not None:
            raise EngineError(problem)
        hint = None
        if self.is_cuda and pinned_bytes > 0:
            hint = memlock_problem(self.pinned_bytes + pinned_bytes, limits)
        if hint is not None:
            self._memlock_hint = hint
            log.info("pstar: %s. CUDA's page-locked memory is not charged to it on Linux, so "
                     "training goes on unless page-locking fails.", self._memlock_hint)

    def alloc_host(self, numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        """A zeroed host buffer. Pinned memory is what makes async H2D/D2H copies possible; only
        moving chunks need it. Zeroing first touches the pages with all of torch's threads, so
        page-locking then finds them resident (the driver faults pages in one thread)."""
        buf = torch.zeros(numel, dtype=dtype, device="cpu")
        if pinned and self.is_cuda and numel > 0:
            buf = self._pin(buf)
            self.pinned_bytes += buf.untyped_storage().nbytes()
        return buf

    def _pin(self, buf: torch.Tensor) -> torch.Tensor:
        if _pin_exactly(buf):
            return buf
        _consume_cuda_error(self.device)
        log.warning("pstar: page-locking a chunk buffer in place failed; using torch's pinned "
                    "allocator instead, which rounds each buffer up to a power of two")
        try:
            return torch.zeros(buf.numel(), dtype=buf.dtype, device="cpu", pin_memory=True)
        except RuntimeError as error:
            _consume_cuda_error(self.device)
            raise EngineError(self._pinning_failure(buf.untyped_storage().nbytes(), error)) from None

    def _pinning_failure(self, nbytes: int, error: Exception) -> str:
        limits = read_host_memory_limits()
        why = self._memlock_hint or memlock_problem(self.pinned_bytes + nbytes, limits)
        if why is None:
            cgroup = "none" if limits.cgroup_bytes is None else f"{limits.cgroup_bytes:,} bytes"
            memlock = "unlimited" if limits.memlock_bytes is None else f"{limits.memlock_bytes:,} bytes"
            why = f"the memory cgroup limit is {cgroup} and the locked-memory limit (ulimit -l) is {memlock}"
        return (f"could not page-lock {nbytes:,} more bytes of host memory for chunk buffers "
                f"({self.pinned_bytes:,} bytes so far): {error}. {why[0].upper()}{why[1:]}; "
                "or give the host less to hold (host_memory_limit, a larger device_memory_limit)")

    def alloc_device(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if not self.is_cuda:
            kept = self._free_buffers.get(numel * dtype.itemsize)
            if kept:
                storage = kept.pop()
                self._free_bytes -= storage.nbytes()
                return torch.empty(0, dtype=dtype, device=self.device).set_(storage, 0, (numel,))
            return torch.empty(numel, dtype=dtype, device=self.device)
        # Allocated on the copy stream (which fills it) and marked as used by the compute stream,
        # so the caching allocator reuses the block only after both streams are done with it.
        with torch.cuda.stream(self.copy_stream):
            buf = torch.empty(numel, dtype=dtype, device=self.device)
        buf.record_stream(torch.cuda.current_stream(self.device))
        return buf

    @property
    def kept_bytes(self) -> int:
        """Bytes of freed device buffers kept for reuse (a CPU compute device only)."""
        return self._free_bytes

    def release_device(self, buf: torch.Tensor, room_bytes: int) -> None:
        """A chunk let go of its device buffer `buf`. On a CPU it is kept for a later upload of the
        same size, if nothing else holds it (a view made while the chunk was resident keeps its
        numbers, as on CUDA) and the buffers kept stay within `room_bytes` (what the device budget
        leaves beside the resident chunks); on CUDA the caching allocator does this."""
        if self.is_cuda:
            return
        storage = buf.untyped_storage()
        nbytes = storage.nbytes()
        # what holds the storage: `buf` and this `storage` object; a third holder is someone's view
        if (buf.storage_offset() != 0 or buf.numel() * buf.element_size() != nbytes
                or torch._C._storage_Use_Count(storage._cdata) > 2
                or self._free_bytes + nbytes > room_bytes):
            return
        self._free_buffers.setdefault(nbytes, []).append(storage)
        self._free_bytes += nbytes

    def allocate_zeroed(self, chunk: Chunk) -> None:
        """A zero-filled device buffer for a chunk that has no data yet (moments, grad chunks)."""
        buf = self.alloc_device(chunk.numel, chunk.dtype)
        if self.is_cuda:
            with torch.cuda.stream(self.copy_stream):
                buf.zero_()
                chunk.ready_event = torch.cuda.Event()
                chunk.ready_event.record(self.copy_stream)
        else:
            buf.zero_()
        chunk.device_flat = buf

    def upload(self, chunk: Chunk) -> None:
        """host -> device; on CUDA asynchronous: `wait_uploaded` orders the compute stream after it."""
        start = time.perf_counter()
        buf = self.alloc_device(chunk.numel, chunk.dtype)
        if self.is_cuda:
            with torch.cuda.stream(self.copy_stream):
                if chunk.host_ready_event is not None:  # a download still filling the host copy
                    self.copy_stream.wait_event(chunk.host_ready_event)
                buf.copy_(chunk.host_flat, non_blocking=True)
                chunk.ready_event = torch.cuda.Event()
                chunk.ready_event.record(self.copy_stream)
        else:
            buf.copy_(chunk.host_flat)
        chunk.device_flat = buf
        self.transfer_s += time.perf_counter() - start

    def download(self, chunk: Chunk) -> None:
        """device -> host; on CUDA asynchronous: `wait_downloaded` blocks the host until it is done."""
        start = time.perf_counter()
        if self.is_cuda:
            stream = self.download_stream
            # The compute stream may still be writing this chunk (grads), and an upload may still
            # be filling it: copy after both.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            if chunk.ready_event is not None:
                stream.wait_event(chunk.ready_event)
            # The allocator may hand the block out again once the chunk drops it: not before
            # this copy has read it.
            chunk.device_flat.record_stream(stream)
            with torch.cuda.stream(stream):
                chunk.host_flat.copy_(chunk.device_flat, non_blocking=True)
                chunk.host_ready_event = torch.cuda.Event()
                chunk.host_ready_event.record(stream)
        else:
            chunk.host_flat.copy_(chunk.device_flat)
        self.transfer_s += time.perf_counter() - start

    def upload_into_place(self, chunk: Chunk, after: "torch.cuda.Event | None") -> None:
        """host -> the chunk's existing device buffer, after the compute stream reached `after`
        and the chunk's last download finished reading the buffer (the host copy was updated in
        place: new weights). Safe from a worker thread; sets the event the compute stream waits on.
        """
        if not self.is_cuda:
            chunk.device_flat.copy_(chunk.host_flat)
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            if chunk.host_ready_event is not None:
                self.copy_stream.wait_event(chunk.host_ready_event)
            chunk.device_flat.copy_(chunk.host_flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        chunk.ready_event = event

    def compute_point(self) -> "torch.cuda.Event | None":
        """An event at the compute stream's current position (None on the CPU)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait_uploaded(self, chunk: Chunk) -> None:
        if chunk.ready_event is not None:
            torch.cuda.current_stream(self.device).wait_event(chunk.ready_event)
            chunk.ready_event = None

    def wait_downloaded(self, chunk: Chunk) -> None:
        if chunk.host_ready_event is not None:
            start = time.perf_counter()
            chunk.host_ready_event.synchronize()
            chunk.host_ready_event = None
            self.wait_s += time.perf_counter() - start

    def wait_upload_read(self, chunk: Chunk) -> None:
        """Block the host until a pending upload of the chunk has read its host buffer."""
        if chunk.ready_event is not None:
            start = time.perf_counter()
            chunk.ready_event.synchronize()
            self.wait_s += time.perf_counter() - start

    def current_flat(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's buffer where it is now, safe to use from the compute stream / the host."""
        if chunk.location is Location.DEVICE:
            self.wait_uploaded(chunk)
        elif chunk.location is Location.HOST:
            self.wait_downloaded(chunk)
        return chunk.flat


def pin_in_place(copier: Copier, buf: torch.Tensor) -> bool:
    """Page-lock an existing host buffer for asynchronous copies, keeping its data (CUDA; on a CPU
    there is nothing to do). False, and nothing changed, if the driver refuses."""
    if not copier.is_cuda or buf.numel() == 0:
        return True
    if buf.is_pinned():
        return True
    if not _pin_exactly(buf):
        _consume_cuda_error(copier.device)
        return False
    copier.pinned_bytes += buf.untyped_storage().nbytes()
    return True


def _pin_exactly(buf: torch.Tensor) -> bool:
    """Page-lock exactly this buffer's bytes; False if the driver refused.

    torch's pinned allocator (`pin_memory=True`) rounds every allocation up to a power of two, which
    for chunks of a few hundred MB wastes up to half of the pinned host memory. Registering the
    plain allocation costs nothing extra; it is unregistered when the buffer object goes away.
    """
    ptr, nbytes = buf.data_ptr(), buf.untyped_storage().nbytes()
    try:
        cudart = torch.cuda.cudart()
        registered = cudart.cudaHostRegister(ptr, nbytes, 0) == cudart.cudaError.success
    except (AttributeError, RuntimeError, TypeError):
        return False
    if registered:
        weakref.finalize(buf, cudart.cudaHostUnregister, ptr)
    return registered


def _consume_cuda_error(device: torch.device) -> None:
    """A failed CUDA runtime call stays the thread's "last error", and the next kernel launch would
    report it as its own failure; one throwaway launch reads and clears it."""
    try:
        torch.zeros(1, device=device)
    except RuntimeError:
        pass
