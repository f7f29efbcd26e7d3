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
from pstar_cli.observe.metrics import TIMING_KEYS, TIMING_WITHIN, TRAFFIC_KEYS, peak_rss_bytes
from pstar_cli.observe.svg import memory_timeline_svg

NUM_WARMUP_STEPS = 2  # the engine's traced warm-up, then one step of the steady-state schedule


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
        train = dataclasses.replace(train, batch_size=cfg.batch_split.per_rank)
        notes.append(
            f"profiled one process of the {world_size}-rank job, with its share of the batch "
            f"({train.batch_size} sequences); sharding and communication are not included"
        )
    single = dataclasses.replace(cfg.distributed, nproc_per_node=1, nnodes=1, node_rank=0)
    return dataclasses.replace(cfg, train=train, distributed=single), notes


def run_profile(cfg: Config, output_dir: Path, num_steps: int) -> ProfileResult:
    from pstar_cli.training.run import build_trainer
    from pstar_cli.training.trainer import write_run_config

    cfg, notes = single_process_config(cfg)
    total_steps = NUM_WARMUP_STEPS + num_steps + 1
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=max(cfg.train.steps, total_steps)))
    write_run_config(cfg, output_dir)
    baseline_rss_bytes = psutil.Process().memory_info().rss
    files = {name: str(output_dir / name) for name in ("profile.json", "memory_timeline.svg", "trace.json")}
    with ExplainedFailures() as failures:
        trainer = failures.trainer = build_trainer(cfg, output_dir)
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
        from pstar_cli.training.failures import TrainingFailed, explain_failure

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
        "unaccounted_s": max(0.0, step_s - sum(s for key, s in split.items() if key not in TIMING_WITHIN)),
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

    estimate = pstar_estimate(workload_from_config(cfg),
                              detect_hardware(compute_device=cfg.engine_config.compute_device))
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
