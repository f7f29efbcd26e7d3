"""Placement of chunks on the device or the host, within budgets, with counted moves.

The manager is the only code that moves chunks. An access (`access`) makes a chunk resident on the
compute device, evicting others if the budget of the current moment requires it: Belady's choice from
the warm-up schedule (least recently used during warm-up itself). After each access the next chunk
of the schedule is prefetched when it fits. Every parameter's `.data` always points at its chunk's
current buffer, device or host.

Each chunk keeps a host "home" buffer once it has one (pinned on CUDA for chunks that move). A chunk
whose device copy was not modified since it was uploaded (`dirty` is False) is evicted by dropping the
device buffer, without a copy.

With several ranks (engine/distributed.py) the param chunk a module computes with is a *gathered*
chunk: fetching it is an all-gather of every rank's shard, evicting it drops it (reducing first any
gradients written into it), and it never has a host copy. The budget counts this rank's shards and
the gathered chunks on the device. Because fetches and evictions of gathered chunks are collectives,
every decision here depends only on what is identical on all ranks (schedule, sizes, agreed budgets).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from engine.chunk import Chunk, ChunkGroup, ChunkKind, Location, TensorInfo
from engine.device import Copier
from engine.distributed import Comm, gradient_writes
from engine.errors import EngineError
from engine.memory_tracer import MemoryTracer
from engine.schedule import AccessSchedule

# Moments to look ahead for a chunk worth prefetching.
_PREFETCH_MOMENTS = 8


@dataclasses.dataclass
class MoveCounters:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    h2d_moves: int = 0
    d2h_moves: int = 0
    evictions: int = 0  # chunks dropped from the device (a clean one needs no d2h copy)
    gathers: int = 0  # param chunks all-gathered from the ranks' shards (several ranks)

    def minus(self, other: "MoveCounters") -> "MoveCounters":
        return MoveCounters(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


class ChunkManager:
    def __init__(self, copier: Copier, schedule: AccessSchedule, tracer: MemoryTracer,
                 device_budget_bytes: int, host_budget_bytes: int, comm: Comm | None = None):
        self.copier = copier
        self.comm = comm  # None on one rank: no shards, no gathered chunks
        self.schedule = schedule
        self.tracer = tracer
        self.device_budget_bytes = device_budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.groups: list[ChunkGroup] = []
        self.layout_version = 0  # bumped whenever groups are added or replaced
        self.chunks: list[Chunk] = []  # indexed by chunk_id
        self._on_device: dict[int, Chunk] = {}
        self._by_storage: dict[int, Chunk] = {}  # storage data_ptr -> chunk owning that buffer
        self.device_bytes = 0  # chunk bytes resident on the device
        self.host_allocated_bytes = 0  # host buffers held (home copies included)
        self.init_host_bytes = 0  # host buffers held when init ended (target T4 compares against it)
        self.totals = MoveCounters()
        self.last_step = MoveCounters()
        self._step_start = MoveCounters()
        self.num_over_budget = 0  # accesses where chunks in use alone exceeded the moment's budget
        # Host seconds spent moving chunks beyond the copies themselves (the copier counts those):
        # choosing victims, allocating, pointing the parameters at the new buffer.
        self.move_s = 0.0
        self._move_clock = _MoveClock(self)
        self.in_fwd_bwd = False  # between a forward's start and the end of its backward
        self._last_access: tuple | None = None  # (chunk id, moment, device bytes, in_fwd_bwd)
        # The optimizer's host updates (engine/host_adam.py): a chunk group whose update is still
        # running after step() is waited for before any of its chunks is used or moved.
        self.host_updates = None
        # Autograd may run hooks on a device thread and a CPU thread at once (use_cpu_embedding).
        self.lock = threading.RLock()

    # ---- registry -------------------------------------------------------------------------

    def add_groups(self, groups: list[ChunkGroup]) -> None:
        self.layout_version += 1  # what was derived from the old layout is stale
        for group in groups:
            self.groups.append(group)
            for chunk in group.chunks:
                assert chunk.chunk_id == len(self.chunks), "chunk ids must be dense and ordered"
                self.chunks.append(chunk)
                if chunk.host_flat is not None:
                    self._register_host(chunk)

    def add_settled_grad_chunk(self, group: ChunkGroup, dtype: torch.dtype) -> Chunk:
        """A zeroed grad chunk on the device for good, made after placement for a settled run
        (engine/hooks.py): step() casts the group's gradients into it. Zeroed, so that its padding
        between tensors, read with them, holds no garbage."""
        chunk = Chunk(len(self.chunks), ChunkKind.GRAD, group.param.numel, dtype)
        chunk.group = group
        chunk.device_flat = torch.zeros(chunk.numel, dtype=chunk.dtype, device=self.copier.device)
        chunk.location = Location.DEVICE
        chunk.pinned_forever = True
        group.grad = chunk
        group.chunks.append(chunk)
        self.chunks.append(chunk)
        self._on_device[chunk.chunk_id] = chunk
        self.device_bytes += chunk.nbytes
        self._by_storage[chunk.device_flat.untyped_storage().data_ptr()] = chunk
        return chunk

    def make_param_the_master(self, group: ChunkGroup) -> None:
        """A settled fp32 group (engine/hooks.py): its param chunk, which holds the same numbers as
        its fp32 master after every step, becomes the master, and the master chunk is freed. Both
        are on the device for good."""
        master, param = group.master, group.param
        assert param.dtype == master.dtype == torch.float32 and param.location is Location.DEVICE
        self.copier.current_flat(param).copy_(self.copier.current_flat(master))  # (equal already)
        if master.host_flat is not None:
            self.free_host(master)
        if master.location is Location.DEVICE:
            self._drop_device_buffer(master, Location.NOWHERE)
        master.location = Location.NOWHERE
        group.master = param
        group.chunks = [c for c in group.chunks if c is not master]

    def chunk_of(self, tensor: torch.Tensor) -> Chunk | None:
        """The chunk whose buffer `tensor` lives in (None for any other tensor)."""
        if tensor.layout is not torch.strided or tensor.is_meta:
            return None
        chunk = self._by_storage.get(tensor.untyped_storage().data_ptr())
        if chunk is None or chunk.dtype != tensor.dtype:
            return None
        return chunk

    @property
    def model_data_bytes(self) -> int:
        return sum(g.model_data_bytes for g in self.groups)

    # ---- allocation ----------------------------------------------------------------------

    def allocate_host(self, chunk: Chunk) -> None:
        """Give the chunk a zeroed host buffer (pinned on CUDA when the chunk will move)."""
        moves = chunk.kind in (ChunkKind.PARAM, ChunkKind.GRAD) and not chunk.group.host_only
        buf = self.copier.alloc_host(chunk.numel, chunk.dtype, pinned=moves)
        chunk.host_flat = buf  # zeroed: zero padding keeps Adam and norms exact over whole spans
        if chunk.location is Location.NOWHERE:
            chunk.location = Location.HOST
        self._register_host(chunk)

    def _register_host(self, chunk: Chunk) -> None:
        self.host_allocated_bytes += chunk.nbytes
        self._by_storage[chunk.host_flat.untyped_storage().data_ptr()] = chunk

    def free_host(self, chunk: Chunk) -> None:
        """Drop a chunk's host buffer (it lives on the device for good, or is no longer used)."""
        self.copier.wait_downloaded(chunk)
        self.copier.wait_upload_read(chunk)  # an upload may still be reading the host buffer
        self._by_storage.pop(chunk.host_flat.untyped_storage().data_ptr(), None)
        self.host_allocated_bytes -= chunk.nbytes
        chunk.host_flat = None
        chunk.home_views = None  # they would keep the buffer alive
        if chunk.location is Location.HOST:
            chunk.location = Location.NOWHERE

    def replace_groups(self, groups: list[ChunkGroup]) -> None:
        """Adopt a new layout (after re-packing on the host): chunk ids are renumbered densely."""
        assert not self._on_device, "re-packing happens with every chunk on the host"
        self.groups, self.chunks = [], []
        self._by_storage = {}
        self.host_allocated_bytes = 0
        chunks = [chunk for group in groups for chunk in group.chunks]
        for chunk_id, chunk in enumerate(chunks):
            chunk.chunk_id = chunk_id
        self.add_groups(groups)

    # ---- moves ---------------------------------------------------------------------------

    def current_budget_bytes(self) -> int:
        moment = self.schedule.position if self.in_fwd_bwd else None
        return self.tracer.chunk_budget_bytes(moment)

    def ensure_on_device(self, chunk: Chunk, budget_bytes: int | None = None) -> None:
        """Make `chunk` resident, and the resident chunks fit the budget of this moment: as
        activations grow the budget shrinks, so a moment may evict even when it fetches nothing."""
        if chunk.group.host_only:
            return
        if self.host_updates is not None:
            self.host_updates.wait_for(chunk.group)
        budget = self.current_budget_bytes() if budget_bytes is None else budget_bytes
        if chunk.location is Location.DEVICE:
            self._make_room(0, budget, keep=chunk)
            return
        with self._move_clock:
            self._make_room(chunk.nbytes, budget, keep=chunk)
            if chunk.kind is ChunkKind.GATHERED:
                self._gather(chunk)
            elif chunk.location is Location.NOWHERE:
                self.copier.allocate_zeroed(chunk)
                chunk.dirty = True
            else:
                self.copier.upload(chunk)
                self._count(h2d=chunk.nbytes)
                chunk.dirty = False
            chunk.location = Location.DEVICE
            self._on_device[chunk.chunk_id] = chunk
            self.device_bytes += chunk.nbytes
            self._by_storage[chunk.device_flat.untyped_storage().data_ptr()] = chunk
            self._repoint(chunk)

    def evict(self, chunk: Chunk) -> None:
        """Move a device-resident chunk to the host (a copy only if the device copy changed)."""
        assert chunk.location is Location.DEVICE and chunk.movable, f"cannot evict {chunk}"
        with self._move_clock:
            if chunk.kind is ChunkKind.GATHERED:
                self._drop_gathered(chunk)
                return
            if self.comm is not None:
                self.comm.fence()  # a reduction may still be writing this shard on the side stream
            if chunk.host_flat is None:
                self.allocate_host(chunk)
                chunk.dirty = True
            if chunk.dirty:
                self.copier.download(chunk)
                self._count(d2h=chunk.nbytes)
            buf = self._drop_device_buffer(chunk, Location.HOST)
            chunk.dirty = False
            self.totals.evictions += 1
            self._repoint(chunk)
            self.copier.release_device(buf, room_bytes=self.device_budget_bytes - self.device_bytes)

    def _drop_device_buffer(self, chunk: Chunk, now_at: Location) -> torch.Tensor:
        """Forget a resident chunk's device buffer, returned (for `Copier.release_device` once the
        chunk's parameters point elsewhere; the allocator reuses it once the streams using it are
        done); the chunk is `now_at` from here on."""
        buf = chunk.device_flat
        self._by_storage.pop(buf.untyped_storage().data_ptr(), None)
        chunk.device_flat = None
        chunk.ready_event = None
        chunk.location = now_at
        del self._on_device[chunk.chunk_id]
        self.device_bytes -= chunk.nbytes
        return buf

    def move_to_host(self, chunk: Chunk) -> None:
        if chunk.location is Location.DEVICE:
            self.evict(chunk)
        elif chunk.location is Location.NOWHERE:
            self.allocate_host(chunk)

    def _make_room(self, need_bytes: int, budget_bytes: int, keep: Chunk) -> None:
        if self.device_bytes + need_bytes <= budget_bytes:
            return
        with self._move_clock:
            candidates = [c for c in self._on_device.values() if c.movable and c is not keep]
            for victim in self.schedule.eviction_order(candidates):
                self.evict(victim)
                if self.device_bytes + need_bytes <= budget_bytes:
                    return
            # What is left is in use right now and must stay; going over the moment's share is the
            # lesser evil, but not over the whole device budget.
            self.num_over_budget += 1
            if self.device_bytes + need_bytes > self.device_budget_bytes:
                raise EngineError(
                    f"the device budget ({self.device_budget_bytes} bytes) cannot hold the chunks one "
                    f"step needs at once ({self.device_bytes + need_bytes} bytes): raise "
                    "device_memory_limit (or client.mem_tracer.overall_gpu_mem_ratio) or lower "
                    "default_chunk_size"
                )

    def repoint_all(self) -> None:
        for group in self.groups:
            self._repoint(group.working)

    def _repoint(self, chunk: Chunk) -> None:
        """Point every parameter stored in this param chunk at the chunk's current buffer.

        On CUDA a parameter whose chunk is on the host points at a NaN placeholder on the device
        instead: a parameter's device must never change while autograd holds its gradient
        accumulator (torch drops the accumulator on a device change, so a tied or reused parameter
        would get several partial "final" gradients), and reading an evicted weight outside the
        hooks must fail loudly rather than compute with stale numbers.
        """
        if chunk is not chunk.group.working:
            return
        group = chunk.group
        on_host = chunk.location is Location.HOST and not self.copier.is_cuda
        if chunk.location is Location.DEVICE and not group.host_only:
            # A new buffer at every upload: each parameter is re-pointed in place, `set_` to the
            # buffer's storage at its offset, below autograd. It keeps its identity, its autograd
            # accumulator and its version counter, as an assignment to `.data` would, but no view
            # tensor is made: a view is a dispatch through autograd, and was most of a move's cost
            # (12 parameters a chunk: 56 against 20 us on a 2-core Xeon). The device is the same.
            flat = chunk.flat
            storage, first = flat.untyped_storage(), flat.storage_offset()
            with torch._C._AutoDispatchBelowADInplaceOrView():
                for info, shape, stride, offset in group.view_args():
                    info.param.set_(storage, first + offset, shape, stride)
            return
        # The host buffer and the placeholder outlive many moves: their views are kept and reused.
        if on_host or group.host_only:
            base, step = chunk.flat, 1
        else:
            base, step = self.copier.placeholder(chunk.dtype), 0  # one element, broadcast
        cached = chunk.home_views
        if cached is None or cached[0] is not base:
            first = base.storage_offset()
            views = [base.as_strided(info.shape, info.stride(step), first + info.offset * step)
                     for info in group.tensors]
            cached = chunk.home_views = (base, views)
        for info, view in zip(group.tensors, cached[1]):
            info.param.data = view

    def _count(self, h2d: int = 0, d2h: int = 0) -> None:
        self.totals.h2d_bytes += h2d
        self.totals.d2h_bytes += d2h
        self.totals.h2d_moves += h2d > 0
        self.totals.d2h_moves += d2h > 0

    # ---- gathered chunks (several ranks) -----------------------------------------------------

    def _gather(self, chunk: Chunk) -> None:
        """All-gather the whole param chunk from every rank's shard into a new device buffer."""
        shard = chunk.group.param
        source = self.copier.current_flat(shard)
        if shard.location is not Location.DEVICE:
            self._count(h2d=shard.nbytes)  # this rank's part goes up; the rest comes over the network
        chunk.device_flat, chunk.ready_event = self.comm.gather_chunk(source, chunk.numel)
        chunk.dirty = False
        self.totals.gathers += 1

    def _drop_gathered(self, chunk: Chunk) -> None:
        """Free a gathered chunk: the shards keep the weights; pending gradients are reduced first."""
        if chunk.unreduced:
            self.reduce_gradients(chunk)
        self._drop_device_buffer(chunk, Location.NOWHERE)
        self.totals.evictions += 1
        self._repoint(chunk)

    def note_gradient(self, info: TensorInfo) -> None:
        """The gradient of `info` was written into its gathered chunk: reduce the chunk's gradients
        once as many have arrived as in the previous backward (the chunk's backward is over)."""
        chunk = info.group.gathered
        chunk.unreduced.append(info)
        chunk.num_grads_this_backward += 1
        expected = chunk.num_grads_expected
        if expected is not None and chunk.num_grads_this_backward >= expected:
            self.reduce_gradients(chunk)

    def reduce_gradients(self, chunk: Chunk) -> None:
        """Reduce-scatter the gradients written into a gathered chunk into this rank's grad shard."""
        infos, chunk.unreduced = chunk.unreduced, []
        group = chunk.group
        target = group.grad_chunk
        if target.location is Location.NOWHERE:
            self.allocate_host(target)  # a grad shard before its first step: zeros
        dest = self.copier.current_flat(target)
        writes = gradient_writes(group, infos, dest)
        self.comm.reduce_gradients(self.copier.current_flat(chunk), target.numel, writes)
        if target.location is Location.DEVICE and writes:
            target.dirty = True
        elif writes:  # the reduced gradients came down from the device
            self._count(d2h=sum(end - begin for _, begin, end, _ in writes) * target.dtype.itemsize)
        for info in infos:
            info.has_grad = True

    def finish_backward(self) -> None:
        """End of backward: reduce what is left (in group order, the same on every rank), wait for
        the reductions, and drop the gathered chunks that held gradients (their weights are gone)."""
        gathered = [group.gathered for group in self.groups if group.gathered is not None]
        for chunk in gathered:
            if chunk.unreduced:
                self.reduce_gradients(chunk)
        if self.comm is not None:
            self.comm.wait_reductions()
        for chunk in gathered:
            if chunk.num_grads_this_backward == 0:
                continue
            chunk.num_grads_expected = chunk.num_grads_this_backward
            chunk.num_grads_this_backward = 0
            if chunk.location is Location.DEVICE:
                self._drop_gathered(chunk)

    def drop_all_gathered(self) -> None:
        """Forget every gathered chunk (the shards' weights changed outside a step)."""
        for group in self.groups:
            chunk = group.gathered
            if chunk is not None and chunk.location is Location.DEVICE:
                self._drop_gathered(chunk)

    # ---- accesses ------------------------------------------------------------------------

    def access(self, chunk: Chunk) -> torch.Tensor:
        """A moment: the chunk is about to be used on the compute device. Returns its buffer."""
        with self.lock:
            last = self._last_access
            if (last is not None and last[0] == chunk.chunk_id and chunk.ready_event is None
                    and (self.host_updates is None or not self.host_updates.running)
                    and self._same_moment_again(chunk)):
                return chunk.device_flat  # what the last access settled still holds (the common case)
            if self.host_updates is not None:
                self.host_updates.wait_for(chunk.group)  # its weights are being written
            if not chunk.group.host_only and not self._same_moment_again(chunk):
                moment = self.schedule.on_access(chunk.chunk_id)
                self.tracer.on_moment(moment, self.device_bytes)
                self.ensure_on_device(chunk)
                self._prefetch_next(accessed=chunk)
                self._last_access = self._access_key(chunk)
            return self.copier.current_flat(chunk)

    def _access_key(self, chunk: Chunk) -> tuple:
        return (chunk.chunk_id, self.schedule.position, self.device_bytes, self.in_fwd_bwd)

    def _same_moment_again(self, chunk: Chunk) -> bool:
        """The chunk was the last one accessed and nothing moved since (the gradients of one chunk's
        tensors, one after the other): the schedule stays at its moment, the chunk is resident,
        the budget and the resident bytes are those the last access already settled and prefetched
        for. After warm-up only (warm-up records every access)."""
        return (chunk.location is Location.DEVICE and self.schedule.recorded and not self.schedule.recording
                and self._last_access == self._access_key(chunk))

    def _prefetch_next(self, accessed: Chunk) -> None:
        if not self.schedule.recorded or not self.in_fwd_bwd:
            return
        for chunk_id in self.schedule.upcoming(_PREFETCH_MOMENTS):
            chunk = self.chunks[chunk_id]
            if chunk.location is Location.DEVICE or chunk.group.host_only:
                continue
            if self.host_updates is not None and self.host_updates.pending(chunk.group):
                return  # its host buffer is still being written: fetched at its use, after the wait
            self._prefetch(chunk, keep=accessed)
            return  # one chunk ahead is enough to overlap the copy with this moment's compute

    def _prefetch(self, chunk: Chunk, keep: Chunk) -> None:
        with self._move_clock:
            # The copy lands while this moment still computes: both moments' budgets apply.
            budget = min(self.current_budget_bytes(),
                         self.tracer.chunk_budget_bytes(self.schedule.position + 1))
            need = chunk.nbytes
            if self.device_bytes + need > budget:
                # Evict only chunks needed later than this one, so prefetching never costs a re-fetch
                # (and never the chunk being accessed right now).
                its_distance = self.schedule.distance_to_next_use(chunk.chunk_id)
                later = [c for c in self._on_device.values() if c.movable and c is not keep
                         and self.schedule.distance_to_next_use(c.chunk_id) > its_distance]
                freeable = sum(c.nbytes for c in later)
                if self.device_bytes - freeable + need > budget:
                    return
                for victim in self.schedule.eviction_order(later):
                    if self.device_bytes + need <= budget:
                        break
                    self.evict(victim)
            self.ensure_on_device(chunk, budget_bytes=budget)

    # ---- step accounting -----------------------------------------------------------------

    def end_step(self) -> None:
        self.last_step = self.totals.minus(self._step_start)
        self._step_start = dataclasses.replace(self.totals)

    def location_bytes(self, kinds: tuple[ChunkKind, ...], location: Location) -> tuple[int, int]:
        """(number of chunks, bytes) of the given kinds at `location`."""
        chosen = [c for c in self.chunks if c.kind in kinds and c.location is location]
        return len(chosen), sum(c.nbytes for c in chosen)


class _MoveClock:
    """Times the manager's moves (`ChunkManager.move_s`), less the copies inside them: reentrant,
    so that only the outermost of nested moves counts (an upload and the evictions it makes)."""

    __slots__ = ("_manager", "_depth", "_started")

    def __init__(self, manager: ChunkManager):
        self._manager = manager
        self._depth = 0
        self._started = (0.0, 0.0)

    def __enter__(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self._started = (time.perf_counter(), self._manager.copier.transfer_s)

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            manager, (start, copied) = self._manager, self._started
            manager.move_s += (time.perf_counter() - start) - (manager.copier.transfer_s - copied)
