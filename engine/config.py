"""The engine's configuration: PatrickStar's keys plus pstar's, validated all at once.

`engine_config_problems(cfg)` lists every unknown key and bad value (each naming the dotted key and
what is allowed); `resolve_engine_config(cfg)` turns a valid dict into a typed `EngineConfig` with the
defaults filled in, or raises `EngineConfigError` carrying all problems.

Defaults follow PatrickStar's meaning: `default_chunk_size` counts elements (64 Mi), the mem-tracer
ratios are fractions of the device / host memory, and the fp16 loss scaler is dynamic
(`loss_scale: 0`) starting at 2**initial_scale_power.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024  # elements, not bytes (as in PatrickStar)

log = logging.getLogger("pstar.engine")


class ConfigProblems(ValueError):
    """A config with one or more problems; `problems` holds one line per problem, each naming its
    dotted key and what is allowed. The engine's, the models' and the CLI's config errors are all
    of this family, so a caller catches one type."""

    def __init__(self, problems: list[str], title: str = "invalid config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{title} ({len(self.problems)} problem(s)):\n{lines}")


class EngineConfigError(ConfigProblems):
    """An engine config with one or more problems."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, "invalid engine config")


def unknown_key_problem(dotted: str, key: str, allowed: Iterable[str], what: str = "key") -> str:
    """`dotted: unknown key (did you mean 'x'?); allowed: ...`: the one wording of a misspelt key
    for every config pstar reads."""
    allowed = sorted(allowed)
    hint = difflib.get_close_matches(key, allowed, n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"{dotted}: unknown {what}{did_you_mean}; allowed: {', '.join(allowed)}"


@dataclass(frozen=True)
class OptimizerConfig:
    type: str = "AdamW"  # "Adam" (L2 added to the gradient) or "AdamW" (decoupled decay)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    use_hybrid_adam: bool = True  # False: every optimizer group lives and steps on the host


@dataclass(frozen=True)
class Fp16Config:
    enabled: bool = False
    loss_scale: float = 0.0  # 0 = dynamic scaling; > 0 = this static scale
    initial_scale_power: int = 16  # dynamic scaling starts at 2**initial_scale_power
    loss_scale_window: int = 1000  # clean steps before the scale doubles
    hysteresis: int = 2  # consecutive overflows before the scale halves
    min_loss_scale: float = 1.0


@dataclass(frozen=True)
class MemTracerConfig:
    use_async_mem_monitor: bool = True
    warmup_gpu_chunk_mem_ratio: float = 0.1  # device share chunks may use during the warm-up step
    overall_gpu_mem_ratio: float = 0.8  # device share pstar may use at all (without device_memory_limit)
    overall_cpu_mem_ratio: float = 0.8  # host share pstar may use (without host_memory_limit)
    margin_use_ratio: float = 0.8  # optimizer groups leave (1 - this) x the activation peak free on the device


@dataclass(frozen=True)
class EngineConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    fp16: Fp16Config = field(default_factory=Fp16Config)
    bf16_enabled: bool = False
    default_chunk_size: int = DEFAULT_CHUNK_SIZE
    release_after_init: bool = False
    use_cpu_embedding: bool = False
    mem_tracer: MemTracerConfig = field(default_factory=MemTracerConfig)
    gradient_clipping: float = 0.0  # max global L2 norm; 0 = off
    device_memory_limit: int | None = None  # bytes of device memory for pstar (chunks + activations)
    host_memory_limit: int | None = None  # bytes of host memory for host-resident chunks
    gradient_accumulation_steps: int = 1
    init_device: str = "auto"  # where init's RNG runs: "auto" = the compute device, "cpu" = the host
    compute_device: str = "auto"  # "auto": this rank's GPU where CUDA is present, else the CPU; "cpu"
    # torch.compile each repeated block (every member of an nn.ModuleList) once the run has settled
    # (engine/hooks.py): nothing moves, so no engine hook runs inside a block
    compile_blocks: bool = False
    # Step some host optimizer groups on the GPU over their streamed state, beside host Adam
    # (engine/streamed_adam.py): CUDA, one rank, when every param chunk stays on the device
    stream_host_optimizer: bool = True

    @property
    def compute_dtype_name(self) -> str:
        if self.fp16.enabled:
            return "float16"
        if self.bf16_enabled:
            return "bfloat16"
        return "float32"


# ---- value checkers: each returns None when the value is fine, else what is allowed ----

Checker = Callable[[Any], "str | None"]


def _is_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_float(v: Any) -> str | None:
    return None if _is_number(v) and v > 0 else "must be a number > 0"


def _non_negative_float(v: Any) -> str | None:
    return None if _is_number(v) and v >= 0 else "must be a number >= 0"


def _positive_int(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v > 0 else "must be an integer > 0"


def _non_negative_int(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
    return None if ok else "must be an integer >= 0"


def _ratio(v: Any) -> str | None:
    return None if _is_number(v) and 0 < v <= 1 else "must be a number in (0, 1]"


def _optional_bytes(v: Any) -> str | None:
    if v is None:
        return None
    ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
    return None if ok else "must be null or a positive integer number of bytes"


def _init_device(v: Any) -> str | None:
    return None if v in ("auto", "cpu") else "must be 'auto' (the compute device) or 'cpu'"


def _compute_device(v: Any) -> str | None:
    return None if v in ("auto", "cpu") else "must be 'auto' (this rank's GPU if there is one) or 'cpu'"


def _optimizer_type(v: Any) -> str | None:
    return None if v in ("Adam", "AdamW") else "must be 'Adam' or 'AdamW'"


def _betas(v: Any) -> str | None:
    ok = (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in v)
    )
    return None if ok else "must be a pair of numbers in [0, 1), e.g. [0.9, 0.999]"


# The schema mirrors the seed's nested dict; a dict value is a section, a callable a leaf.
_SCHEMA: dict[str, Any] = {
    "optimizer": {
        "type": _optimizer_type,
        "params": {
            "lr": _non_negative_float,
            "betas": _betas,
            "eps": _positive_float,
            "weight_decay": _non_negative_float,
            "use_hybrid_adam": _is_bool,
        },
    },
    "fp16": {
        "enabled": _is_bool,
        "loss_scale": _non_negative_float,
        "initial_scale_power": _non_negative_int,
        "loss_scale_window": _positive_int,
        "hysteresis": _positive_int,
        "min_loss_scale": _positive_float,
    },
    "bf16": {"enabled": _is_bool},
    "default_chunk_size": _positive_int,
    "release_after_init": _is_bool,
    "use_cpu_embedding": _is_bool,
    "use_fake_dist": _is_bool,  # PatrickStar's examples put it here as well as under mem_tracer
    "client": {
        "mem_tracer": {
            "use_async_mem_monitor": _is_bool,
            "warmup_gpu_chunk_mem_ratio": _ratio,
            "overall_gpu_mem_ratio": _ratio,
            "overall_cpu_mem_ratio": _ratio,
            "margin_use_ratio": _ratio,
            "use_fake_dist": _is_bool,
            "with_static_partition": _is_bool,
        },
        "opts": {
            "with_mem_saving_comm": _is_bool,
            "with_mem_cache": _is_bool,
            "with_async_move": _is_bool,
        },
    },
    "gradient_clipping": _non_negative_float,
    "device_memory_limit": _optional_bytes,
    "host_memory_limit": _optional_bytes,
    "gradient_accumulation_steps": _positive_int,
    "init_device": _init_device,
    "compute_device": _compute_device,
    "compile_blocks": _is_bool,
    "stream_host_optimizer": _is_bool,
}


# PatrickStar 0.4.6 reads these keys; pstar accepts them so that its configs run unchanged, and
# says once why each has no effect here. (`client.mem_tracer.use_async_mem_monitor` and
# `release_after_init` are pstar settings of the same meaning: see MemTracerConfig, EngineConfig.)
PATRICKSTAR_ONLY_KEYS = {
    ("use_fake_dist",): "pstar runs one process per rank through torch.distributed; a single process "
                        "needs no stand-in process group",
    ("client", "mem_tracer", "use_fake_dist"): "pstar runs one process per rank through torch.distributed; "
                                               "a single process needs no stand-in process group",
    ("client", "mem_tracer", "with_static_partition"): "pstar places optimizer state from the warm-up step's "
                                                       "measured peak (engine/optimizer_placement.py)",
    ("client", "opts", "with_mem_saving_comm"): "pstar all-gathers whole chunks into one reused buffer "
                                                "and frees them by its eviction order",
    ("client", "opts", "with_mem_cache"): "pstar reuses chunk buffers through the caching allocator and its "
                                          "own pinned pool",
    ("client", "opts", "with_async_move"): "pstar always copies chunks on a side stream, overlapping compute",
}

# Keys that decide only where model data lives or how init runs, never what a step computes:
# a run may resume from a checkpoint written with other values (the shards are re-placed).
PLACEMENT_KEYS = frozenset({
    "device_memory_limit", "host_memory_limit", "default_chunk_size", "release_after_init",
    "use_cpu_embedding", "init_device", "compute_device", "client", "use_fake_dist",
    "optimizer.params.use_hybrid_adam",
})
# Keys that change the numbers from the step they take effect, without changing the saved state's
# meaning (one turns them to get a diverging run going again).
TUNING_KEYS = frozenset({"gradient_clipping", "compile_blocks", "stream_host_optimizer"})


def engine_key_effect(dotted: str) -> str:
    """What changing an engine key (dotted, within the engine section) between a checkpoint and
    its resumed run does: "placement" (nothing to the numbers), "numbers" (the steps from then
    on), or "state" (the saved state would mean something else)."""
    prefixes = [".".join(dotted.split(".")[:n]) for n in range(1, dotted.count(".") + 2)]
    if any(p in PLACEMENT_KEYS for p in prefixes):
        return "placement"
    return "numbers" if dotted in TUNING_KEYS else "state"


def note_patrickstar_only_keys(cfg: dict) -> list[str]:
    """Log one line per PatrickStar-only key the config sets; returns those lines."""
    lines = []
    for path, why in PATRICKSTAR_ONLY_KEYS.items():
        if find_key(cfg, path)[0]:
            lines.append(f"engine config: {'.'.join(path)} has no effect in pstar: {why}")
            log.info(lines[-1])
    return lines


def find_key(tree: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    """(whether the nested dict `tree` has the key path, its value or None)."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False, None
        tree = tree[key]
    return True, tree


def _section_problems(section: Any, schema: dict[str, Any], prefix: str) -> list[str]:
    where = prefix.rstrip(".") or "engine config"
    if not isinstance(section, dict):
        return [f"{where}: must be a mapping of keys to values"]
    problems = []
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            problems.append(unknown_key_problem(dotted, str(key), schema))
        elif isinstance(schema[key], dict):
            problems += _section_problems(value, schema[key], dotted + ".")
        elif (why := schema[key](value)) is not None:
            problems.append(f"{dotted}: {why} (got {value!r})")
    return problems


def _cross_field_problems(cfg: dict) -> list[str]:
    fp16_on = isinstance(cfg.get("fp16"), dict) and cfg["fp16"].get("enabled") is True
    bf16_on = isinstance(cfg.get("bf16"), dict) and cfg["bf16"].get("enabled") is True
    if fp16_on and bf16_on:
        return ["fp16.enabled and bf16.enabled: at most one may be true"]
    return []


def engine_config_problems(cfg: dict) -> list[str]:
    """Every problem of an engine config dict, one line each; an empty list means it is valid."""
    problems = _section_problems(cfg, _SCHEMA, "")
    if not problems:
        problems += _cross_field_problems(cfg)
    return problems


def _sub(cfg: dict, *path: str) -> dict:
    for key in path:
        cfg = cfg.get(key) or {}
    return cfg


def _build_optimizer(cfg: dict) -> OptimizerConfig:
    params = _sub(cfg, "optimizer", "params")
    values = {k: params[k] for k in ("lr", "eps", "weight_decay", "use_hybrid_adam") if k in params}
    if "betas" in params:
        values["betas"] = (float(params["betas"][0]), float(params["betas"][1]))
    if "type" in _sub(cfg, "optimizer"):
        values["type"] = cfg["optimizer"]["type"]
    return OptimizerConfig(**values)


def resolve_engine_config(cfg: "dict | EngineConfig | None") -> EngineConfig:
    """The typed config with defaults filled; raises EngineConfigError listing every problem.

    An EngineConfig (what pstar's CLI builds once from its YAML) is returned as it is."""
    if isinstance(cfg, EngineConfig):
        return cfg
    cfg = {} if cfg is None else cfg
    problems = engine_config_problems(cfg)
    if problems:
        raise EngineConfigError(problems)
    note_patrickstar_only_keys(cfg)
    return EngineConfig(
        optimizer=_build_optimizer(cfg),
        fp16=Fp16Config(**_sub(cfg, "fp16")),
        bf16_enabled=_sub(cfg, "bf16").get("enabled", False),
        mem_tracer=MemTracerConfig(**{k: v for k, v in _sub(cfg, "client", "mem_tracer").items()
                                       if k in _MEM_TRACER_FIELDS}),
        **{k: cfg[k] for k in _TOP_LEVEL_KEYS if k in cfg},
    )


_TOP_LEVEL_KEYS = ("default_chunk_size", "release_after_init", "use_cpu_embedding", "gradient_clipping",
                   "device_memory_limit", "host_memory_limit", "gradient_accumulation_steps", "init_device",
                   "compute_device", "compile_blocks", "stream_host_optimizer")
_MEM_TRACER_FIELDS = ("use_async_mem_monitor", "warmup_gpu_chunk_mem_ratio", "overall_gpu_mem_ratio",
                      "overall_cpu_mem_ratio", "margin_use_ratio")


def engine_config_tree(cfg: EngineConfig) -> dict:
    """The seed's nested dict of a typed config, every key of pstar's own written out (the
    inverse of `resolve_engine_config`); lists for tuples, so it survives JSON and YAML."""
    opt, fp16 = cfg.optimizer, cfg.fp16
    return {
        "optimizer": {"type": opt.type, "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
                                                   "weight_decay": opt.weight_decay,
                                                   "use_hybrid_adam": opt.use_hybrid_adam}},
        "fp16": {"enabled": fp16.enabled, "loss_scale": fp16.loss_scale,
                 "initial_scale_power": fp16.initial_scale_power, "loss_scale_window": fp16.loss_scale_window,
                 "hysteresis": fp16.hysteresis, "min_loss_scale": fp16.min_loss_scale},
        "bf16": {"enabled": cfg.bf16_enabled},
        "client": {"mem_tracer": dataclasses.asdict(cfg.mem_tracer)},
        **{k: v for k, v in dataclasses.asdict(cfg).items() if k in _TOP_LEVEL_KEYS},
    }
