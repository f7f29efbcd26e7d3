"""`pstar profile`: where a step's time and memory go, measured next to the estimates.

Runs the config's model in one process: the engine's traced warm-up step plus one more, then
`num_steps` timed steps (the device synchronised around each), then one step under
`torch.profiler`. Writes into the output directory:
  profile.json          every figure below, per step and summarised
  memory_timeline.svg   the warm-up's per-moment memory: non-model data, chunks on the device, budget
  trace.json            Chrome trace of one step (chrome://tracing or https://ui.perfetto.dev)
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from pstar_cli.config import Config
from pstar_cli.metrics import peak_rss_bytes

NUM_WARMUP_STEPS = 2  # the engine's traced warm-up, then one step of the steady-state schedule
TIMING_KEYS = ("forward", "backward", "optimizer_device", "optimizer_host", "transfer", "wait")
TRAFFIC_KEYS = ("step_h2d_moves", "step_h2d_bytes", "step_d2h_moves", "step_d2h_bytes", "step_gathers")


@dataclass
class ProfileResult:
    summary: dict[str, Any]
    steps: list[dict[str, Any]]
    memory_timeline: list[dict[str, Any]]
    memory_check: list[dict[str, Any]]  # rows: what, estimate_bytes, measured_bytes
    files: dict[str, str]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def single_process_config(cfg: Config) -> tuple[Config, list[str]]:
    """Profiling runs one process: a multi-rank config is profiled with one rank's share of the batch."""
    world_size = cfg.world_size
    train = dataclasses.replace(cfg.train, log_interval=1)  # every step gets its full record
    notes = []
    if world_size > 1:
        train = dataclasses.replace(train, batch_size=cfg.train.batch_size // world_size)
        notes.append(
            f"profiled one process of the {world_size}-rank job, with its share of the batch "
            f"({train.batch_size} sequences); sharding and communication are not included"
        )
    single = dataclasses.replace(cfg.distributed, nproc_per_node=1, nnodes=1, node_rank=0)
    return dataclasses.replace(cfg, train=train, distributed=single), notes


def run_profile(cfg: Config, output_dir: Path, num_steps: int) -> ProfileResult:
    from pstar_cli.trainer import Ranks, Trainer, write_run_config

    cfg, notes = single_process_config(cfg)
    total_steps = NUM_WARMUP_STEPS + num_steps + 1
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=max(cfg.train.steps, total_steps)))
    write_run_config(cfg, output_dir)
    baseline_rss_bytes = psutil.Process().memory_info().rss
    files = {name: str(output_dir / name) for name in ("profile.json", "memory_timeline.svg", "trace.json")}
    with ExplainedFailures() as failures:
        trainer = failures.trainer = Trainer(cfg, output_dir, Ranks())
        try:
            for _ in range(NUM_WARMUP_STEPS):
                trainer.train_step()
            steps = [timed_step(trainer) for _ in range(num_steps)]
            timeline = list(trainer.model.memory_timeline())
            # peaks are read before tracing: the profiler's own buffers are not the model's
            memory_check = compare_with_estimate(cfg, steps[-1], timeline, trainer.device, baseline_rss_bytes)
            summary = summarise(steps, trainer)
            trace_one_step(trainer, Path(files["trace.json"]))
        finally:
            trainer.close()
    title = f"{cfg.model.size or cfg.model.family or cfg.model.hf_path}: memory per moment of the traced warm-up"
    Path(files["memory_timeline.svg"]).write_text(memory_timeline_svg(timeline, title), encoding="utf-8")
    result = ProfileResult(summary, steps, timeline, memory_check, files, notes)
    Path(files["profile.json"]).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return result


class ExplainedFailures:
    """Out-of-memory errors and engine refusals leave as one clear message, as in `pstar train`
    (without its checkpoint advice: profiling writes none)."""

    trainer = None  # set once built, so a message can say at which step memory ran out

    def __enter__(self) -> "ExplainedFailures":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        from pstar_cli.errors import PstarError
        from pstar_cli.resilience import TrainingFailed, explain_failure

        lines = None if exc is None or isinstance(exc, PstarError) else explain_failure(exc, self.trainer)
        if lines is None:
            return False  # no failure, one already explained, or a bug: leave it as it is
        raise TrainingFailed(lines) from None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(trainer) -> dict[str, Any]:
    """One step, timed between device synchronisations, with the engine's own split of the time."""
    synchronize(trainer.device)
    started = time.perf_counter()
    record = trainer.train_step()
    synchronize(trainer.device)
    step_s = time.perf_counter() - started
    timings = dict(trainer.model.step_timings())
    return {
        "step": record["step"],
        "loss": record.get("loss"),
        "step_s": step_s,
        "timings": {key: float(timings.get(key, 0.0)) for key in TIMING_KEYS},
        "chunk_stats": trainer.chunk_stats(),
    }


def trace_one_step(trainer, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(trainer.device)
    with warnings.catch_warnings():
        # one traced step is one profiler cycle; its note about clearing events between cycles is moot
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        with profile(activities=activities) as prof:
            trainer.train_step()
            synchronize(trainer.device)
    prof.export_chrome_trace(str(path))


def summarise(steps: list[dict[str, Any]], trainer) -> dict[str, Any]:
    """Medians over the timed steps: step time, its split, throughput, chunk traffic per step."""
    step_s = statistics.median(s["step_s"] for s in steps)
    split = {key: statistics.median(s["timings"][key] for s in steps) for key in TIMING_KEYS}
    num_tokens = trainer.split.global_batch * trainer.cfg.train.seq_len
    traffic = {key: statistics.median(s["chunk_stats"].get(key) or 0 for s in steps) for key in TRAFFIC_KEYS}
    return {
        "step_s": step_s,
        "time_split_s": split,
        "unaccounted_s": max(0.0, step_s - sum(split.values())),
        "tokens_per_s": num_tokens / step_s,
        "tflops": trainer.flops_per_token * num_tokens / step_s / 1e12,
        "traffic_per_step": traffic,
        "chunk_stats": steps[-1]["chunk_stats"],
        "device": str(trainer.device),
    }


def compare_with_estimate(
    cfg: Config, last_step: dict[str, Any], timeline: list[dict], device: torch.device, baseline_rss_bytes: int
) -> list[dict[str, Any]]:
    """Measured peaks and placements next to `pstar estimate-memory`'s numbers for this config.

    Host memory is compared above the process's RSS before the engine was built (Python, torch and
    their libraries are not in the estimate); on a CPU-only machine the device side lives in host
    RAM too, so the host estimate includes it."""
    from pstar_cli.estimate import detect_hardware, pstar_estimate, workload_from_config

    estimate = pstar_estimate(workload_from_config(cfg), detect_hardware())
    stats = last_step["chunk_stats"]
    device_model = (stats["param_bytes_device"] or 0) + (stats["optim_bytes_device"] or 0)
    host_model = (stats["param_bytes_host"] or 0) + (stats["optim_bytes_host"] or 0)
    peak_non_model = max((m["non_model_bytes"] for m in timeline), default=None)
    device_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    host_estimate = estimate.host.total + (estimate.gpu.total if device.type == "cpu" else 0)
    return [
        check_row("model data on the device", sum(estimate.gpu.model_data.values()), device_model),
        check_row("model data on the host", sum(estimate.host.model_data.values()), host_model),
        check_row("activations (peak non-model data on the device)", estimate.gpu.activations, peak_non_model),
        check_row("device peak (CUDA max allocated)", estimate.gpu.total, device_peak),
        check_row("host peak (process RSS above its start)", host_estimate, peak_rss_bytes() - baseline_rss_bytes),
    ]


def check_row(what: str, estimate_bytes: int | None, measured_bytes: int | None) -> dict[str, Any]:
    ratio = measured_bytes / estimate_bytes if measured_bytes is not None and estimate_bytes else None
    return {"what": what, "estimate_bytes": estimate_bytes, "measured_bytes": measured_bytes, "ratio": ratio}


# ---- the memory timeline picture ----

SVG_WIDTH, SVG_HEIGHT = 900, 430
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 80, 880, 50, 360
SERIES = (  # key, label, colour
    ("non_model_bytes", "non-model data (activations, temporaries)", "#d62728"),
    ("chunk_bytes_device", "chunks on the device", "#1f77b4"),
    ("device_total_bytes", "both together", "#9467bd"),
    ("budget_bytes", "chunk budget", "#2ca02c"),
)


def series_value(moment: dict[str, Any], key: str) -> int:
    if key == "device_total_bytes":
        return (moment.get("non_model_bytes") or 0) + (moment.get("chunk_bytes_device") or 0)
    return moment.get(key) or 0


def memory_timeline_svg(timeline: list[dict[str, Any]], title: str) -> str:
    """A self-contained SVG line chart of the memory timeline (bytes per moment)."""
    num_moments = max(len(timeline), 1)
    values = [series_value(m, key) for m in timeline for key, _, _ in SERIES]
    top_bytes = nice_ceiling(max(values, default=0))
    x_of = lambda i: PLOT_LEFT + (PLOT_RIGHT - PLOT_LEFT) * (i / max(num_moments - 1, 1))  # noqa: E731
    y_of = lambda b: PLOT_BOTTOM - (PLOT_BOTTOM - PLOT_TOP) * (b / top_bytes)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{SVG_HEIGHT}" '
        f'viewBox="0 0 {SVG_WIDTH} {SVG_HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{SVG_WIDTH}" height="{SVG_HEIGHT}" fill="white"/>',
        f'<text x="{PLOT_LEFT}" y="24" font-size="15">{escape(title)}</text>',
    ]
    parts += axis_elements(top_bytes, num_moments, y_of)
    for key, label, colour in SERIES:
        points = " ".join(f"{x_of(i):.1f},{y_of(series_value(m, key)):.1f}" for i, m in enumerate(timeline))
        if points:
            parts.append(f'<polyline data-series="{key}" fill="none" stroke="{colour}" stroke-width="2" '
                         f'points="{points}"><title>{escape(label)}</title></polyline>')
    parts += legend_elements()
    if not timeline:
        parts.append(f'<text x="{PLOT_LEFT + 20}" y="{PLOT_TOP + 30}">the engine recorded no moments</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def axis_elements(top_bytes: float, num_moments: int, y_of) -> list[str]:
    from pstar_cli.metrics import format_bytes

    parts = [
        f'<line x1="{PLOT_LEFT}" y1="{PLOT_BOTTOM}" x2="{PLOT_RIGHT}" y2="{PLOT_BOTTOM}" stroke="black"/>',
        f'<line x1="{PLOT_LEFT}" y1="{PLOT_TOP}" x2="{PLOT_LEFT}" y2="{PLOT_BOTTOM}" stroke="black"/>',
    ]
    for tick in range(5):
        tick_bytes = top_bytes * tick / 4
        y = y_of(tick_bytes)
        parts.append(f'<line x1="{PLOT_LEFT}" y1="{y:.1f}" x2="{PLOT_RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{PLOT_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{format_bytes(tick_bytes)}</text>')
    parts.append(f'<text x="{PLOT_LEFT}" y="{PLOT_BOTTOM + 18}">0</text>')
    parts.append(f'<text x="{PLOT_RIGHT}" y="{PLOT_BOTTOM + 18}" text-anchor="end">{num_moments - 1}</text>')
    parts.append(f'<text x="{(PLOT_LEFT + PLOT_RIGHT) / 2}" y="{PLOT_BOTTOM + 18}" text-anchor="middle">'
                 "moment of the warm-up step (each hook of forward and backward)</text>")
    return parts


def legend_elements() -> list[str]:
    parts = []
    for index, (_, label, colour) in enumerate(SERIES):
        x = PLOT_LEFT + (index % 2) * 360
        y = PLOT_BOTTOM + 38 + (index // 2) * 16
        parts.append(f'<rect x="{x}" y="{y - 9}" width="14" height="4" fill="{colour}"/>')
        parts.append(f'<text x="{x + 20}" y="{y}">{escape(label)}</text>')
    return parts


def nice_ceiling(num_bytes: float) -> float:
    """Axis top: the smallest 1, 2 or 5 x 10^k KiB/MiB/GiB/... at or above num_bytes."""
    if num_bytes <= 0:
        return 1.0
    unit = 1024 ** min(4, int(math.log(num_bytes, 1024)))
    scaled = num_bytes / unit  # in [1, 1024)
    magnitude = 10 ** math.floor(math.log10(scaled))
    step = next(step for step in (1, 2, 5, 10) if scaled <= step * magnitude * (1 + 1e-12))
    return step * magnitude * unit


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
