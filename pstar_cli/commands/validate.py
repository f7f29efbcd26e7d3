"""`pstar validate CONFIG [KEY=VALUE ...]`: check a config without running it (no GPU needed)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pstar_cli.config import Config, config_hash, load_config
from pstar_cli.observe.metrics import format_count


def summary_lines(cfg: Config) -> list[str]:
    """A few lines that say what the config will run."""
    import models
    from pstar_cli.estimate.workload import recompute_note

    model = cfg.model_spec
    num_params = models.num_params(model)
    name = model.get("size") or f"{model['layers']} layers x {model['hidden']} hidden"
    if model["family"] == "hf":  # a Hugging Face directory: say which model and which weights
        name = (f"{model['architecture']} in {model['hf_path']}, {name}, "
                + ("its weights" if model["pretrained"] else "random init"))
    dist = cfg.distributed
    data = cfg.data.path or ("the shipped corpus" if cfg.data.kind == "text" else "random tokens")
    return [
        f"model      {model['family']} {name}: {format_count(num_params)} parameters, "
        f"vocab {model['vocab_size']}, sequence {cfg.train.seq_len}"
        + recompute_note(model["activation_checkpointing"], model.get("recompute_layers"), model["layers"]),
        f"precision  {cfg.precision}",
        f"world size {cfg.world_size} ({dist.nnodes} node(s) x {dist.nproc_per_node} process(es)); "
        f"micro-batch {cfg.micro_batch_size} x {cfg.train.grad_accum} accumulation per rank",
        f"train      {cfg.train.steps} steps of {cfg.train.batch_size} sequences, peak lr {cfg.train.lr:g}",
        f"data       {cfg.data.kind}: {data}"
        + (f", tokenizer {cfg.data.tokenizer}" if cfg.data.tokenizer else ""),
        f"hash       {config_hash(cfg)}",
    ]


def command(
    config: Annotated[str, typer.Argument(help="YAML config file.", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="Overrides such as train.steps=20 engine.fp16.enabled=true.", show_default=False)] = None,
) -> None:
    """Check a config (types, ranges, files) without running it; no GPU needed."""
    cfg = load_config(config, overrides or [])
    typer.echo(f"{config}: valid")
    for line in summary_lines(cfg):
        typer.echo(f"  {line}")
