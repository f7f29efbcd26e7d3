"""Pretrained weights in and out of chunks (the file format: engine/safetensors_io.py).

Loading. `PretrainedInit` is an `init_module_` for engine/init.py: when the engine materialises a
module, the module's parameters are views of (or temporaries for) its fp32 master chunk, and each is
filled from the safetensors file it is stored in, in 8 MiB blocks converted on the way; the engine
then casts the masters into the compute-dtype chunk. Host memory during a load is the chunks plus
one block. Parameters the files lack are refused before any chunk is allocated.

Saving. `save_pretrained_weights(model, out)` writes a live `EngineModel`'s weights from its fp32
master chunks, one tensor in host memory at a time, each tied parameter once (under its first name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine.errors import EngineError
from engine.safetensors_io import DEFAULT_SHARD_BYTES, Entry, SafetensorsDir, write_safetensors


# ---- loading into chunks -----------------------------------------------------------------------

class PretrainedInit:
    """An `init_module_` that fills each module's parameters (and saved buffers) from safetensors.

    `names` maps (id(module), local name) to every full name of that tensor (tied ones have
    several); the first name found in the files is read; keys in `optional` (buffers) may be absent.
    `init_rest(module)` initialises what the files do not hold (buffers computed at construction,
    such as rotary tables); it runs before the stored values are copied in, so whatever it does to
    the parameters is overwritten. Missing parameters are refused before any chunk is allocated."""

    def __init__(self, source: SafetensorsDir, names: dict[tuple[int, str], list[str]],
                 optional: set[tuple[int, str]], init_rest: Callable[[nn.Module], None] | None):
        self.source, self.names, self.init_rest = source, names, init_rest
        missing = [aliases[0] for key, aliases in names.items()
                   if key not in optional and not any(a in source.tensors for a in aliases)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise EngineError(f"{source.directory}: the safetensors files lack {len(missing)} of the model's "
                              f"parameters ({shown}); is this the checkpoint of this config.json?")

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> None:
        stored_buffers = {n for n, b in module._buffers.items() if b is not None and self._key(module, n)}
        has_other_buffers = any(b is not None and n not in stored_buffers for n, b in module._buffers.items())
        if has_other_buffers and self.init_rest is not None:
            self.init_rest(module)
        for local, tensor in [*module._parameters.items(), *module._buffers.items()]:
            key = self._key(module, local) if tensor is not None else None
            if key is None:
                continue
            # converted to the master's fp32 (or the buffer's dtype) block by block
            self.source.copy_into(key, tensor.data)

    def _key(self, module: nn.Module, local: str) -> str | None:
        aliases = self.names.get((id(module), local), ())
        return next((a for a in aliases if a in self.source.tensors), None)


# ---- from a live engine model ------------------------------------------------------------------

def engine_entries(model, dtype: torch.dtype, rename: Callable[[str], str | None]) -> tuple[list[Entry], Callable]:
    """Entries and a fetch function for an `EngineModel`'s weights: each parameter once (under its
    first name, tied ones included), in layout order, then the persistent buffers. Values come from
    `model.state_dict()`, which on one rank holds views of the fp32 master chunks (no copy), so each
    tensor is copied to the host only when it is written. `rename(name)` gives the saved name
    (None: leave the tensor out)."""
    rt = model._rt
    if rt.comm is not None:
        raise EngineError("save_pretrained_weights runs in one process; with several ranks save a "
                          "checkpoint and convert it with `pstar export CHECKPOINT OUT --format hf`")
    state = model.state_dict()  # finishes pending optimizer updates first
    param_names = [info.names[0] for group in rt.groups for info in group.tensors]
    aliases = {name for group in rt.groups for info in group.tensors for name in info.names}
    buffer_names = [key for key in state if key not in aliases]
    values = {rename(key): state[key] for key in param_names + buffer_names if rename(key) is not None}
    entries = [Entry(name, tuple(value.shape), dtype if value.is_floating_point() else value.dtype)
               for name, value in values.items()]
    return entries, values.__getitem__


def save_pretrained_weights(model, out: str | Path, dtype: torch.dtype = torch.float32,
                            rename: Callable[[str], str | None] = lambda name: name,
                            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write an EngineModel's weights as safetensors shards, one tensor in host memory at a time."""
    entries, fetch = engine_entries(model, dtype, rename)
    return write_safetensors(Path(out), entries, fetch, max_shard_bytes)


def tensor_names(module: nn.Module) -> dict[tuple[int, str], list[str]]:
    """(id(owner module), local name) -> every full name of that parameter or persistent buffer (a
    tied parameter has the names of all its holders, first holder first)."""
    names_of: dict[int, list[str]] = {}
    keys: dict[tuple[int, str], int] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dotted = f"{prefix}." if prefix else ""
        entries = list(sub._parameters.items()) + [
            (n, b) for n, b in sub._buffers.items() if n not in sub._non_persistent_buffers_set]
        for local, tensor in entries:
            if tensor is not None:
                names_of.setdefault(id(tensor), []).append(dotted + local)
                keys[(id(sub), local)] = id(tensor)
    return {key: names_of[tensor_id] for key, tensor_id in keys.items()}
