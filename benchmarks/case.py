"""One benchmark case, run in its own process: `python -m benchmarks.case --spec JSON --result PREFIX`.

A fresh process per case gives each system a fresh CUDA context and its own host RSS, and lets an
out-of-memory end the case without ending the harness. Every rank writes PREFIX.rank<r>.json, also
on failure; the harness (benchmarks/launch.py) merges them into one row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from benchmarks.launch import die_with_parent
from benchmarks.memory import PeakSampler
from benchmarks.spec import CaseSpec
from benchmarks.systems import Runtime, Trainer, build_trainer, needs_process_group, synchronize
from pstar_cli.launch.process_group import TIMEOUT as PROCESS_GROUP_TIMEOUT
from pstar_cli.launch.process_group import resolve_backend

NUM_BATCH_SETS = 4  # distinct random batches, rotated through the steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="the case, as CaseSpec JSON")
    parser.add_argument("--result", required=True, help="path prefix of the per-rank result files")
    args = parser.parse_args(argv)
    spec = CaseSpec.from_json(args.spec)
    die_with_parent()  # under torchrun the parent is torchrun; alone, it is the harness

    runtime = runtime_from_env(spec)
    sampler = PeakSampler(runtime.device).start()
    result = {"rank": runtime.rank, "world_size": runtime.world_size, "torch_version": torch.__version__,
              "device_name": device_name(runtime.device)}
    result.update(run_guarded(spec, runtime, sampler))
    sampler.stop()
    result.update(memory_figures(runtime.device, sampler))
    write_json(Path(f"{args.result}.rank{runtime.rank}.json"), result)
    print(f"case {spec.label()}: {result['status']}", flush=True)
    sys.stderr.flush()
    # Leave without interpreter teardown: freeing a large model or tearing down NCCL after a failed
    # collective can take minutes or hang, and the result is already on disk.
    os._exit(0 if result["status"] == "ok" else 1)


def runtime_from_env(spec: CaseSpec) -> Runtime:
    """Rank and device from torchrun's environment (a lone process is rank 0 of 1)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if spec.device == "cuda" else torch.device("cpu")  # the spec's choice
    return Runtime(device=device, rank=int(os.environ.get("RANK", "0")), local_rank=local_rank,
                   world_size=int(os.environ.get("WORLD_SIZE", "1")))


def start_process_group(spec: CaseSpec, runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    if not needs_process_group(spec, runtime.world_size) or dist.is_initialized():
        return
    backend = resolve_backend("auto", runtime.device)
    if runtime.world_size > 1:
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)  # torchrun's environment
    else:
        # A one-member group through a private file store: no port to collide with.
        store_path = Path(tempfile.mkdtemp(prefix="pstar-bench-")) / "store"
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=0, world_size=1)


def run_guarded(spec: CaseSpec, runtime: Runtime, sampler: PeakSampler) -> dict:
    """Run the case; any failure becomes a status, kept with what was measured before it.

    `phase` says how far the case got ("init" or "steps"); tracebacks go to the case's log.
    """
    found: dict = {"phase": "init"}
    try:
        run_case(spec, runtime, sampler, found)
        return {"status": "ok", **found}
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return {**found, "status": status_of_exception(exc), "error": first_line(exc) or type(exc).__name__}
    except NotImplementedError as exc:
        traceback.print_exc()
        return {**found, "status": f"not implemented: {first_line(exc)}", "error": first_line(exc)}
    except Exception as exc:  # reported in the row; the harness goes on with the next case
        traceback.print_exc()
        return {**found, "status": status_of_exception(exc), "error": first_line(exc)}


def status_of_exception(exc: BaseException) -> str:
    from engine.errors import ModelTooLargeError
    from pstar_cli.training.failures import out_of_memory_kind

    if isinstance(exc, ModelTooLargeError):  # pstar refusing a model its budgets cannot hold
        return "out of memory"
    kind = out_of_memory_kind(exc)  # the rule `pstar train` explains its failures by
    if kind is not None:
        return "out of memory" if kind == "gpu" else "out of memory (host)"
    return f"failed: {type(exc).__name__}: {first_line(exc)}"


def run_case(spec: CaseSpec, runtime: Runtime, sampler: PeakSampler, found: dict) -> None:
    """Initialise the system, warm up, time the steps; each figure goes into `found` once measured."""
    start_process_group(spec, runtime)
    if runtime.device.type == "cuda":
        torch.zeros(1, device=runtime.device)  # the CUDA context's host memory belongs to the baseline
    found["host_base_bytes"] = psutil.Process().memory_info().rss
    trainer = build_trainer(spec, runtime)
    found.update(phase="steps", init_s=trainer.init_s, host_init_peak_bytes=sampler.mark("init"))
    progress(runtime, f"init {trainer.init_s:.1f} s")
    batches = random_batches(spec, runtime)
    step_times_s, loss = time_steps(trainer, batches, spec, runtime)
    step_times_s = slowest_rank_times(step_times_s, runtime)
    found.update(step_times_s=step_times_s, step_s=statistics.median(step_times_s), loss=loss,
                 details=trainer.details())
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} after {spec.num_warmup + spec.num_steps} steps")


def random_batches(spec: CaseSpec, runtime: Runtime) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few distinct batches of random tokens (different on every rank), rotated through the steps."""
    import models

    vocab_size = models.resolve_model_config(spec.model_config())["vocab_size"]
    generator = torch.Generator(device="cpu").manual_seed(1234 + runtime.rank)
    num_sets = min(NUM_BATCH_SETS, spec.num_warmup + spec.num_steps)
    shape = (spec.batch, spec.seq)
    return [
        tuple(torch.randint(0, vocab_size, shape, generator=generator).to(runtime.device) for _ in range(2))
        for _ in range(num_sets)
    ]


def time_steps(trainer: Trainer, batches: list, spec: CaseSpec, runtime: Runtime) -> tuple[list[float], float]:
    """Untimed warm-up steps, then `num_steps` steps each timed between two device synchronisations.
    Rank 0 prints each step's time as it ends, so a case stopped by its timeout shows how far it got."""
    loss = None
    step_times_s = []
    for index in range(spec.num_warmup + spec.num_steps):
        x, y = batches[index % len(batches)]
        synchronize(runtime.device)
        start = time.perf_counter()
        loss = trainer.step(x, y)
        synchronize(runtime.device)
        elapsed = time.perf_counter() - start
        timed = index >= spec.num_warmup
        if timed:
            step_times_s.append(elapsed)
        progress(runtime, f"{'step' if timed else 'warm-up step'} {index + 1}: {elapsed:.2f} s")
    return step_times_s, float(loss)


def progress(runtime: Runtime, message: str) -> None:
    if runtime.rank == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def slowest_rank_times(step_times_s: list[float], runtime: Runtime) -> list[float]:
    """Per step, the slowest rank's time: a data-parallel step ends when its last rank ends."""
    if runtime.world_size == 1:
        return step_times_s
    times = torch.tensor(step_times_s, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return times.tolist()


def memory_figures(device: torch.device, sampler: PeakSampler) -> dict:
    figures = {"host_peak_bytes": sampler.host_peak_bytes}
    if device.type == "cuda":
        figures["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        figures["gpu_reserved_peak_bytes"] = torch.cuda.max_memory_reserved(device)
        figures["gpu_nvml_peak_bytes"] = sampler.device_used_peak_bytes
    return figures


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)  # a reader never sees half a file


if __name__ == "__main__":
    main()
