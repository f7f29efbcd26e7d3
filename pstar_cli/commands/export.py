"""`pstar export CHECKPOINT OUT [--dtype float32|bfloat16|float16]`: a checkpoint as a plain state dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def command(
    checkpoint: Annotated[str, typer.Argument(
        help="A checkpoint directory (step-N), or a checkpoint.dir to export its newest.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="The file to write (torch.save), e.g. model.pt.", show_default=False)],
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Element type of the weights: float32, bfloat16 or float16.")] = "float32",
) -> None:
    """Write a checkpoint's weights (any number of ranks) as one PyTorch state dict for the plain model."""
    # pstar_cli.checkpoint loads torch: imported here so `pstar --help` stays fast.
    from pstar_cli.checkpoint.export import EXPORT_DTYPES, export_checkpoint
    from pstar_cli.errors import PstarError

    if dtype not in EXPORT_DTYPES:
        raise PstarError(f"--dtype {dtype}: must be one of {', '.join(EXPORT_DTYPES)}")
    result = export_checkpoint(checkpoint, out, dtype)
    typer.echo(f"wrote {result.out}: {result.num_tensors} tensors, {result.num_params:,} parameters ({dtype}), "
               f"from {result.source} (step {result.step})")
    typer.echo(f"load it with: model = models.build_model({json.dumps(result.model)}); "
               f"model.load_state_dict(torch.load('{result.out}'))")
