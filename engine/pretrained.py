"""Pretrained weights in and out of chunks: safetensors read tensor by tensor, written shard by shard.

Reading. `SafetensorsDir(path)` indexes a directory's `*.safetensors` files (through
`model.safetensors.index.json` when there is one) from their headers only. `PretrainedInit` is an
`init_module_` for engine/init.py: when the engine materialises a module, the module's parameters
are views of (or temporaries for) its fp32 master chunk, and each is filled from the file it is
stored in. A tensor is read with `readinto` in blocks of 8 MiB (no memory map: the pages of a mapped
file would count against the process's resident memory until it ends), each converted to fp32 as
it is copied into the master; the engine then casts the masters into the compute-dtype chunk. Host
memory during a load is the chunks plus one block.

Writing. `write_safetensors(out, entries, fetch, ...)` writes tensors in the order given, cut into
shards of at most `max_shard_bytes` (plus an index when there are several); every file's header is
known from the shapes, so `fetch(name)` is called for one tensor at a time, written and dropped.
`save_pretrained_weights(model, out)` does that from a live `EngineModel`'s masters.

The format (the safetensors specification): 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data,
offsets relative to its start. Needs no package: the engine stays importable alone.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from engine.errors import EngineError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_READ_BLOCK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    num_bytes: int


def read_header(path: Path) -> tuple[dict, int]:
    """(header without `__metadata__`, byte offset where the data starts) of one safetensors file."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise EngineError(f"{path} is not a safetensors file (shorter than its 8-byte header size)")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > _MAX_HEADER_BYTES:
            raise EngineError(f"{path} is not a safetensors file (header size {header_bytes:,} bytes)")
        try:
            header = json.loads(f.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise EngineError(f"{path} has a damaged safetensors header: {error}") from None
    header.pop("__metadata__", None)
    return header, 8 + header_bytes


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: those its index names, else every one there."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    return sorted(directory.glob("*.safetensors"))


class SafetensorsDir:
    """Every tensor of a directory's safetensors files, by name, from their headers."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        files = shard_files(self.directory)
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise EngineError(f"{self.directory}: {INDEX_NAME} lists shards that are not there: "
                              f"{', '.join(missing)}")
        if not files:
            raise EngineError(f"{self.directory} has no *.safetensors weights")
        self.tensors: dict[str, StoredTensor] = {}
        for path in files:
            header, data_start = read_header(path)
            for name, entry in header.items():
                self.tensors[name] = _stored(path, name, entry, data_start)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from disk into memory of its own (its stored dtype and shape)."""
        stored = self.tensors[name]
        if stored.num_bytes == 0:
            return torch.empty(stored.shape, dtype=stored.dtype)
        raw = bytearray(stored.num_bytes)
        with open(stored.path, "rb") as f:
            f.seek(stored.begin)
            if f.readinto(raw) != stored.num_bytes:
                raise EngineError(f"{stored.path} ends inside tensor '{name}': the file is truncated")
        return torch.frombuffer(raw, dtype=stored.dtype).view(stored.shape)

    def copy_into(self, name: str, target: torch.Tensor) -> None:
        """Read a tensor into `target` (same shape, any dtype and device) in blocks of at most
        `_READ_BLOCK_BYTES`, converting each as it is copied: a load never holds a whole tensor
        besides its destination (an embedding of 150k x 5120 would be 1.5 GB in bf16)."""
        stored = self.tensors[name]
        if tuple(target.shape) != stored.shape:
            raise EngineError(f"{self.directory}: '{name}' has shape {list(stored.shape)}, the model "
                              f"built from config.json expects {list(target.shape)}")
        flat = target.view(-1)  # the chunk views and temporaries the engine hands out are contiguous
        block = max(1, _READ_BLOCK_BYTES // stored.dtype.itemsize)
        with open(stored.path, "rb") as f:
            f.seek(stored.begin)
            for first in range(0, flat.numel(), block):
                count = min(block, flat.numel() - first)
                raw = bytearray(count * stored.dtype.itemsize)
                if f.readinto(raw) != len(raw):
                    raise EngineError(f"{stored.path} ends inside tensor '{name}': the file is truncated")
                flat[first:first + count].copy_(torch.frombuffer(raw, dtype=stored.dtype))


def _stored(path: Path, name: str, entry: dict, data_start: int) -> StoredTensor:
    dtype = _DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise EngineError(f"{path}: tensor '{name}' has dtype {entry.get('dtype')!r}, which pstar cannot "
                          f"read; known: {', '.join(_DTYPES)}")
    begin, end = entry["data_offsets"]
    shape = tuple(int(n) for n in entry["shape"])
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise EngineError(f"{path}: tensor '{name}' has {end - begin} bytes for shape {list(shape)}")
    return StoredTensor(path, dtype, shape, data_start + begin, end - begin)


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


# ---- writing -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive runs of entries, each under max_shard_bytes (a bigger tensor gets a shard alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.num_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.num_bytes
    return shards


def _header_bytes(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": _CODES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.num_bytes]}
        offset += entry.num_bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data then starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def write_safetensors(out: Path, entries: list[Entry], fetch: Callable[[str], torch.Tensor],
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write the entries' tensors (fetched one at a time, converted to each entry's dtype) as
    `model.safetensors`, or as numbered shards plus `model.safetensors.index.json`."""
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _write_shard(out / name, shard, fetch)
        weight_map.update({entry.name: name for entry in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.num_bytes for e in entries)}, "weight_map": weight_map}
        _write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return [out / name for name in names]


def _write_shard(path: Path, entries: list[Entry], fetch: Callable[[str], torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(_header_bytes(entries, {"format": "pt"}))
        for entry in entries:
            value = fetch(entry.name).detach().to("cpu", entry.dtype).contiguous()
            if tuple(value.shape) != entry.shape:
                raise EngineError(f"'{entry.name}': got shape {list(value.shape)}, planned {list(entry.shape)}")
            if value.numel():
                f.write(_raw_bytes(value))
            del value
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _raw_bytes(value: torch.Tensor):
    """A contiguous host tensor's memory as a bytes-like object, without a copy (and without numpy);
    valid while `value` lives."""
    return (ctypes.c_ubyte * value.nbytes).from_address(value.data_ptr())


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- from a live engine model ------------------------------------------------------------------

def engine_entries(model, dtype: torch.dtype, rename: Callable[[str], str | None]) -> tuple[list[Entry], Callable]:
    """Entries and a fetch function for an `EngineModel`'s weights: each parameter once (under its
    first name, tied ones included), read from its fp32 master chunk, in layout order.
    `rename(name)` gives the saved name (None: leave the tensor out)."""
    rt = model._rt
    if rt.comm is not None:
        raise EngineError("save_pretrained_weights runs in one process; with several ranks save a "
                          "checkpoint and convert it with `pstar export CHECKPOINT OUT --format hf`")
    infos = {}
    entries = []
    for group in rt.groups:
        for info in group.tensors:
            name = rename(info.names[0])
            if name is not None:
                infos[name] = info
                entries.append(Entry(name, tuple(info.shape), dtype))

    def fetch(name: str) -> torch.Tensor:
        info = infos[name]
        with rt.manager.lock:
            return info.view_of(rt.copier.current_flat(info.group.master)).to("cpu", dtype, copy=True)

    return entries, fetch


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
