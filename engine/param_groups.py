"""Optimizer parameter groups in torch.optim's format, and nanoGPT's weight-decay rule.

`initialize_engine(..., param_groups=fn)` calls `fn(module)` on the model as built (on the meta
device, before any memory is taken) and expects torch.optim's list of dicts:

    [{"params": [...], "weight_decay": 0.1}, {"params": [...], "weight_decay": 0.0, "lr": 3e-4}]

Each dict may set `lr`, `betas`, `eps`, `weight_decay`; what it leaves out comes from the engine
config's `optimizer.params`. As in torch, a parameter may be in one group only. Unlike torch, every
trainable parameter must be in a group (torch would compute its gradient and never apply it; in
pstar the gradient takes the weight's place in its chunk): freeze it (`requires_grad_(False)`) to
leave it out. Frozen parameters may be listed or not; they hold no optimizer state either way.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine.config import _betas, _non_negative_float, _positive_float
from engine.errors import EngineError

ParamGroupsFn = Callable[[nn.Module], list[dict]]

HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")


def weight_decay_groups(module: nn.Module, weight_decay: float, **hyper) -> list[dict]:
    """nanoGPT's rule as two groups: weight decay on the trainable tensors of 2+ dims (matmul
    weights, embeddings), none on the rest (biases, norm gains). `hyper` (lr, betas, eps) goes into
    both. Both groups are always returned (possibly empty), so group indices stay stable."""
    decay, no_decay = [], []
    for param in module.parameters():  # distinct parameters: a tied one once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": float(weight_decay), **hyper},
            {"params": no_decay, "weight_decay": 0.0, **hyper}]


def resolve_param_groups(module: nn.Module, fn: ParamGroupsFn | None,
                         params: list[tuple[nn.Parameter, list[str]]]) -> tuple[list[dict], dict[int, int]]:
    """(each group's own hyper-parameters, id(parameter) -> group index) for `fn(module)`; one group
    without hyper-parameters of its own when there is no fn. Raises EngineError listing every
    problem."""
    if fn is None:
        return [{}], {}
    groups = fn(module)
    if isinstance(groups, dict) or not isinstance(groups, (list, tuple)) or not groups:
        raise EngineError("param_groups(module) must return a non-empty list of dicts in torch.optim's "
                          f"format ({{'params': [...], 'lr': ...}}), got {type(groups).__name__}")
    names = {id(param): names[0] for param, names in params}
    problems: list[str] = []
    hypers, group_of = [], {}
    for index, group in enumerate(groups):
        hyper, members = _check_group(index, group, names, problems)
        hypers.append(hyper)
        for param in members:
            if id(param) in group_of:
                problems.append(f"param_groups[{index}]: '{names[id(param)]}' is also in "
                                f"param_groups[{group_of[id(param)]}]; a parameter may be in one group only")
            group_of.setdefault(id(param), index)
    missing = [nm[0] for param, nm in params if param.requires_grad and id(param) not in group_of]
    if missing:
        problems.append(f"trainable parameters in no group: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''} (add them to a group, or freeze them "
                        "with requires_grad_(False))")
    if problems:
        raise EngineError("param_groups: " + "; ".join(problems))
    return hypers, group_of


def _check_group(index: int, group, names: dict[int, str], problems: list[str]) -> tuple[dict, list]:
    where = f"param_groups[{index}]"
    if not isinstance(group, dict) or "params" not in group:
        problems.append(f"{where}: must be a dict with a 'params' key")
        return {}, []
    unknown = sorted(set(group) - {"params", *HYPER_KEYS})
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: params, "
                        f"{', '.join(HYPER_KEYS)}")
    members = group["params"]
    members = [members] if isinstance(members, torch.Tensor) else list(members)
    foreign = [m for m in members if id(m) not in names]
    if foreign:
        problems.append(f"{where}: {len(foreign)} tensor(s) are not parameters of the model")
    hyper = {key: group[key] for key in HYPER_KEYS if key in group}
    problems += [f"{where}.{key}: {why} (got {hyper[key]!r})" for key in hyper
                 if (why := _hyper_problem(key, hyper[key])) is not None]
    if "betas" in hyper and isinstance(hyper["betas"], (list, tuple)):
        hyper["betas"] = tuple(float(b) for b in hyper["betas"])
    return hyper, [m for m in members if id(m) in names]


def _hyper_problem(key: str, value) -> str | None:
    check = {"lr": _non_negative_float, "eps": _positive_float, "weight_decay": _non_negative_float,
             "betas": _betas}[key]
    return check(value)
