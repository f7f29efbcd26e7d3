"""`initialize_engine`: the seed's entry point, and the model wrapper it returns.

    model, optimizer = initialize_engine(model_func=lambda: MyModel(...), local_rank=0, config=cfg,
                                         param_groups=lambda m: weight_decay_groups(m, 0.1))
    for step, (x, y) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)   # any schedule, per group: read at every step()
        optimizer.zero_grad()
        loss = model(x, y)
        model.backward(loss)
        optimizer.step()

Lifecycle:
1. Init. `model_func` runs on the `meta` device; the layout of parameters in chunks is planned from
   the shapes (refused if model data cannot fit device + host budgets), then every module is
   materialised straight into fp32 master / compute-dtype param chunks on the host and initialised
   by the model's own code (see engine/init.py). `init_device: auto` (the default) runs that init
   on the compute device (on a GPU its RNG is ~100x the CPU's; the weights equal a plain build made
   there with the same seed); `cpu` runs it on the host (the weights of a plain CPU build).
2. Warm-up: the first forward + backward with autograd on. Chunks are fetched on demand within
   `warmup_gpu_chunk_mem_ratio` of the device budget (least recently used evicted first), while the
   memory tracer records non-model memory per moment and the schedule records the chunk order.
   The first `optimizer.step()` then places optimizer state: as many chunk groups on the device as
   the margin allows, the rest on the host (engine/optimizer_placement.py).
3. Steady state: each access follows the recorded schedule: the chunk budget of a moment is the device
   budget minus the moment's non-model peak, evictions are Belady's (farthest next use first) and the
   next chunk is prefetched (on CUDA on a side stream from pinned host memory).

Parameter groups: `param_groups` is `fn(module) -> list[dict]` in torch.optim's format, called on
the model as built on meta (engine/param_groups.py; `weight_decay_groups` is nanoGPT's rule).
`optimizer.param_groups` has one dict per group (lr, betas, eps, weight_decay), read at every
`step()`: a schedule sets them any time before `step()`, and torch's lr_scheduler classes work.
`zero_grad()` discards a backward, as in torch. Frozen parameters (requires_grad False) live in
chunks of their own with no optimizer state (2 B/param in bf16); they move like any chunk.

Gradients: with `gradient_accumulation_steps` 1, a gradient is written over its weight in the param
chunk, so each `model.backward()` must be followed by `optimizer.step()` (which consumes the
gradients) or `optimizer.zero_grad()` (which restores the weights) before the next forward. With
more steps, gradients accumulate in separate grad chunks until `zero_grad()`.

Several ranks (engine/distributed.py): under a process group of world_size > 1 (created here from
torchrun's environment when the script has not created one; `local_rank` defaults to LOCAL_RANK)
every chunk is split into world_size shards and rank r keeps shard r; param chunks are all-gathered
before use and gradients reduce-scattered after backward, averaged over ranks, so training equals one
rank with the same global batch. Every rank must call every method below in the same order.
`device_memory_limit` and `host_memory_limit` are per rank; without `host_memory_limit`, the
machine's `overall_cpu_mem_ratio` share of host memory is divided among its ranks (LOCAL_WORLD_SIZE).
`state_dict()` gathers the full fp32 weights on *every* rank (as host tensors; a collective), and
`load_state_dict(sd)` takes the full dict on every rank and keeps each rank's shard.

`release_after_init` is accepted for compatibility with PatrickStar configs: pstar never builds a
second copy of the parameters to release. Weights are changed through `load_state_dict`, not by
writing into parameters directly (the engine tracks which chunk copies are current).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from engine import checkpoint
from engine.chunk import ChunkKind, Location, TensorInfo
from engine.chunk_manager import ChunkManager
from engine.config import EngineConfig, resolve_engine_config
from engine.device import Copier, device_total_bytes, host_total_bytes, pick_compute_device
from engine.distributed import Comm, connect, gather_flat, local_rank_from_env
from engine.errors import EngineError
from engine.hooks import EngineHooks
from engine.init import BuiltModel, build_in_chunks
from engine.memory_tracer import MemoryTracer
from engine.optimizer import HybridAdam
from engine.param_groups import ParamGroupsFn
from engine.precision import LossScaler, compute_dtype
from engine.runtime import EngineRuntime
from engine.schedule import AccessSchedule

_OPTIMIZER_KINDS = (ChunkKind.MASTER, ChunkKind.EXP_AVG, ChunkKind.EXP_AVG_SQ)


def initialize_engine(model_func: Callable[[], nn.Module], local_rank: int | None = None,
                      config: dict | None = None,
                      param_groups: ParamGroupsFn | None = None) -> tuple["EngineModel", HybridAdam]:
    cfg = resolve_engine_config(config or {})
    device = pick_compute_device(local_rank_from_env(local_rank), cfg.compute_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    comm = connect(device)
    if comm is not None and cfg.use_cpu_embedding:
        raise EngineError("use_cpu_embedding is not supported with several ranks: set it to false")
    dtype = compute_dtype(cfg)
    device_budget, host_budget = _budgets(cfg, device, comm)
    copier = Copier(device)

    def new_manager() -> ChunkManager:
        tracer = MemoryTracer(device, device_budget, cfg.mem_tracer.warmup_gpu_chunk_mem_ratio,
                              budget_shared_with_others=cfg.device_memory_limit is None)
        return ChunkManager(copier, AccessSchedule(), tracer, device_budget, host_budget, comm)

    built = build_in_chunks(model_func, cfg, dtype, device, new_manager, param_groups)
    built.manager.init_host_bytes = built.manager.host_allocated_bytes  # what init planned on the host
    built.manager.repoint_all()  # on CUDA: evicted-weight placeholders until the first fetch
    runtime = EngineRuntime(config=cfg, device=device, compute_dtype=dtype, copier=copier,
                            schedule=built.manager.schedule, tracer=built.manager.tracer,
                            manager=built.manager, scaler=LossScaler(cfg.fp16), groups=built.groups,
                            infos=built.infos, param_order=built.param_order, comm=comm)
    model = EngineModel(built, runtime)
    return model, HybridAdam(runtime, built.param_group_hypers)


def _budgets(cfg: EngineConfig, device: torch.device, comm: Comm | None) -> tuple[int, int]:
    """(device, host) bytes for this rank. Explicit limits are per rank; a share of the machine's
    memory is divided among the ranks on it (the host's, and the CPU's when it is the compute
    device). With several ranks every rank takes the smallest rank's budgets, so that all of them
    make the same placement decisions."""
    local_ranks = comm.local_world_size if comm is not None else 1
    device_budget = cfg.device_memory_limit
    if device_budget is None:
        device_budget = int(device_total_bytes(device) * cfg.mem_tracer.overall_gpu_mem_ratio)
        if device.type == "cpu":
            device_budget //= local_ranks
    host_budget = cfg.host_memory_limit
    if host_budget is None:
        host_budget = int(host_total_bytes() * cfg.mem_tracer.overall_cpu_mem_ratio) // local_ranks
    if comm is not None:
        device_budget, host_budget = comm.agree_min(device_budget), comm.agree_min(host_budget)
    return device_budget, host_budget


def _inputs_on(device: torch.device, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The forward's inputs with every tensor on the compute device, following nested lists, tuples
    and dicts. The engine chooses the device, so a batch from the host (a DataLoader, token ids
    read from disk) is moved there, as the model's weights were; tensors already there pass as
    they are. Moving a batch ahead of time from pinned memory overlaps the copy with compute."""
    leaves = tree_leaves((args, kwargs))
    if all(leaf.device == device for leaf in leaves if isinstance(leaf, torch.Tensor)):
        return args, kwargs
    return tree_map_only(torch.Tensor, lambda t: t if t.device == device else t.to(device, non_blocking=True),
                         (args, kwargs))


class EngineModel(nn.Module):
    """The user's model, trained by the engine. `module` is the wrapped nn.Module."""

    def __init__(self, built: BuiltModel, runtime: EngineRuntime):
        super().__init__()
        self.module = built.module
        self._rt = runtime
        self._infos_by_param = {id(info.param): info for info in built.infos}
        self._hooks = EngineHooks(built.module, built.manager, self._infos_by_param,
                                  runtime.grad_accumulation, runtime.device, built.host_only_modules,
                                  on_backward_end=runtime.end_backward,
                                  first_used=runtime.first_used)
        self._hooks.install()
        runtime.hooks = self._hooks

    @property
    def device(self) -> torch.device:
        """Where the model computes (a GPU where there is one); forward moves its inputs here."""
        return self._rt.device

    def forward(self, *args, **kwargs):
        start = time.perf_counter()
        args, kwargs = _inputs_on(self._rt.device, args, kwargs)
        self._hooks.begin_forward()
        if self._hooks.settled:
            self._hooks.refuse_forward_over_gradients()
        self._rt.begin_forward()
        self._hooks.hold_outside_reads()
        try:
            with self._hooks.saved_tensors_context(), self._hooks.outside_reads_context():
                output = self.module(*args, **kwargs)
        finally:
            self._hooks.end_forward()
            self._hooks.release_outside_reads()
        if self._hooks.retrace:
            self._hooks.retrace = False
            self._rt.retrace_after_backward = True  # the next warm-up holds them from the start
        if not torch.is_grad_enabled():
            self._rt.end_forward_without_grad()
        self._rt.add_time("forward", start)
        return output

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled by the fp16 loss scale when fp16 is on."""
        start = time.perf_counter()
        scaler = self._rt.scaler
        if scaler.enabled:
            loss = loss.float() * scaler.scale
        ends_before = self._rt.num_backward_ends
        loss.backward()
        if self._rt.num_backward_ends == ends_before:
            # The graph reached no chunk, so the hooks queued no end-of-backward callback. Ending
            # it only then spares a second wait for the gradient reductions of several ranks.
            self._rt.end_backward()
        self._rt.add_time("backward", start)

    # ---- state -----------------------------------------------------------------------------

    def _own_entries(self) -> OrderedDict:
        return self.module.state_dict(keep_vars=True)

    def state_dict(self, *args, **kwargs) -> OrderedDict:
        """The plain model's keys: parameters as their fp32 masters (tied ones under each name).
        With several ranks: gathered from every rank's shards, on every rank (host tensors)."""
        self._rt.finish_host_updates()
        masters = self._whole_masters()
        result = OrderedDict()
        for key, value in self._own_entries().items():
            info = self._infos_by_param.get(id(value))
            if info is None:
                result[key] = value.detach()
            else:
                result[key] = info.view_of(masters[id(info.group)])
        return result

    def _whole_masters(self) -> dict[int, torch.Tensor]:
        """id(group) -> its whole fp32 master chunk (gathered in group order with several ranks);
        a frozen group's param chunk, cast to fp32."""
        rt = self._rt

        def weights(group):
            return group.master if group.trainable else (group.gathered or group.param)

        def fp32(group, flat):
            return flat if group.trainable else flat.float()
        if rt.comm is None:
            return {id(g): fp32(g, rt.copier.current_flat(weights(g))) for g in rt.groups}
        with rt.manager.lock:
            return {id(g): fp32(g, gather_flat(rt.comm, g.master if g.trainable else g.param,
                                               rt.copier.current_flat))
                    for g in rt.groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self._own_entries()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        self._rt.finish_host_updates()
        with self._rt.manager.lock:
            if self._rt.comm is not None:
                self._rt.comm.wait_reductions()  # nothing may still read the shards being replaced
            for key, value in state_dict.items():
                if key not in own:
                    continue
                info = self._infos_by_param.get(id(own[key]))
                if info is None:
                    own[key].copy_(value)
                else:
                    self._load_param(key, info, value)
            self._rt.manager.drop_all_gathered()  # they hold the old weights
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _load_param(self, key: str, info: TensorInfo, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(info.shape):
            raise RuntimeError(f"load_state_dict: '{key}' has shape {tuple(value.shape)}, "
                               f"the model expects {tuple(info.shape)}")
        copier = self._rt.copier
        begin, tensor_begin, length = info.shard_piece()  # several ranks: this rank's part only
        source = value.reshape(-1).narrow(0, tensor_begin, length)
        if info.group.master is not None:
            master = copier.current_flat(info.group.master).narrow(0, begin, length)
            source = master.copy_(source)
        copier.current_flat(info.group.param).narrow(0, begin, length).copy_(source)
        info.has_grad = False
        self._hooks.discard_gradients()
        for chunk in (info.group.master, info.group.param):
            if chunk is not None and chunk.location is Location.DEVICE and not chunk.pinned_forever:
                chunk.dirty = True

    def shard_state(self, copy: bool = True) -> dict:
        """This rank's shards of every chunk group (fp32 masters, moments, step counts), the loss
        scaler and the buffers, without assembling the model (engine/checkpoint.py). `copy` False
        gives the live buffers, for an immediate torch.save that streams device chunks."""
        self._rt.finish_host_updates()
        return checkpoint.shard_state(self._rt, self._own_entries(), set(self._infos_by_param), copy)

    def load_shard_state(self, shards: "dict | list[dict]") -> None:
        """Load `shard_state()` results: every saved rank's (a list), or the one of a single rank.
        Any layout, chunk size or number of ranks: each rank takes the pieces its shards hold."""
        shards = [shards] if isinstance(shards, dict) else list(shards)
        self._rt.finish_host_updates()
        checkpoint.load_shard_state(self._rt, self._own_entries(), self._infos_by_param, shards)

    # ---- observability -----------------------------------------------------------------------

    def chunk_stats(self) -> dict[str, int]:
        manager = self._rt.manager
        stats: dict[str, int] = {}
        for prefix, kinds in (("param", (ChunkKind.PARAM, ChunkKind.GATHERED)), ("grad", (ChunkKind.GRAD,)),
                              ("optim", _OPTIMIZER_KINDS)):
            for place, location in (("device", Location.DEVICE), ("host", Location.HOST)):
                count, nbytes = manager.location_bytes(kinds, location)
                stats[f"{prefix}_chunks_{place}"] = count
                stats[f"{prefix}_bytes_{place}"] = nbytes
        for scope, counters in (("step", manager.last_step), ("total", manager.totals)):
            stats[f"{scope}_h2d_bytes"] = counters.h2d_bytes
            stats[f"{scope}_d2h_bytes"] = counters.d2h_bytes
            stats[f"{scope}_h2d_moves"] = counters.h2d_moves
            stats[f"{scope}_d2h_moves"] = counters.d2h_moves
            stats[f"{scope}_evictions"] = counters.evictions
            stats[f"{scope}_gathers"] = counters.gathers
        # Moments whose chunks in use alone exceeded the chunk budget (activations left too little).
        stats["over_budget_moments"] = manager.num_over_budget
        stats["device_budget_bytes"] = manager.device_budget_bytes
        stats["host_budget_bytes"] = manager.host_budget_bytes
        stats["model_data_bytes"] = manager.model_data_bytes
        stats["init_host_bytes"] = manager.init_host_bytes  # chunk buffers init built on the host
        host = self._rt.host_updates
        report = host.last_report if host is not None else None
        # Host optimizer groups of the last step: gradients sent down during backward; updates
        # still running when step() returned (finished during the next forward); updates redone.
        stats["step_host_groups_downloaded_in_backward"] = report.num_downloaded_in_backward if report else 0
        stats["step_host_groups_after_step"] = report.num_after_step if report else 0
        stats["step_host_groups_redone"] = report.num_redone if report else 0
        # ...of which the device stepped over their streamed state (engine/streamed_adam.py)
        stats["step_host_groups_streamed"] = report.num_streamed if report else 0
        # Host Adam's and the streamed step's last measured rates, params/s (0: not measured yet)
        stats["host_adam_params_per_s"] = int(host.measured_rates[0]) if host is not None else 0
        stats["streamed_adam_params_per_s"] = int(host.measured_rates[1]) if host is not None else 0
        # 1 once nothing can move any more and the model runs with the lean hooks (engine/hooks.py)
        stats["settled"] = int(self._hooks.settled)
        return stats

    def step_timings(self) -> dict[str, float]:
        """Seconds of the last optimizer step (its forwards, backwards and update); coarse on CUDA."""
        return dict(self._rt.last_step_timings)

    def memory_timeline(self) -> list[dict]:
        """Per moment of the warm-up iteration: non-model bytes, chunk bytes and the chunk budget."""
        return self._rt.tracer.timeline()
