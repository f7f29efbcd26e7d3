"""Where a step's host time goes: each system's steps timed on the host clock, then profiled.

    PYTHONPATH=. python -m benchmarks.host_profile --systems pytorch-bf16,pstar --model gpt-1.3b --batch 1 \
        --config configs/gpt-1.3b.yaml
    PYTHONPATH=. python -m benchmarks.host_profile --device cpu --model gpt-tiny --batch 2 --seq 64

At a small batch a step is bound by the host thread that issues the work, not by the GPU. For each
system this builds the harness's own case (the same model, optimizer, clipping and, for pstar, the
shipped config's engine section), runs warm-up steps, then times steps twice: the host time to issue
one step (forward, backward, optimizer) and the step between two device synchronisations; then
cProfiles a few more steps and prints the functions with the most time of their own. It prints
figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

import torch

from benchmarks.case import random_batches
from benchmarks.run import UsageError, model_shapes, shipped_config
from benchmarks.spec import CaseSpec
from benchmarks.systems import Runtime, build_trainer, synchronize


def spec_for(system: str, args: argparse.Namespace, device: str, shipped: dict | None) -> CaseSpec:
    pstar_settings = {}
    if system == "pstar" and shipped is not None:
        pstar_settings = {"config": shipped["path"], "engine": shipped["engine"],
                          "weight_decay_on": shipped["weight_decay_on"],
                          "activation_checkpointing": shipped["activation_checkpointing"],
                          "recompute_layers": shipped["recompute_layers"]}
    return CaseSpec(system=system, model=args.model, batch=args.batch, seq=args.seq, num_steps=args.steps,
                    num_warmup=args.warmup, device=device, clip=args.clip, **pstar_settings)


def profile_system(spec: CaseSpec, runtime: Runtime, top: int, kernels: bool = False) -> dict:
    trainer = build_trainer(spec, runtime)
    batches = random_batches(spec, runtime)
    for index in range(spec.num_warmup):
        trainer.step(*batches[index % len(batches)])
    synchronize(runtime.device)
    issue_s, step_s = [], []
    for index in range(spec.num_steps):
        x, y = batches[index % len(batches)]
        synchronize(runtime.device)
        start = time.perf_counter()
        trainer.step(x, y)
        issued = time.perf_counter()
        synchronize(runtime.device)
        issue_s.append(issued - start)
        step_s.append(time.perf_counter() - start)
    profiler = cProfile.Profile()
    profiler.enable()
    for index in range(spec.num_steps):
        trainer.step(*batches[index % len(batches)])
    synchronize(runtime.device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    details = trainer.details()
    result = {"issue_s": statistics.median(issue_s), "step_s": statistics.median(step_s),
              "profile": text.getvalue(), "step_timings": details.get("step_timings")}
    if kernels and runtime.device.type == "cuda":
        result.update(kernel_profile(trainer, batches, spec.num_steps, runtime, top))
    elif kernels:
        print("   --kernels: the device profile is for CUDA; not taken on", runtime.device.type)
    return result


def kernel_profile(trainer, batches, num_steps: int, runtime: Runtime, top: int) -> dict:
    """The device's side of a few steps: kernel time a step (the GPU busy) against the step."""
    from torch.profiler import ProfilerActivity, profile
    synchronize(runtime.device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for index in range(num_steps):
            trainer.step(*batches[index % len(batches)])
        synchronize(runtime.device)
    wall = (time.perf_counter() - start) / num_steps
    averages = prof.key_averages()
    # kernels and copies only: GPU-side ranges of record_function (an optimizer's step) would count
    # their kernels twice (torch's own table leaves them out of its total the same way)
    busy = sum(e.self_device_time_total for e in averages
               if e.device_type.name == "CUDA" and not e.is_user_annotation) / 1e6 / num_steps
    table = averages.table(sort_by="self_device_time_total", row_limit=top)
    return {"device_busy_s": busy, "profiled_step_s": wall, "kernels": table}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="pytorch-bf16,pstar")
    parser.add_argument("--model", default="gpt-1.3b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--config", type=Path, default=None, help="a shipped config for the pstar system")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--kernels", action="store_true",
                        help="also profile the device's kernels (CUDA): busy time a step, the top kernels")
    args = parser.parse_args(argv)
    try:  # a user mistake (unknown size, a config that is not there) is one line and exit code 2
        model_shapes([args.model], args.seq)
        shipped = shipped_config(args.config, 1, args.overrides)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    runtime = Runtime(device=torch.device(args.device))
    results = []
    for system in args.systems.split(","):
        result = profile_system(spec_for(system, args, args.device, shipped), runtime, args.top, args.kernels)
        results.append({"system": system, **result})
        print(f"== {system} {args.model} b{args.batch} s{args.seq}: host issue {result['issue_s'] * 1e3:.2f} ms, "
              f"step {result['step_s'] * 1e3:.2f} ms")
        if result["step_timings"]:
            print("   engine step timings (s):", {k: round(v, 5) for k, v in result["step_timings"].items()})
        print(result["profile"], flush=True)
        if "kernels" in result:
            print(f"   device busy {result['device_busy_s'] * 1e3:.2f} ms a step of "
                  f"{result['profiled_step_s'] * 1e3:.2f} ms (profiled)")
            print(result["kernels"], flush=True)
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
