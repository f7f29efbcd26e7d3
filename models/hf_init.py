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

Exact for models whose layers draw only in `reset_parameters` (torch's layers) and in `_init_weights`;
a custom layer drawing in its own constructor is initialised correctly but from another point of the
random stream.
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
        if id(module) in self._kept:
            for name, _, tensor in _direct_tensors(module):
                tensor.data.copy_(self._kept[id(module)][name])
            del self._kept[id(module)]
            return
        while self._next < len(self._events):
            kind, target = self._events[self._next]
            self._next += 1
            if kind == "construct":
                _on_scratch(target, _reset_parameters)
            elif target is module and self._owns_all(module):
                self._init(module)  # straight into the chunk storage the engine gave it
                return
            elif target is module:
                _on_scratch(module, self._init)  # a tied copy: HF's draws for it are overwritten
                return
            elif _direct_tensors(target):
                self._kept[id(target)] = _on_scratch(target, self._init)
        self._init(module)  # not in the event list (not reachable from the model): plain init

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


def _reset_parameters(module: nn.Module) -> None:
    """What a torch layer's constructor draws (modules without reset_parameters draw nothing)."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset) and module._parameters:
        reset()


def _on_scratch(module: nn.Module, run: Callable[[nn.Module], None]) -> dict[str, torch.Tensor]:
    """Run `run(module)` with its direct tensors swapped for fresh ones (on the default device, the
    engine's init device); returns those fresh tensors and puts the module's own back."""
    own = _direct_tensors(module)
    if not own:
        return {}
    scratch = {}
    for name, is_param, tensor in own:
        fresh = torch.empty(tensor.shape, dtype=torch.float32 if tensor.is_floating_point() else tensor.dtype)
        if is_param:
            module._parameters[name] = nn.Parameter(fresh, requires_grad=tensor.requires_grad)
        else:
            module._buffers[name] = fresh
        scratch[name] = fresh
    try:
        run(module)
        # an init may replace a tensor instead of writing into it: keep what the module holds now
        scratch = {name: (module._parameters.get(name) if is_param else module._buffers.get(name)).detach()
                   for name, is_param, _ in own}
    finally:
        for name, is_param, tensor in own:
            (module._parameters if is_param else module._buffers)[name] = tensor
    return scratch
