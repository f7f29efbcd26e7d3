"""Chunks: fixed-size flat buffers that hold many tensors at fixed offsets and move whole.

A `ChunkGroup` is one slot of the layout: the param chunk (compute dtype) and its mirrors with the
identical layout — fp32 master, exp_avg, exp_avg_sq and, with gradient accumulation, a grad chunk.
Each `Chunk` keeps its own storage per placement (a device buffer and a host buffer).

With several ranks (engine/distributed.py) every chunk of the layout is split into `world_size` equal
shards: the group's param/grad/master/moment chunks then hold only this rank's shard (`group.shard`
says which elements), and a separate `gathered` chunk holds the whole compute-dtype chunk on the
device while forward and backward use it. `group.working` is the chunk the model computes with: the
gathered one when sharded, else the param chunk itself. Offsets of tensors are always offsets in the
whole (unsharded) chunk; `TensorInfo.shard_piece()` maps a tensor onto this rank's shard.

A tensor is FREE until it is materialised, then HOLD. Use is counted per chunk, not per tensor
(the hooks' hot path does one thing per chunk a module touches): a chunk may move only while no
running module uses any of its tensors (`num_tensors_in_compute`, uses summed over the modules
running) and no backward node has it pinned.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

# Tensor offsets inside a chunk are multiples of this many elements (>= 64 bytes for every dtype),
# so each tensor starts on an aligned address and vectorised kernels stay vectorised.
ALIGN_ELEMENTS = 64


class Location(enum.Enum):
    NOWHERE = "nowhere"  # not allocated yet (moments before a lazy first use)
    DEVICE = "device"
    HOST = "host"


class ChunkKind(enum.Enum):
    PARAM = "param"
    GATHERED = "gathered"  # sharded only: the whole param chunk, assembled from every rank's shard
    MASTER = "master"
    EXP_AVG = "exp_avg"
    EXP_AVG_SQ = "exp_avg_sq"
    GRAD = "grad"


class TensorState(enum.Enum):
    FREE = "free"
    HOLD = "hold"


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(eq=False)
class TensorInfo:
    """One model parameter's place in a chunk group, plus its per-step bookkeeping."""

    param: torch.nn.Parameter
    names: list[str]
    offset: int  # elements from the start of the chunk
    numel: int
    shape: torch.Size
    requires_grad: bool
    group: "ChunkGroup | None" = None
    state: TensorState = TensorState.FREE
    # Running modules that hold it (tied params, re-entrant calls): counted during the warm-up and
    # for reads outside the hooks only, where a read must be told apart from a module's own use
    num_users: int = 0
    _has_grad: bool = field(default=False, repr=False)  # see has_grad
    _strides: tuple[int, ...] | None = field(default=None, repr=False)  # see stride
    num_steps: int = 0  # Adam steps applied to this tensor (bias correction is per tensor)
    param_group: int = 0  # index of its optimizer parameter group (lr, betas, eps, weight_decay)

    @property
    def has_grad(self) -> bool:
        """A gradient has been written since the last step / zero_grad (its group counts them, so
        that step() knows a group is dense without looking at each of its tensors)."""
        return self._has_grad

    @has_grad.setter
    def has_grad(self, value: bool) -> None:
        if value != self._has_grad:
            self._has_grad = value
            if self.group is not None:
                self.group.num_grads += 1 if value else -1

    def stride(self, step: int = 1) -> tuple[int, ...]:
        """The strides of the tensor laid out contiguously (step 1), or broadcast from one element
        (step 0: every stride 0)."""
        if self._strides is None:
            strides, size = [], 1
            for dim in reversed(self.shape):
                strides.append(size)
                size *= dim
            self._strides = tuple(reversed(strides))
        return self._strides if step else (0,) * len(self._strides)

    def view_of(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.narrow(0, self.offset, self.numel).view(self.shape)

    def region_of(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.narrow(0, self.offset, self.numel)

    def shard_piece(self) -> tuple[int, int, int]:
        """(start in this rank's storage chunks, start in the flattened tensor, length) of the part
        of this tensor this rank stores; length 0 when it lies wholly in other ranks' shards."""
        shard = self.group.shard
        if shard is None:
            return self.offset, 0, self.numel
        begin = max(self.offset, shard.begin)
        end = min(self.offset + self.numel, shard.end)
        if end <= begin:
            return 0, 0, 0
        return begin - shard.begin, begin - self.offset, end - begin

    def local_range(self) -> tuple[int, int]:
        """[begin, end) of this rank's part of the tensor in the group's storage chunks."""
        begin, _, length = self.shard_piece()
        return begin, begin + length

    def start_compute(self) -> None:
        self.group.working.num_tensors_in_compute += 1
        self.num_users += 1

    def end_compute(self) -> None:
        self.group.working.num_tensors_in_compute -= 1
        self.num_users -= 1


class Chunk:
    """One flat buffer of `numel` elements of one dtype, on the device or on the host."""

    def __init__(self, chunk_id: int, kind: ChunkKind, numel: int, dtype: torch.dtype):
        self.chunk_id = chunk_id
        self.kind = kind
        self.numel = numel
        self.dtype = dtype
        self.group: ChunkGroup | None = None
        self.device_flat: torch.Tensor | None = None
        self.host_flat: torch.Tensor | None = None
        self.location = Location.NOWHERE
        # True when the device copy holds data the host copy lacks (grads, new weights);
        # a clean chunk is evicted by dropping its device buffer, with no copy at all.
        self.dirty = False
        self.num_pins = 0  # autograd nodes currently reading it during backward
        self.num_tensors_in_compute = 0  # uses of its tensors by running modules (working chunks)
        # Gathered chunks only: tensors whose gradient was written here but not yet reduced over
        # ranks, gradients written this backward, and how many the last backward wrote (once that
        # many have arrived, the chunk's backward is over and its gradients are reduced at once).
        self.unreduced: list[TensorInfo] = []
        self.num_grads_this_backward = 0
        self.num_grads_expected: int | None = None
        self.pinned_forever = False  # optimizer state of a device group: never evicted
        # Param chunks: (host buffer or placeholder, its views per tensor), reused while it lasts
        self.home_views: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.ready_event = None  # CUDA: upload finished (compute stream waits on it)
        self.host_ready_event = None  # CUDA: download finished (host readers wait on it)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def flat(self) -> torch.Tensor:
        """The buffer at the chunk's current location."""
        if self.location is Location.DEVICE:
            return self.device_flat
        if self.location is Location.HOST:
            return self.host_flat
        raise RuntimeError(f"chunk {self.chunk_id} ({self.kind.value}) has no storage yet")

    @property
    def movable(self) -> bool:
        return not self.pinned_forever and self.num_pins == 0 and self.num_tensors_in_compute == 0

    def __repr__(self) -> str:
        return f"Chunk({self.chunk_id}, {self.kind.value}, {self.numel}, {self.location.value})"


@dataclass(frozen=True)
class Shard:
    """This rank's shard of a chunk group: elements [begin, end) of each of its chunks."""

    rank: int
    world_size: int
    numel: int  # elements per rank; the whole chunk has numel * world_size

    @property
    def begin(self) -> int:
        return self.rank * self.numel

    @property
    def end(self) -> int:
        return self.begin + self.numel


@dataclass(eq=False)
class ChunkGroup:
    """Param chunk i and its mirrors (identical layout); the unit the optimizer steps."""

    index: int
    numel: int  # elements of the whole chunk (of every rank's shards together)
    tensors: list[TensorInfo]
    param: Chunk
    master: Chunk | None  # None for a group of frozen tensors: no optimizer state at all
    exp_avg: Chunk | None
    exp_avg_sq: Chunk | None
    grad: Chunk | None = None  # only with gradient accumulation; else grads go into `param`
    host_only: bool = False  # use_cpu_embedding: lives and computes on the host
    optimizer_on_device: bool = False  # decided after warm-up from the device margin
    shard: Shard | None = None  # set with several ranks: the chunks above hold only this shard
    gathered: Chunk | None = None  # with several ranks: the whole param chunk while in use
    chunks: list[Chunk] = field(default_factory=list)
    num_grads: int = 0  # its tensors with has_grad set
    num_trainable: int = 0  # its tensors that require grad (engine/hooks.py writes their gradients together)
    # The optimizer's spans of the group when every tensor has a gradient (engine/optimizer.py):
    # they stay the same while every step steps every tensor; None once that may have changed
    dense_spans: list | None = None
    _view_args: list | None = field(default=None, repr=False)  # see view_args

    def __post_init__(self):
        self.chunks = [c for c in (self.gathered, self.param, self.grad, self.master, self.exp_avg,
                                   self.exp_avg_sq) if c is not None]
        for chunk in self.chunks:
            chunk.group = self
        for info in self.tensors:
            info.group = self
        self.num_grads = sum(info.has_grad for info in self.tensors)
        self.num_trainable = sum(info.requires_grad for info in self.tensors)

    def view_args(self) -> list[tuple[TensorInfo, torch.Size, tuple[int, ...], int]]:
        """(info, shape, contiguous strides, offset) of each tensor: what its parameter's view into
        a new buffer of the chunk is made from, at every upload."""
        if self._view_args is None:
            self._view_args = [(info, info.shape, info.stride(), info.offset) for info in self.tensors]
        return self._view_args

    @property
    def dense(self) -> bool:
        """Every tensor of the group has a gradient."""
        return self.num_grads == len(self.tensors)

    @property
    def working(self) -> Chunk:
        """The chunk forward and backward compute with (and parameters point into)."""
        return self.gathered if self.gathered is not None else self.param

    @property
    def grad_chunk(self) -> Chunk:
        return self.grad if self.grad is not None else self.param

    @property
    def trainable(self) -> bool:
        """False for a group of frozen tensors (requires_grad False): it holds only the compute-dtype
        param chunk, which moves as needed; no master, no moments, no gradients."""
        return self.master is not None

    @property
    def optimizer_chunks(self) -> list[Chunk]:
        return [self.master, self.exp_avg, self.exp_avg_sq] if self.trainable else []

    @property
    def model_data_bytes(self) -> int:
        """This rank's model data: its shards (a gathered chunk is a temporary copy, not data)."""
        return sum(c.nbytes for c in self.chunks if c is not self.gathered)


def plan_chunk_layout(numels: list[int], chunk_numel: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """Pack tensors, in the given order, into chunks of at most `chunk_numel` elements.

    Returns one (chunk capacity, [(tensor index, offset), ...]) per chunk, chunks in the order of
    their first tensor. A tensor larger than `chunk_numel` gets a chunk of its own, sized to fit it,
    and the chunk being filled stays open for the tensors after it. A chunk is closed at the size
    its tensors use, so the only memory not holding a tensor is the alignment padding (a fixed-size
    chunk would waste up to the largest tensor's size each time the next one does not fit).
    """
    limit = round_up(chunk_numel, ALIGN_ELEMENTS)
    chunks: list[list] = []  # [used elements, members]
    open_chunk = None
    for index, numel in enumerate(numels):
        padded = round_up(max(numel, 1), ALIGN_ELEMENTS)
        if padded > limit:
            chunks.append([padded, [(index, 0)]])
            continue
        if open_chunk is None or open_chunk[0] + padded > limit:
            open_chunk = [0, []]
            chunks.append(open_chunk)
        open_chunk[1].append((index, open_chunk[0]))
        open_chunk[0] += padded
    return [(used, members) for used, members in chunks]


def new_chunk_group(index: int, capacity: int, tensors: list[TensorInfo], compute_dtype: torch.dtype,
                    with_grad_chunk: bool, host_only: bool, first_chunk_id: int,
                    rank_and_world: tuple[int, int] | None = None, trainable: bool = True) -> ChunkGroup:
    """A chunk group for `tensors` (their offsets already set) in a chunk of `capacity` elements.

    With `rank_and_world` (several ranks) `capacity` must split into equal shards: the group's
    storage chunks are this rank's shards, and a gathered chunk of the whole capacity comes first.
    Chunk ids are consecutive from `first_chunk_id` in `ChunkGroup.chunks` order. A group that is
    not `trainable` (frozen tensors only) gets neither a grad chunk nor optimizer chunks.

    Gradient accumulation sums in an fp32 grad chunk whatever the compute dtype (as AMP's fp32
    `.grad` does): summing micro-batches in bf16 would round every partial sum to 8 bits.
    """
    shard = None
    storage_numel = capacity
    if rank_and_world is not None:
        rank, world_size = rank_and_world
        assert capacity % world_size == 0, "a sharded chunk must split into equal shards"
        shard = Shard(rank=rank, world_size=world_size, numel=capacity // world_size)
        storage_numel = shard.numel
    ids = iter(range(first_chunk_id, first_chunk_id + 6))
    gathered = Chunk(next(ids), ChunkKind.GATHERED, capacity, compute_dtype) if shard else None
    param = Chunk(next(ids), ChunkKind.PARAM, storage_numel, compute_dtype)
    grad = None
    if with_grad_chunk and trainable:
        grad = Chunk(next(ids), ChunkKind.GRAD, storage_numel, torch.float32)
    master = exp_avg = exp_avg_sq = None
    if trainable:
        master, exp_avg, exp_avg_sq = (Chunk(next(ids), kind, storage_numel, torch.float32)
                                       for kind in (ChunkKind.MASTER, ChunkKind.EXP_AVG, ChunkKind.EXP_AVG_SQ))
    return ChunkGroup(index=index, numel=capacity, tensors=tensors, param=param, master=master,
                      exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, grad=grad, host_only=host_only,
                      shard=shard, gathered=gathered)
