"""Faults for tests, injected through pstar's seams (never read by pstar's own modules).

In-process tests wrap `pstar_cli.training.run.build_run` with `with_faults(...)` (monkeypatch).
Subprocess tests start `python -m tests.faults ARGS` instead of `python -m pstar_cli ARGS`: the
same app, with the faults that these environment variables ask for, in the launcher's process and
(through `tests/fault_worker.py`, the worker module it then starts) in every worker:

- PSTAR_TEST_FAULT=KIND@STEP: a failure in the forward pass of that step; KIND is `cuda-oom`,
  `host-oom` or `nan` (the model's output becomes NaN, as a diverging run's does).
- PSTAR_TEST_CHECKPOINT_PAUSE=STEP (0: every step): the checkpoint write of that step stops after the
  rank files are written, before the checkpoint is complete, and waits to be killed.
- PSTAR_TEST_FAIL_RANK=R: rank R raises before training.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch

FAULT_ENV = "PSTAR_TEST_FAULT"
PAUSE_ENV = "PSTAR_TEST_CHECKPOINT_PAUSE"
FAIL_RANK_ENV = "PSTAR_TEST_FAIL_RANK"
PAUSE_S = 600


def with_faults(build_run: Callable, fault: str | None = None, pause_step: int | None = None,
                fail_rank: int | None = None) -> Callable:
    """`build_run` (pstar_cli.training.run) with the given faults installed in what it builds."""

    def build_run_with_faults(cfg, output_dir, ranks, view, resume, stop):
        if fail_rank is not None and ranks.rank == fail_rank:
            raise RuntimeError(f"injected failure on rank {ranks.rank} ({FAIL_RANK_ENV} is set)")
        trainer = build_run(cfg, output_dir, ranks, view, resume, stop)
        if fault:
            inject_forward_fault(trainer, fault)
        if pause_step is not None:
            trainer.checkpointer.before_complete = pause_in_checkpoint_write(pause_step)
        return trainer

    return build_run_with_faults


def pause_in_checkpoint_write(wanted: int) -> Callable[[int], None]:
    def pause(step: int) -> None:
        if wanted in (0, step):
            print(f"pstar: test pause inside the checkpoint write of step {step}", file=sys.stderr, flush=True)
            time.sleep(PAUSE_S)

    return pause


def inject_forward_fault(trainer, spec: str) -> None:
    """A failure in the forward pass of step STEP of `KIND@STEP` (see the module's docstring)."""
    kind, _, step_text = spec.partition("@")
    step = int(step_text)

    def failing_forward(module, args):
        if trainer.state.step + 1 != step:
            return
        if kind == "cuda-oom":
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB "
                f"of which 512.00 MiB is free. (injected by {FAULT_ENV})")
        raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                           f"memory: you tried to allocate 4294967296 bytes. (injected by {FAULT_ENV})")

    def poisoned_output(module, args, output):
        return output * float("nan") if trainer.state.step + 1 == step else output

    if kind == "nan":
        trainer.model.module.register_forward_hook(poisoned_output)
    elif kind in ("cuda-oom", "host-oom"):
        trainer.model.module.register_forward_pre_hook(failing_forward)
    else:
        raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r}")


def install_from_env() -> None:
    """Install the faults the environment asks for (in this process and the workers it starts)."""
    from pstar_cli.launch import launcher
    from pstar_cli.training import run

    pause = os.environ.get(PAUSE_ENV)
    fail_rank = os.environ.get(FAIL_RANK_ENV)
    run.build_run = with_faults(run.build_run, os.environ.get(FAULT_ENV),
                                int(pause) if pause is not None else None,
                                int(fail_rank) if fail_rank is not None else None)
    launcher.WORKER_MODULE = "tests.fault_worker"


if __name__ == "__main__":
    install_from_env()
    from pstar_cli.main import main

    main()
