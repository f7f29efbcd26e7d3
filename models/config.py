"""Model config dicts: validation and resolution against the size tables.

A model config is a plain dict (the `model` section of a pstar YAML file). `resolve_model_config`
returns a new dict with every key of the family filled in: the size's numbers first, then the
explicit keys on top, then the family defaults for anything still missing.
"""

from engine.config import ConfigProblems, unknown_key_problem
from models.sizes import SIZES_BY_FAMILY

FAMILIES = ("gpt", "llama")

_COMMON_KEYS = ("family", "size", "hidden", "layers", "heads", "vocab_size", "seq_len",
                "activation_checkpointing", "recompute_layers", "dropout")
_FAMILY_KEYS = {
    "gpt": _COMMON_KEYS,
    "llama": _COMMON_KEYS + ("kv_heads", "ffn_hidden", "rope_theta", "tie_embeddings"),
}
_DEFAULTS = {
    "gpt": {"vocab_size": 50304, "seq_len": 1024, "activation_checkpointing": False, "recompute_layers": None,
            "dropout": 0.0},
    "llama": {"vocab_size": 32000, "seq_len": 2048, "activation_checkpointing": False, "recompute_layers": None,
              "dropout": 0.0, "rope_theta": 10000.0, "tie_embeddings": False},
}
_POSITIVE_INT_KEYS = ("hidden", "layers", "heads", "vocab_size", "seq_len", "kv_heads", "ffn_hidden")
_BOOL_KEYS = ("activation_checkpointing", "tie_embeddings")


class ModelConfigError(ConfigProblems):
    """A model config with one or more problems (of the engine's config error family)."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, "invalid model config")


def model_config_problems(cfg) -> list[str]:
    """Every problem of a model config, each naming its dotted key; empty when valid."""
    if not isinstance(cfg, dict):
        return [f"model: expected a mapping of model keys, got {type(cfg).__name__}"]
    if cfg.get("hf_path") is not None:  # a Hugging Face directory: its config.json is the model
        from models.hf import hf_model_problems
        return hf_model_problems(cfg)
    if cfg.get("pretrained") is not None:
        return ["model.pretrained: only used with model.hf_path (a local Hugging Face model directory)"]
    family, problems = _family_of(cfg)
    if family is None:
        return problems
    problems += _unknown_key_problems(cfg, family)
    problems += _size_problems(cfg, family)
    problems += _value_problems(cfg)
    if any(p.startswith(("model.size", "model.hidden", "model.heads", "model.kv_heads"))
           for p in problems):
        return problems  # the shape checks below need those values
    return problems + _shape_problems(_merge(cfg, family))


def resolve_model_config(cfg: dict) -> dict:
    """The full config of a model: size numbers, explicit keys on top, family defaults.

    Raises ModelConfigError listing every problem when the config is not valid.
    """
    if cfg.get("family") == "hf":
        return dict(cfg)  # resolved already (models/hf.py)
    problems = model_config_problems(cfg)
    if problems:
        raise ModelConfigError(problems)
    if cfg.get("hf_path") is not None:
        from models.hf import resolve_hf_model_config
        return resolve_hf_model_config(cfg)
    family, _ = _family_of(cfg)
    return _merge(cfg, family)


def _merge(cfg: dict, family: str) -> dict:
    size = cfg.get("size")
    merged = {"family": family, "size": size, **_DEFAULTS[family]}
    if size is not None:
        merged.update(SIZES_BY_FAMILY[family][size])
    merged.update({k: v for k, v in cfg.items() if v is not None})
    merged["family"] = family
    if family == "llama":
        merged.setdefault("kv_heads", merged.get("heads"))
        if "ffn_hidden" not in merged and isinstance(merged.get("hidden"), int):
            merged["ffn_hidden"] = default_ffn_hidden(merged["hidden"])
    if isinstance(merged.get("dropout"), int):
        merged["dropout"] = float(merged["dropout"])
    return merged


def default_ffn_hidden(hidden: int, multiple_of: int = 256) -> int:
    """SwiGLU width with about the parameter count of a 4h GELU MLP: 2/3 of 4h, rounded up."""
    width = 2 * 4 * hidden // 3
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


def recomputed_layers(model: dict) -> int:
    """How many blocks a resolved model recomputes in backward: the first `recompute_layers` of them
    (null: all) with activation checkpointing, none without."""
    if not model.get("activation_checkpointing"):
        return 0
    count = model.get("recompute_layers")
    return model["layers"] if count is None else count


def _family_of(cfg: dict) -> tuple[str | None, list[str]]:
    family, size = cfg.get("family"), cfg.get("size")
    if family is None and isinstance(size, str):
        family = next((f for f, table in SIZES_BY_FAMILY.items() if size in table), None)
        if family is None:
            return None, [f"model.size: {size!r} is not a known size; known: {_known_sizes()}"]
    if family is None:
        return None, [f"model.size: required (a size name such as gpt-124m or llama-1b), or set "
                      f"model.family ({' or '.join(FAMILIES)}) with hidden, layers and heads"]
    if family not in FAMILIES:
        return None, [f"model.family: {family!r} is not one of {', '.join(FAMILIES)}"]
    return family, []


def _unknown_key_problems(cfg: dict, family: str) -> list[str]:
    allowed, problems = _FAMILY_KEYS[family], []
    for key in cfg:
        if key in allowed:
            continue
        owners = [f for f, keys in _FAMILY_KEYS.items() if key in keys]
        if owners:
            problems.append(f"model.{key}: only used by family {owners[0]}, but this model is {family}; "
                            f"remove it")
            continue
        problems.append(unknown_key_problem(f"model.{key}", str(key), allowed, f"key for family {family}"))
    return problems


def _size_problems(cfg: dict, family: str) -> list[str]:
    size = cfg.get("size")
    if size is None:
        missing = [k for k in ("hidden", "layers", "heads") if cfg.get(k) is None]
        return [f"model.{k}: required when model.size is not given" for k in missing]
    if not isinstance(size, str):
        return [f"model.size: expected a size name like 'gpt-1.3b', got {size!r}"]
    if size in SIZES_BY_FAMILY[family]:
        return []
    for other, table in SIZES_BY_FAMILY.items():
        if size in table:
            return [f"model.size: {size!r} is a {other} size but model.family is {family!r}"]
    known = ", ".join(SIZES_BY_FAMILY[family])
    return [f"model.size: {size!r} is not a known {family} size; known: {known}"]


def _value_problems(cfg: dict) -> list[str]:
    problems = []
    for key in _POSITIVE_INT_KEYS:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"model.{key}: expected a positive integer, got {value!r}")
    for key in _BOOL_KEYS:
        value = cfg.get(key)
        if value is not None and not isinstance(value, bool):
            problems.append(f"model.{key}: expected true or false, got {value!r}")
    dropout = cfg.get("dropout")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0.0 <= dropout < 1.0):
        problems.append(f"model.dropout: expected a number in [0, 1), got {dropout!r}")
    count, checkpointing = cfg.get("recompute_layers"), cfg.get("activation_checkpointing")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        problems.append(f"model.recompute_layers: expected 0 or more blocks, or null (every block), "
                        f"got {count!r}")
    elif count is not None and (checkpointing is None or checkpointing is False):  # not when it is invalid
        problems.append(f"model.recompute_layers: only used with model.activation_checkpointing: true "
                        f"(it says how many blocks to recompute); set that or remove recompute_layers")
    theta = cfg.get("rope_theta")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                              or not 0 < theta < float("inf")):
        problems.append(f"model.rope_theta: expected a positive number, got {theta!r}")
    return problems


def _shape_problems(merged: dict) -> list[str]:
    problems = _recompute_count_problems(merged)
    hidden, heads = merged["hidden"], merged["heads"]
    if hidden % heads:
        return problems + [f"model.hidden: {hidden} is not divisible by model.heads={heads}"]
    if merged["family"] != "llama":
        return problems
    if heads % merged["kv_heads"]:
        problems.append(f"model.kv_heads: model.heads={heads} is not a multiple of "
                        f"model.kv_heads={merged['kv_heads']}")
    if (hidden // heads) % 2:
        problems.append(f"model.heads: head size hidden/heads = {hidden // heads} must be even for RoPE")
    return problems


def _recompute_count_problems(merged: dict) -> list[str]:
    count, layers = merged.get("recompute_layers"), merged.get("layers")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (count, layers)) or count <= layers:
        return []  # unset, or a wrong type or layer count that _value_problems reported
    return [f"model.recompute_layers: {count} is more than the model's {layers} blocks (model.layers); "
            f"use at most {layers}, or null to recompute every block"]


def _known_sizes() -> str:
    return ", ".join(name for table in SIZES_BY_FAMILY.values() for name in table)
