"""The safetensors format, read tensor by tensor and written shard by shard (no package needed).

The format (the safetensors specification): 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data,
offsets relative to its start. A model directory holds one `model.safetensors`, or shards listed by
`model.safetensors.index.json`.

Reading (`SafetensorsDir`) indexes every file's header; `copy_into(name, target)` reads one tensor
with `readinto` in blocks of 8 MiB, each converted as it is copied into its destination. No memory
map: the pages of a mapped file would count against the process's resident memory until it ends.

Writing (`write_safetensors`) takes the entries (name, shape, dtype) in the order they are written,
cuts them into shards of at most `max_shard_bytes` (plus an index when there are several) and calls
`fetch(name)` for one tensor at a time: every header is known from the shapes, so nothing is held
back. The engine stays importable alone: only torch and the standard library are used.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

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
