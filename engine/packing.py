"""Re-packing the chunks in the order their tensors are first used in forward.

At init only the modules' registration order is known (the model has not run), so that is the
initial packing. The warm-up forward records the order in which parameters are first used; when it
differs, the first optimizer step re-packs the chunks on the host in that order (neighbours in time
become neighbours in memory, so one fetch serves consecutive modules) and the next iteration is
traced again as the warm-up of the new layout. For models whose modules are registered in the order
they run (pstar's GPT and Llama) this is a no-op.

The copy goes new chunk by new chunk and frees each old chunk as soon as all its tensors have moved;
if the host budget cannot hold both layouts' buffers at once, the layout stays as it is (logged).
With several ranks a tensor's piece in this rank's new shard may lie in another rank's old shard, so
the copy goes old chunk by old chunk instead: each is all-gathered (every rank, in the same order),
this rank takes what its new shards need, and the old shards are freed.
"""

from __future__ import annotations

import logging

import torch

from engine.chunk import (ALIGN_ELEMENTS, Chunk, ChunkGroup, Location, TensorInfo, new_chunk_group,
                          plan_chunk_layout)
from engine.distributed import gather_flat, padded_capacity
from engine.runtime import EngineRuntime

_STORAGE_KINDS = ("param", "grad", "master", "exp_avg", "exp_avg_sq")

log = logging.getLogger("pstar.engine")


def packing_order(groups: list[ChunkGroup], first_used: list[TensorInfo]) -> list[TensorInfo]:
    """First-used tensors in that order, then the never-used ones in their current order."""
    regular = [info for group in groups if not group.host_only for info in group.tensors]
    used = [info for info in first_used if not info.group.host_only]
    used_ids = {id(info) for info in used}
    return used + [info for info in regular if id(info) not in used_ids]


def repack_in_first_use_order(rt: EngineRuntime, first_used: list[TensorInfo]) -> bool:
    """Re-pack the movable chunk groups in first-use order; True when the layout changed."""
    regular = [g for g in rt.groups if not g.host_only]
    used_order = packing_order(rt.groups, first_used)
    # Frozen tensors (no optimizer state) are packed after the trainable ones, in their own chunks.
    order = [i for i in used_order if i.requires_grad] + [i for i in used_order if not i.requires_grad]
    num_trainable = sum(1 for i in order if i.requires_grad)
    layout = plan_chunk_layout([info.numel for info in order[:num_trainable]], rt.config.default_chunk_size)
    layout += [(capacity, [(t + num_trainable, offset) for t, offset in members]) for capacity, members
               in plan_chunk_layout([info.numel for info in order[num_trainable:]], rt.config.default_chunk_size)]
    if rt.comm is not None:
        layout = [(padded_capacity(capacity, rt.comm.world_size, ALIGN_ELEMENTS), members)
                  for capacity, members in layout]
    current = {id(info): (g_index, info.offset) for g_index, g in enumerate(regular) for info in g.tensors}
    proposed = {id(order[t]): (c_index, offset)
                for c_index, (_, members) in enumerate(layout) for t, offset in members}
    if proposed == current:
        return False
    if not _fits_twice(rt, regular, layout):
        log.info("pstar: keeping the init packing order: the host budget cannot hold the old and "
                 "the re-packed chunks at once")
        return False
    manager = rt.manager
    for group in regular:
        for chunk in group.chunks:
            if chunk.location is Location.DEVICE:
                manager.evict(chunk)
    if rt.comm is None:
        new_groups = _copy_into_new_groups(rt, regular, order, layout)
    else:
        new_groups = _copy_into_new_shards(rt, regular, order, layout)
    manager.replace_groups(new_groups + [g for g in rt.groups if g.host_only])
    manager.repoint_all()
    rt.groups = manager.groups
    rt.infos = [info for group in rt.groups for info in group.tensors]
    rt.schedule.forget()
    rt.tracer.forget()
    return True


def _fits_twice(rt: EngineRuntime, regular: list[ChunkGroup], layout) -> bool:
    allocated_kinds = [c for c in regular[0].chunks if c.location is not Location.NOWHERE
                       and c is not regular[0].gathered] if regular else []
    bytes_per_element = sum(c.dtype.itemsize for c in allocated_kinds)
    num_ranks = rt.comm.world_size if rt.comm is not None else 1
    new_bytes = sum(capacity // num_ranks for capacity, _ in layout) * bytes_per_element
    return rt.manager.host_allocated_bytes + new_bytes <= rt.manager.host_budget_bytes


def _copy_into_new_groups(rt: EngineRuntime, regular: list[ChunkGroup], order: list[TensorInfo],
                          layout) -> list[ChunkGroup]:
    manager = rt.manager
    old_place = {id(info): (info.group, info.offset) for info in order}
    left_in_old = {id(group): len(group.tensors) for group in regular}
    new_groups = []
    for index, (capacity, members) in enumerate(layout):
        tensors = [order[t] for t, _ in members]
        group = _new_group(rt, regular[0], index, capacity, tensors, members)
        for kind in _STORAGE_KINDS:
            if getattr(group, kind) is not None:
                _fill(manager, rt, getattr(group, kind), kind, tensors, old_place)
        new_groups.append(group)
        for info in tensors:  # free each old chunk group as soon as all its tensors have moved
            old_group = old_place[id(info)][0]
            left_in_old[id(old_group)] -= 1
            if left_in_old[id(old_group)] == 0:
                for chunk in old_group.chunks:
                    if chunk.host_flat is not None:
                        manager.free_host(chunk)
    return new_groups


def _new_group(rt: EngineRuntime, template: ChunkGroup, index: int, capacity: int,
               tensors: list[TensorInfo], members) -> ChunkGroup:
    """A group like `template` for `tensors` at the layout's offsets (chunk ids set later)."""
    for info, (_, offset) in zip(tensors, members):
        info.offset = offset
    sharding = (rt.comm.rank, rt.comm.world_size) if rt.comm is not None else None
    return new_chunk_group(index, capacity, list(tensors), template.param.dtype,
                           rt.grad_accumulation, host_only=False, first_chunk_id=0,
                           rank_and_world=sharding, trainable=tensors[0].requires_grad)


def _copy_into_new_shards(rt: EngineRuntime, regular: list[ChunkGroup], order: list[TensorInfo],
                          layout) -> list[ChunkGroup]:
    """Several ranks: every old chunk is gathered whole once; each tensor's piece in this rank's
    new shards is cut from it; old shards are freed group by group."""
    manager = rt.manager
    old_place = {id(info): info.offset for info in order}
    new_groups = [_new_group(rt, regular[0], index, capacity, [order[t] for t, _ in members], members)
                  for index, (capacity, members) in enumerate(layout)]
    for old_group in regular:  # the same order on every rank: each gather is a collective
        for kind in _STORAGE_KINDS:
            old = getattr(old_group, kind)
            if old is None or old.location is Location.NOWHERE:
                continue  # nothing of this kind exists yet (moments before the first step)
            whole = gather_flat(rt.comm, old, rt.copier.current_flat)
            for info in old_group.tensors:
                _copy_piece(manager, getattr(info.group, kind), info, whole, old_place[id(info)])
        for chunk in old_group.chunks:
            if chunk.host_flat is not None:
                manager.free_host(chunk)
    return new_groups


def _copy_piece(manager, chunk: Chunk, info: TensorInfo, old_whole: torch.Tensor, old_offset: int) -> None:
    """This rank's piece of `info` in its new group's `chunk`, from the old whole chunk."""
    if chunk.location is Location.NOWHERE:
        manager.allocate_host(chunk)
    begin, tensor_begin, length = info.shard_piece()
    chunk.host_flat.narrow(0, begin, length).copy_(old_whole.narrow(0, old_offset + tensor_begin, length))


def _fill(manager, rt: EngineRuntime, chunk: Chunk, kind: str, tensors: list[TensorInfo], old_place) -> None:
    sources = [(info, getattr(old_place[id(info)][0], kind), old_place[id(info)][1]) for info in tensors]
    if all(src.location is Location.NOWHERE for _, src, _ in sources):
        return  # nothing of this kind exists yet (moments before the first step)
    manager.allocate_host(chunk)
    for info, src, old_offset in sources:
        if src.location is Location.NOWHERE:
            continue
        flat = rt.copier.current_flat(src)
        info.region_of(chunk.host_flat).copy_(flat.narrow(0, old_offset, info.numel))
