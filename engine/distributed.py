"""Chunk sharding over torch.distributed: the process group, collectives on chunk buffers, gradient
reduction and the global gradient norm.

With a process group of world_size > 1, every chunk of the layout is split into world_size equal
shards (a chunk's size is padded to a multiple of world_size); rank r stores shard r of every param,
grad, fp32 master and Adam moment chunk, so each rank holds 1/world_size of the model data.

- Before forward or backward uses a param chunk, one all-gather assembles it from every rank's shard
  into a `gathered` chunk on the compute device (on CUDA on a side stream, so a prefetch overlaps
  compute). Dropping it later costs nothing: the shards still hold the weights.
- Gradients are written over the weights in the gathered chunk, as with one rank. Once the chunk's
  backward is over (as many gradients have arrived as in the previous backward; any others at the
  end of backward), one reduce-scatter sums them over ranks and each rank keeps its shard divided by
  world_size: the gradient of the mean loss over the global batch, as one rank would compute it.
  On CUDA the reduction runs on the same side stream, overlapping the rest of backward.
- The optimizer steps this rank's shards. The global gradient norm (clipping, fp16 overflow) is one
  all-reduce of per-tensor partial sums of squares.

Every collective must be issued by all ranks in the same order. Gathers and reductions are triggered
by placement decisions (evict, prefetch, fetch again), so those decisions must be identical on every
rank: they are functions of the access schedule, the chunk sizes and the budgets only, and the
budgets and the memory tracer's measurements are agreed on (min / max over ranks) before use.

NCCL needs device tensors: with it, host-resident shards are staged through the device. gloo works on
host tensors (a CUDA job on gloo stages through the host). Where a torch release's gloo lacks
reduce_scatter, an all-reduce of a copy followed by taking this rank's slice gives the same numbers.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.chunk import Chunk, ChunkGroup, Location, TensorInfo
from engine.device import to_device_without_sync
from engine.errors import EngineError

log = logging.getLogger("pstar.engine")

# torch >= 2.12 renamed the single-tensor collectives; the old names still work there (deprecated).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def local_rank_from_env(local_rank: int | None) -> int:
    """An explicit local rank wins; else torchrun's LOCAL_RANK; else 0."""
    if local_rank is not None:
        return local_rank
    return int(os.environ.get("LOCAL_RANK", "0"))


def connect(device: torch.device) -> "Comm | None":
    """The engine's view of the process group, or None when training on one rank.

    A script started by plain `torchrun` (WORLD_SIZE > 1 in the environment) need not create the
    process group itself: it is created here (NCCL on CUDA, gloo on the CPU)."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise EngineError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                              "is not set: start the script with torchrun, or call "
                              "torch.distributed.init_process_group before initialize_engine")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        # Ours to close: left to interpreter shutdown, the group's objects are sometimes destroyed
        # in an order that aborts the process (seen with gloo).
        atexit.register(_leave_process_group)
    if dist.get_world_size() <= 1:
        return None
    return Comm(device)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


class Comm:
    """Rank, world size and the collectives the engine runs on chunk buffers."""

    def __init__(self, device: torch.device, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # Ranks on this machine share its host memory (torchrun sets LOCAL_WORLD_SIZE).
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        self.device = device
        backend = str(dist.get_backend(group))
        self.tensor_device = device if backend == "nccl" else torch.device("cpu")
        # CUDA + NCCL: gathers and reductions run on this stream, ordered by events.
        self.stream = torch.cuda.Stream(device) if self.tensor_device.type == "cuda" else None
        self._native_all_gather = self._native_reduce_scatter = True
        self._pending_host_adds: list = []  # CUDA: (event, host destination, pinned staging)
        self._host_writes_pending = False  # CUDA: reduced gradients on their way to host shards

    # ---- plain collectives (synchronous) -----------------------------------------------------

    def all_reduce_(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        staged = tensor.to(self.tensor_device)
        dist.all_reduce(staged, op=op, group=self.group)
        if staged is not tensor:
            tensor.copy_(staged)
        return tensor

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's value (budgets: what all ranks can afford)."""
        tensor = torch.tensor([value], dtype=torch.int64, device="cpu")
        return int(self.all_reduce_(tensor, dist.ReduceOp.MIN)[0])

    def agree_max(self, values: list[int]) -> list[int]:
        """Element-wise largest over ranks (measurements: plan for the worst rank)."""
        if not values:
            return []
        tensor = torch.tensor(values, dtype=torch.int64, device="cpu")
        return [int(v) for v in self.all_reduce_(tensor, dist.ReduceOp.MAX)]

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """full (world_size * n elements) <- every rank's shard (n), in rank order."""
        out = full if full.device == self.tensor_device else torch.empty_like(full, device=self.tensor_device)
        source = shard.to(self.tensor_device)
        if self._native_all_gather:
            try:
                _ALL_GATHER(out, source, group=self.group)
            except (RuntimeError, NotImplementedError) as error:
                self._note_missing("all_gather_into_tensor", error)
                self._native_all_gather = False
        if not self._native_all_gather:  # into views of the output, one per rank
            dist.all_gather(list(out.chunk(self.world_size)), source, group=self.group)
        if out is not full:
            full.copy_(out)
        return full

    def reduce_scatter_sum(self, out: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """out (n) <- this rank's slice of the element-wise sum of every rank's `full`."""
        staged_in = full.to(self.tensor_device)
        staged_out = out if out.device == self.tensor_device else torch.empty_like(out, device=self.tensor_device)
        if self._native_reduce_scatter:
            try:
                _REDUCE_SCATTER(staged_out, staged_in, group=self.group)
            except (RuntimeError, NotImplementedError) as error:
                self._note_missing("reduce_scatter_tensor", error)
                self._native_reduce_scatter = False
        if not self._native_reduce_scatter:
            total = staged_in.clone()  # the caller's buffer may still hold weights in use
            dist.all_reduce(total, group=self.group)
            staged_out.copy_(total.narrow(0, self.rank * out.numel(), out.numel()))
        if staged_out is not out:
            out.copy_(staged_out)
        return out

    def _note_missing(self, name: str, error: Exception) -> None:
        """A collective this backend lacks is replaced by an equivalent; any other error is raised."""
        if "support" not in str(error).lower():
            raise error
        log.info("pstar: the %s backend has no %s; using an equivalent", dist.get_backend(self.group), name)

    def gather_to_host(self, shard: torch.Tensor) -> torch.Tensor:
        """The whole chunk assembled from every rank's shard, as a new host tensor."""
        full = torch.empty(shard.numel() * self.world_size, dtype=shard.dtype, device=self.tensor_device)
        return self.all_gather(full, shard).cpu()

    # ---- chunk collectives (asynchronous on CUDA) --------------------------------------------

    def gather_chunk(self, shard: torch.Tensor, numel: int) -> tuple[torch.Tensor, object]:
        """A new device buffer of `numel` elements holding every rank's shard; with the CUDA event
        the compute stream must wait for before reading it (None: ready now)."""
        if self.stream is None:
            full = torch.empty(numel, dtype=shard.dtype, device=self.device)
            return self.all_gather(full, shard), None
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            if shard.device.type == "cuda":
                # A device shard may have been written on the compute stream (new weights). A host
                # shard was written by host code, or by downloads the caller has waited for.
                self.stream.wait_stream(compute)
            # Allocated on this stream, so the allocator orders its reuse after this stream's work;
            # recorded on the compute stream, which reads it until it is dropped.
            full = torch.empty(numel, dtype=shard.dtype, device=self.device)
            source = shard.to(self.device, non_blocking=True)  # host shards are pinned
            _ALL_GATHER(full, source, group=self.group, async_op=True).wait()
            ready = torch.cuda.Event()
            ready.record(self.stream)
        full.record_stream(compute)
        if shard.device.type == "cuda":
            shard.record_stream(self.stream)
        return full, ready

    def reduce_gradients(self, full: torch.Tensor, shard_numel: int,
                         writes: list[tuple[torch.Tensor, int, int, bool]]) -> None:
        """Sum `full` over ranks; this rank's slice, divided by world_size, is written to each
        (destination, begin, end, add) span: destination[begin:end] = or += slice[begin:end]."""
        if self.stream is None:
            out = torch.empty(shard_numel, dtype=full.dtype, device=full.device)
            self.reduce_scatter_sum(out, full).mul_(1.0 / self.world_size)
            for dest, begin, end, add in writes:
                self._write(dest.narrow(0, begin, end - begin), out.narrow(0, begin, end - begin), add)
            return
        self._finish_host_adds(keep_last=1)  # one reduction's staging in flight at a time
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(compute)  # the gradients were written on the compute stream
            out = torch.empty(shard_numel, dtype=full.dtype, device=self.device)
            _REDUCE_SCATTER(out, full, group=self.group, async_op=True).wait()
            out.mul_(1.0 / self.world_size)
            for dest, begin, end, add in writes:
                self._write_async(dest.narrow(0, begin, end - begin), out.narrow(0, begin, end - begin), add)
        full.record_stream(self.stream)  # the gathered chunk may be dropped before this runs

    def _write(self, dest: torch.Tensor, source: torch.Tensor, add: bool) -> None:
        if add:
            dest.add_(source.to(dest.device))
        else:
            dest.copy_(source)

    def _write_async(self, dest: torch.Tensor, source: torch.Tensor, add: bool) -> None:
        """On the side stream: device destinations directly; host ones through pinned memory."""
        if dest.device.type == "cuda":
            self._write(dest, source, add)
            dest.record_stream(self.stream)
            return
        self._host_writes_pending = True
        if not add:
            dest.copy_(source, non_blocking=True)  # host shards are pinned; read after the sync
            return
        staging = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=True)
        staging.copy_(source, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.stream)
        self._pending_host_adds.append((event, dest, staging))

    def _finish_host_adds(self, keep_last: int = 0) -> None:
        while len(self._pending_host_adds) > keep_last:
            event, dest, staging = self._pending_host_adds.pop(0)
            event.synchronize()
            dest.add_(staging)

    def wait_reductions(self) -> None:
        """End of backward: every reduced gradient is in place for the device and the host.
        Only host shards need the host to wait; device shards are read on the compute stream
        (or on copy streams that wait for it), which waits for this one."""
        if self.stream is None:
            return
        if self._host_writes_pending:
            self.stream.synchronize()
            self._finish_host_adds()
            self._host_writes_pending = False
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def fence(self) -> None:
        """Order the compute stream (and copies issued after it) after this stream's writes."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


# ---- what the chunk manager and the optimizer call ------------------------------------------

def padded_capacity(capacity: int, world_size: int, align: int) -> int:
    """A chunk size that splits into world_size equal shards, each a multiple of `align`."""
    multiple = world_size * align
    return (capacity + multiple - 1) // multiple * multiple


def gradient_writes(group: ChunkGroup, infos: list[TensorInfo], dest: torch.Tensor
                    ) -> list[tuple[torch.Tensor, int, int, bool]]:
    """Spans of this rank's grad shard that receive the reduced gradients of `infos`: runs of
    neighbouring tensors (in layout order) that all copy or all add (gradient accumulation)."""
    chosen = {id(info) for info in infos}
    writes: list[list] = []
    previous_chosen = False
    for info in group.tensors:
        is_chosen = id(info) in chosen
        begin, end = info.local_range()
        if is_chosen and begin < end:
            add = info.has_grad  # a gradient from an earlier backward of this step is there
            last = writes[-1] if writes else None
            if previous_chosen and last is not None and last[3] == add:
                last[2] = end
            else:
                writes.append([dest, begin, end, add])
        previous_chosen = is_chosen
    return [tuple(w) for w in writes]


def global_grad_norm(infos_in_order: list[TensorInfo], current_flat, comm: Comm,
                     device: torch.device) -> torch.Tensor:
    """The L2 norm over every gradient of every rank, as torch's clip_grad_norm_ takes it: the
    norm of the per-tensor norms. Each rank adds the squares of its parts of each tensor; one
    all-reduce sums those per tensor."""
    with_grad = [info for info in infos_in_order if info.has_grad]
    if not with_grad:
        return torch.zeros((), device=device)
    # Grouped by the device each piece lives on (device and host shards): one kernel and one copy
    # to the compute device per group, not per tensor.
    per_device: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
    for slot, info in enumerate(with_grad):
        begin, end = info.local_range()
        if begin < end:
            flat = current_flat(info.group.grad_chunk)
            pieces, slots = per_device.setdefault(flat.device, ([], []))
            pieces.append(flat.narrow(0, begin, end - begin))
            slots.append(slot)
    partial = torch.zeros(len(with_grad), dtype=torch.float32, device=device)  # (num tensors,)
    for pieces, slots in per_device.values():
        squares = torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float32)).square()
        partial.index_copy_(0, to_device_without_sync(torch.tensor(slots), device),
                            to_device_without_sync(squares, device))
    comm.all_reduce_(partial)
    return torch.linalg.vector_norm(partial.sqrt(), 2)


def gather_flat(comm: Comm, chunk: Chunk, current_flat) -> torch.Tensor:
    """The whole chunk of this kind (every rank's shard) on the host; zeros where none exists yet."""
    if chunk.location is Location.NOWHERE:
        shard = torch.zeros(chunk.numel, dtype=chunk.dtype, device="cpu")
    else:
        shard = current_flat(chunk)
    return comm.gather_to_host(shard)
