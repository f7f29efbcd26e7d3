"""The systems under test, each built the way its own users would build it, around the same GPT.

Every builder returns a `Trainer` whose `step(x, y)` runs one full optimizer step and returns the
(detached) loss; `details()` adds what the system knows about itself to the result row.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import models
from benchmarks.spec import CaseSpec

BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1


class BenchmarkSetupError(RuntimeError):
    """A case that cannot be set up as asked (reported in its row, not raised to the harness)."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


@dataclass
class Trainer:
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    init_s: float
    details: Callable[[], dict] = field(default=dict)


def build_trainer(spec: CaseSpec, runtime: Runtime) -> Trainer:
    builders = {
        "pytorch": build_pytorch,
        "pytorch-bf16": build_pytorch_bf16,
        "pytorch-compile": lambda s, r: build_pytorch(s, r, compile_blocks=True),
        "fsdp2": lambda s, r: build_fsdp2(s, r, offload=False),
        "fsdp2-bf16": lambda s, r: build_fsdp2(s, r, offload=False, like_pstar=True),
        "fsdp2-offload": lambda s, r: build_fsdp2(s, r, offload=True),
        "pstar": build_pstar,
    }
    return builders[spec.system](spec, runtime)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- plain PyTorch: fp32 weights on the device, bf16 autocast, fused AdamW (DDP over several GPUs) ----

def build_pytorch(spec: CaseSpec, runtime: Runtime, compile_blocks: bool = False) -> Trainer:
    start = time.perf_counter()
    # The model builds on meta and materialises on the default device: straight onto the GPU.
    with runtime.device:
        model = models.build_model(spec.model_config())
    if compile_blocks:  # each block on its own, as users compile a model too large to trace whole
        for block in find_transformer_blocks(model):
            block.compile()
    if runtime.world_size > 1:
        device_ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True
    )
    synchronize(runtime.device)
    step = _plain_step(model, optimizer, autocast_device=runtime.device.type, clip=spec.clip)
    details = {"optimizer": "AdamW(fused)", "compiled_blocks": compile_blocks}
    return Trainer(step=step, init_s=time.perf_counter() - start, details=lambda: dict(details))


def _plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, autocast_device: str | None, clip: float):
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if autocast_device is None:
            loss = model(x, y)
        else:
            with torch.autocast(device_type=autocast_device, dtype=torch.bfloat16):
                loss = model(x, y)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ---- plain PyTorch, pstar's numerics without chunks: bf16 weights and grads, fp32 masters ----

def build_pytorch_bf16(spec: CaseSpec, runtime: Runtime) -> Trainer:
    """What a user writes for bf16 training in plain PyTorch: the model in bf16 end to end, fp32
    master weights stepped by fused AdamW, the new weights rounded back into the model."""
    if runtime.world_size > 1:
        raise BenchmarkSetupError("pytorch-bf16 runs on one GPU; use fsdp2-bf16 for several")
    start = time.perf_counter()
    with runtime.device:
        model = models.build_model(spec.model_config()).to(torch.bfloat16)
    params = list(model.parameters())
    masters = [nn.Parameter(p.detach().float()) for p in params]
    optimizer = torch.optim.AdamW(masters, lr=spec.lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
    synchronize(runtime.device)

    for master in masters:  # fp32 gradients for the fp32 step, as pstar's masters get; kept across steps
        master.grad = torch.zeros_like(master)
    master_grads = [master.grad for master in masters]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = model(x, y)
        loss.backward()
        with torch.no_grad():
            torch._foreach_copy_(master_grads, [p.grad for p in params])
        if spec.clip > 0:
            torch.nn.utils.clip_grad_norm_(masters, spec.clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_copy_(params, masters)  # round the new weights into the bf16 model
        model.zero_grad(set_to_none=True)
        return loss.detach()

    details = {"optimizer": "AdamW(fused) on fp32 masters", "param_dtype": "bfloat16"}
    return Trainer(step=step, init_s=time.perf_counter() - start, details=lambda: dict(details))


# ---- PyTorch FSDP2: fully_shard per block and root, bf16 params / fp32 reduce, optional CPU offload ----

def build_fsdp2(spec: CaseSpec, runtime: Runtime, offload: bool, like_pstar: bool = False) -> Trainer:
    """FSDP2 as its users set it up; `like_pstar` reduces in bf16 and keeps each block gathered from
    its forward to its backward (no re-gather), which is what pstar does with its chunks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    start = time.perf_counter()
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    with torch.device("meta"):
        model = models.build_model(spec.model_config())
    reduce_dtype = torch.bfloat16 if like_pstar else torch.float32
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
    # Pinned host shards are what make FSDP2's offload copies asynchronous; pinning needs CUDA.
    policy = CPUOffloadPolicy(pin_memory=runtime.device.type == "cuda") if offload else OffloadPolicy()
    for block in find_transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=policy,
                    reshard_after_forward=not like_pstar)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=policy)
    # Offloaded shards live on the host, so that is where they get their storage and initial values.
    model.to_empty(device="cpu" if offload else runtime.device)
    init_note = _init_sharded_weights(model)
    _move_buffers(model, runtime.device)  # FSDP2 manages parameters only; buffers must be on the device
    optimizer, impl = _sharded_adamw(model, spec.lr)
    synchronize(runtime.device)
    init_s = time.perf_counter() - start

    details = {"optimizer": f"AdamW({impl})", "fsdp_units": len(find_transformer_blocks(model)) + 1,
               "reduce_dtype": str(reduce_dtype).removeprefix("torch."), "reshard_after_forward": not like_pstar}
    if init_note:
        details["init_note"] = init_note
    step = _plain_step(model, optimizer, autocast_device=None, clip=spec.clip)  # MixedPrecisionPolicy casts instead
    return Trainer(step=step, init_s=init_s, details=lambda: dict(details))


def find_transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the longest nn.ModuleList in the model (`blocks`, `h`, `layers`...)."""
    module_lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not module_lists:
        raise BenchmarkSetupError("the model has no nn.ModuleList of transformer blocks to shard")
    return list(max(module_lists, key=len))


def _init_sharded_weights(model: nn.Module) -> str | None:
    """Run the model's own init on the sharded parameters; fall back to N(0, 0.02) if it cannot.

    Step time does not depend on the initial values, so a fallback keeps the row measurable; the
    row says so.
    """
    try:
        with torch.no_grad():
            model.init_weights()
        return None
    except Exception as exc:  # an init function that DTensor does not support
        with torch.no_grad():
            for name, param in model.named_parameters():
                # The local shard, so the fallback needs nothing from DTensor's random ops.
                shard = param.to_local() if hasattr(param, "to_local") else param
                if param.ndim >= 2:
                    shard.normal_(0.0, 0.02)
                else:
                    shard.fill_(1.0 if name.endswith("weight") else 0.0)
        return f"model.init_weights() failed on sharded parameters ({type(exc).__name__}: {exc}); used N(0, 0.02)"


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def _sharded_adamw(model: nn.Module, lr: float) -> tuple[torch.optim.Optimizer, str]:
    params = list(model.parameters())
    impl = "fused" if _fused_adamw_works(params) else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kwargs)
    return optimizer, impl


def _fused_adamw_works(params: list[nn.Parameter]) -> bool:
    """Probe fused AdamW on a copy of the smallest sharded parameter (DTensor, maybe on the host).

    Fused is the fastest AdamW torch has on either device (4x foreach on the host); where this
    torch build cannot run it on sharded parameters, foreach is the fallback.
    """
    probe = nn.Parameter(min(params, key=lambda p: p.numel()).detach().clone())
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.AdamW([probe], lr=1e-4, fused=True).step()
        return True
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


# ---- pstar: the seed API, bf16, AdamW with hybrid placement ----

def pstar_engine_config(spec: CaseSpec) -> dict:
    """The engine section of the shipped config the row runs (`--config`), else the harness's own;
    either way with this run's clipping."""
    if spec.engine is not None:
        config = copy.deepcopy(spec.engine)
        config["gradient_clipping"] = spec.clip
        config["gradient_accumulation_steps"] = 1  # the harness runs one micro-batch a step
        return config
    config = {
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": spec.lr, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY,
                       "use_hybrid_adam": True},
        },
        "fp16": {"enabled": False},
        "bf16": {"enabled": True},
        "gradient_clipping": spec.clip,
    }
    optional = {
        "default_chunk_size": spec.chunk_size,
        "device_memory_limit": spec.device_memory_limit,
        "host_memory_limit": spec.host_memory_limit,
    }
    config.update({key: value for key, value in optional.items() if value is not None})
    return config


def pstar_param_groups(spec: CaseSpec, config: dict):
    """The optimizer groups `pstar train` builds for the config, so a row takes a user's path."""
    from pstar_cli.training.run import param_groups_for

    return param_groups_for(spec.weight_decay_on, config["optimizer"]["params"].get("weight_decay", 0.0))


def build_pstar(spec: CaseSpec, runtime: Runtime) -> Trainer:
    from engine import initialize_engine
    from engine.config import engine_config_problems

    config = pstar_engine_config(spec)
    if runtime.device.type == "cpu":
        config["compute_device"] = "cpu"  # where the case runs, a GPU present or not
    problems = engine_config_problems(config)
    if problems:
        raise BenchmarkSetupError("engine config rejected: " + "; ".join(problems))
    model_cfg = spec.model_config()
    start = time.perf_counter()
    model, optimizer = initialize_engine(
        model_func=lambda: models.build_model(model_cfg), local_rank=runtime.local_rank, config=config,
        param_groups=pstar_param_groups(spec, config),
    )
    synchronize(runtime.device)
    init_s = time.perf_counter() - start

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = model(x, y)
        model.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return Trainer(step=step, init_s=init_s, details=lambda: _pstar_details(model, optimizer, config))


def _pstar_details(model, optimizer, config: dict) -> dict:
    details: dict = {"engine_config": config, "param_groups": len(optimizer.param_groups)}
    for name in ("chunk_stats", "step_timings"):
        try:
            details[name] = getattr(model, name)()
        except Exception as exc:  # an engine without the report still gives a timed row
            details[name] = {"unavailable": f"{type(exc).__name__}: {exc}"}
    return details


def needs_process_group(spec: CaseSpec, world_size: int) -> bool:
    # pstar gets its group from the caller, as PatrickStar's users did; FSDP2 needs one even alone.
    return world_size > 1 or spec.system.startswith("fsdp2")
