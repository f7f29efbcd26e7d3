"""`pstar estimate-memory CONFIG`: memory per GPU and per host for pstar and its peers, no GPU needed.

The default is one narrow table (per system: GPU need, host need, whether it fits) and the verdict,
readable at 80 columns; `--detail` adds the breakdown by kind of model data."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from pstar_cli.errors import PstarError
from pstar_cli.observe.metrics import format_bytes, format_count

SYSTEM_TITLES = {
    "pstar": "pstar",
    "pytorch": "plain PyTorch (AMP)",
    "zero2_offload": "DeepSpeed ZeRO-2 offload",
    "zero3_offload": "DeepSpeed ZeRO-3 offload",
}
GPU_COLUMNS = ("param", "grad", "master", "exp_avg", "exp_avg_sq", "compute_copy")
HOST_COLUMNS = ("param", "grad", "master", "exp_avg", "exp_avg_sq")


def format_fits(fits: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[red]no[/]", None: "?"}[fits]


def side_table(title: str, report: dict, side: str, kinds: tuple[str, ...]):
    """One rich table: a row per system, a column per model-data kind, then the totals."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("system")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for name in ("activations", "other", "total", "available", "fits"):
        table.add_column(name, justify="right")
    for system, estimate in report["systems"].items():
        part = estimate[side]
        cells = [format_bytes(part["model_data"].get(kind, 0)) for kind in kinds]
        cells += [format_bytes(part["activations"]), format_bytes(part["other"]),
                  format_bytes(part["total"]), format_bytes(part["budget"]), format_fits(part["fits"])]
        table.add_row(SYSTEM_TITLES[system], *cells)
    return table


def summary_table(report: dict):
    """Per system: what one GPU and one host need (with what is available) and whether it fits."""
    from rich.table import Table

    table = Table(title="Memory per GPU and per host", title_justify="left")
    table.add_column("system")
    table.add_column("GPU need", justify="right")
    table.add_column("host need", justify="right")
    table.add_column("fits", justify="center")
    for system, estimate in report["systems"].items():
        gpu, host = estimate["gpu"], estimate["host"]
        table.add_row(SYSTEM_TITLES[system], format_bytes(gpu["total"]), format_bytes(host["total"]),
                      format_fits(estimate["fits"]))
    hw = report["hardware"]
    table.add_row("[dim]available[/]", f"[dim]{format_bytes(hw['gpu_bytes'])}[/]",
                  f"[dim]{format_bytes(hw['host_bytes'])}[/]", "")
    return table


def verdict_line(report: dict) -> str:
    """Whether pstar trains this config here, and which of the others would."""
    systems = report["systems"]
    others = [SYSTEM_TITLES[name] for name, e in systems.items() if name != "pstar" and e["fits"]]
    also = f" (so would: {', '.join(others)})" if others else " (none of the others would)"
    pstar = systems["pstar"]
    if pstar["fits"] is None:
        return "verdict: unknown without the GPU's size: give it in GiB with --gpu-mem"
    if pstar["fits"]:
        return "verdict: pstar trains this config here" + also
    short = [f"{where} needs {format_bytes(pstar[side]['total'])} of {format_bytes(pstar[side]['budget'])}"
             for side, where in (("gpu", "a GPU"), ("host", "the host")) if pstar[side]["fits"] is False]
    return f"verdict: pstar does not fit: {'; '.join(short)}" + also


def footer_lines(report: dict) -> list[str]:
    from pstar_cli.estimate.hardware import NO_GPU_DETECTED
    from pstar_cli.estimate.workload import recompute_note

    model, work, hw = report["model"], report["workload"], report["hardware"]
    if hw["gpu_bytes"]:
        gpu = f"{format_bytes(hw['gpu_bytes'])} per GPU ({hw['gpu_source']})"
    elif hw["gpu_source"] == NO_GPU_DETECTED:
        gpu = "no GPU detected (give its size in GiB with --gpu-mem)"
    else:
        gpu = f"no GPU ({hw['gpu_source']})"
    best = report["largest_pstar_model"]
    best_line = (f"largest {model['family']} size pstar trains here: {best['size']} "
                 f"({format_count(best['num_params'])} parameters)" if best
                 else f"no {model['family']} size fits pstar on this hardware")
    lines = [
        f"{model['size'] or model['family']}: {format_count(model['num_params'])} parameters, "
        f"{work['precision']}, micro-batch {work['micro_batch_size']} x sequence {work['seq_len']}"
        + recompute_note(work["activation_checkpointing"], work["recompute_layers"], work["layers"])
        + f", {work['gpus_per_node']} GPU(s) per node x {work['num_nodes']} node(s)",
        f"hardware: {gpu}; host {format_bytes(hw['host_bytes'])} ({hw['host_source']})",
        "activations: Korthikanti et al. 2022, fused attention (scores never stored), fp32 logits for the loss",
        "pstar's host 'other': init builds every param chunk and fp32 master on the host before the GPU's share "
        "moves there, so the host's peak is at least that",
        "pstar's GPU 'grad', when not 0 B on one GPU: a run that fits the GPU with room to spare settles after its "
        "first step and adds a grad chunk per group (2 B/param) and fp32 gradients for Adam (4 B/param, in 'other')",
    ]
    return lines + ([] if model["family"] == "hf" else [best_line])  # a Hugging Face model has no size table


def render(report: dict, detail: bool) -> None:
    from rich.console import Console

    console = Console()
    if detail and not console.is_terminal:
        console = Console(width=160)  # logs and pipes: do not squeeze the wide tables into 80 columns
    if detail:
        console.print(side_table("Per GPU", report, "gpu", GPU_COLUMNS))
        console.print(side_table("Per host (all ranks of a node)", report, "host", HOST_COLUMNS))
        for line in footer_lines(report):
            console.print(line, highlight=False)
    else:
        console.print(summary_table(report))
        lines = footer_lines(report)
        for line in (lines[0], lines[-1]):  # the workload and the largest size pstar trains
            console.print(line, highlight=False)
    console.print(verdict_line(report), highlight=False)


def command(
    config: Annotated[str, typer.Argument(help="YAML config file.", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="Overrides such as train.batch_size=4.", show_default=False)] = None,
    gpus: Annotated[Optional[int], typer.Option(
        "--gpus", min=1, help="GPUs per node (default: the config's distributed.nproc_per_node).")] = None,
    gpu_mem: Annotated[Optional[float], typer.Option(
        "--gpu-mem", help="Memory of one GPU in GiB (default: detected).")] = None,
    host_mem: Annotated[Optional[float], typer.Option(
        "--host-mem", help="Host memory of one node in GiB (default: detected).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of tables.")] = False,
    detail: Annotated[bool, typer.Option("--detail", help="Break the memory down by kind of model data "
                                         "(wide tables, best read at 160 columns).")] = False,
) -> None:
    """Estimate memory per GPU and per host for pstar, plain PyTorch and DeepSpeed ZeRO offload."""
    from pstar_cli.config import load_config
    from pstar_cli.estimate import detect_hardware, estimate_report, workload_from_config

    for flag, value in (("--gpu-mem", gpu_mem), ("--host-mem", host_mem)):
        if value is not None and value <= 0:
            raise PstarError(f"{flag}: must be a size in GiB > 0, got {value}")
    cfg = load_config(config, overrides or [])
    report = estimate_report(workload_from_config(cfg, gpus),
                             detect_hardware(gpu_mem, host_mem, cfg.engine_config.compute_device))
    if as_json:
        typer.echo(json.dumps({"config": config, **report}, indent=2))
    else:
        render(report, detail)
