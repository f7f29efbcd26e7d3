"""The typed config tree of a run: one dataclass per section, each field with its allowed values
and what changing it on resume does.

Sections: `model`, `data`, `train`, `engine` (the engine's own schema, engine/config.py: the typed
`EngineConfig` is `Config.engine_config`), `distributed`, `checkpoint`. The loader
(pstar_cli/config/loader.py) builds and validates the tree once; everything else reads it.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.config import EngineConfig, engine_config_tree, engine_key_effect, resolve_engine_config
from pstar_cli.errors import PstarError


class ResumeEffect(enum.Enum):
    """What changing a setting between a checkpoint and the run resuming it does."""

    NONE = "none"  # nothing to what a step computes: memory, length of logging, layout, processes
    NUMBERS = "numbers"  # the steps from the resumed one on (lr schedule, clipping): allowed, reported
    STATE = "state"  # what the saved state means (model, data, optimizer): the resume is refused


def _key(default: Any, *, min: float | None = None, gt: float | None = None, below: float | None = None,
         choices: tuple[str, ...] | None = None, resume: ResumeEffect = ResumeEffect.STATE) -> Any:
    """A config field with its allowed range (`min` inclusive, `gt`/`below` exclusive) or choices,
    and what changing it on resume does (see ResumeEffect)."""
    rules = {"min": min, "gt": gt, "below": below, "choices": choices}
    return field(default=default, metadata={"resume": resume, **{k: v for k, v in rules.items() if v is not None}})


@dataclass
class ModelConfig:
    family: str | None = _key(None, choices=("gpt", "llama"))  # null: the family of `size`
    size: str | None = None  # a name of models.GPT_SIZES / models.LLAMA_SIZES
    hidden: int | None = _key(None, min=1)  # explicit numbers override the size's
    layers: int | None = _key(None, min=1)
    heads: int | None = _key(None, min=1)
    kv_heads: int | None = _key(None, min=1)  # llama only
    ffn_hidden: int | None = _key(None, min=1)  # llama only
    rope_theta: float | None = _key(None, gt=0.0)  # llama only
    tie_embeddings: bool | None = None  # llama only (GPT always ties input and output embedding)
    vocab_size: int | None = _key(None, min=1)
    activation_checkpointing: bool = _key(False, resume=ResumeEffect.NONE)  # recomputes the same numbers
    # with activation_checkpointing: recompute the first N blocks, the others keep their activations; null: all
    recompute_layers: int | None = _key(None, min=0, resume=ResumeEffect.NONE)
    dropout: float = _key(0.0, min=0.0, below=1.0)
    # a local Hugging Face model directory (config.json, safetensors, tokenizer): models/hf.py
    hf_path: str | None = None
    # with hf_path: load its weights (default) or random init (false); a resume loads the checkpoint's
    pretrained: bool | None = _key(None, resume=ResumeEffect.NONE)


@dataclass
class DataConfig:
    kind: str = _key("synthetic", choices=("synthetic", "text", "tokens", "jsonl"))
    path: str | None = None  # text: a UTF-8 file (omitted = the shipped corpus); tokens: a .bin of ids
    dtype: str = _key("uint16", choices=("uint16", "uint32"))  # element type of a tokens file
    # jsonl / text through a Hugging Face tokenizer (pstar_cli/training/hf_data.py)
    field: str = "text"  # jsonl: the key holding each document's text
    tokenizer: str | None = None  # a local tokenizer directory; default: model.hf_path (text, jsonl)


@dataclass
class TrainConfig:
    steps: int = _key(200, min=1, resume=ResumeEffect.NUMBERS)  # the cosine decay's length
    batch_size: int = _key(8, min=1)  # sequences per optimizer step, summed over all ranks
    seq_len: int = _key(128, min=1)
    lr: float = _key(1e-3, gt=0.0, resume=ResumeEffect.NUMBERS)  # peak lr after warm-up; cosine decay to min_lr at `steps`
    warmup_steps: int = _key(20, min=0, resume=ResumeEffect.NUMBERS)
    min_lr: float = _key(1e-4, min=0.0, resume=ResumeEffect.NUMBERS)
    grad_accum: int = _key(1, min=1, resume=ResumeEffect.NONE)  # micro-batches per optimizer step on each rank
    seed: int = _key(0, min=0)
    log_interval: int = _key(10, min=1, resume=ResumeEffect.NONE)
    # which parameters engine.optimizer.params.weight_decay applies to: "matrices" (nanoGPT's rule:
    # tensors of 2+ dims, i.e. matmul weights and embeddings, not biases and norm gains) or "all"
    weight_decay_on: str = _key("matrices", choices=("matrices", "all"))


@dataclass
class DistributedConfig:
    RESUME: ClassVar[ResumeEffect] = ResumeEffect.NONE  # how the run is carried out: shards are re-split
    nproc_per_node: int = _key(1, min=1)
    nnodes: int = _key(1, min=1)
    node_rank: int = _key(0, min=0)
    rdzv_endpoint: str | None = None  # host:port of the rendezvous, needed when nnodes > 1
    rdzv_backend: str = _key("c10d", choices=("c10d", "static"))
    rdzv_id: str = "pstar"
    backend: str = _key("auto", choices=("auto", "nccl", "gloo"))  # auto: nccl on GPUs, gloo on CPU


@dataclass
class CheckpointConfig:
    RESUME: ClassVar[ResumeEffect] = ResumeEffect.NONE
    dir: str | None = None  # null: `checkpoints/` inside the run's output directory
    interval: int = _key(0, min=0)  # steps between checkpoints; 0 = none on a schedule
    keep: int = _key(2, min=1)  # newest checkpoints kept on disk


SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "distributed": DistributedConfig,
    "checkpoint": CheckpointConfig,
}
SECTION_NAMES = ("model", "data", "train", "engine", "distributed", "checkpoint")

# Keys that the train section owns, and where the user sets them instead.
MODEL_KEYS_FROM_TRAIN = {"seq_len": "set the sequence length with train.seq_len"}
ENGINE_KEYS_FROM_TRAIN = {
    ("optimizer", "params", "lr"): "set the peak learning rate with train.lr (the schedule drives the engine's lr)",
    ("gradient_accumulation_steps",): "set it with train.grad_accum",
}


@dataclass(frozen=True)
class BatchSplit:
    """How one optimizer step's global batch is cut: per rank, then into micro-batches. The one
    rule: the loader checks it, the trainer, the estimate and the profiler use it."""

    global_batch: int
    per_rank: int
    micro_batch: int
    num_micro_batches: int

    @classmethod
    def of(cls, global_batch: int, world_size: int, grad_accum: int) -> "BatchSplit":
        if global_batch % (world_size * grad_accum):
            raise PstarError(split_problem(global_batch, world_size, grad_accum))
        per_rank = global_batch // world_size
        return cls(global_batch, per_rank, per_rank // grad_accum, grad_accum)


def split_problem(global_batch: int, world_size: int, grad_accum: int) -> str | None:
    """Why `global_batch` does not split evenly, or None when it does."""
    splits = grad_accum * world_size
    if global_batch % splits == 0:
        return None
    return (f"train.batch_size: {global_batch} sequences do not split evenly into train.grad_accum "
            f"({grad_accum}) micro-batches on each of {world_size} rank(s); use a multiple of {splits}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: dict = field(default_factory=dict)  # the engine section as written, precision resolved
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def world_size(self) -> int:
        return self.distributed.nproc_per_node * self.distributed.nnodes

    @property
    def batch_split(self) -> BatchSplit:
        return BatchSplit.of(self.train.batch_size, self.world_size, self.train.grad_accum)

    @property
    def micro_batch_size(self) -> int:
        """Sequences per forward/backward on one rank."""
        return self.batch_split.micro_batch

    @functools.cached_property
    def engine_config(self) -> EngineConfig:
        """The typed engine config (lr and accumulation from the train section), resolved once."""
        return resolve_engine_config(self.engine_dict())

    @functools.cached_property
    def model_spec(self) -> dict:
        """The model's every number (size table, explicit keys, family defaults), resolved once."""
        import models

        return models.resolve_model_config(self.model_dict())

    @property
    def precision(self) -> str:
        engine = self.engine_config
        return "fp16" if engine.fp16.enabled else "bf16" if engine.bf16_enabled else "fp32"

    def model_dict(self) -> dict:
        """The dict for `models.build_model`: the set model keys plus `seq_len` from the train section."""
        model = {k: v for k, v in dataclasses.asdict(self.model).items() if v is not None}
        return {**model, "seq_len": self.train.seq_len}

    def engine_dict(self) -> dict:
        """The engine section as the seed API's dict, with lr and accumulation filled in."""
        engine = copy.deepcopy(self.engine)
        engine.setdefault("optimizer", {}).setdefault("params", {})["lr"] = self.train.lr
        engine["gradient_accumulation_steps"] = self.train.grad_accum
        return engine

    def to_dict(self) -> dict:
        """Every section with defaults filled; `load_config` accepts it back unchanged."""
        sections = {name: dataclasses.asdict(section) for name, section in self.sections().items()}
        return {**sections, "engine": copy.deepcopy(self.engine)}

    def sections(self) -> dict[str, Any]:
        """The typed sections by name (the engine's is `engine_config`)."""
        return {"model": self.model, "data": self.data, "train": self.train, "distributed": self.distributed,
                "checkpoint": self.checkpoint}


def config_hash(cfg: Config) -> str:
    """A short fingerprint of the run `pstar validate` shows: model, data, train (minus its length and
    logging), engine and world size. Resuming compares the settings themselves (resume_effect)."""
    train = dataclasses.asdict(cfg.train)
    del train["steps"], train["log_interval"]
    relevant = {
        "model": cfg.model_dict(),
        "data": dataclasses.asdict(cfg.data),
        "train": train,
        "engine": cfg.engine_dict(),
        "world_size": cfg.world_size,
    }
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- the resume rule ----


def resume_effect(dotted: str) -> ResumeEffect:
    """What changing the setting `dotted` (e.g. "train.lr") on resume does, as its section declares."""
    section, _, key = dotted.partition(".")
    if section == "engine":
        return {"placement": ResumeEffect.NONE, "numbers": ResumeEffect.NUMBERS}.get(
            engine_key_effect(key), ResumeEffect.STATE)
    cls = SECTION_TYPES.get(section)
    if cls is None:
        return ResumeEffect.STATE
    if "RESUME" in vars(cls):
        return vars(cls)["RESUME"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        return ResumeEffect.STATE
    return fields[key].metadata.get("resume", ResumeEffect.STATE)


def full_config_tree(saved: dict) -> dict:
    """A config dict (`Config.to_dict()`, of this or an older pstar) with every default written
    out: the model fully resolved (a size name and its numbers compare equal) and the engine's
    defaults filled, so that two configs compare setting by setting."""
    import models

    tree = json.loads(json.dumps(saved))
    model = {k: v for k, v in tree.get("model", {}).items() if v is not None}
    model["seq_len"] = tree.get("train", {}).get("seq_len")
    try:
        tree["model"] = json.loads(json.dumps(models.resolve_model_config(model)))
    except models.ModelConfigError:  # a model this pstar cannot resolve: compare what was written
        pass
    written = tree.get("engine") or {}
    try:
        defaults = engine_config_tree(resolve_engine_config(written))
    except ValueError:
        defaults = {}
    for path in (("optimizer", "params", "lr"), ("gradient_accumulation_steps",)):
        _drop(defaults, path)  # the train section owns these
    tree["engine"] = _merge(defaults, written)
    return tree


def _merge(defaults: dict, written: dict) -> dict:
    merged = dict(defaults)
    for key, value in written.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def _drop(tree: dict, path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        tree = tree.get(key, {})
    tree.pop(path[-1], None)
