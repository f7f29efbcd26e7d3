"""The benchmark harness and its case process with a rehearsed failure (a test-only entry point).

`python -m tests.bench_faults run ARGS` is `python -m benchmarks.run ARGS` whose case processes are
`python -m tests.bench_faults case ...`: `benchmarks.case` failing as PSTAR_BENCH_SIMULATE says,
as a case can on a real machine. The setting is KIND or KIND@PHASE (phase "init", the default, or
"steps"); KIND is oom, host-oom, crash, abort (dies without writing a result) or hang.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

SIMULATE_ENV = "PSTAR_BENCH_SIMULATE"
CASE_MODULE = "tests.bench_faults_case"


def rehearse_failure(setting: str) -> None:
    kind = setting.partition("@")[0]
    if kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
    if kind == "host-oom":
        raise MemoryError("simulated host allocation failure")
    if kind == "crash":
        raise RuntimeError("simulated crash")
    if kind == "abort":
        print("simulated abort: the process dies without writing a result", file=sys.stderr, flush=True)
        os.abort()
    if kind == "hang":
        time.sleep(3600)


def failing_build_trainer(build_trainer, setting: str):
    """`benchmarks.systems.build_trainer` that fails at init, or whose first step fails (@steps)."""
    at_steps = setting.partition("@")[2] == "steps"

    def build(spec, runtime):
        if not at_steps:
            rehearse_failure(setting)
        trainer = build_trainer(spec, runtime)
        if not at_steps:
            return trainer

        def failing_step(x, y):
            rehearse_failure(setting)
            return trainer.step(x, y)

        return dataclasses.replace(trainer, step=failing_step)

    return build


def run_case() -> None:
    from benchmarks import case

    setting = os.environ.get(SIMULATE_ENV, "")
    if setting:
        case.build_trainer = failing_build_trainer(case.build_trainer, setting)
    case.main()


def run_harness() -> None:
    from benchmarks import launch, run

    launch.CASE_MODULE = CASE_MODULE
    sys.exit(run.main())


if __name__ == "__main__":
    run_harness()
