"""Re-packing the chunks in the order their tensors are first used in forward.

At init only the modules' registration order is known (the model has not run), so that is the
initial packing. The warm-up forward records the order in which parameters are first used; when it
differs, the first optimizer step re-packs the chunks on the host in that order (neighbours in time
become neighbours in memory, so one fetch serves consecutive modules) and the next iteration is
traced again as the warm-up of the new layout. For models whose modules are registered in the order
they run (pstar's GPT and Llama) this is a no-op.

The copy goes new chunk by new chunk and frees each old chunk as soon as all its tensors have moved;
if the host budget cannot hold both layouts' buffers at once, the layout stays as it is (logged).
"""

from __future__ import annotations

import logging

from engine.chunk import Chunk, ChunkGroup, Location, TensorInfo, plan_chunk_layout
from engine.runtime import EngineRuntime

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
    order = packing_order(rt.groups, first_used)
    layout = plan_chunk_layout([info.numel for info in order], rt.config.default_chunk_size)
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
    new_groups = _copy_into_new_groups(rt, regular, order, layout)
    manager.replace_groups(new_groups + [g for g in rt.groups if g.host_only])
    manager.repoint_all()
    rt.groups = manager.groups
    rt.infos = [info for group in rt.groups for info in group.tensors]
    rt.schedule.forget()
    rt.tracer.forget()
    return True


def _fits_twice(rt: EngineRuntime, regular: list[ChunkGroup], layout) -> bool:
    allocated_kinds = [c for c in regular[0].chunks if c.location is not Location.NOWHERE] if regular else []
    bytes_per_element = sum(c.dtype.itemsize for c in allocated_kinds)
    new_bytes = sum(capacity for capacity, _ in layout) * bytes_per_element
    return rt.manager.host_allocated_bytes + new_bytes <= rt.manager.host_budget_bytes


def _copy_into_new_groups(rt: EngineRuntime, regular: list[ChunkGroup], order: list[TensorInfo],
                          layout) -> list[ChunkGroup]:
    manager = rt.manager
    old_place = {id(info): (info.group, info.offset) for info in order}
    left_in_old = {id(group): len(group.tensors) for group in regular}
    new_groups = []
    for index, (capacity, members) in enumerate(layout):
        tensors = [order[t] for t, _ in members]
        template = regular[0]
        chunks = {kind: Chunk(0, c.kind, capacity, c.dtype)
                  for kind, c in (("param", template.param), ("grad", template.grad),
                                  ("master", template.master), ("exp_avg", template.exp_avg),
                                  ("exp_avg_sq", template.exp_avg_sq)) if c is not None}
        for info, (_, offset) in zip(tensors, members):
            info.offset = offset
        group = ChunkGroup(index=index, numel=capacity, tensors=list(tensors), param=chunks["param"],
                           master=chunks["master"], exp_avg=chunks["exp_avg"],
                           exp_avg_sq=chunks["exp_avg_sq"], grad=chunks.get("grad"))
        for kind in chunks:
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
