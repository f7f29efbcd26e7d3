"""Where the optimizer chunk groups live: on the device as far as memory allows, else on the host.

Decided once, after the warm-up iteration: with `use_hybrid_adam`, the first chunk groups (in
packing order, i.e. the ones whose backward finishes last) keep their optimizer state on the
device as far as it fits next to every param chunk and the warm-up's peak non-model memory, with
a safety margin measured from that peak: (1 - `margin_use_ratio`) of it (0.8: 20% more than
measured) for the caching allocator's fragmentation and run-to-run variation. (PatrickStar gave
the optimizer that share of the whole margin instead, which on a large GPU leaves tens of GB
unused.) On CUDA the device's real free memory bounds it too. The rest step on the host
(engine/host_adam.py): the last layers, whose gradients are final earliest in backward. With
several ranks, all take the smallest rank's number of device groups, and when the optimizer state
does not all fit beside every gathered param chunk, the gathered chunks get a window of a few
chunks instead (they are gathered again over NVLink, far cheaper than host Adam).

`plan_placement_of_sizes` is the pure arithmetic (the memory estimate runs it too); `settle_optimizer_placement` applies it to the engine's
chunks at the first step(s). The Adam step over the placed groups is engine/optimizer.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from engine.chunk import ChunkGroup, Location
from engine.device import device_capacity_bytes
from engine.errors import ModelTooLargeError
from engine.host_adam import HostUpdates
from engine.packing import repack_in_first_use_order
from engine.runtime import EngineRuntime
from engine.streamed_adam import STREAM_PIECE_ELEMENTS, ring_bytes

log = logging.getLogger("pstar.engine")


@dataclass(frozen=True)
class Placement:
    num_device_groups: int  # leading movable groups whose optimizer state lives on the device
    params_fit: bool  # every param chunk fits the device beside the activations (with the margin)
    allowance_bytes: int  # device bytes the optimizer groups could take


@dataclass(frozen=True)
class GroupSizes:
    """What placement needs to know of one movable chunk group, in bytes on this rank."""

    param_bytes: int  # its param chunk (and separate grad chunk): on the device while computing
    gathered_bytes: int  # the whole param chunk gathered from every rank's shard; 0 with one rank
    optimizer_bytes: int  # its fp32 master and Adam moments, which move together


def group_sizes(group: ChunkGroup) -> GroupSizes:
    return GroupSizes(
        param_bytes=sum(c.nbytes for c in (group.param, group.grad) if c is not None),
        gathered_bytes=group.gathered.nbytes if group.gathered is not None else 0,
        optimizer_bytes=sum(c.nbytes for c in group.optimizer_chunks))


def plan_placement(groups: list[ChunkGroup], device_budget_bytes: int, peak_non_model_bytes: int,
                   margin_use_ratio: float, use_hybrid_adam: bool, scratch_bytes: int,
                   device_capacity: int | None = None) -> Placement:
    """`plan_placement_of_sizes` for the engine's chunk groups (host-only groups never move)."""
    sizes = [group_sizes(g) for g in groups if not g.host_only]
    return plan_placement_of_sizes(sizes, device_budget_bytes, peak_non_model_bytes, margin_use_ratio,
                                   use_hybrid_adam, scratch_bytes, device_capacity)


def plan_placement_of_sizes(moving: list[GroupSizes], device_budget_bytes: int, peak_non_model_bytes: int,
                            margin_use_ratio: float, use_hybrid_adam: bool, scratch_bytes: int,
                            device_capacity: int | None = None) -> Placement:
    """Where the optimizer state (12 B/param) goes: the device holds every param chunk, the
    activations' peak plus (1 - margin_use_ratio) of it, and a step's scratch first; optimizer
    groups take the rest, leading groups first. `device_capacity` (CUDA: what is really free)
    bounds the budget. A pure function of sizes: `pstar estimate-memory` runs it on a config's
    numbers, so the estimate places what the engine would."""
    param_bytes = sum(g.param_bytes for g in moving)
    # With several ranks a param chunk in use is the gathered whole chunk, next to the shards.
    # Gathered chunks are dropped and gathered again when the device needs the room, which over
    # NVLink costs far less than stepping optimizer state on the host: they get a window, not
    # room for all of them, unless the optimizer state fits beside all of them anyway.
    gathered = sorted((g.gathered_bytes for g in moving if g.gathered_bytes), reverse=True)
    budget = device_budget_bytes if device_capacity is None else min(device_budget_bytes, device_capacity)
    activations = peak_non_model_bytes + activation_margin_bytes(peak_non_model_bytes, margin_use_ratio)
    placement = _fill(moving, budget - param_bytes - sum(gathered) - activations, scratch_bytes, use_hybrid_adam)
    if gathered and placement.num_device_groups < len(moving):
        window = sum(gathered[:GATHER_WINDOW])
        placement = _fill(moving, budget - param_bytes - window - activations, scratch_bytes, use_hybrid_adam)
    return placement


GATHER_WINDOW = 4  # gathered chunks the device keeps room for when they cannot all stay


def activation_margin_bytes(peak_non_model_bytes: int, margin_use_ratio: float) -> int:
    """The room kept over the traced activation peak: (1 - margin_use_ratio) of it."""
    return math.ceil((1 - margin_use_ratio) * peak_non_model_bytes)


def step_scratch_bytes(groups: list[ChunkGroup]) -> int:
    """A device group's fp32 gradients while it steps: the largest group's."""
    return max((g.numel for g in groups), default=0) * 4


def _fill(moving: list[GroupSizes], spare: int, scratch_bytes: int, use_hybrid_adam: bool) -> Placement:
    """Leading groups' optimizer state on the device while it fits in `spare` (less the scratch)."""
    allowance = spare - scratch_bytes if use_hybrid_adam else 0
    num_groups, used = 0, 0
    for group in moving:
        if used + group.optimizer_bytes > allowance:
            break
        used += group.optimizer_bytes
        num_groups += 1
    return Placement(num_groups, params_fit=spare >= 0, allowance_bytes=max(0, allowance))


def settle_optimizer_placement(rt: EngineRuntime, host: HostUpdates) -> None:
    """First step(s): re-pack in first-use order (once), then place the optimizer state after
    a warm-up traced with the final layout; until then it stays on the host."""
    if not rt.repack_checked:
        rt.repack_checked = True
        repack_in_first_use_order(rt, rt.first_used)
    if rt.tracer.finished:
        _place_optimizer_state(rt, host)
        return
    _allocate_on_host(rt, rt.groups)


def _allocate_on_host(rt: EngineRuntime, groups: list[ChunkGroup]) -> None:
    """Zeroed host buffers for the groups' optimizer chunks that have none anywhere yet."""
    for group in groups:
        for chunk in group.optimizer_chunks:
            if chunk.location is Location.NOWHERE:
                rt.manager.allocate_host(chunk)


def _place_optimizer_state(rt: EngineRuntime, host: HostUpdates) -> None:
    placement = _plan_for_runtime(rt)
    if host.streamer is not None and (rt.copier.is_cuda or host.stream_on_cpu) and _may_stream(rt, placement):
        # Host groups the device may step over streamed state (engine/streamed_adam.py): its
        # slots take device room from the optimizer groups, but only when some stay on the host.
        host.streamer.piece = min(STREAM_PIECE_ELEMENTS, max(g.numel for g in rt.groups))
        placement = _plan_for_runtime(rt, extra_scratch=ring_bytes(host.streamer.piece))
        if not _may_stream(rt, placement):
            placement = _plan_for_runtime(rt)  # the slots would push a param chunk off the device
    moving = [g for g in rt.groups if not g.host_only]
    num_device_groups = placement.num_device_groups
    if rt.comm is not None:  # the ranks' free memory differs, but their placements must not:
        num_device_groups = rt.comm.agree_min(num_device_groups)  # gathers depend on them
    for index, group in enumerate(moving):
        group.optimizer_on_device = index < num_device_groups
    keep_resident = placement.params_fit and not rt.grad_accumulation and rt.comm is None
    # With gradient accumulation the grad chunks are apart from the weights: they can go down
    # during the last micro-batch's backward whether or not the param chunks stay on the device.
    host.plan(rt.groups, keep_resident, start_in_backward=keep_resident or (rt.grad_accumulation and rt.comm is None))
    _check_host_memory(rt, host.keep_resident)
    for group in rt.groups:
        if group.optimizer_on_device:
            _put_optimizer_state_on_device(rt, group)
    rt.optimizer_placed = True
    rt.host_moments_pending = True  # the host groups' moments come in allocate_host_moments


def allocate_host_moments(rt: EngineRuntime) -> None:
    """Zeroed host moments for the host groups that have none yet. step() calls it once the device
    groups' host copies are freed (masters at placement, param chunks when they stay on the device
    for good), so the host never holds both: its peak stays that of init or of the steady state."""
    if not rt.host_moments_pending:  # once per placement, not a loop in every step
        return
    rt.host_moments_pending = False
    _allocate_on_host(rt, [group for group in rt.groups if not group.optimizer_on_device])


def _may_stream(rt: EngineRuntime, placement: Placement) -> bool:
    moving = [g for g in rt.groups if not g.host_only]
    return may_stream(placement, len(moving), rt.comm is None, rt.grad_accumulation)


def may_stream(placement: Placement, num_moving: int, one_rank: bool, accumulating: bool) -> bool:
    """Whether the streamed device step (engine/streamed_adam.py) can serve a placement's host
    groups: some groups stay on the host, every param chunk stays on the device (in place), on one
    rank, without gradient accumulation. The engine and `pstar estimate-memory` both ask it."""
    return placement.num_device_groups < num_moving and placement.params_fit and one_rank and not accumulating


def _plan_for_runtime(rt: EngineRuntime, extra_scratch: int = 0) -> Placement:
    """`plan_placement` with this engine's traced warm-up, config and device."""
    scratch = step_scratch_bytes(rt.groups) + extra_scratch
    return plan_placement(
        rt.groups, rt.tracer.chunk_budget_bytes(None), rt.tracer.peak_non_model_bytes,
        rt.config.mem_tracer.margin_use_ratio, rt.config.optimizer.use_hybrid_adam, scratch,
        device_capacity_bytes(rt.device, rt.manager.device_bytes))


def _put_optimizer_state_on_device(rt: EngineRuntime, group: ChunkGroup) -> None:
    manager = rt.manager
    budget = manager.current_budget_bytes()
    for chunk in group.optimizer_chunks:
        manager.ensure_on_device(chunk, budget_bytes=budget)  # master: uploaded; moments: zeros
        chunk.pinned_forever = True
        if chunk.host_flat is not None:
            manager.free_host(chunk)  # the device copy is the only one from now on


def _check_host_memory(rt: EngineRuntime, keep_resident: bool) -> None:
    """The host groups' moments are about to be allocated (and the device groups' host masters
    freed): check the memory cgroup has room for the difference. What is allocated already is
    in the cgroup's usage."""
    new_bytes = freed_bytes = 0
    for group in rt.groups:
        for chunk in group.optimizer_chunks:
            if group.optimizer_on_device and chunk.host_flat is not None:
                freed_bytes += chunk.nbytes
            elif not group.optimizer_on_device and chunk.host_flat is None:
                new_bytes += chunk.nbytes
    rt.copier.check_host_plan(max(0, new_bytes - freed_bytes), 0)
    if keep_resident:  # device groups' param chunks drop their host copies too
        freed_bytes += sum(g.param.nbytes for g in rt.groups
                           if g.optimizer_on_device and g.param.host_flat is not None)
    host_bytes = rt.manager.host_allocated_bytes + new_bytes - freed_bytes
    if host_bytes > rt.manager.host_budget_bytes and rt.config.host_memory_limit is not None:
        # A limit the user set is a limit: refuse now, before a step, rather than be OOM-killed.
        raise ModelTooLargeError(
            f"the optimizer state the device cannot hold needs {host_bytes:,} bytes of host memory "
            f"on this rank, over host_memory_limit ({rt.config.host_memory_limit:,}): give the device "
            "more (device_memory_limit), add GPUs, raise host_memory_limit if the host has the "
            "memory, or train a smaller model")
    if host_bytes > rt.manager.host_budget_bytes:
        log.warning("pstar: the optimizer groups the device cannot hold need %s bytes of host "
                    "memory with the param chunks' host copies, over the host budget of %s: "
                    "give the device more (device_memory_limit) if the host runs short",
                    f"{host_bytes:,}", f"{rt.manager.host_budget_bytes:,}")
