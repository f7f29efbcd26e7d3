"""`pstar export CHECKPOINT OUT [--format pt|hf] [--dtype float32|bfloat16|float16]`: a checkpoint's
weights as a plain state dict (pt) or, for a Hugging Face model, as a Hugging Face directory (hf)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

FORMATS = ("pt", "hf")


def command(
    checkpoint: Annotated[str, typer.Argument(
        help="A checkpoint directory (step-N), or a checkpoint.dir to export its newest.", show_default=False)],
    out: Annotated[Path, typer.Argument(
        help="pt: the file to write (torch.save), e.g. model.pt; hf: a new directory.", show_default=False)],
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Element type of the weights: float32, bfloat16 or float16.")] = "float32",
    fmt: Annotated[str, typer.Option(
        "--format", help="pt: one PyTorch state dict; hf: a Hugging Face directory (model.hf_path runs).")] = "pt",
    shard_mib: Annotated[int, typer.Option(
        "--shard-mib", help="hf: largest safetensors shard in MiB.", min=1)] = 5120,
) -> None:
    """Write a checkpoint's weights (any number of ranks) for the plain model, or as a Hugging Face directory."""
    # pstar_cli.checkpoint loads torch: imported here so `pstar --help` stays fast.
    from pstar_cli.checkpoint.export import EXPORT_DTYPES, export_checkpoint
    from pstar_cli.errors import PstarError

    if dtype not in EXPORT_DTYPES:
        raise PstarError(f"--dtype {dtype}: must be one of {', '.join(EXPORT_DTYPES)}")
    if fmt not in FORMATS:
        raise PstarError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    if fmt == "hf":
        from pstar_cli.checkpoint.hf_export import export_hf

        done = export_hf(checkpoint, out, dtype, shard_mib << 20)
        typer.echo(f"wrote {done.out}: {done.num_tensors} tensors, {done.num_params:,} parameters ({dtype}), "
                   f"from {done.source} (step {done.step}): {', '.join(done.files)}")
        typer.echo(f"load it with: AutoModelForCausalLM.from_pretrained('{done.out}')")
        return
    result = export_checkpoint(checkpoint, out, dtype)
    typer.echo(f"wrote {result.out}: {result.num_tensors} tensors, {result.num_params:,} parameters ({dtype}), "
               f"from {result.source} (step {result.step})")
    if result.model.get("hf_path"):  # names behind `hf.`: a Hugging Face directory is the usual way out
        typer.echo("its names are pstar's (the HF model's behind 'hf.'); for a Hugging Face directory "
                   "export with --format hf")
        return
    typer.echo(f"load it with: model = models.build_model({json.dumps(result.model)}); "
               f"model.load_state_dict(torch.load('{result.out}'))")
