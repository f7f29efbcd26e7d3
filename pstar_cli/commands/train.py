"""`pstar train CONFIG [KEY=VALUE ...] [--output-dir DIR]`: train a model through the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pstar_cli.config import load_config


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
) -> None:
    """Train with warm-up + cosine lr; a live view on a terminal, log lines otherwise; metrics.jsonl always."""
    from pstar_cli.launch import launch

    overrides = overrides or []
    cfg = load_config(config, overrides)
    launch(cfg, Path(config), overrides, output_dir or default_output_dir(config))
