"""Run configs: a YAML file plus `dotted.key=value` overrides, typed and validated at load.

Sections: `model`, `data`, `train`, `engine` (the seed's dict, checked by `engine.config`),
`distributed`, `checkpoint`. Every problem of a file is collected and raised at once as one
`ConfigError`, each problem naming the dotted key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from pstar_cli.errors import PstarError


class ConfigError(PstarError):
    """A config with one or more problems; `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source or "config"
        super().__init__("\n".join(self.message_lines()))

    def message_lines(self) -> list[str]:
        if len(self.problems) == 1:
            return [f"{self.source}: {self.problems[0]}"]
        return [f"{self.source} has {len(self.problems)} problems:", *self.problems]


def _key(default: Any, *, min: float | None = None, gt: float | None = None, below: float | None = None,
         choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its allowed range (`min` inclusive, `gt`/`below` exclusive) or choices."""
    rules = {"min": min, "gt": gt, "below": below, "choices": choices}
    return field(default=default, metadata={k: v for k, v in rules.items() if v is not None})


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
    activation_checkpointing: bool = False
    dropout: float = _key(0.0, min=0.0, below=1.0)
    # a local Hugging Face model directory (config.json, safetensors, tokenizer): models/hf.py
    hf_path: str | None = None
    pretrained: bool | None = None  # with hf_path: load its weights (default) or random init (false)


@dataclass
class DataConfig:
    kind: str = _key("synthetic", choices=("synthetic", "text", "tokens", "jsonl"))
    path: str | None = None  # text: a UTF-8 file (omitted = the shipped corpus); tokens: a .bin of ids
    dtype: str = _key("uint16", choices=("uint16", "uint32"))  # element type of a tokens file
    # jsonl / text through a Hugging Face tokenizer (pstar_cli/hf_data.py)
    field: str = "text"  # jsonl: the key holding each document's text
    tokenizer: str | None = None  # a local tokenizer directory; default: model.hf_path (text, jsonl)


@dataclass
class TrainConfig:
    steps: int = _key(200, min=1)
    batch_size: int = _key(8, min=1)  # sequences per optimizer step, summed over all ranks
    seq_len: int = _key(128, min=1)
    lr: float = _key(1e-3, gt=0.0)  # peak lr after warm-up; cosine decay to min_lr at `steps`
    warmup_steps: int = _key(20, min=0)
    min_lr: float = _key(1e-4, min=0.0)
    grad_accum: int = _key(1, min=1)  # micro-batches per optimizer step on each rank
    seed: int = _key(0, min=0)
    log_interval: int = _key(10, min=1)


@dataclass
class DistributedConfig:
    nproc_per_node: int = _key(1, min=1)
    nnodes: int = _key(1, min=1)
    node_rank: int = _key(0, min=0)
    rdzv_endpoint: str | None = None  # host:port of the rendezvous, needed when nnodes > 1
    rdzv_backend: str = _key("c10d", choices=("c10d", "static"))
    rdzv_id: str = "pstar"
    backend: str = _key("auto", choices=("auto", "nccl", "gloo"))  # auto: nccl on GPUs, gloo on CPU


@dataclass
class CheckpointConfig:
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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: dict = field(default_factory=dict)  # the seed's keys, precision resolved, lr not yet filled
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def world_size(self) -> int:
        return self.distributed.nproc_per_node * self.distributed.nnodes

    @property
    def micro_batch_size(self) -> int:
        """Sequences per forward/backward on one rank."""
        return self.train.batch_size // (self.train.grad_accum * self.world_size)

    @property
    def precision(self) -> str:
        if _nested_get(self.engine, ("fp16", "enabled")) is True:
            return "fp16"
        return "bf16" if _nested_get(self.engine, ("bf16", "enabled")) is True else "fp32"

    def model_dict(self) -> dict:
        """The dict for `models.build_model`: the set model keys plus `seq_len` from the train section."""
        model = {k: v for k, v in dataclasses.asdict(self.model).items() if v is not None}
        return {**model, "seq_len": self.train.seq_len}

    def engine_dict(self) -> dict:
        """The dict for `initialize_engine`: the engine section with lr and accumulation filled in."""
        engine = copy.deepcopy(self.engine)
        engine.setdefault("optimizer", {}).setdefault("params", {})["lr"] = self.train.lr
        engine["gradient_accumulation_steps"] = self.train.grad_accum
        return engine

    def to_dict(self) -> dict:
        """Every section with defaults filled; `load_config` accepts it back unchanged."""
        sections = {name: dataclasses.asdict(getattr(self, name)) for name in SECTION_TYPES}
        return {**sections, "engine": copy.deepcopy(self.engine)}


def config_hash(cfg: Config) -> str:
    """A stable hash of what must match for a checkpoint to resume: model, data, train (minus its
    length and logging), engine and world size."""
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


# ---- YAML ----

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string; configs mean a number, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def read_yaml_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError([f"config file not found{where}"], str(path))
    if not path.is_file():
        raise ConfigError(["is not a file; give the path of a YAML config"], str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8"], str(path))
    except OSError as exc:
        raise ConfigError([f"cannot be read: {exc.strerror}"], str(path))
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError([f"is not valid YAML{line}: {getattr(exc, 'problem', None) or exc}"], str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"must be a mapping of sections ({', '.join(SECTION_NAMES)})"], str(path))
    return raw


# ---- overrides ----

def apply_overrides(raw: dict, overrides: Iterable[str]) -> list[str]:
    """Set each `a.b.c=value` (value read as a YAML scalar) into raw; returns the malformed ones."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        path = tuple(key.strip().split("."))
        if not sep or not all(path):
            problems.append(f"override '{item}': must look like section.key=value, e.g. train.steps=20")
            continue
        try:
            value = parse_yaml(text)
        except yaml.YAMLError:
            value = text  # an unparsable value is kept as text; type checks say if it is wrong
        if (why := _nested_set(raw, path, value)) is not None:
            problems.append(f"override '{item}': {why}")
    return problems


def _nested_set(raw: dict, path: tuple[str, ...], value: Any) -> str | None:
    node = raw
    for i, part in enumerate(path[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            return f"{'.'.join(path[:i + 1])} is a value, not a section"
    node[path[-1]] = value
    return None


def _nested_get(d: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


# ---- typed sections ----

def _unknown_key(dotted: str, key: str, allowed: Iterable[str], what: str = "key") -> str:
    allowed = sorted(allowed)
    hint = difflib.get_close_matches(key, allowed, n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"{dotted}: unknown {what}{did_you_mean}; allowed: {', '.join(allowed)}"


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             type(None): "null"}
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join(names[t] for t in options)


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value) for a value against a field type; ints are accepted where numbers are."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        return type(None) in options, None
    if isinstance(value, bool):
        return bool in options, value
    if isinstance(value, int) and (int in options or float in options):
        return True, value if int in options else float(value)
    if isinstance(value, float) and float in options:
        return True, value
    if isinstance(value, str) and str in options:
        return True, value
    return False, value


def _range_problem(value: Any, rules: dict) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"  # NaN would pass every range check below
    if "choices" in rules and value not in rules["choices"]:
        return "must be one of " + ", ".join(rules["choices"])
    if "min" in rules and value < rules["min"]:
        return f"must be >= {rules['min']}"
    if "gt" in rules and value <= rules["gt"]:
        return f"must be > {rules['gt']}"
    if "below" in rules and value >= rules["below"]:
        return f"must be < {rules['below']}"
    return None


def build_section(cls: type, raw: Any, name: str, problems: list[str],
                  moved_keys: dict[str, str] | None = None) -> Any:
    """A section dataclass from its raw dict; wrong keys and values become problems (and defaults).

    `moved_keys` maps keys that belong elsewhere to where the user sets them instead."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{name}: must be a mapping of keys to values (got {raw!r})")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key in (moved_keys or {}):
            problems.append(f"{dotted}: {moved_keys[key]}")
            continue
        if key not in fields:
            problems.append(_unknown_key(dotted, str(key), fields))
            continue
        ok, value = _coerce(value, hints[key])
        why = _range_problem(value, fields[key].metadata) if ok else f"must be {_type_name(hints[key])}"
        if why is None:
            values[key] = value
        else:
            problems.append(f"{dotted}: {why} (got {raw[key]!r})")
    return cls(**values)


# ---- the engine section ----

def detect_bf16() -> bool:
    """Whether this machine's GPU computes in bf16; False without a GPU."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def build_engine_section(raw: Any, bf16_supported: bool | None, problems: list[str]) -> dict:
    """The engine dict checked by the engine itself, with the precision default filled in."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"engine: must be a mapping of the engine's keys (got {raw!r})")
        return {}
    from engine.config import engine_config_problems

    engine = copy.deepcopy(raw)
    for path, where in ENGINE_KEYS_FROM_TRAIN.items():
        if _has_key(engine, path):
            problems.append(f"engine.{'.'.join(path)}: {where}")
    engine_problems = engine_config_problems(engine)
    problems += [f"engine.{p}" for p in engine_problems]
    if not engine_problems:
        _fill_precision_default(engine, bf16_supported)
    return engine


def _fill_precision_default(engine: dict, bf16_supported: bool | None) -> None:
    """bf16 where the GPU supports it, fp32 elsewhere, unless the file chose fp16 or bf16 itself."""
    if _nested_get(engine, ("fp16", "enabled")) is True or _has_key(engine, ("bf16", "enabled")):
        return
    if bf16_supported is None:
        bf16_supported = detect_bf16()
    bf16 = engine.get("bf16") or {}
    engine["bf16"] = {**bf16, "enabled": bf16_supported}


def _has_key(d: Any, path: tuple[str, ...]) -> bool:
    parent = _nested_get(d, path[:-1]) if len(path) > 1 else d
    return isinstance(parent, dict) and path[-1] in parent


# ---- checks across keys and sections ----

def model_problems(cfg: Config) -> list[str]:
    """Size name, shape and vocabulary checks of the model section (the models package decides)."""
    import models
    from pstar_cli.data import BYTE_VOCAB_SIZE

    problems = models.model_config_problems(cfg.model_dict())
    if problems:
        return problems
    vocab_size = models.resolve_model_config(cfg.model_dict())["vocab_size"]
    if cfg.data.kind == "text" and cfg.data.tokenizer is None and vocab_size < BYTE_VOCAB_SIZE:
        return [f"model.vocab_size: data.kind text needs at least {BYTE_VOCAB_SIZE} token ids "
                f"(one per byte value), got {vocab_size}"]
    return []


def train_problems(cfg: Config) -> list[str]:
    train, problems = cfg.train, []
    if train.min_lr > train.lr:
        problems.append(f"train.min_lr: must be <= train.lr ({train.lr}), got {train.min_lr}")
    splits = train.grad_accum * cfg.world_size
    if train.batch_size % splits:
        problems.append(
            f"train.batch_size: {train.batch_size} sequences do not split evenly into "
            f"train.grad_accum ({train.grad_accum}) micro-batches on each of {cfg.world_size} rank(s); "
            f"use a multiple of {splits}")
    return problems


def distributed_problems(dist: DistributedConfig) -> list[str]:
    problems = []
    if dist.node_rank >= dist.nnodes:
        problems.append(f"distributed.node_rank: must be < distributed.nnodes ({dist.nnodes}), "
                        f"got {dist.node_rank}")
    if dist.nnodes > 1 and not dist.rdzv_endpoint:
        problems.append("distributed.rdzv_endpoint: required when distributed.nnodes > 1 "
                        "(host:port of node 0, e.g. 10.0.0.1:29500)")
    return problems


# ---- loading ----

def config_from_dict(raw: dict, source: str | None = None, *, bf16_supported: bool | None = None,
                     problems: list[str] | None = None) -> Config:
    """A validated Config from a dict of sections; raises ConfigError listing every problem.

    `bf16_supported` None means: ask this machine's GPU (used only when the file leaves the
    precision open)."""
    problems = list(problems or [])
    problems += [_unknown_key(str(k), str(k), SECTION_NAMES, "section")
                 for k in raw if k not in SECTION_NAMES]
    sections = {name: build_section(cls, raw.get(name), name, problems,
                                    MODEL_KEYS_FROM_TRAIN if name == "model" else None)
                for name, cls in SECTION_TYPES.items()}
    engine = build_engine_section(raw.get("engine"), bf16_supported, problems)
    cfg = Config(**sections, engine=engine)
    if cfg.model.hf_path and cfg.data.kind in ("text", "jsonl") and cfg.data.tokenizer is None:
        cfg.data.tokenizer = cfg.model.hf_path  # a Hugging Face model's data goes through its tokenizer
    # checks across keys run only on sections without problems: a bad value has been replaced by
    # its default, and a problem about that default would name a number the user never wrote
    if _clean(problems, "model"):
        problems += model_problems(cfg)
    if _clean(problems, "data"):
        from pstar_cli.data import data_problems

        problems += data_problems(dataclasses.asdict(cfg.data), cfg.train.seq_len)
    if _clean(problems, "train", "distributed"):
        problems += train_problems(cfg)
    if _clean(problems, "distributed"):
        problems += distributed_problems(cfg.distributed)
    if problems:
        raise ConfigError(problems, source)
    if cfg.model.family is None and cfg.model.hf_path is None:
        import models

        cfg.model.family = models.resolve_model_config(cfg.model_dict())["family"]
    return cfg


def _clean(problems: list[str], *sections: str) -> bool:
    prefixes = tuple(f"{name}{sep}" for name in sections for sep in ".:")
    return not any(problem.startswith(prefixes) for problem in problems)


def load_config(path: str | Path, overrides: Iterable[str] = (), *,
                bf16_supported: bool | None = None) -> Config:
    """Read a YAML config, apply `dotted.key=value` overrides and validate everything at once."""
    raw = read_yaml_file(path)
    override_problems = apply_overrides(raw, overrides)
    return config_from_dict(raw, str(path), bf16_supported=bf16_supported, problems=override_problems)
