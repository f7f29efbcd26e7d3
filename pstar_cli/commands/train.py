"""`pstar train CONFIG [KEY=VALUE ...] [--output-dir DIR] [--resume [CHECKPOINT]]`: train a model through the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pstar_cli.config import load_config
from pstar_cli.errors import PstarError


def default_output_dir(config_path: str) -> Path:
    """`outputs/<config file name without extension>`."""
    return Path("outputs") / Path(config_path).stem


def command(
    config: Annotated[str, typer.Argument(help="YAML config file, e.g. configs/tiny.yaml.", show_default=False)],
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(help="Overrides such as train.steps=20 distributed.nproc_per_node=2.", show_default=False),
    ] = None,
    output_dir: Annotated[
        Optional[Path],
        typer.Option("--output-dir", "-o", help="Where config.yaml, metrics.jsonl and logs/ go "
                     "(default: outputs/<config name>).", show_default=False),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the latest checkpoint in checkpoint.dir, or from the "
                     "checkpoint directory given after --resume; metrics.jsonl is appended to.",
                     show_default=False),
    ] = False,
) -> None:
    """Train with warm-up + cosine lr; a live view on a terminal, log lines otherwise; metrics.jsonl always.

    SIGTERM or Ctrl-C finish the current step, write a checkpoint and exit with code 128 + the
    signal's number (143 for SIGTERM, 130 for Ctrl-C); a second Ctrl-C stops at once."""
    from pstar_cli.checkpoint import checkpoint_root, find_resume_point
    from pstar_cli.launch import launch
    from pstar_cli.training.failures import StoppedBySignal

    overrides, resume_path = split_resume_path(overrides or [], resume)
    cfg = load_config(config, overrides)
    output_dir = output_dir or default_output_dir(config)
    point = None
    if resume:
        point = find_resume_point(resume_path or "latest", checkpoint_root(cfg, output_dir), cfg.to_dict())
        for change in point.changes:
            typer.echo(f"pstar: changed since the checkpoint: {change}")
    try:
        launch(cfg, Path(config), overrides, output_dir, point)
    except StoppedBySignal as stopped:
        for line in stopped.message_lines():
            typer.echo(f"pstar: {line}")
        raise typer.Exit(code=stopped.exit_code) from None


def split_resume_path(arguments: list[str], resume: bool) -> tuple[list[str], str | None]:
    """(overrides, the checkpoint path given after --resume). An override always has `=`; with
    --resume, one argument without it is the checkpoint to resume from."""
    paths = [a for a in arguments if "=" not in a]
    if not resume or not paths:
        return arguments, None
    if len(paths) > 1:
        raise PstarError(f"--resume takes one checkpoint path, got {', '.join(paths)}")
    return [a for a in arguments if "=" in a], paths[0]
