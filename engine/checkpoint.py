"""This rank's part of a checkpoint, read straight from its chunks and written back into them.

A shard state holds, for every chunk group, this rank's shard of the fp32 master, exp_avg and
exp_avg_sq chunks as flat tensors, the group's layout (every tensor's name, offset and shape, and
which elements of the whole chunk the shard covers), every tensor's Adam step count, plus the loss
scaler and the model's buffers, and the optimizer's parameter groups (each tensor's group index and
each group's hyper-parameters, restored into `optimizer.param_groups` on load). The compute-dtype
param chunks are not saved: after every optimizer step they are the masters cast, so loading recasts
them. A group of frozen tensors has no master: its weights are saved as "master" (the param chunk
in fp32) and it has no moments.

Because each saved piece is labelled with its tensor and position, loading does not need the same
chunk layout, chunk size or number of ranks: every rank takes, from the shard states of all saved
ranks, the elements of each tensor that its own shards hold now ("gather the shards into whole
chunks, re-split" without building any whole chunk). Loading files with `torch.load(mmap=True)`
reads only the pages a rank needs.

    state = model.shard_state()                       # this rank's shards, host copies
    model.load_shard_state([state_of_rank_0, ...])    # every saved rank's state (or one dict)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from engine.chunk import ChunkGroup, Location, TensorInfo
from engine.errors import EngineError
from engine.runtime import EngineRuntime

FORMAT = "pstar-shard-1"
STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")
_MOMENTS = ("exp_avg", "exp_avg_sq")


def shard_state(rt: EngineRuntime, own_entries: OrderedDict, param_ids: set[int], copy: bool) -> dict:
    """This rank's shards of every chunk group (see the module docstring).

    `copy` True clones every buffer to the host: the result stays valid after further steps.
    `copy` False returns the live chunk buffers (device ones too) for an immediate `torch.save`,
    which copies device storages to the host one at a time: a checkpoint then never holds a second
    copy of this rank's optimizer state in host memory. Call it between optimizer steps.
    """
    world_size = rt.comm.world_size if rt.comm is not None else 1
    rank = rt.comm.rank if rt.comm is not None else 0
    with rt.manager.lock:
        if rt.comm is not None:
            rt.comm.wait_reductions()  # nothing may still be writing into the shards
        groups = [_group_state(rt, group, copy) for group in rt.groups]
    buffers = {key: _host(value.detach(), copy) for key, value in own_entries.items()
               if id(value) not in param_ids}
    hypers = [{k: v for k, v in group.items() if k != "params"} for group in (rt.param_groups or [])]
    return {"format": FORMAT, "rank": rank, "world_size": world_size, "groups": groups,
            "buffers": buffers, "loss_scaler": rt.scaler.state_dict(), "param_groups": hypers}


def _group_state(rt: EngineRuntime, group: ChunkGroup, copy: bool) -> dict:
    shard = group.shard
    tensors = [{"name": info.names[0], "names": list(info.names), "offset": info.offset, "numel": info.numel,
                "shape": list(info.shape), "steps": info.num_steps, "param_group": info.param_group}
               for info in group.tensors]
    state = {"numel": group.numel, "shard_begin": shard.begin if shard else 0,
             "shard_numel": shard.numel if shard else group.numel, "tensors": tensors}
    for kind in STATE_KINDS:
        chunk = getattr(group, kind)
        if chunk is None:  # frozen: the weights are the param chunk's; there are no moments
            state[kind] = rt.copier.current_flat(group.param).to("cpu", torch.float32, copy=True) \
                if kind == "master" else None
            continue
        state[kind] = None if chunk.location is Location.NOWHERE else _host(rt.copier.current_flat(chunk), copy)
    return state


def _host(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    if copy:
        return tensor.to("cpu", copy=True)
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()  # torch.save writes a view's whole storage: keep only the view
    return tensor


# ---- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """Elements [tensor_begin, tensor_begin + length) of one tensor, found in one saved group at
    `storage_begin` of its flat (shard) tensors."""

    tensor_begin: int
    length: int
    storage_begin: int
    group: dict


@dataclass
class _SavedTensor:
    names: list[str]
    shape: tuple[int, ...]
    steps: int
    pieces: list[_Piece] = field(default_factory=list)


def load_shard_state(rt: EngineRuntime, own_entries: OrderedDict, infos_by_param: dict,
                     shards: list[dict]) -> None:
    """Write the saved shard states of every saved rank into this rank's chunks (any layout)."""
    saved = _index_tensors(shards)
    infos = [info for group in rt.groups for info in group.tensors]
    _check_same_tensors(infos, saved)
    with rt.manager.lock:
        if rt.comm is not None:
            rt.comm.wait_reductions()  # nothing may still read the shards being replaced
        for info in infos:
            _load_tensor(rt, info, saved[info.names[0]].pieces)
            info.num_steps = saved[info.names[0]].steps
            info.group.dense_spans = None  # the step counts' runs may differ now
            info.has_grad = False
        rt.hooks.discard_gradients()
        rt.manager.drop_all_gathered()  # they hold the old weights
    _load_buffers(own_entries, infos_by_param, shards[0]["buffers"])
    rt.scaler.load_state_dict(shards[0]["loss_scaler"])
    _load_param_groups(rt, shards[0].get("param_groups"))


def _load_param_groups(rt: EngineRuntime, saved: list[dict] | None) -> None:
    """The saved groups' hyper-parameters into `optimizer.param_groups` (as torch's
    load_state_dict does); a checkpoint from before groups were saved leaves them as they are."""
    if not saved or rt.param_groups is None:
        return
    if len(saved) != len(rt.param_groups):
        raise EngineError(f"the checkpoint has {len(saved)} optimizer parameter group(s), the "
                          f"optimizer {len(rt.param_groups)}: build the same groups as the saved run")
    for group, hyper in zip(rt.param_groups, saved):
        group.update(hyper)


def full_state_dict(shards: list[dict], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The plain model's state dict from every saved rank's shard state: each parameter assembled
    from its pieces (under each of its names, one shared tensor for tied ones), plus the buffers."""
    result: dict[str, torch.Tensor] = {}
    for name, tensor in _index_tensors(shards).items():
        whole = torch.empty(math.prod(tensor.shape), dtype=torch.float32, device="cpu")
        if _copy_overlaps(whole, 0, tensor.pieces, "master") != whole.numel():
            raise EngineError(f"the checkpoint lacks part of '{name}': some ranks' files are missing")
        weight = whole.view(tensor.shape).to(dtype)
        for alias in tensor.names:
            result[alias] = weight
    result.update(shards[0]["buffers"])
    return result


def _index_tensors(shards: list[dict]) -> dict[str, _SavedTensor]:
    """First name -> what the shard states hold of that tensor, every saved piece of it included."""
    _check_format(shards)
    saved: dict[str, _SavedTensor] = {}
    for shard in shards:
        for group in shard["groups"]:
            begin, end = group["shard_begin"], group["shard_begin"] + group["shard_numel"]
            for entry in group["tensors"]:
                name, offset = entry["name"], entry["offset"]
                tensor = saved.setdefault(name, _SavedTensor(list(entry.get("names", [name])),
                                                             tuple(entry["shape"]), int(entry["steps"])))
                lo, hi = max(offset, begin), min(offset + entry["numel"], end)
                if hi > lo:
                    tensor.pieces.append(_Piece(lo - offset, hi - lo, lo - begin, group))
    return saved


def _check_format(shards: list[dict]) -> None:
    if not shards:
        raise EngineError("load_shard_state: no shard states given")
    formats = {shard.get("format") for shard in shards}
    if formats != {FORMAT}:
        raise EngineError(f"load_shard_state: unknown shard format(s) {sorted(map(str, formats))}; "
                          f"this pstar reads {FORMAT}")
    world_sizes = {shard["world_size"] for shard in shards}
    ranks = sorted(shard["rank"] for shard in shards)
    if len(world_sizes) != 1 or ranks != list(range(world_sizes.pop())):
        raise EngineError(f"load_shard_state: need the shard state of every saved rank, got ranks {ranks}")


def _check_same_tensors(infos: list[TensorInfo], saved: dict[str, _SavedTensor]) -> None:
    mine = {info.names[0]: tuple(info.shape) for info in infos}
    missing = sorted(set(mine) - set(saved))
    unexpected = sorted(set(saved) - set(mine))
    wrong = sorted(name for name in set(mine) & set(saved) if mine[name] != saved[name].shape)
    problems = []
    if missing:
        problems.append(f"parameters missing from the checkpoint: {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"parameters the model does not have: {', '.join(unexpected[:5])}")
    for name in wrong[:5]:
        problems.append(f"'{name}' is {list(saved[name].shape)} in the checkpoint, {list(mine[name])} in the model")
    if problems:
        raise EngineError("the checkpoint is of a different model: " + "; ".join(problems))


def _load_tensor(rt: EngineRuntime, info: TensorInfo, saved: list[_Piece]) -> None:
    """This rank's piece of one tensor: masters and moments from the saved pieces, weights recast."""
    begin, tensor_begin, length = info.shard_piece()
    if length == 0:
        return  # wholly in other ranks' shards
    if not info.group.trainable:
        _load_frozen(rt, info, saved, begin, tensor_begin, length)
        return
    for kind in STATE_KINDS:
        chunk = getattr(info.group, kind)
        sources = [p for p in saved if p.group[kind] is not None]
        if kind in _MOMENTS and not sources:
            # Saved before this tensor's first step: its moments are zero. Chunks that exist
            # already may hold this engine's own moments from steps it took before the load.
            if chunk.location is not Location.NOWHERE:
                rt.copier.current_flat(chunk).narrow(0, begin, length).zero_()
                _mark_changed(chunk)
            continue
        if chunk.location is Location.NOWHERE:
            rt.manager.allocate_host(chunk)  # the first step after warm-up places it
        target = rt.copier.current_flat(chunk).narrow(0, begin, length)
        if _copy_overlaps(target, tensor_begin, sources, kind) != length:
            raise EngineError(f"the checkpoint lacks part of '{info.names[0]}' ({kind}): "
                              "some ranks' files are missing or damaged")
        _mark_changed(chunk)
    param = info.group.param
    master = rt.copier.current_flat(info.group.master).narrow(0, begin, length)
    rt.copier.current_flat(param).narrow(0, begin, length).copy_(master)  # cast, as a step does
    _mark_changed(param)


def _load_frozen(rt: EngineRuntime, info: TensorInfo, saved: list[_Piece], begin: int,
                 tensor_begin: int, length: int) -> None:
    """A frozen tensor: its saved weights straight into the param chunk (cast); no moments."""
    staged = torch.empty(length, dtype=torch.float32)
    if _copy_overlaps(staged, tensor_begin, saved, "master") != length:
        raise EngineError(f"the checkpoint lacks part of '{info.names[0]}': some ranks' files are "
                          "missing or damaged")
    param = info.group.param
    rt.copier.current_flat(param).narrow(0, begin, length).copy_(staged)
    _mark_changed(param)


def _copy_overlaps(target: torch.Tensor, tensor_begin: int, sources: list[_Piece], kind: str) -> int:
    """Copy every saved piece overlapping target's elements [tensor_begin, +len); elements copied."""
    end = tensor_begin + target.numel()
    copied = 0
    for piece in sources:
        lo, hi = max(tensor_begin, piece.tensor_begin), min(end, piece.tensor_begin + piece.length)
        if hi <= lo:
            continue
        flat = piece.group[kind]  # (shard_numel,) fp32
        source = flat.narrow(0, piece.storage_begin + lo - piece.tensor_begin, hi - lo)
        target.narrow(0, lo - tensor_begin, hi - lo).copy_(source)
        copied += hi - lo
    return copied


def _mark_changed(chunk) -> None:
    """A device copy written here is newer than the host copy (pinned optimizer chunks have none)."""
    if chunk.location is Location.DEVICE and not chunk.pinned_forever:
        chunk.dirty = True


def _load_buffers(own_entries: OrderedDict, infos_by_param: dict, buffers: dict) -> None:
    with torch.no_grad():
        for key, value in buffers.items():
            entry = own_entries.get(key)
            if entry is not None and id(entry) not in infos_by_param:
                entry.copy_(value)
