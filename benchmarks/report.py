"""Result rows: built from a case's outcome, compared with plain PyTorch, written as JSON, shown as a table."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from benchmarks.flops import gpt_num_params, tflops, train_flops_per_step
from benchmarks.launch import CaseOutcome
from benchmarks.spec import PYTORCH_RECIPES, CaseSpec

GIB = 2**30


def build_row(spec: CaseSpec, shape: dict, outcome: CaseOutcome, machine: str) -> dict:
    """One JSON row: issue 4's fields first, then what helps to read them.

    `shape` holds the model's hidden, layers and vocab_size. With several GPUs, `batch` and `tflops`
    are per GPU, the step time is the slowest rank's, and host memory is the sum over the ranks.
    """
    ranks = outcome.rank_results
    lead = next((r for r in ranks if r.get("rank") == 0), ranks[0] if ranks else {})
    tokens = spec.batch * spec.seq
    flops = train_flops_per_step(shape["hidden"], shape["layers"], spec.seq, tokens, shape["vocab_size"])
    hardware_flops = train_flops_per_step(shape["hidden"], shape["layers"], spec.seq, tokens, shape["vocab_size"],
                                          recompute=spec.activation_checkpointing,
                                          recompute_layers=spec.recompute_layers)
    step_s = lead.get("step_s") if outcome.status == "ok" else None
    row = {
        "system": spec.system,
        "model": spec.model,
        "batch": spec.batch,
        "seq": spec.seq,
        "step_s": _significant(step_s, 5) if step_s else None,
        # the headline: model FLOPs (6·N·tokens + 12·L·h·s·tokens), no credit for recomputing
        "model_tflops": _significant(tflops(flops, step_s), 4) if step_s else None,
        "hardware_tflops": _significant(tflops(hardware_flops, step_s), 4) if step_s else None,
        "clip": spec.clip,
        "config": spec.config,
        "gpu_peak_gib": _gib(_max_of(ranks, "gpu_peak_bytes")),
        "host_peak_gib": _gib(_sum_of(ranks, "host_peak_bytes")),
        "machine": machine,
        "gpus": spec.gpus,
        "init_s": _round(lead.get("init_s"), 2),
        "status": outcome.status,
        "ratio_to_best_pytorch": None,
        "best_pytorch": None,
        "torch_version": lead.get("torch_version"),
    }
    row.update(_extras(spec, shape, outcome, lead, flops, step_s))
    return row


def _extras(spec: CaseSpec, shape: dict, outcome: CaseOutcome, lead: dict, flops: int, step_s: float | None) -> dict:
    ranks = outcome.rank_results
    extras = {
        "device": spec.device,
        "device_name": lead.get("device_name"),
        "activation_checkpointing": spec.activation_checkpointing,
        "recompute_layers": spec.recompute_layers,
        "num_params_formula": gpt_num_params(shape["hidden"], shape["layers"], shape["vocab_size"]),
        "model_flops_per_step_per_gpu": flops,
        "tokens_per_s": round(spec.batch * spec.seq * spec.gpus / step_s, 1) if step_s else None,
        "step_times_s": [round(t, 5) for t in lead.get("step_times_s", [])],
        "num_warmup": spec.num_warmup,
        "gpu_reserved_peak_gib": _gib(_max_of(ranks, "gpu_reserved_peak_bytes")),
        "gpu_nvml_peak_gib": _gib(_max_of(ranks, "gpu_nvml_peak_bytes")),
        "host_init_peak_gib": _gib(_sum_of(ranks, "host_init_peak_bytes")),
        "host_base_gib": _gib(_sum_of(ranks, "host_base_bytes")),  # RSS before init: torch, CUDA context
        "loss": _round(lead.get("loss"), 4),
        "error": next((r.get("error") for r in ranks if r.get("error")), None),
        "failed_in": lead.get("phase") if outcome.status != "ok" and ranks else None,
        "wall_s": round(outcome.wall_s, 1),
        "log": str(outcome.log_path) if outcome.log_path else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if spec.system == "pstar":
        extras.update({"chunk_size": spec.chunk_size, "device_memory_limit": spec.device_memory_limit,
                       "host_memory_limit": spec.host_memory_limit})
        extras.update(_host_model_data(lead.get("details", {}), extras["host_init_peak_gib"], len(ranks)))
    extras["details"] = lead.get("details")
    return extras


def _host_model_data(details: dict, host_init_peak_gib: float | None, num_ranks: int = 1) -> dict:
    """Target T4: init's host peak against the host-resident model data pstar planned, both as
    init built it (every param chunk and fp32 master on the host) and as it stays after the
    optimizer placement (most of it moved to the GPU). The peak is summed over a node's ranks and
    the ranks hold equal shards, so the plan is the lead rank's times the ranks."""
    stats = details.get("chunk_stats") or {}
    steady = None
    if "param_bytes_host" in stats and "optim_bytes_host" in stats:
        steady = stats["param_bytes_host"] + stats["optim_bytes_host"]
    at_init = stats.get("init_host_bytes") or init_host_bytes_from_model_data(details)

    steady, at_init = (None if v is None else v * num_ranks for v in (steady, at_init))

    def ratio(planned):
        return round(host_init_peak_gib * GIB / planned, 3) if planned and host_init_peak_gib else None

    return {"host_model_data_gib": _gib(steady), "init_rss_over_host_model_data": ratio(steady),
            "init_host_model_data_gib": _gib(at_init), "init_rss_over_init_host_plan": ratio(at_init)}


def init_host_bytes_from_model_data(details: dict) -> int | None:
    """Init's host chunks for rows from before the engine reported them: the param chunks (compute
    dtype) and fp32 masters, i.e. (c + 4) / (c + 12) of all model data for c bytes per compute
    element (every chunk kind of a group has the same number of elements)."""
    stats = details.get("chunk_stats") or {}
    if not stats.get("model_data_bytes") or stats.get("param_bytes_host") is None:
        return None
    engine_config = details.get("engine_config") or {}
    half = any((engine_config.get(key) or {}).get("enabled") for key in ("bf16", "fp16"))
    c = 2 if half else 4
    return stats["model_data_bytes"] * (c + 4) // (c + 12)


def fill_ratios(rows: list[dict]) -> None:
    """ratio_to_best_pytorch = model TFLOPS / the best plain-PyTorch recipe's on the same model, batch,
    seq, GPU count and clipping, among `rows` (one harness run: the same machine state)."""
    def key(row):
        return row["model"], row["batch"], row["seq"], row["gpus"], row.get("clip")

    best: dict = {}
    for row in rows:
        if row["system"] in PYTORCH_RECIPES and row.get("model_tflops"):
            if key(row) not in best or row["model_tflops"] > best[key(row)]["model_tflops"]:
                best[key(row)] = row
    for row in rows:
        base = best.get(key(row))
        if base and row.get("model_tflops") is not None:
            row["ratio_to_best_pytorch"] = round(row["model_tflops"] / base["model_tflops"], 3)
            row["best_pytorch"] = base["system"]
        else:
            row["ratio_to_best_pytorch"] = row["best_pytorch"] = None


def read_rows(path: Path) -> list[dict]:
    """The rows already in `path` (none if it does not exist); raises ValueError if it is not a JSON list."""
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text() or "[]")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or remove it, or pass another --out") from exc
    if not isinstance(rows, list):
        raise ValueError(f"{path} holds a JSON {type(rows).__name__}, not a list of rows; pass another --out")
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)  # a run killed mid-write leaves the previous complete file


TABLE_COLUMNS = (  # header, row key, format
    ("system", "system", "{}"),
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("gpus", "gpus", "{}"),
    ("clip", "clip", "{:g}"),
    ("step s", "step_s", "{:.4g}"),
    ("model TF", "model_tflops", "{:.4g}"),
    ("hw TF", "hardware_tflops", "{:.4g}"),
    ("x best pt", "ratio_to_best_pytorch", "{:.2f}"),
    ("GPU GiB", "gpu_peak_gib", "{:.1f}"),
    ("host GiB", "host_peak_gib", "{:.1f}"),
    ("init s", "init_s", "{:.1f}"),
    ("status", "status", "{}"),
)


def format_table(rows: list[dict], max_status_chars: int = 70) -> str:
    cells = [[header for header, _, _ in TABLE_COLUMNS]]
    for row in rows:
        line = []
        for _, key, fmt in TABLE_COLUMNS:
            value = row.get(key)
            text = "-" if value is None else fmt.format(value)
            line.append(text[:max_status_chars])
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_COLUMNS))]
    text_lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    text_lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text_lines)


def _max_of(ranks: list[dict], key: str) -> int | None:
    values = [r[key] for r in ranks if r.get(key) is not None]
    return max(values) if values else None


def _sum_of(ranks: list[dict], key: str) -> int | None:
    values = [r[key] for r in ranks if r.get(key) is not None]
    return sum(values) if values else None


def _gib(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else round(num_bytes / GIB, 2)


def _significant(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")  # CPU smoke runs reach milli-TFLOPS; keep them non-zero


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
