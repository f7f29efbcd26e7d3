"""Building the model straight into chunks, module by module, without a full copy in host RAM.

`model_func` runs with `meta` as the default device, so no parameter gets storage. The layout is
planned from the meta shapes (and refused if it cannot fit the budgets) before any memory is taken.
Then each module, in `model.modules()` order, gets its direct parameters as views of the fp32 master
chunk (and its buffers as real tensors), and is initialised in place by the model's own code:
`root.init_module_(module)` when the model has it (pstar's models; same RNG order as their plain CPU
build, hence the same weights for the same seed), else the module's `reset_parameters()`. The
compute-dtype param chunk is then cast from the masters.

With several ranks every rank runs the same init with the same RNG on a temporary fp32 tensor per
parameter (one module's parameters at a time; a tied parameter's until its last holder module has
run) and keeps only the piece of it that falls into its own shards, so the initial weights equal one
rank's and no rank ever holds more than its shards plus one module.

Before init, new parameters are filled with NaN (buffers with NaN / the integer maximum) so that an
init which misses something is detected rather than trained on. A model that cannot be built on meta,
or whose init is incomplete there, is built on the CPU instead (one log line says so) and copied into
chunks module by module, each original tensor freed as soon as it is copied.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.chunk import (ALIGN_ELEMENTS, ChunkGroup, Location, TensorInfo, TensorState, new_chunk_group,
                          plan_chunk_layout)
from engine.chunk_manager import ChunkManager
from engine.config import EngineConfig
from engine.device import planned_host_bytes
from engine.distributed import padded_capacity
from engine.errors import EngineError, ModelTooLargeError
from engine.param_groups import ParamGroupsFn, resolve_param_groups

log = logging.getLogger("pstar.engine")


class _MetaInitIncomplete(Exception):
    """Building on meta worked but initialising there cannot reproduce the model."""


@dataclass
class BuiltModel:
    module: nn.Module
    manager: ChunkManager
    groups: list[ChunkGroup]
    infos: list[TensorInfo]  # layout order
    param_order: list[TensorInfo]  # the model's parameters() order
    host_only_modules: list[nn.Module]
    param_group_hypers: list[dict]  # per optimizer group: the hyper-parameters it sets itself


def build_in_chunks(model_func: Callable[[], nn.Module], cfg: EngineConfig, dtype: torch.dtype,
                    device: torch.device, new_manager: Callable[[], ChunkManager],
                    param_groups: ParamGroupsFn | None = None) -> BuiltModel:
    rng_state = torch.random.get_rng_state()
    construction = Construction()
    module, why_not_meta = _construct_on_meta(model_func, construction)
    if why_not_meta is None:
        why_not_meta = _meta_init_problem(module)
    if why_not_meta is None:
        try:
            return _materialise(module, cfg, dtype, device, new_manager(), param_groups, construction)
        except _MetaInitIncomplete as incomplete:
            why_not_meta = str(incomplete)
    log.warning("pstar: building the model on the CPU first (%s); host memory briefly holds a full "
                "copy of it", why_not_meta)
    torch.random.set_rng_state(rng_state)  # same weights as if model_func had run on the CPU first
    if module is None or _has_meta_tensors(module):
        with torch.device("cpu"):
            module = model_func()
    return _materialise(module, cfg, dtype, device, new_manager(), param_groups, construction=None)


# ---- construction --------------------------------------------------------------------------

def _construct_on_meta(model_func, construction: "Construction") -> tuple[nn.Module | None, str | None]:
    try:
        with torch.device("meta"), construction.recording():
            module = model_func()
    except Exception as error:  # any failure on meta means "build it for real instead"
        return None, f"it cannot be built on the meta device: {type(error).__name__}: {error}"
    if not isinstance(module, nn.Module):
        raise EngineError(f"model_func must return a torch.nn.Module, got {type(module).__name__}")
    if not _has_meta_tensors(module):
        return module, "model_func placed its tensors on a real device itself"
    if any(not t.is_meta for t in _tensors(module)):
        raise EngineError("model_func built some tensors on 'meta' and others on a real device; "
                          "build all of them on the default device")
    return module, None


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def _has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in _tensors(module))


def _meta_init_problem(module: nn.Module) -> str | None:
    """Why this model's own init cannot be run module by module (None: it can)."""
    if callable(getattr(module, "init_module_", None)):
        return None
    for name, sub in module.named_modules():
        has_data = any(p is not None for p in sub._parameters.values()) or any(
            b is not None for b in sub._buffers.values())
        if has_data and not callable(getattr(sub, "reset_parameters", None)):
            return f"module '{name or type(module).__name__}' has no reset_parameters()"
        if any(b is not None and b.dtype == torch.bool for b in sub._buffers.values()):
            return f"module '{name}' has a bool buffer that meta init cannot check"
    return None


# ---- layout --------------------------------------------------------------------------------

def _unique_params(module: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """Distinct parameters in module order, each with every name it has (tied ones have several)."""
    by_id: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in by_id:
            by_id[id(param)] = (param, [])
        by_id[id(param)][1].append(name)
    for param, names in by_id.values():
        if not param.is_floating_point():
            raise EngineError(f"parameter '{names[0]}' has dtype {param.dtype}; pstar trains "
                              "floating-point parameters only")
    return list(by_id.values())


def _host_only_embeddings(module: nn.Module, use_cpu_embedding: bool) -> tuple[list[nn.Module], set[int]]:
    if not use_cpu_embedding:
        return [], set()
    holders: dict[int, list[nn.Module]] = {}
    for sub in module.modules():
        for param in sub._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(sub)
    chosen, ids = [], set()
    for sub in module.modules():
        if not isinstance(sub, nn.Embedding):
            continue
        if all(isinstance(h, nn.Embedding) for h in holders[id(sub.weight)]):
            chosen.append(sub)
            ids.add(id(sub.weight))
        else:
            log.info("pstar: use_cpu_embedding leaves an embedding on the device: its table is "
                     "shared with a non-embedding module (tied weights)")
    return chosen, ids


def _plan_groups(params: list[tuple[nn.Parameter, list[str]]], cfg: EngineConfig, dtype: torch.dtype,
                 host_only: bool, first_group: int, first_chunk: int,
                 rank_and_world: tuple[int, int] | None, group_of: dict[int, int]) -> list[ChunkGroup]:
    """Chunk groups for `params` in order: the trainable ones' chunks, then the frozen ones' (which
    hold no optimizer state, so they must not share a chunk group with trainable tensors)."""
    trainable = [p for p in params if p[0].requires_grad]
    frozen = [p for p in params if not p[0].requires_grad]
    groups: list[ChunkGroup] = []
    for chosen, is_trainable in ((trainable, True), (frozen, False)):
        groups += _plan_kind(chosen, cfg, dtype, host_only, first_group + len(groups),
                             first_chunk + sum(len(g.chunks) for g in groups), rank_and_world,
                             group_of, is_trainable)
    return groups


def _plan_kind(params: list[tuple[nn.Parameter, list[str]]], cfg: EngineConfig, dtype: torch.dtype,
               host_only: bool, first_group: int, first_chunk: int,
               rank_and_world: tuple[int, int] | None, group_of: dict[int, int],
               trainable: bool) -> list[ChunkGroup]:
    layout = plan_chunk_layout([p.numel() for p, _ in params], cfg.default_chunk_size)
    groups, chunk_id = [], first_chunk
    for index, (capacity, members) in enumerate(layout, start=first_group):
        tensors = []
        for param_index, offset in members:
            param, names = params[param_index]
            tensors.append(TensorInfo(param=param, names=names, offset=offset, numel=param.numel(),
                                      shape=param.shape, requires_grad=param.requires_grad,
                                      param_group=group_of.get(id(param), 0)))
        if rank_and_world is not None:
            capacity = padded_capacity(capacity, rank_and_world[1], ALIGN_ELEMENTS)
        group = new_chunk_group(index, capacity, tensors, dtype, cfg.gradient_accumulation_steps > 1,
                                host_only, chunk_id, rank_and_world, trainable=trainable)
        chunk_id += len(group.chunks)
        groups.append(group)
    return groups


def _rank_and_world(manager: ChunkManager) -> tuple[int, int] | None:
    comm = manager.comm
    return None if comm is None else (comm.rank, comm.world_size)


def _refuse_if_too_large(groups: list[ChunkGroup], manager: ChunkManager) -> None:
    need = sum(g.model_data_bytes for g in groups)
    available = manager.device_budget_bytes + manager.host_budget_bytes
    if need > available:
        raise ModelTooLargeError(
            f"the model's data (params, fp32 masters, Adam moments) needs {need:,} bytes but the "
            f"device and host budgets allow {manager.device_budget_bytes:,} + "
            f"{manager.host_budget_bytes:,} = {available:,} bytes: raise device_memory_limit / "
            "host_memory_limit (or the mem_tracer ratios), or train a smaller model"
        )


# ---- materialisation -----------------------------------------------------------------------

def _materialise(module: nn.Module, cfg: EngineConfig, dtype: torch.dtype, device: torch.device,
                 manager: ChunkManager, param_groups: ParamGroupsFn | None,
                 construction: "Construction | None") -> BuiltModel:
    """`construction` is the meta build's record (None: the model was built on the CPU and is
    copied as it is)."""
    on_meta = construction is not None
    params = _unique_params(module)
    group_hypers, group_of = resolve_param_groups(module, param_groups, params)
    host_only_modules, host_only_ids = _host_only_embeddings(module, cfg.use_cpu_embedding)
    regular = [p for p in params if id(p[0]) not in host_only_ids]
    host_side = [p for p in params if id(p[0]) in host_only_ids]
    sharding = _rank_and_world(manager)
    groups = _plan_groups(regular, cfg, dtype, host_only=False, first_group=0, first_chunk=0,
                          rank_and_world=sharding, group_of=group_of)
    num_chunks = sum(len(g.chunks) for g in groups)
    groups += _plan_groups(host_side, cfg, dtype, host_only=True, first_group=len(groups),
                           first_chunk=num_chunks, rank_and_world=sharding, group_of=group_of)
    _refuse_if_too_large(groups, manager)
    # Host limits (memory cgroup, ulimit -l) checked before any chunk buffer is allocated.
    manager.copier.check_host_plan(*planned_host_bytes(groups, pins=manager.copier.is_cuda))
    manager.add_groups(groups)
    infos = [info for g in groups for info in g.tensors]
    by_original_id = {id(info.param): info for info in infos}
    param_order = [by_original_id[id(param)] for param, _ in params]
    init_module = getattr(module, "init_module_", None)
    init_device = device if cfg.init_device == "auto" else torch.device("cpu")
    holders = _holder_slots(module, by_original_id)
    initialisers = _initialisers(holders, construction, init_module is not None)
    staging = _Staging(manager, by_original_id, init_device, initialisers)
    with torch.no_grad():
        for sub in _init_order(module, construction, init_module is not None):
            if on_meta:
                _init_module_on_meta(sub, init_module, by_original_id, staging, initialisers)
            else:
                _copy_module_into_chunks(sub, by_original_id, staging)
            for name, buf in sub._buffers.items():
                if buf is not None:
                    sub._buffers[name] = buf.to(device)
    for sub, name, info, _ in holders:  # every holder of a tied parameter ends on its one Parameter
        sub._parameters[name] = info.param
    for group in groups:
        if group.host_only and group.grad is not None:
            manager.allocate_host(group.grad)
    return BuiltModel(module, manager, groups, infos, param_order, host_only_modules, group_hypers)


_BOUNCE_ELEMENTS = 16 * 1024 * 1024  # 64 MiB of fp32 per GPU -> host copy through pinned memory


def _stage_in_temporaries(sharded: bool, init_device: torch.device) -> bool:
    """Whether init runs on temporary tensors rather than straight in the host master chunks."""
    return sharded or init_device.type != "cpu"


class _Staging:
    """Where a parameter's whole fp32 value lives while the modules holding it initialise it.

    One rank initialising on the CPU: a view of the fp32 master chunk, so init writes straight into
    the chunk. Several ranks, or init on the GPU (`init_device: auto` with CUDA, where the RNG is
    ~100x faster than the CPU's): a temporary tensor on the init device, kept until the last module
    holding the (possibly tied) parameter has run its init; each holder's result is then written
    into this rank's part of the master and param chunks."""

    def __init__(self, manager: ChunkManager, by_original_id: dict[int, TensorInfo],
                 init_device: torch.device, initialisers: dict[int, set[int]]):
        self.manager = manager
        self.sharded = manager.comm is not None
        self.init_device = init_device
        self.temporary = _stage_in_temporaries(self.sharded, init_device)
        self._whole: dict[int, torch.Tensor] = {}  # id(info) -> its temporary whole value
        self._bounce: dict[torch.dtype, torch.Tensor] = {}  # page-locked staging for GPU -> host copies
        # id(info) -> modules whose init writes it and have not run yet
        self._holders_left: dict[int, int] = {id(info): len(initialisers[id(info)])
                                              for info in by_original_id.values()}

    def _temporary_for(self, info: TensorInfo) -> bool:
        # A frozen tensor has no fp32 master chunk: its init runs on a temporary, then is cast.
        return self.temporary or not info.group.trainable

    def _storage(self, info: TensorInfo) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(master, param) host buffers of the tensor's group, allocated on first use; master is
        None for frozen tensors."""
        group = info.group
        for chunk in (group.master, group.param):
            if chunk is not None and chunk.location is Location.NOWHERE:
                self.manager.allocate_host(chunk)
        master = group.master.host_flat if group.master is not None else None
        return master, group.param.host_flat

    def master(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's whole fp32 value, shaped like it (NaN until something initialises it)."""
        master, _ = self._storage(info)
        if not self._temporary_for(info):
            return info.view_of(master)
        if id(info) not in self._whole:
            self._whole[id(info)] = torch.full(info.shape, float("nan"), dtype=torch.float32,
                                               device=self.init_device)
        return self._whole[id(info)]

    def finish(self, info: TensorInfo) -> None:
        """One holder module has initialised `info`: keep the result, point the parameter at it."""
        master, param = self._storage(info)
        if not self._temporary_for(info):
            compute = info.view_of(param)
            compute.copy_(info.view_of(master))
            info.param.data = compute
            return
        self._keep_shard_piece(info, self._whole[id(info)])
        self._holders_left[id(info)] -= 1
        if self._holders_left[id(info)] > 0:
            info.param.data = self._whole[id(info)]  # the next holder's init starts from it
            return
        del self._whole[id(info)]
        if not self.temporary:  # a frozen tensor on one rank: it lives in the param chunk
            info.param.data = info.view_of(param)
            return
        if self.sharded:
            info.param.data = torch.empty(0, dtype=param.dtype, device="cpu")  # the chunks hold it now
        else:
            info.param.data = info.view_of(param)

    def store(self, info: TensorInfo, value: torch.Tensor) -> None:
        """Take an already initialised value (a model built on the CPU) into the chunks."""
        master, param = self._storage(info)
        if not self.sharded:
            if master is None:  # frozen: only the compute-dtype copy is kept
                info.view_of(param).copy_(value.reshape(info.shape))
                info.param.data = info.view_of(param)
                return
            info.view_of(master).copy_(value.reshape(info.shape))
            info.view_of(param).copy_(info.view_of(master))
            info.param.data = info.view_of(param)  # the original storage is freed
            return
        self._keep_shard_piece(info, value)
        info.param.data = torch.empty(0, dtype=param.dtype, device="cpu")

    def _keep_shard_piece(self, info: TensorInfo, whole: torch.Tensor) -> None:
        master, param = self._storage(info)
        if self.sharded:
            begin, tensor_begin, length = info.shard_piece()
            piece = whole.reshape(-1).narrow(0, tensor_begin, length)
            param = param.narrow(0, begin, length)
            master = None if master is None else master.narrow(0, begin, length)
        else:
            piece, param = whole, info.view_of(param)
            master = None if master is None else info.view_of(master)
        if master is not None:
            self._download(master, piece)
        self._download(param, piece)  # cast where the value is (on the GPU, half the bytes cross PCIe)

    def _download(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst (host, contiguous) <- src. From a GPU into pageable memory, a copy runs at about
        1.5 GB/s; through a reused page-locked bounce buffer it runs at copy-engine speed, plus a
        host memcpy on all threads."""
        if src.device.type != "cuda" or dst.is_pinned():
            dst.copy_(src.reshape(dst.shape))
            return
        bounce = self._bounce.get(dst.dtype)
        if bounce is None:
            bounce = self._bounce[dst.dtype] = torch.empty(_BOUNCE_ELEMENTS, dtype=dst.dtype, device="cpu",
                                                           pin_memory=True)
        flat_src, flat_dst = src.reshape(-1), dst.view(-1)
        for start in range(0, flat_dst.numel(), _BOUNCE_ELEMENTS):
            length = min(_BOUNCE_ELEMENTS, flat_dst.numel() - start)
            staged = bounce[:length]
            staged.copy_(flat_src[start:start + length])
            flat_dst[start:start + length].copy_(staged)


def _init_module_on_meta(sub: nn.Module, init_module, by_original_id, staging: _Staging,
                         initialisers: dict[int, set[int]]) -> None:
    buffers = [(name, b) for name, b in sub._buffers.items() if b is not None]
    direct, borrowed = [], []
    for name, param in sub._parameters.items():
        if param is not None:
            writes = id(sub) in initialisers[id(by_original_id[id(param)])]
            (direct if writes else borrowed).append((name, param))
    if not direct and not borrowed and not buffers:
        return
    for name, param in borrowed:
        # Tied in from the module that created it: this module's init runs on a throw-away, as in
        # a plain build, where it drew from the RNG for a tensor the tie then replaced.
        throwaway = nn.Parameter(torch.empty(param.shape, dtype=torch.float32, device=staging.init_device),
                                 requires_grad=param.requires_grad)
        throwaway.__dict__.update(param.__dict__)
        sub._parameters[name] = throwaway
    fresh: list[TensorInfo] = []
    for name, param in direct:
        info = by_original_id[id(param)]
        master = staging.master(info)
        if info.state is TensorState.FREE:  # first holder of this (possibly tied) parameter
            master.fill_(float("nan"))
            new = nn.Parameter(master, requires_grad=param.requires_grad)
            new.__dict__.update(param.__dict__)  # keep attributes models hang on parameters
            info.param = new
            info.state = TensorState.HOLD
            fresh.append(info)
        else:
            info.param.data = master  # a later holder's init writes the fp32 master too
        sub._parameters[name] = info.param
    for name, buf in buffers:
        if buf.is_meta:
            sub._buffers[name] = _sentinel_like(buf, staging.init_device)
    with torch.device(staging.init_device):  # anything the init creates lands beside its RNG
        if init_module is not None:
            init_module(sub)
        else:
            sub.reset_parameters()
    for name, param in direct:
        info = by_original_id[id(param)]
        master = staging.master(info)
        if info.param.data.data_ptr() != master.data_ptr():  # init replaced .data: take its values
            master.copy_(info.param.data)
    _check_initialised(sub, fresh, staging)
    for name, param in direct:
        staging.finish(by_original_id[id(param)])


def _holder_slots(root: nn.Module, by_original_id: dict[int, TensorInfo]
                  ) -> list[tuple[nn.Module, str, TensorInfo, nn.Parameter]]:
    """(module, name, info, original parameter) for every registration of every parameter."""
    return [(sub, name, by_original_id[id(param)], param) for sub in root.modules()
            for name, param in sub._parameters.items() if param is not None and id(param) in by_original_id]


def _initialisers(holders, construction: "Construction | None", apply_style: bool) -> dict[int, set[int]]:
    """id(info) -> ids of the modules whose init writes the tensor.

    A model with `init_module_` initialises after construction over `modules()` (as nn.Module.apply
    does): every holder of a tied tensor writes the one tensor, the last one wins. Otherwise each
    module's default init ran in its constructor on the tensors it created, so a tied tensor holds
    the init of the module that created it (registered it first), whatever the order of the tie."""
    result: dict[int, set[int]] = {}
    for sub, _, info, _ in holders:
        result.setdefault(id(info), set()).add(id(sub))
    if construction is None or apply_style:
        return result
    for _, _, info, original in holders:
        creator = construction.creator_of(original)
        if creator is not None and id(creator) in result[id(info)]:
            result[id(info)] = {id(creator)}
    return result


def _init_order(root: nn.Module, construction: "Construction | None", apply_style: bool) -> list[nn.Module]:
    """The order modules run their init: `modules()` for `init_module_` models (its contract), else
    the order the meta build constructed them in (a plain build ran each default init then)."""
    modules = list(root.modules())
    if construction is None or apply_style:
        return modules
    return sorted(modules, key=construction.index_of)  # stable: unseen modules keep their order


class Construction:
    """What the meta build registered, in order: for each parameter the module that registered it
    first (the module that created it; a tie registers it again elsewhere), and for each module when
    it first registered a tensor (its construction order). Recorded with torch's module registration
    hooks, installed only while `model_func` runs."""

    def __init__(self):
        self._creator: dict[int, nn.Module] = {}
        self._index: dict[int, int] = {}
        self._seen: list = []  # keeps every recorded object alive, so no id is reused meanwhile

    @contextlib.contextmanager
    def recording(self):
        from torch.nn.modules import module as torch_module
        handles = [torch_module.register_module_parameter_registration_hook(self._on_tensor),
                   torch_module.register_module_buffer_registration_hook(self._on_tensor)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _on_tensor(self, module: nn.Module, name: str, tensor) -> None:
        if tensor is None:
            return
        self._seen.append((module, tensor))
        self._index.setdefault(id(module), len(self._index))
        if isinstance(tensor, nn.Parameter):
            self._creator.setdefault(id(tensor), module)

    def creator_of(self, param: nn.Parameter) -> nn.Module | None:
        return self._creator.get(id(param))

    def index_of(self, module: nn.Module) -> float:
        return self._index.get(id(module), math.inf)


def _check_initialised(sub: nn.Module, fresh: list[TensorInfo], staging: _Staging) -> None:
    for info in fresh:
        if torch.isnan(staging.master(info)).any():
            raise _MetaInitIncomplete(f"{type(sub).__name__}'s init left parameter "
                                      f"'{info.names[0]}' unset on meta")
    for name, buf in sub._buffers.items():
        if buf is not None and _still_sentinel(buf):
            raise _MetaInitIncomplete(f"{type(sub).__name__}'s init left buffer '{name}' unset on meta")


def _sentinel_like(buf: torch.Tensor, device: torch.device) -> torch.Tensor:
    real = torch.empty_like(buf, device=device)
    if real.is_floating_point():
        return real.fill_(float("nan"))
    if real.dtype == torch.bool:
        return real.fill_(False)
    return real.fill_(torch.iinfo(real.dtype).max)


def _still_sentinel(buf: torch.Tensor) -> bool:
    if buf.numel() == 0 or buf.dtype == torch.bool:
        return False
    if buf.is_floating_point():
        return bool(torch.isnan(buf).any())
    return bool((buf == torch.iinfo(buf.dtype).max).all())


def _copy_module_into_chunks(sub: nn.Module, by_original_id, staging: _Staging) -> None:
    for param in sub._parameters.values():
        if param is None:
            continue
        info = by_original_id[id(param)]
        if info.state is not TensorState.FREE:
            continue
        staging.store(info, param.data)  # drops the original storage: host RAM is freed module by module
        info.state = TensorState.HOLD
