"""`pstar export`: a checkpoint of any number of ranks as one plain PyTorch state dict."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pstar_cli.checkpoint.durable import write_durably
from pstar_cli.checkpoint.layout import checkpoint_at, damaged_checkpoint_error, read_metadata, verify_checkpoint

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Export:
    source: Path
    out: Path
    step: int
    num_tensors: int
    num_params: int
    model: dict  # the config's model section + seq_len: what `models.build_model` takes


def export_checkpoint(requested: str, out: Path, dtype: str = "float32") -> Export:
    """Write a checkpoint's weights as one plain state dict (torch.save) that the `models/` model
    built from the checkpoint's config accepts with `load_state_dict(strict=True)`. Needs host
    memory for the whole model in `dtype`: the one place pstar assembles it."""
    from engine.checkpoint import full_state_dict

    source = checkpoint_at(requested)
    problems = verify_checkpoint(source)
    if problems:
        raise damaged_checkpoint_error(source, problems)
    metadata = read_metadata(source)
    shards = [torch.load(source / name, map_location="cpu", mmap=True, weights_only=True)
              for name in metadata["files"]]
    state = full_state_dict(shards, EXPORT_DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    write_durably(tmp, lambda f: torch.save(state, f))
    os.replace(tmp, out)
    num_params = sum(t.numel() for t in {id(t): t for t in state.values()}.values() if t.is_floating_point())
    saved = metadata["config"]
    model = {**{k: v for k, v in saved["model"].items() if v is not None}, "seq_len": saved["train"]["seq_len"]}
    return Export(source, out, int(metadata["step"]), len(state), num_params, model)
