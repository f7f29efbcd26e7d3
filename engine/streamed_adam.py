"""Host optimizer groups stepped by the GPU over streamed state, beside host Adam.

A host group's fp32 master and moments live on the host because the device has no room for them
(12 B/param); its gradients and weights are on the device anyway when its param chunk stays there
(placement's "in place" mode). Host Adam moves 4 B/param over PCIe (gradients down, weights up)
and then runs at the host's memory bandwidth: measured on the H200 machine
(`python -m benchmarks.host_link`), 3.7 G params/s on 15 cores alone and about 2.4 inside a step.
PCIe moves 55 GB/s each way at once, so streaming a group's state up, stepping it with the CUDA
kernel and streaming it back down (12 B/param each way) runs at about 4 G params/s without
touching the host's cores. `HostUpdates` (engine/host_adam.py) splits the host groups between the
two every step so that both finish together, from the rates each measured in the steps before.

The pipeline, per piece of a group (a few million elements): H2D of the piece's master and moments
into a device slot (the `up` stream); on the `work` stream, after the compute stream's end of
backward (gradients final, the clipping/unscale multiplier computed): the piece's gradients cast to
fp32 in the slot and multiplied, torch's fused Adam/AdamW on the spans in it, the new masters cast
into the param chunk over the gradients; D2H of master and moments back (the `down` stream). Three
slots turn around so that the up copy of one piece, the kernels of the next and the down copy of
the one before run at once. No host thread waits for any of it:
- the param chunk's `ready_event` is the work stream's end: the compute stream waits for it at the
  chunk's first use in the next forward, as it does for an upload;
- the master's and moments' `host_ready_event` is the down stream's end: whatever reads them on the
  host (host Adam of a later step, a checkpoint, a state dict) waits for it, as for a download.

Each piece is stepped by device Adam's own `adam_on_device_groups` (engine/host_adam.py) over the
slot: cast, multiply, fused step, cast, which is host Adam's arithmetic elementwise, so on a CPU
(where the tests run it) the result is bitwise that of host Adam; on CUDA it is the CUDA kernel's,
as for the device groups. A group's state lives on the host either way, so which of the two steps
a group can change from one step to the next. Its host buffers are page-locked the first time it
streams (copies from pageable memory would not overlap anything).
"""

from __future__ import annotations

import contextlib

import torch

from engine.chunk import ChunkGroup
from engine.device import Copier, pin_in_place
from engine.host_adam import GroupFlats, adam_on_device_groups

# Elements per streamed piece: a slot holds its fp32 master, moments and gradients (16 B/element),
# and three slots turn around. Results do not depend on it (Adam is elementwise).
STREAM_PIECE_ELEMENTS = 1 << 24
NUM_SLOTS = 3


def ring_bytes(piece_elements: int = STREAM_PIECE_ELEMENTS) -> int:
    """Device bytes of the slots that the streamed pipeline keeps."""
    return NUM_SLOTS * 16 * piece_elements


class StreamedAdam:
    """Steps host groups on the compute device over their streamed state (module doc)."""

    def __init__(self, copier: Copier, piece_elements: int = STREAM_PIECE_ELEMENTS):
        self._copier = copier
        self.piece = piece_elements
        self._slots: list[list[torch.Tensor]] | None = None  # per slot: master, exp_avg, exp_avg_sq, grad
        self._freed: list = [None] * NUM_SLOTS  # CUDA: the down copy out of each slot finished
        self._next_slot = 0
        cuda = copier.is_cuda
        self._up = torch.cuda.Stream(copier.device) if cuda else None
        self._work = torch.cuda.Stream(copier.device) if cuda else None
        self._down = torch.cuda.Stream(copier.device) if cuda else None
        self._refused: set[tuple] = set()  # host buffers' addresses that the driver would not page-lock
        self._step_tensors: dict[int, torch.Tensor] = {}
        self._timings: list[list] = []  # CUDA: [start event, end event, elements] of steps not yet read
        self.numel_this_step = 0

    def can_stream(self, group: ChunkGroup) -> bool:
        """Whether the group's host state can stream: page-locked here the first time (CUDA)."""
        key = tuple(c.host_flat.data_ptr() for c in group.optimizer_chunks)
        if key in self._refused:
            return False  # not asked again every step
        if all(pin_in_place(self._copier, c.host_flat) for c in group.optimizer_chunks):
            return True  # (already page-locked: a cheap check)
        self._refused.add(key)
        return False

    def begin_step(self, after: "torch.cuda.Event | None") -> None:
        """The step's streamed groups follow; their kernels start after the compute stream's `after`."""
        self._step_tensors = {}
        self.numel_this_step = 0
        if self._slots is None:  # kept: the placement counted them in the device budget
            self._slots = [[torch.empty(self.piece, dtype=torch.float32, device=self._copier.device)
                            for _ in range(4)] for _ in range(NUM_SLOTS)]
            if self._up is not None:
                # The allocator may hand out memory that kernels queued on the compute stream still
                # use (it was freed there, not yet used up): the first copy in waits for them.
                self._up.wait_stream(torch.cuda.current_stream(self._copier.device))
        if self._work is not None:
            self._work.wait_event(after)
            started = torch.cuda.Event(enable_timing=True)
            started.record(self._work)
            self._timings.append([started, None, 0])

    def step_group(self, group: ChunkGroup, spans: list, multiplier: torch.Tensor | None) -> None:
        """One Adam step of the group's spans (begin, end, step number, hyper-parameters): state up,
        kernels, state down, piece by piece; the new weights land in its device param chunk."""
        if not spans:
            return
        host = [c.host_flat for c in group.optimizer_chunks]  # master, exp_avg, exp_avg_sq
        grad = group.grad_chunk.device_flat
        param = group.param.device_flat
        if multiplier is not None and self._work is not None:
            multiplier.record_stream(self._work)  # read there after the caller drops it
        state_before = [c.host_ready_event for c in group.optimizer_chunks]  # a previous stream down
        weights_before = group.param.ready_event
        if self._work is not None and weights_before is not None:
            self._work.wait_event(weights_before)
        begin, end = spans[0][0], spans[-1][1]
        piece = self._slots[0][0].numel()
        for lo in range(begin, end, piece):
            hi = min(lo + piece, end)
            parts = [(max(b, lo), min(e, hi), number, hyper) for b, e, number, hyper in spans if b < hi and e > lo]
            if parts:
                self._step_piece(lo, hi, parts, group.dense, host, grad, param, multiplier, state_before)
        self.numel_this_step += end - begin
        if self._work is not None:
            weights = torch.cuda.Event()
            weights.record(self._work)
            group.param.ready_event = weights  # the compute stream waits for it at the next use
            state = torch.cuda.Event()
            state.record(self._down)
            for chunk in group.optimizer_chunks:
                chunk.host_ready_event = state  # host readers wait for it
        group.param.dirty = True  # the device copy holds the new weights, the host copy does not

    def end_step(self) -> None:
        if self._down is not None:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record(self._down)
            self._timings[-1][1:] = [ended, self.numel_this_step]

    def measured(self) -> tuple[int, float]:
        """(elements, seconds) of the streamed steps finished since the last call, each timed from
        the end of its backward to its last copy down (CUDA; (0, 0.0) on a CPU)."""
        numel, seconds, waiting = 0, 0.0, []
        for started, ended, elements in self._timings:
            if ended is not None and ended.query():
                numel += elements
                seconds += started.elapsed_time(ended) / 1000
            else:
                waiting.append([started, ended, elements])
        self._timings = waiting
        return numel, seconds

    def _step_piece(self, lo: int, hi: int, parts: list, dense: bool, host: list[torch.Tensor],
                    grad: torch.Tensor, param: torch.Tensor, multiplier: torch.Tensor | None,
                    state_before: list) -> None:
        k = self._next_slot
        self._next_slot = (k + 1) % NUM_SLOTS
        n = hi - lo
        master, exp_avg, exp_avg_sq, grad32 = (t[:n] for t in self._slots[k])
        cuda = self._work is not None
        if cuda:
            up, work, down = self._up, self._work, self._down
            if self._freed[k] is not None:
                up.wait_event(self._freed[k])
            for event in state_before:
                if event is not None:
                    up.wait_event(event)
            with torch.cuda.stream(up):
                for dst, src in zip((master, exp_avg, exp_avg_sq), host):
                    dst.copy_(src[lo:hi], non_blocking=True)
                loaded = torch.cuda.Event()
                loaded.record(up)
            work.wait_event(loaded)
        else:
            for dst, src in zip((master, exp_avg, exp_avg_sq), host):
                dst.copy_(src[lo:hi])
        with torch.cuda.stream(self._work) if cuda else contextlib.nullcontext():
            # Device Adam's own path over the piece: the slot holds the state, and its fp32 gradients
            flats = GroupFlats(grad[lo:hi], param[lo:hi], master, exp_avg, exp_avg_sq)
            spans = [(b - lo, e - lo, number, hyper) for b, e, number, hyper in parts]
            adam_on_device_groups([(flats, spans, dense)], multiplier, grad32, self._step_tensors)
        if cuda:
            computed = torch.cuda.Event()
            computed.record(work)
            down.wait_event(computed)
            with torch.cuda.stream(down):
                for dst, src in zip(host, (master, exp_avg, exp_avg_sq)):
                    dst[lo:hi].copy_(src, non_blocking=True)
                self._freed[k] = torch.cuda.Event()
                self._freed[k].record(down)
        else:
            for dst, src in zip(host, (master, exp_avg, exp_avg_sq)):
                dst[lo:hi].copy_(src)
