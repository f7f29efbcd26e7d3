"""Memory of one config under each system: pstar, plain PyTorch, DeepSpeed ZeRO-2/3 offload.

Pure functions of a Workload and the Hardware (pstar_cli/estimate/workload.py); the formulas are
described there and in docs/design.md.
"""

from __future__ import annotations

import dataclasses

from pstar_cli.estimate.workload import (DEEPSPEED_BUFFER_FACTOR, NUM_WORKING_CHUNKS, Hardware, Side,
                                         SystemEstimate, Workload, activation_bytes, model_fields)


def pstar_bytes_per_param(precision: str, grad_accum: int) -> dict[str, int]:
    if precision == "fp32":
        return {"param": 4, "grad": 4, "master": 0, "exp_avg": 4, "exp_avg_sq": 4}
    separate_grads = 2 if grad_accum > 1 else 0  # accumulation keeps grads apart from the params
    return {"param": 2, "grad": separate_grads, "master": 4, "exp_avg": 4, "exp_avg_sq": 4}


PLACEMENT_TIERS = (("param", "grad"), ("master", "exp_avg", "exp_avg_sq"))


def place_on_gpu(model_data: dict[str, int], room: int) -> tuple[dict[str, int], dict[str, int]]:
    """Split model data into (GPU, host) by kind: param chunks take the GPU's room first, as every
    step computes with them; optimizer chunk groups (master + both moments of one chunk move
    together) share what is left in proportion."""
    gpu, room = {}, max(room, 0)
    for tier in PLACEMENT_TIERS:
        tier_bytes = sum(model_data.get(kind, 0) for kind in tier)
        placed = min(tier_bytes, room)
        for kind in tier:
            if kind in model_data:
                gpu[kind] = model_data[kind] * placed // tier_bytes if tier_bytes else 0
        room -= placed
    host = {kind: num_bytes - gpu[kind] for kind, num_bytes in model_data.items()}
    return gpu, host


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
    # at least one chunk must be resident per tensor; a tensor larger than a chunk gets its own
    chunk_elems = max(w.chunk_size, w.largest_layer_params)
    working = NUM_WORKING_CHUNKS * chunk_elems * w.compute_bytes
    gpu_budget = pstar_gpu_budget(w, hw)
    activations = activation_bytes(w)
    room = (gpu_budget if gpu_budget is not None else 0) - activations - working
    on_gpu, on_host = place_on_gpu(model_data, room)
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


def _param_host_copies(model_data: dict[str, int], on_host: dict[str, int], num_gpus: int) -> int:
    """Param chunks that keep a host buffer although they compute on the GPU: with one GPU those of
    the groups whose optimizer state steps on the host (their gradients go down into it and the new
    weights come back up from it); with several, every shard (its home while gathered chunks come
    and go)."""
    if num_gpus > 1:
        return model_data["param"]
    _, optimizer_kinds = PLACEMENT_TIERS
    optimizer = sum(model_data[k] for k in optimizer_kinds)
    on_host_share = sum(on_host[k] for k in optimizer_kinds) / optimizer if optimizer else 0
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


def largest_trainable(w: Workload, hw: Hardware) -> Workload | None:
    """The largest size of the workload's family that pstar fits on this hardware (None: none fits)."""
    import models

    table = {"gpt": models.GPT_SIZES, "llama": models.LLAMA_SIZES}[w.family]
    best = None
    for size in table:
        model = models.resolve_model_config({"family": w.family, "size": size, "seq_len": w.seq_len})
        candidate = dataclasses.replace(w, **model_fields(model))
        fits = pstar_estimate(candidate, hw).fits
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
                     "gpus_per_node": w.gpus_per_node, "num_nodes": w.num_nodes},
        "hardware": dataclasses.asdict(hw),
        "systems": {name: e.to_dict() for name, e in estimate_systems(w, hw).items()},
        "largest_pstar_model": None if best is None else {"size": best.size, "num_params": best.num_params},
    }


