"""`pstar profile CONFIG [KEY=VALUE ...] [--steps N] [--output-dir DIR]`: time and memory of a step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pstar_cli.config import load_config
from pstar_cli.observe.metrics import TIMING_LABELS, format_bytes


def command(
    config: Annotated[str, typer.Argument(help="YAML config file.", show_default=False)],
    overrides: Annotated[
        Optional[list[str]], typer.Argument(help="Overrides such as train.batch_size=4.", show_default=False)
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps after the warm-up.")] = 3,
    output_dir: Annotated[
        Optional[Path],
        typer.Option("--output-dir", "-o", help="Where the report, picture and trace go "
                     "(default: outputs/<config name>/profile).", show_default=False),
    ] = None,
) -> None:
    """Warm up, time a few steps, trace one: time split, TFLOPS, chunk traffic, memory vs estimate."""
    from pstar_cli.observe.profiler import run_profile

    cfg = load_config(config, overrides or [])
    output_dir = output_dir or Path("outputs") / Path(config).stem / "profile"
    result = run_profile(cfg, output_dir, steps)
    print_report(result, Console())


def print_report(result, console: Console) -> None:
    summary = result.summary
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(
        f"[bold]step {summary['step_s']:.3f} s[/] (median of {len(result.steps)}) · "
        f"{summary['tokens_per_s']:,.0f} tokens/s · [bold]{summary['tflops']:.2f} TFLOPS[/] on {summary['device']}"
    )
    console.print(time_table(summary))
    console.print(traffic_table(summary))
    console.print(memory_table(result.memory_check))
    for name, path in result.files.items():
        console.print(f"{name}: {path}")


def time_table(summary: dict) -> Table:
    table = Table(title="time split of a step (engine's timers; host Adam may overlap backward)")
    table.add_column("part")
    table.add_column("seconds", justify="right")
    table.add_column("of the step", justify="right")
    for key, seconds in summary["time_split_s"].items():
        table.add_row(TIMING_LABELS.get(key, key), f"{seconds:.4f}", f"{seconds / summary['step_s']:.0%}")
    table.add_row("not accounted", f"{summary['unaccounted_s']:.4f}",
                  f"{summary['unaccounted_s'] / summary['step_s']:.0%}")
    return table


def traffic_table(summary: dict) -> Table:
    traffic, stats = summary["traffic_per_step"], summary["chunk_stats"]
    table = Table(title="chunks: placement and traffic per step")
    table.add_column("")
    table.add_column("on the device", justify="right")
    table.add_column("on the host", justify="right")
    for kind, label in (("param", "param chunks"), ("optim", "optimizer chunks")):
        table.add_row(label, f"{stats[f'{kind}_chunks_device']} · {format_bytes(stats[f'{kind}_bytes_device'])}",
                      f"{stats[f'{kind}_chunks_host']} · {format_bytes(stats[f'{kind}_bytes_host'])}")
    table.add_row("moves per step", f"H2D {traffic['step_h2d_moves']:g} · {format_bytes(traffic['step_h2d_bytes'])}",
                  f"D2H {traffic['step_d2h_moves']:g} · {format_bytes(traffic['step_d2h_bytes'])}")
    if stats.get("optim_chunks_host"):  # who stepped the host's optimizer groups, and how fast
        table.add_row("host groups stepped",
                      f"streamed {stats.get('step_host_groups_streamed') or 0} · "
                      f"{_rate(stats.get('streamed_adam_params_per_s'))}",
                      f"host Adam {_rate(stats.get('host_adam_params_per_s'))}")
    if traffic.get("step_gathers"):  # several ranks: param chunks all-gathered from the shards
        table.add_row("all-gathers per step", f"{traffic['step_gathers']:g}", "")
    return table


def _rate(params_per_s: int | None) -> str:
    return f"{params_per_s / 1e9:.2f} G params/s" if params_per_s else "-"


def memory_table(rows: list[dict]) -> Table:
    table = Table(title="memory: measured vs `pstar estimate-memory`")
    table.add_column("")
    table.add_column("estimate", justify="right")
    table.add_column("measured", justify="right")
    table.add_column("measured / estimate", justify="right")
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        table.add_row(row["what"], format_bytes(row["estimate_bytes"]), format_bytes(row["measured_bytes"]), ratio)
    return table
