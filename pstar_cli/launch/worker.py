"""One training process of a multi-process job, as `torch.distributed.run` starts it:

    python -m pstar_cli.launch.worker CONFIG [key=value ...] --output-dir DIR

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; this module joins the process group
(`nccl` on GPUs, `gloo` on CPU, or `distributed.backend`), picks the GPU of LOCAL_RANK and runs the
Trainer. Any failure is written to torchrun's per-rank error file, so the launcher can show which
rank failed and why; a user mistake also prints one `error:` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pstar_cli.launch.worker")
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint the launcher verified")
    return parser.parse_args(argv)


def run_worker(config_path: Path, overrides: list[str], output_dir: Path, resume_path: Path | None = None) -> None:
    from engine.device import pick_compute_device
    from pstar_cli.checkpoint import ResumePoint, read_metadata
    from pstar_cli.config import load_config
    from pstar_cli.launch.process_group import process_group, resolve_backend
    from pstar_cli.observe.live import choose_view
    from pstar_cli.training.run import run_training
    from pstar_cli.training.trainer import Ranks, build_run_info

    cfg = load_config(config_path, overrides)
    ranks = Ranks.from_env()
    device = pick_compute_device(ranks.local_rank, cfg.engine_config.compute_device)
    with process_group(resolve_backend(cfg.distributed.backend, device), device):
        resume = ResumePoint(resume_path, read_metadata(resume_path)) if resume_path is not None else None
        info = build_run_info(cfg, ranks.world_size, device, resume.step if resume is not None else 0)
        # rank 0 on a terminal is not redirected by the launcher: keep its log lines in a file too
        log_path = output_dir / "logs" / f"rank{ranks.rank}.log" if sys.stdout.isatty() else None
        view = choose_view(info, ranks.is_main, sys.stdout.isatty(), log_path)
        run_training(cfg, output_dir, ranks, view, resume)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    args = parse_args(sys.argv[1:] if argv is None else argv)
    get_error_handler().initialize()
    try:
        run_worker(args.config, args.overrides, args.output_dir, args.resume)
    except Exception as exc:
        # The agent stops the other ranks with SIGTERM as soon as one fails, possibly while this
        # one is writing its own report: ignore those signals from here on (os._exit follows).
        # Ignored for the whole process: a signal blocked only in this thread would still end it
        # through any other thread (torch's own threads).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        record_failure(exc)
        exit_code = report_error(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        # Leave without interpreter shutdown: the peers are stuck in a collective with this rank,
        # and tearing the process group down could wait for them or abort.
        os._exit(exit_code)
    return 0


ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # where torchrun's agent reads this rank's error


def record_failure(exc: BaseException, error_file: str | None = None) -> None:
    """torchrun's error file for this rank, written by torch's own ErrorHandler (the launcher reads
    its message), but whole or not at all: into a temporary file renamed into place. The agent parses
    it once this process is gone, and a file cut short by a kill would make it fail on the report
    instead of naming this rank's error."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    path = error_file or os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    partial = f"{path}.partial"
    previous = os.environ.get(ERROR_FILE_ENV)
    os.environ[ERROR_FILE_ENV] = partial  # the handler writes where this names
    try:
        get_error_handler().record_exception(exc)
        os.replace(partial, path)
    except OSError as write_error:  # the console still gets the error itself (report_error)
        print(f"pstar: could not write the error file {path}: {write_error}", file=sys.stderr)
    finally:
        if previous is None:
            del os.environ[ERROR_FILE_ENV]
        else:
            os.environ[ERROR_FILE_ENV] = previous


def report_error(exc: Exception) -> int:
    """Print a user mistake as one `error:` line, anything else with its traceback; the exit code."""
    from pstar_cli.errors import PstarError
    from pstar_cli.main import error_lines, user_error_types

    if isinstance(exc, user_error_types()):
        print("error: " + "\n  ".join(error_lines(exc)), file=sys.stderr)
        return exc.exit_code if isinstance(exc, PstarError) else 2
    traceback.print_exc()
    return 1


if __name__ == "__main__":
    sys.exit(main())
