"""The compute device, memory totals, and the copy engine that moves chunk buffers.

On CUDA, chunk uploads and downloads run on a side stream from/to pinned host buffers and are
ordered against the compute stream with events, so they can overlap compute. On a CPU-only machine
the CPU is the compute device: "device" buffers are still separate allocations and every copy is a
real (synchronous) memcpy, so all movement paths run in CI.
"""

from __future__ import annotations

import time
import weakref

import psutil
import torch

from engine.chunk import Chunk, Location


def pick_compute_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def device_total_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total


def host_total_bytes() -> int:
    return psutil.virtual_memory().total


class Copier:
    """Allocates chunk buffers and copies them between host and device, timing what it does."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.transfer_s = 0.0  # host time spent issuing copies (whole copy time on CPU)
        self.wait_s = 0.0  # host time spent waiting for copies to finish

    def placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        """A one-element NaN tensor on the device that stands in for evicted weights."""
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.full((), float("nan"), dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    def alloc_host(self, numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        # Pinned memory is what makes async H2D/D2H copies possible; only moving chunks need it.
        buf = torch.empty(numel, dtype=dtype)
        if pinned and self.is_cuda:
            buf = _pin_exactly(buf)
        return buf

    def alloc_device(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if not self.is_cuda:
            return torch.empty(numel, dtype=dtype, device=self.device)
        # Allocated on the copy stream (which fills it) and marked as used by the compute stream,
        # so the caching allocator reuses the block only after both streams are done with it.
        with torch.cuda.stream(self.copy_stream):
            buf = torch.empty(numel, dtype=dtype, device=self.device)
        buf.record_stream(torch.cuda.current_stream(self.device))
        return buf

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
            # The compute stream may still be writing this chunk (grads): copy after that work.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                chunk.host_flat.copy_(chunk.device_flat, non_blocking=True)
                chunk.host_ready_event = torch.cuda.Event()
                chunk.host_ready_event.record(self.copy_stream)
        else:
            chunk.host_flat.copy_(chunk.device_flat)
        self.transfer_s += time.perf_counter() - start

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


def _pin_exactly(buf: torch.Tensor) -> torch.Tensor:
    """Page-lock exactly this buffer's bytes.

    torch's pinned allocator (`pin_memory=True`) rounds every allocation up to a power of two, which
    for chunks of a few hundred MB wastes up to half of the pinned host memory. Registering the
    plain allocation costs nothing extra; it is unregistered when the buffer object goes away.
    """
    ptr, nbytes = buf.data_ptr(), buf.untyped_storage().nbytes()
    if nbytes == 0:
        return buf
    try:
        cudart = torch.cuda.cudart()
        registered = cudart.cudaHostRegister(ptr, nbytes, 0) == cudart.cudaError.success
    except (AttributeError, RuntimeError, TypeError):
        registered = False
    if not registered:  # e.g. a locked-memory limit: torch's own pinned allocator instead
        return torch.empty(buf.numel(), dtype=buf.dtype, pin_memory=True)
    weakref.finalize(buf, cudart.cudaHostUnregister, ptr)
    return buf
