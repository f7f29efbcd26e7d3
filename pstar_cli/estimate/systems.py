"""Memory of one config under each system: pstar, plain PyTorch, DeepSpeed ZeRO-2/3 offload.

Pure functions of a Workload and the Hardware (pstar_cli/estimate/workload.py); the formulas are
described there and in docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math

from engine.optimizer_placement import (GATHER_WINDOW, GroupSizes, Placement, activation_margin_bytes,
                                        may_stream, plan_placement_of_sizes)
from engine.streamed_adam import STREAM_PIECE_ELEMENTS, ring_bytes
from pstar_cli.estimate.workload import (DEEPSPEED_BUFFER_FACTOR, Hardware, Side, SystemEstimate, Workload,
                                         activation_bytes, model_fields)


def pstar_bytes_per_param(precision: str, grad_accum: int) -> dict[str, int]:
    if precision == "fp32":
        return {"param": 4, "grad": 4, "master": 0, "exp_avg": 4, "exp_avg_sq": 4}
    separate_grads = 2 if grad_accum > 1 else 0  # accumulation keeps grads apart from the params
    return {"param": 2, "grad": separate_grads, "master": 4, "exp_avg": 4, "exp_avg_sq": 4}


OPTIMIZER_KINDS = ("master", "exp_avg", "exp_avg_sq")  # one chunk group's state, which moves together


def pstar_chunk_groups(w: Workload) -> list[GroupSizes]:
    """The chunk groups the engine would build for the workload, as placement sees them on one rank.

    As engine/chunk.py packs them: the largest tensor (the embedding or an MLP matrix) in a chunk of its
    own when it is larger than `chunk_size`, the rest in chunks of `chunk_size` elements (the last one
    partial; tensor boundaries and alignment padding are not modelled), each split into one shard per rank."""
    per_param = pstar_bytes_per_param(w.precision, w.grad_accum)
    own = [w.largest_layer_params] if w.largest_layer_params > w.chunk_size else []
    num_full, rest = divmod(w.num_params - sum(own), w.chunk_size)
    groups = []
    for chunk_elems in own + [w.chunk_size] * num_full + ([rest] if rest else []):
        shard_elems = -(-chunk_elems // w.num_gpus)
        groups.append(GroupSizes(
            param_bytes=shard_elems * (per_param["param"] + per_param["grad"]),
            gathered_bytes=chunk_elems * per_param["param"] if w.num_gpus > 1 else 0,
            optimizer_bytes=shard_elems * sum(per_param[k] for k in OPTIMIZER_KINDS)))
    return groups


def plan_pstar_placement(w: Workload, gpu_budget: int | None) -> tuple[Placement, list[GroupSizes], int]:
    """The engine's own placement plan (engine/optimizer_placement.py) on the workload's numbers, with
    the estimated activations as the warm-up's measured peak; returns (plan, groups, scratch bytes)."""
    groups = pstar_chunk_groups(w)
    scratch = -(-w.chunk_size // w.num_gpus) * 4  # a device group's fp32 gradients, as the engine sizes it

    def plan_with(scratch_bytes: int) -> Placement:
        return plan_placement_of_sizes(groups, gpu_budget or 0, activation_bytes(w), w.margin_use_ratio,
                                       w.use_hybrid_adam, scratch_bytes)

    def streams(plan: Placement) -> bool:
        return w.stream_host_optimizer and may_stream(plan, len(groups), w.num_gpus == 1, w.grad_accum > 1)

    plan = plan_with(scratch)
    if streams(plan):
        # As the engine does: when host groups may step on the GPU over streamed state, its slots
        # are kept on the device, unless they would push a param chunk off it.
        with_slots = scratch + ring_bytes(min(STREAM_PIECE_ELEMENTS, max(w.chunk_size, w.largest_layer_params)))
        streaming = plan_with(with_slots)
        if streams(streaming):
            return streaming, groups, with_slots
    return plan, groups, scratch


def place_on_gpu(w: Workload, model_data: dict[str, int], gpu_budget: int | None
                 ) -> tuple[dict[str, int], dict[str, int], int]:
    """(GPU, host) split of one rank's model data by kind, and the GPU's other bytes (the margin over
    the activations, the scratch, gathered chunks), as the engine's placement plan decides: param
    chunks stay on the device when they fit, the leading groups' optimizer state takes the room left."""
    plan, groups, scratch = plan_pstar_placement(w, gpu_budget)
    activations = activation_bytes(w)
    margin = activation_margin_bytes(activations, w.margin_use_ratio)  # as the engine reserves it
    gathered = sorted((g.gathered_bytes for g in groups), reverse=True)
    gathered_bytes = sum(gathered if plan.num_device_groups == len(groups) else gathered[:GATHER_WINDOW])
    param_kinds_bytes = model_data["param"] + model_data["grad"]
    room_for_params = max(0, (gpu_budget or 0) - activations - margin - gathered_bytes)
    params_on_gpu = param_kinds_bytes if plan.params_fit else min(param_kinds_bytes, room_for_params)
    optimizer_on_gpu = sum(g.optimizer_bytes for g in groups[:plan.num_device_groups])
    optimizer_total = sum(model_data[k] for k in OPTIMIZER_KINDS)
    gpu = {}
    for kind, total in model_data.items():
        placed, of = (params_on_gpu, param_kinds_bytes) if kind in ("param", "grad") else (optimizer_on_gpu, optimizer_total)
        gpu[kind] = min(total, total * placed // of) if of else 0
    host = {kind: num_bytes - gpu[kind] for kind, num_bytes in model_data.items()}
    other = margin + gathered_bytes + (scratch if plan.num_device_groups else 0)
    return gpu, host, other


def pstar_gpu_budget(w: Workload, hw: Hardware) -> int | None:
    """Bytes pstar may use on one GPU: the config's limit (within the GPU), else a share of the GPU."""
    if hw.gpu_bytes is None:
        return w.device_memory_limit
    if w.device_memory_limit is None:
        return int(hw.gpu_bytes * w.gpu_mem_ratio)
    return min(w.device_memory_limit, hw.gpu_bytes)


def pstar_estimate(w: Workload, hw: Hardware) -> SystemEstimate:
    """pstar: each rank owns 1/num_gpus of every chunk; its GPU holds what fits, the host the rest."""
    per_param = pstar_bytes_per_param(w.precision, w.grad_accum)
    model_data = {kind: -(-w.num_params * nbytes // w.num_gpus) for kind, nbytes in per_param.items()}
    gpu_budget = pstar_gpu_budget(w, hw)
    activations = activation_bytes(w)
    on_gpu, on_host, working = place_on_gpu(w, model_data, gpu_budget)
    in_chunks, beside = settled_extra_bytes(w, hw, model_data, on_gpu, on_host, activations + working, gpu_budget)
    on_gpu["grad"] += in_chunks
    working += beside
    on_host["param"] = max(on_host["param"], _param_host_copies(model_data, on_host, w.num_gpus))
    host_budget = (w.host_memory_limit * w.gpus_per_node if w.host_memory_limit is not None
                   else int(hw.host_bytes * w.host_mem_ratio))
    # Init builds every param chunk and fp32 master on the host; the placement after the warm-up
    # moves the device's share to the GPU. The host's peak is the larger of the two.
    init_host = model_data["param"] + model_data["master"]
    return SystemEstimate(
        "pstar",
        gpu=Side(on_gpu, activations, working, gpu_budget),
        host=Side({k: v * w.gpus_per_node for k, v in on_host.items()}, budget=host_budget,
                  other=max(0, init_host - sum(on_host.values())) * w.gpus_per_node),
    )


def settled_extra_bytes(w: Workload, hw: Hardware, model_data: dict[str, int], on_gpu: dict[str, int],
                        on_host: dict[str, int], other_gpu_bytes: int, gpu_budget: int | None) -> tuple[int, int]:
    """(bytes added to the chunks, bytes added beside them) once a run that fits one device whole
    settles, as the engine decides it (engine/optimizer.py `_settled_mode`). fp32: each param chunk
    becomes its group's master and the gradients stay in `.grad`, so the 4 B/param counted here as
    gradients leave the chunks for autograd's own tensors (nothing added overall). Other compute
    dtypes, on a GPU with room for both (`_room_for_grad_chunks`): an fp32 grad chunk per group
    (4 B/param) and the compute-dtype gradients in `.grad` beside it."""
    if gpu_budget is None or w.num_gpus > 1 or w.grad_accum > 1 or any(on_host.values()):
        return 0, 0
    if w.precision == "fp32":
        return -on_gpu["grad"], on_gpu["grad"]
    if hw.gpu_bytes is None:
        return 0, 0
    grad_chunks, grads = 4 * w.num_params, model_data["param"]
    fits = sum(on_gpu.values()) + other_gpu_bytes + grad_chunks + grads <= gpu_budget
    return (grad_chunks, grads) if fits else (0, 0)


def _param_host_copies(model_data: dict[str, int], on_host: dict[str, int], num_gpus: int) -> int:
    """Param chunks that keep a host buffer although they compute on the GPU: with one GPU those of
    the groups whose optimizer state steps on the host (their gradients go down into it and the new
    weights come back up from it); with several, every shard (its home while gathered chunks come
    and go)."""
    if num_gpus > 1:
        return model_data["param"]
    optimizer = sum(model_data[k] for k in OPTIMIZER_KINDS)
    on_host_share = sum(on_host[k] for k in OPTIMIZER_KINDS) / optimizer if optimizer else 0
    return int(model_data["param"] * on_host_share)


def pytorch_estimate(w: Workload, hw: Hardware) -> SystemEstimate:
    """Plain PyTorch (DDP when several GPUs): fp32 params, grads and Adam moments all on each GPU,
    plus the 16-bit copies autocast makes of the weights."""
    per_param = {"param": 4, "grad": 4, "master": 0, "exp_avg": 4, "exp_avg_sq": 4,
                 "compute_copy": 0 if w.precision == "fp32" else 2}
    model_data = {kind: w.num_params * nbytes for kind, nbytes in per_param.items()}
    activations = activation_bytes(w)
    # the peak is at the start of backward (no grads yet) or at the optimizer step (no activations)
    not_at_once = min(model_data["grad"], activations + model_data["compute_copy"])
    return SystemEstimate(
        "pytorch",
        gpu=Side(model_data, activations, budget=hw.gpu_bytes, not_at_once=not_at_once),
        host=Side(budget=hw.host_bytes),
    )


def zero2_offload_estimate(w: Workload, hw: Hardware) -> SystemEstimate:
    """DeepSpeed ZeRO-2 with the optimizer on the CPU: 16-bit params on every GPU; on each host
    params·max(4·num_gpus, 16)·1.5 (fp32 master, grad, moments; the 4·num_gpus covers every
    rank building the fp32 model at start)."""
    n = w.num_params
    host_model = {"param": 0, "grad": 4 * n, "master": 4 * n, "exp_avg": 4 * n, "exp_avg_sq": 4 * n}
    host_total = int(n * max(4 * w.num_gpus, 16) * DEEPSPEED_BUFFER_FACTOR)
    return SystemEstimate(
        "zero2_offload",
        gpu=Side({"param": 2 * n}, activation_bytes(w), budget=hw.gpu_bytes),
        host=Side(host_model, other=host_total - 16 * n, budget=hw.host_bytes),
    )


def zero3_offload_estimate(w: Workload, hw: Hardware) -> SystemEstimate:
    """DeepSpeed ZeRO-3 with params and optimizer on the CPU (zero.Init): the largest layer in fp32
    on each GPU; on each host params·18·1.5/num_nodes."""
    n = w.num_params / w.num_nodes
    host_model = {kind: int(n * nbytes) for kind, nbytes in
                  {"param": 2, "grad": 4, "master": 4, "exp_avg": 4, "exp_avg_sq": 4}.items()}
    host_total = int(n * 18 * DEEPSPEED_BUFFER_FACTOR)
    return SystemEstimate(
        "zero3_offload",
        gpu=Side({}, activation_bytes(w), other=4 * w.largest_layer_params, budget=hw.gpu_bytes),
        host=Side(host_model, other=host_total - sum(host_model.values()), budget=hw.host_bytes),
    )


SYSTEMS = (pstar_estimate, pytorch_estimate, zero2_offload_estimate, zero3_offload_estimate)


def estimate_systems(w: Workload, hw: Hardware) -> dict[str, SystemEstimate]:
    estimates = [system(w, hw) for system in SYSTEMS]
    return {e.name: e for e in estimates}


MAX_SEARCH_GROUPS = 4096


def largest_trainable(w: Workload, hw: Hardware) -> Workload | None:
    """The largest size of the workload's family that pstar fits on this hardware (None: none fits)."""
    import models

    table = {"gpt": models.GPT_SIZES, "llama": models.LLAMA_SIZES}.get(w.family)
    if table is None:  # a Hugging Face model has no size table
        return None
    best = None
    for size in table:
        model = models.resolve_model_config({"family": w.family, "size": size, "seq_len": w.seq_len})
        candidate = dataclasses.replace(w, **model_fields(model))
        # The placement plan walks the chunk groups one by one: a small chunk size (the CPU demo's
        # 64 Ki elements) would give millions of groups for the table's largest sizes. For this
        # search the chunks are made large enough for at most MAX_SEARCH_GROUPS groups, which can
        # only make the answer more careful (larger working chunks), by under 1/4096 of the model.
        coarse = max(candidate.chunk_size, -(-candidate.num_params // MAX_SEARCH_GROUPS))
        fits = pstar_estimate(dataclasses.replace(candidate, chunk_size=coarse), hw).fits
        if fits and (best is None or candidate.num_params > best.num_params):
            best = candidate
    return best


def estimate_report(w: Workload, hw: Hardware) -> dict:
    """Everything `pstar estimate-memory` shows, as plain data (its --json output)."""
    best = largest_trainable(w, hw)
    return {
        "model": {"family": w.family, "size": w.size, "num_params": w.num_params},
        "workload": {"seq_len": w.seq_len, "micro_batch_size": w.micro_batch_size,
                     "precision": w.precision, "activation_checkpointing": w.activation_checkpointing,
                     "recompute_layers": w.recompute_layers, "layers": w.layers,
                     "gpus_per_node": w.gpus_per_node, "num_nodes": w.num_nodes},
        "hardware": dataclasses.asdict(hw),
        "systems": {name: e.to_dict() for name, e in estimate_systems(w, hw).items()},
        "largest_pstar_model": None if best is None else {"size": best.size, "num_params": best.num_params},
    }


