"""What one benchmark case is: the parent process describes it, the case process reads it back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

# The plain-PyTorch recipes a ratio is taken against (the best of them measured in the same run):
# AMP with fp32 weights; bf16 weights and grads with fp32 masters (pstar's numerics without chunks);
# AMP with each block compiled.
PYTORCH_RECIPES = ("pytorch", "pytorch-bf16", "pytorch-compile")
# fsdp2: bf16 params, fp32 reduction, reshard after forward (FSDP2's defaults); fsdp2-bf16: bf16
# reduction and gathered blocks kept from forward to backward, as pstar does.
SYSTEMS = PYTORCH_RECIPES + ("fsdp2-offload", "fsdp2", "fsdp2-bf16", "pstar")

# Kept in every case process: NVLink multicast (NVLS) is off limits on the lent multi-GPU machines.
MULTICAST_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass(frozen=True)
class CaseSpec:
    system: str
    model: str
    batch: int  # sequences per GPU (per process) per step
    seq: int
    num_steps: int
    num_warmup: int
    device: str  # "cuda" or "cpu"
    gpus: int = 1  # processes, one per GPU (on CPU: one per process group member)
    activation_checkpointing: bool = False
    recompute_layers: int | None = None  # with activation_checkpointing: the first that many blocks; None: all
    chunk_size: int | None = None  # pstar's default_chunk_size in elements; None = engine default
    device_memory_limit: int | None = None  # pstar only, bytes
    host_memory_limit: int | None = None  # pstar only, bytes
    lr: float = 1e-4
    clip: float = 1.0  # global gradient-norm clipping in every system; 0 turns it off
    config: str | None = None  # pstar: the shipped config whose engine and model settings it runs
    engine: dict | None = None  # pstar: that config's engine section, as `pstar train` hands it over
    weight_decay_on: str = "all"  # pstar: the config's train.weight_decay_on ("matrices": two groups)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CaseSpec":
        return cls(**json.loads(text))

    def model_config(self) -> dict:
        return {
            "family": "gpt",
            "size": self.model,
            "seq_len": self.seq,
            "activation_checkpointing": self.activation_checkpointing,
            "recompute_layers": self.recompute_layers,
            "dropout": 0.0,
        }

    def label(self) -> str:
        gpus = f" x{self.gpus}" if self.gpus > 1 else ""
        clip = "" if self.clip else " clip 0"
        return f"{self.system} {self.model} b{self.batch} s{self.seq}{gpus}{clip}"
