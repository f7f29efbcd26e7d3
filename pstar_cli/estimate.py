"""Memory estimates for a config: pstar next to plain PyTorch and DeepSpeed ZeRO-2/3 offload.

Everything here except `detect_hardware` is a pure function of its arguments. Sizes are bytes.

Model data per parameter (DESIGN.md, "Memory arithmetic"):
  pstar, bf16/fp16: param 2 (its chunk also takes the gradient after the tensor's last backward use;
    separate 2-byte grads only with gradient accumulation) + fp32 master 4 + exp_avg 4 + exp_avg_sq 4.
  pstar, fp32: param 4 + grad 4 + exp_avg 4 + exp_avg_sq 4 (the param is its own master).
  plain PyTorch AMP: fp32 param 4 + grad 4 + exp_avg 4 + exp_avg_sq 4, plus 2-byte compute copies;
    gradients (set to None between steps) and activations are never all alive at once.
  DeepSpeed: the formulas of its own estimators (`estimate_zero2_model_states_mem_needs`,
    `estimate_zero3_model_states_mem_needs`), with their 1.5 host buffer factor.

Activations per layer, 16-bit: GPT follows Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), 34·s·b·h bytes, plus 5·a·s²·b if the attention scores
were materialised; `F.scaled_dot_product_attention`'s fused kernels never store them, so that term is
off by default. The Llama blocks of `models/` keep s·b·(26·h + 8·ffn): two RMSNorms normalising in
fp32 (6h each), attention inputs, q, k, v repeated to all heads and the output (12h), and the four
SwiGLU tensors (8·ffn) plus its input (2h). With full recomputation a layer keeps only its 2·s·b·h
input and the layer being recomputed needs its full activations once. The loss keeps fp32
log-probabilities (4·b·s·V) and needs 8·b·s·V more during its backward.
Checked against peaks measured on one H200 (torch 2.11; tests/test_estimate.py keeps the numbers):
activations within 9% for gpt-1.3b b8 (with and without recomputation), gpt-6.7b b4 and llama-1b
b8 s2048 with bf16 weights; plain PyTorch AMP within 3% for the GPTs and 10% low for llama-1b, whose
RMSNorms keep extra fp32 tensors under autocast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GIB = 1024**3
MODEL_DATA_KINDS = ("param", "grad", "master", "exp_avg", "exp_avg_sq")
DEEPSPEED_BUFFER_FACTOR = 1.5  # DeepSpeed's `additional_buffer_factor` default
NUM_WORKING_CHUNKS = 2  # the chunk being computed on and the one prefetched next
LOSS_BYTES_PER_LOGIT = 4 + 8  # fp32 log-probs kept for backward, then their and the logits' grads


@dataclass(frozen=True)
class Workload:
    """The numbers of a config that memory depends on (one rank's view, model resolved)."""

    family: str
    size: str | None
    num_params: int
    largest_layer_params: int  # the biggest set of direct parameters of one module (ZeRO-3 gathers it)
    hidden: int
    layers: int
    heads: int
    ffn_hidden: int  # llama's SwiGLU width; 4·hidden for GPT
    vocab_size: int
    seq_len: int
    micro_batch_size: int
    activation_checkpointing: bool
    precision: str  # bf16 | fp16 | fp32
    grad_accum: int
    gpus_per_node: int
    num_nodes: int
    chunk_size: int  # elements per chunk
    device_memory_limit: int | None  # bytes pstar may use on one GPU; None = gpu_mem_ratio of the GPU
    host_memory_limit: int | None  # bytes of host memory one rank may use; None = host_mem_ratio
    gpu_mem_ratio: float
    host_mem_ratio: float

    @property
    def num_gpus(self) -> int:
        return self.gpus_per_node * self.num_nodes

    @property
    def compute_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class Hardware:
    gpu_bytes: int | None  # memory of one GPU; None when no GPU was found or given
    host_bytes: int
    gpu_source: str  # "given", a detected device's name, or "no GPU detected"
    host_source: str


@dataclass
class Side:
    """What one system needs on one GPU or on one host."""

    model_data: dict[str, int] = field(default_factory=dict)  # by kind
    activations: int = 0
    other: int = 0  # working buffers: gathered chunks, the largest layer, DeepSpeed's slack
    budget: int | None = None  # what may be used there; None = unknown hardware
    not_at_once: int = 0  # bytes counted above that are never alive at the same moment

    @property
    def total(self) -> int:
        """The peak: everything that is alive at the same moment."""
        return sum(self.model_data.values()) + self.activations + self.other - self.not_at_once

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget


@dataclass
class SystemEstimate:
    name: str
    gpu: Side  # per GPU
    host: Side  # per host (all local ranks together)

    @property
    def fits(self) -> bool | None:
        if self.gpu.fits is False or self.host.fits is False:
            return False
        return None if self.gpu.fits is None or self.host.fits is None else True

    def to_dict(self) -> dict:
        def side_dict(side: Side) -> dict:
            return {**dataclasses.asdict(side), "total": side.total, "fits": side.fits}

        return {"gpu": side_dict(self.gpu), "host": side_dict(self.host), "fits": self.fits}


# ---- activations ----

def layer_activation_bytes(seq_len: int, batch: int, hidden: int, heads: int, compute_bytes: int = 2,
                           materialised_scores: bool = False) -> int:
    """Activations one GPT layer keeps for backward (Korthikanti et al., 16-bit basis)."""
    per_layer = 34 * seq_len * batch * hidden
    if materialised_scores:
        per_layer += 5 * heads * seq_len * seq_len * batch
    return per_layer * compute_bytes // 2


def llama_layer_activation_bytes(seq_len: int, batch: int, hidden: int, ffn_hidden: int,
                                 compute_bytes: int = 2) -> int:
    """Activations one Llama layer of `models/` keeps for backward (16-bit basis)."""
    return seq_len * batch * (26 * hidden + 8 * ffn_hidden) * compute_bytes // 2


def activation_bytes(w: Workload, materialised_scores: bool = False) -> int:
    """Peak activations of one rank's micro-batch: the layers' saved tensors plus the loss."""
    s, b, h = w.seq_len, w.micro_batch_size, w.hidden
    if w.family in ("llama", "hf"):  # hf: Llama-style (SwiGLU) layers assumed
        full_layer = llama_layer_activation_bytes(s, b, h, w.ffn_hidden, w.compute_bytes)
    else:
        full_layer = layer_activation_bytes(s, b, h, w.heads, w.compute_bytes, materialised_scores)
    if w.activation_checkpointing:
        # every layer keeps only its input; the layer recomputed in backward needs everything once
        kept = w.layers * 2 * s * b * h * w.compute_bytes // 2 + full_layer
    else:
        kept = w.layers * full_layer
    return kept + b * s * w.vocab_size * LOSS_BYTES_PER_LOGIT


# ---- per-system estimates ----

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


# ---- from a config ----

def largest_layer_params(model: dict) -> int:
    """Direct parameters of the biggest module: the token embedding or the widest MLP matrix."""
    h = model["hidden"]
    mlp = 4 * h * h + 4 * h if model["family"] == "gpt" else h * model["ffn_hidden"]
    return max(model["vocab_size"] * h, mlp)


def workload_from_config(cfg, gpus_per_node: int | None = None) -> Workload:
    """The Workload of a validated `pstar_cli.config.Config`; `gpus_per_node` overrides the config's."""
    import models
    from engine.config import resolve_engine_config

    model = models.resolve_model_config(cfg.model_dict())
    engine = resolve_engine_config(cfg.engine_dict())
    gpus_per_node = gpus_per_node or cfg.distributed.nproc_per_node
    num_ranks = gpus_per_node * cfg.distributed.nnodes
    return Workload(
        **model_fields(model), family=model["family"], seq_len=cfg.train.seq_len,
        micro_batch_size=max(1, cfg.train.batch_size // (cfg.train.grad_accum * num_ranks)),
        activation_checkpointing=model["activation_checkpointing"], precision=cfg.precision,
        grad_accum=cfg.train.grad_accum, gpus_per_node=gpus_per_node,
        num_nodes=cfg.distributed.nnodes, chunk_size=engine.default_chunk_size,
        device_memory_limit=engine.device_memory_limit, host_memory_limit=engine.host_memory_limit,
        gpu_mem_ratio=engine.mem_tracer.overall_gpu_mem_ratio,
        host_mem_ratio=engine.mem_tracer.overall_cpu_mem_ratio,
    )


def model_fields(model: dict) -> dict:
    """The Workload fields that describe the model itself, from a resolved model dict."""
    import models

    return {
        "size": model.get("size"), "num_params": models.num_params(model),
        "largest_layer_params": largest_layer_params(model), "hidden": model["hidden"],
        "layers": model["layers"], "heads": model["heads"],
        "ffn_hidden": model.get("ffn_hidden", 4 * model["hidden"]), "vocab_size": model["vocab_size"],
    }


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


# ---- hardware (the one impure part) ----

def detect_gpu() -> tuple[int | None, str]:
    """Memory and name of GPU 0 via NVML, else torch; (None, "no GPU detected") without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(handle)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no device: fall back to torch
        pass
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), props.name
    return None, "no GPU detected"


def detect_hardware(gpu_gib: float | None = None, host_gib: float | None = None) -> Hardware:
    """Given sizes (GiB) win over detected ones; host memory comes from psutil."""
    if gpu_gib is not None:
        gpu_bytes, gpu_source = int(gpu_gib * GIB), "given"
    else:
        gpu_bytes, gpu_source = detect_gpu()
    if host_gib is not None:
        host_bytes, host_source = int(host_gib * GIB), "given"
    else:
        import psutil

        host_bytes, host_source = int(psutil.virtual_memory().total), "detected"
    return Hardware(gpu_bytes, host_bytes, gpu_source, host_source)
