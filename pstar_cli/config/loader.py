"""Loading a run config: a YAML file plus `dotted.key=value` overrides, validated at once.

Every problem of a file is collected and raised together as one `ConfigError`, each naming the
dotted key and what is allowed (the misspelt-key wording is the engine's `unknown_key_problem`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from engine.config import ConfigProblems, engine_config_problems, find_key, unknown_key_problem
from pstar_cli.config.checks import cross_key_problems
from pstar_cli.config.sections import (ENGINE_KEYS_FROM_TRAIN, MODEL_KEYS_FROM_TRAIN, SECTION_NAMES,
                                       SECTION_TYPES, Config)
from pstar_cli.errors import PstarError


class ConfigError(PstarError, ConfigProblems):
    """A run config with one or more problems (of the engine's config error family); the CLI
    prints `message_lines()` and exits with code 2."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source or "config"
        Exception.__init__(self, "\n".join(self.message_lines()))  # not the parents: both would re-split it

    def message_lines(self) -> list[str]:
        if len(self.problems) == 1:
            return [f"{self.source}: {self.problems[0]}"]
        return [f"{self.source} has {len(self.problems)} problems:", *self.problems]




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
        marked = isinstance(exc, yaml.MarkedYAMLError)
        line = f" at line {exc.problem_mark.line + 1}" if marked and exc.problem_mark is not None else ""
        problem = exc.problem if marked and exc.problem else exc
        raise ConfigError([f"is not valid YAML{line}: {problem}"], str(path))
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
    return find_key(d, path)[1]


# ---- typed sections ----

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
            problems.append(unknown_key_problem(dotted, str(key), fields))
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
    """bf16 where the run computes on a GPU that supports it, fp32 elsewhere, unless the file chose
    fp16 or bf16 itself."""
    if _nested_get(engine, ("fp16", "enabled")) is True or _has_key(engine, ("bf16", "enabled")):
        return
    if engine.get("compute_device") == "cpu":
        bf16_supported = False  # the run computes on the CPU even where a GPU is present
    elif bf16_supported is None:
        bf16_supported = detect_bf16()
    bf16 = engine.get("bf16") or {}
    engine["bf16"] = {**bf16, "enabled": bf16_supported}


def _has_key(d: Any, path: tuple[str, ...]) -> bool:
    return find_key(d, path)[0]


# ---- loading ----

def config_from_dict(raw: dict, source: str | None = None, *, bf16_supported: bool | None = None,
                     problems: list[str] | None = None) -> Config:
    """A validated Config from a dict of sections; raises ConfigError listing every problem.

    `bf16_supported` None means: ask this machine's GPU (used only when the file leaves the
    precision open)."""
    problems = list(problems or [])
    problems += [unknown_key_problem(str(k), str(k), SECTION_NAMES, "section")
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
    problems += cross_key_problems(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    if cfg.model.family is None and cfg.model.hf_path is None:  # hf: config.json is the model
        cfg.model.family = cfg.model_spec["family"]
    return cfg


def load_config(path: str | Path, overrides: Iterable[str] = (), *,
                bf16_supported: bool | None = None) -> Config:
    """Read a YAML config, apply `dotted.key=value` overrides and validate everything at once."""
    raw = read_yaml_file(path)
    override_problems = apply_overrides(raw, overrides)
    return config_from_dict(raw, str(path), bf16_supported=bf16_supported, problems=override_problems)
