"""What memory depends on: a config's numbers (Workload), the machine (Hardware), what a system
needs on a GPU and a host (Side, SystemEstimate), and the activations of a micro-batch.

Memory estimates for a config: pstar next to plain PyTorch and DeepSpeed ZeRO-2/3 offload.

Everything here except `detect_hardware` is a pure function of its arguments. Sizes are bytes.

Model data per parameter (docs/design.md, "Memory arithmetic"):
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
input and the layer being recomputed needs its full activations once; recomputing only the first k
blocks (`model.recompute_layers`), the other L−k keep their full activations, which backward frees
before it reaches the recomputed ones: k inputs plus max(L−k, 1) full layers. The loss keeps fp32
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
    margin_use_ratio: float = 0.8  # the engine's margin over the warm-up's activation peak
    use_hybrid_adam: bool = True  # False: every optimizer group steps on the host
    stream_host_optimizer: bool = True  # host groups may step on the GPU over streamed state
    recompute_layers: int | None = None  # with activation_checkpointing: the first that many blocks; None: all

    @property
    def recomputed_layers(self) -> int:
        """The blocks recomputed in backward (a count above `layers`, from another size's, means all)."""
        from models import recomputed_layers
        count = recomputed_layers({"activation_checkpointing": self.activation_checkpointing,
                                   "recompute_layers": self.recompute_layers, "layers": self.layers})
        return min(count, self.layers)

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
    recomputed = w.recomputed_layers
    if recomputed:
        # a recomputed layer keeps only its input and needs everything once, when backward recomputes
        # it; by then the layers after it that kept theirs have been through backward and freed them
        inputs = recomputed * 2 * s * b * h * w.compute_bytes // 2
        kept = inputs + max(w.layers - recomputed, 1) * full_layer
    else:
        kept = w.layers * full_layer
    return kept + b * s * w.vocab_size * LOSS_BYTES_PER_LOGIT


def recompute_note(activation_checkpointing: bool, recompute_layers: int | None, layers: int) -> str:
    """The summary lines' ", activation checkpointing", with the count when a config names one."""
    if not activation_checkpointing:
        return ""
    if recompute_layers is None:
        return ", activation checkpointing"
    return f", activation checkpointing ({min(recompute_layers, layers)} of {layers} blocks)"


# ---- from a config ----

def largest_layer_params(model: dict) -> int:
    """Direct parameters of the biggest module: the token embedding or the widest MLP matrix."""
    h = model["hidden"]
    mlp = 4 * h * h + 4 * h if model["family"] == "gpt" else h * model["ffn_hidden"]
    return max(model["vocab_size"] * h, mlp)


def workload_from_config(cfg, gpus_per_node: int | None = None) -> Workload:
    """The Workload of a validated `pstar_cli.config.Config`; `gpus_per_node` overrides the config's."""
    from pstar_cli.config import BatchSplit

    model, engine = cfg.model_spec, cfg.engine_config
    gpus_per_node = gpus_per_node or cfg.distributed.nproc_per_node
    num_ranks = gpus_per_node * cfg.distributed.nnodes
    # another GPU count than the config's may not split the batch evenly: at least one sequence
    split = BatchSplit(cfg.train.batch_size, cfg.train.batch_size // num_ranks,
                       max(1, cfg.train.batch_size // (cfg.train.grad_accum * num_ranks)), cfg.train.grad_accum)
    return Workload(
        **model_fields(model), family=model["family"], seq_len=cfg.train.seq_len,
        micro_batch_size=split.micro_batch,
        activation_checkpointing=model["activation_checkpointing"],
        recompute_layers=model.get("recompute_layers"), precision=cfg.precision,
        grad_accum=cfg.train.grad_accum, gpus_per_node=gpus_per_node,
        num_nodes=cfg.distributed.nnodes, chunk_size=engine.default_chunk_size,
        device_memory_limit=engine.device_memory_limit, host_memory_limit=engine.host_memory_limit,
        gpu_mem_ratio=engine.mem_tracer.overall_gpu_mem_ratio,
        host_mem_ratio=engine.mem_tracer.overall_cpu_mem_ratio,
        margin_use_ratio=engine.mem_tracer.margin_use_ratio, use_hybrid_adam=engine.optimizer.use_hybrid_adam,
        stream_host_optimizer=engine.stream_host_optimizer,
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


