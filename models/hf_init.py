"""Random init of a Hugging Face model module by module, equal to `from_config` for the same seed.

`from_config` on a real device draws random numbers twice per layer: torch's default init in each
layer's constructor (kaiming for nn.Linear, normal for nn.Embedding), later overwritten, then the
model's `_init_weights` in `post_init`. A nested PreTrainedModel (LlamaModel inside
LlamaForCausalLM) runs its own `post_init` as soon as it is constructed, before the outer model
constructs its remaining layers (lm_head); `post_init` visits children before parents. pstar builds
on meta, where nothing is drawn, and the engine initialises one module at a time in `modules()`
order. `HFRandomInit` therefore replays that draw order as a list of events: a constructor's draws
are made into a scratch tensor and dropped; an init that comes before the engine reaches its module
runs on scratch tensors whose values are kept until then; an init of a tied copy (lm_head sharing the
embedding, tied by HF only after its init drew) runs on scratch and is dropped. Scratch tensors are
one module's size and live on the engine's init device, so its generator is the one consumed.

Exact for models whose layers draw only in `reset_parameters` (torch's layers), in a constructor
listed in `_CONSTRUCTOR_DRAWS` (GPT-2's Conv1D) and in `_init_weights` (checked in tests for Llama,
tied and untied, Qwen2, Mistral and GPT-2); another custom layer that draws in its own constructor is
initialised correctly (by `_init_weights`) but from another point of the random stream.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _pretrained_model_class():
    from transformers import PreTrainedModel

    return PreTrainedModel


def owners(root: nn.Module) -> dict[int, nn.Module]:
    """id(module) -> the PreTrainedModel whose `_init_weights` initialises it (the nearest one above
    it or itself, as `initialize_weights` dispatches)."""
    base = _pretrained_model_class()
    result: dict[int, nn.Module] = {}

    def visit(module: nn.Module, owner: nn.Module) -> None:
        owner = module if isinstance(module, base) else owner
        result.setdefault(id(module), owner)
        for child in module.children():
            visit(child, owner)

    visit(root, root)
    return result


def init_weights_of(root: nn.Module) -> Callable[[nn.Module], None]:
    """`init(module)`: the model's own `_init_weights` for that module."""
    by_id = owners(root)
    return lambda module: by_id[id(module)]._init_weights(module)


def construction_events(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """("construct" | "init", module) in the order `from_config` draws random numbers."""
    base = _pretrained_model_class()
    events: list[tuple[str, nn.Module]] = []
    done: set[int] = set()

    def build(pretrained: nn.Module) -> None:
        events.append(("construct", pretrained))
        construct_children(pretrained)
        subtree = [m for m in _post_order(pretrained) if id(m) not in done]
        events.extend(("init", m) for m in subtree)
        done.update(id(m) for m in subtree)

    def construct_children(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, base):
                build(child)
            else:
                events.append(("construct", child))
                construct_children(child)

    build(model)
    return events


def _post_order(module: nn.Module, seen: set[int] | None = None) -> list[nn.Module]:
    seen = set() if seen is None else seen
    order = []
    for child in module.children():
        if id(child) not in seen:
            seen.add(id(child))
            order += _post_order(child, seen)
    return order + [module]


def _direct_tensors(module: nn.Module) -> list[tuple[str, bool, torch.Tensor]]:
    params = [(n, True, p) for n, p in module._parameters.items() if p is not None]
    return params + [(n, False, b) for n, b in module._buffers.items() if b is not None]


class HFRandomInit:
    """`init_module_` that initialises each module with the model's `_init_weights`, drawing random
    numbers in `from_config`'s order (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self._init = init_weights_of(model)
        self._events = construction_events(model)
        self._next = 0
        self._kept: dict[int, dict[str, torch.Tensor]] = {}  # init results made before their turn
        self._tied_copies = _tied_copies(model)

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> None:
        if id(module) in self._kept:  # its init already ran, on stand-ins, when its turn came
            values = self._kept.pop(id(module))
            for name, _, tensor in _direct_tensors(module):
                tensor.data.copy_(values[name])
            return
        while self._next < len(self._events):
            kind, target = self._events[self._next]
            self._next += 1
            if kind == "construct":
                if _direct_tensors(target):
                    _run_isolated(target, _reset_parameters, None, {}, fresh=True)  # drawn and dropped
            elif target is module:
                if self._owns_all(module):
                    _run_isolated(module, self._init, module, self._kept)  # into the chunk storage
                else:  # a tied copy: HF draws its init, then ties it away
                    _run_isolated(module, self._init, None, self._kept, fresh=True)
                self._drain(module)
                return
            elif _direct_tensors(target):
                self._kept[id(target)] = _run_isolated(target, self._init, None, self._kept, fresh=True)
            else:
                _run_isolated(target, self._init, None, self._kept)
        self._init(module)  # not in the event list (not reachable from the model): plain init

    def _drain(self, module: nn.Module) -> None:
        """Run the inits of tensor-less modules that come right after `module`'s: its ancestors
        (GPT-2's attention and MLP re-draw their c_proj weight after c_proj's own init)."""
        while self._next < len(self._events):
            kind, target = self._events[self._next]
            if kind != "init" or _direct_tensors(target):
                return
            _run_isolated(target, self._init, module, self._kept)
            self._next += 1

    def _owns_all(self, module: nn.Module) -> bool:
        return not any((id(module), name) in self._tied_copies for name in module._parameters)


def _tied_copies(model: nn.Module) -> set[tuple[int, str]]:
    """(id(module), name) of every parameter registration after its first (tied weights), taken
    on the meta model: the engine later swaps the Parameter objects, not the modules."""
    seen, copies = set(), set()
    for sub in model.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                (copies.add((id(sub), name)) if id(param) in seen else seen.add(id(param)))
    return copies


# Layers that draw in their constructor without a reset_parameters(), by class name: what they draw.
# transformers' Conv1D (GPT-2's projections) fills its weight with normal(0, 0.02) in __init__.
_CONSTRUCTOR_DRAWS = {"Conv1D": lambda module: nn.init.normal_(module.weight, std=0.02)}


def _reset_parameters(module: nn.Module) -> None:
    """What a layer's constructor draws: torch's layers call reset_parameters(); the few others are
    listed above; anything else is taken to draw nothing."""
    reset = getattr(module, "reset_parameters", None)
    if not module._parameters:
        return
    if callable(reset):
        reset()
    elif type(module).__name__ in _CONSTRUCTOR_DRAWS:
        _CONSTRUCTOR_DRAWS[type(module).__name__](module)


def _run_isolated(root: nn.Module, run: Callable[[nn.Module], None], real: nn.Module | None,
                  kept: dict[int, dict[str, torch.Tensor]], fresh: bool = False) -> dict[str, torch.Tensor]:
    """Run `run(root)` with every direct tensor of root's subtree swapped for a stand-in, except
    those of `real` (left as they are: the engine's chunk storage): modules in `kept` get their
    kept values (and keep what `run` writes there), root gets fresh tensors on the default device
    (the engine's init device) when `fresh`, and everything else a `meta` tensor, so a write meant
    for a module that is done does not reach its chunks. Returns root's tensors after `run` when
    `fresh`."""
    swapped = []  # (owner, store, name, original)
    for module in root.modules():
        if module is real:
            continue
        for name, is_param, tensor in _direct_tensors(module):
            if module is root and fresh:
                dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
                stand_in = torch.empty(tensor.shape, dtype=dtype)
            elif id(module) in kept:
                stand_in = kept[id(module)][name]
            else:
                stand_in = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            store = module._parameters if is_param else module._buffers
            store[name] = nn.Parameter(stand_in, requires_grad=tensor.requires_grad) if is_param else stand_in
            swapped.append((module, store, name, tensor))
    try:
        run(root)
        # an init may replace a tensor instead of writing into it: keep what the module holds now
        result = {}
        for module, store, name, _ in swapped:
            if module is root and fresh:
                result[name] = store[name].detach()
            elif id(module) in kept:
                kept[id(module)][name] = store[name].detach()
    finally:
        for _, store, name, tensor in swapped:
            store[name] = tensor
    return result
