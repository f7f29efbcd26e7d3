"""One training process of a multi-process job, as `torch.distributed.run` starts it:

    python -m pstar_cli.worker CONFIG [key=value ...] --output-dir DIR

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; this module joins the process group
(`nccl` on GPUs, `gloo` on CPU, or `distributed.backend`), picks the GPU of LOCAL_RANK and runs the
Trainer. Any failure is written to torchrun's per-rank error file, so the launcher can show which
rank failed and why; a user mistake also prints one `error:` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

# Test hook: the rank named here raises before training, so tests can check that one failing
# worker stops the whole job and that its message reaches the user.
FAIL_RANK_ENV = "PSTAR_TEST_FAIL_RANK"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pstar_cli.worker")
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint the launcher verified")
    return parser.parse_args(argv)


def resolve_backend(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(backend: str, device: torch.device) -> Iterator[None]:
    """Join the job's process group (env:// rendezvous from torchrun's variables) for the block.

    Only a block that succeeds tears the group down: after an error the worker leaves at once
    (see `main`), as a teardown could wait for peers that are stuck in a collective."""
    if device.type == "cuda":
        # before any CUDA work, so every allocation and NCCL communicator lands on this rank's GPU
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    yield
    dist.destroy_process_group()
    # Collect now what still refers to the group's communication objects: left to interpreter
    # shutdown, their destruction sometimes aborts the process (SIGABRT, "terminate called
    # without an active exception"), seen with gloo in about 1 run in 6.
    gc.collect()


def run_worker(config_path: Path, overrides: list[str], output_dir: Path, resume_path: Path | None = None) -> None:
    from pstar_cli.checkpoint import ResumePoint, read_metadata
    from pstar_cli.config import load_config
    from pstar_cli.live import choose_view
    from pstar_cli.resilience import run_training
    from pstar_cli.trainer import Ranks, build_run_info, compute_device

    cfg = load_config(config_path, overrides)
    ranks = Ranks.from_env()
    device = compute_device(ranks.local_rank)
    with process_group(resolve_backend(cfg.distributed.backend, device), device):
        if os.environ.get(FAIL_RANK_ENV) == str(ranks.rank):
            raise RuntimeError(f"injected failure on rank {ranks.rank} ({FAIL_RANK_ENV} is set)")
        resume = ResumePoint(resume_path, read_metadata(resume_path)) if resume_path is not None else None
        info = build_run_info(cfg, ranks.world_size, device, resume.step if resume is not None else 0)
        # rank 0 on a terminal is not redirected by the launcher: keep its log lines in a file too
        log_path = output_dir / "logs" / f"rank{ranks.rank}.log" if sys.stdout.isatty() else None
        view = choose_view(info, ranks.is_main, sys.stdout.isatty(), log_path)
        run_training(cfg, output_dir, ranks, view, resume)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    args = parse_args(sys.argv[1:] if argv is None else argv)
    error_handler = get_error_handler()
    error_handler.initialize()
    try:
        run_worker(args.config, args.overrides, args.output_dir, args.resume)
    except Exception as exc:
        # torchrun's error file for this rank: the launcher shows the message from it
        error_handler.record_exception(exc)
        exit_code = report_error(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        # Leave without interpreter shutdown: the peers are stuck in a collective with this rank,
        # and tearing the process group down could wait for them or abort.
        os._exit(exit_code)
    return 0


def report_error(exc: Exception) -> int:
    """Print a user mistake as one `error:` line, anything else with its traceback; the exit code."""
    from pstar_cli.main import error_lines, user_error_types

    if isinstance(exc, user_error_types()):
        print("error: " + "\n  ".join(error_lines(exc)), file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    traceback.print_exc()
    return 1


if __name__ == "__main__":
    sys.exit(main())
