"""`pstar export CHECKPOINT OUT --format hf`: a checkpoint as a Hugging Face model directory.

The checkpoint's config names the model's source directory (`model.hf_path`); OUT gets
config.json (dtype set to the export's), safetensors weights (shards of at most `max_shard_bytes`
and an index when there are several), generation_config.json and the tokenizer's files
(`data.tokenizer`, else the source's). Weights are assembled one tensor at a time from the fp32
masters in every saved rank's memory-mapped file and written straight away: host memory holds one
tensor, never the model. A tied parameter is written once, under its first name (the embedding),
as Hugging Face saves it. OUT is written as a temporary directory and renamed when complete.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pstar_cli.checkpoint.export import EXPORT_DTYPES
from pstar_cli.checkpoint.layout import checkpoint_at, damaged_checkpoint_error, read_metadata, verify_checkpoint
from pstar_cli.errors import PstarError


@dataclass(frozen=True)
class HFExport:
    source: Path
    out: Path
    step: int
    num_tensors: int
    num_params: int
    files: list[str]


def export_hf(requested: str, out: Path, dtype: str = "float32", max_shard_bytes: int | None = None) -> HFExport:
    from engine.safetensors_io import DEFAULT_SHARD_BYTES, Entry, write_safetensors
    from models.hf import hf_name, write_hf_metadata

    source = checkpoint_at(requested)
    problems = verify_checkpoint(source)
    if problems:
        raise damaged_checkpoint_error(source, problems)
    metadata = read_metadata(source)
    config = metadata["config"]
    hf_dir = _source_dir(config)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PstarError(f"{out} already exists and is not an empty directory; choose a new OUT")
    shards = [torch.load(source / name, map_location="cpu", mmap=True, weights_only=True)
              for name in metadata["files"]]
    tensors, dtypes, fetch = _weights(shards, hf_name)
    entries = [Entry(name, shape, EXPORT_DTYPES[dtype] if dtypes[name].is_floating_point else dtypes[name])
               for name, shape in tensors.items()]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write_safetensors(tmp, entries, fetch, max_shard_bytes or DEFAULT_SHARD_BYTES)
        tokenizer = config.get("data", {}).get("tokenizer")
        write_hf_metadata(tmp, hf_dir, EXPORT_DTYPES[dtype], Path(tokenizer) if tokenizer else None)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    num_params = sum(math.prod(shape) for shape in tensors.values())
    return HFExport(source, out, int(metadata["step"]), len(entries), num_params, sorted(os.listdir(out)))


def _source_dir(config: dict) -> Path:
    hf_path = (config.get("model") or {}).get("hf_path")
    if not hf_path:
        raise PstarError("--format hf: this checkpoint is of one of pstar's own models, not of a Hugging Face "
                         "directory (model.hf_path); export it with --format pt")
    directory = Path(hf_path)
    if not (directory / "config.json").is_file():
        raise PstarError(f"--format hf: the model's source directory {directory} (model.hf_path of the run) "
                         "has no config.json any more; restore it, it describes the exported model")
    return directory


def _weights(shards: list[dict], rename):
    """(HF name -> shape, HF name -> saved dtype, fetch(name) -> the whole tensor) over the
    checkpoint's parameters (fp32 masters) and saved buffers; assembling a tensor reads only its
    own pieces."""
    # the engine's reader of its own shard format: every saved piece, labelled with its tensor
    from engine.checkpoint import _copy_overlaps, _index_tensors

    saved = {rename(name): value for name, value in _index_tensors(shards).items() if rename(name)}
    buffers = {rename(name): value for name, value in shards[0]["buffers"].items() if rename(name)}
    shapes = {name: tuple(value.shape) for name, value in saved.items()}
    shapes.update({name: tuple(value.shape) for name, value in buffers.items()})
    dtypes = {name: torch.float32 for name in saved} | {name: value.dtype for name, value in buffers.items()}

    def fetch(name: str) -> torch.Tensor:
        if name in buffers:
            return buffers[name]
        tensor = saved[name]
        whole = torch.empty(math.prod(tensor.shape), dtype=torch.float32)
        if _copy_overlaps(whole, 0, tensor.pieces, "master") != whole.numel():
            raise PstarError(f"the checkpoint lacks part of '{name}': some ranks' files are missing")
        return whole.view(tensor.shape)

    return shapes, dtypes, fetch
