"""Starting a training job: in this process, or as workers under PyTorch's own launcher.

One process (nproc_per_node 1, nnodes 1) trains right here. Anything larger starts
`pstar_cli.launch.worker` processes through `torch.distributed.run` (the engine behind `torchrun`), whose
elastic agent does the rendezvous (also across machines), sets RANK/LOCAL_RANK/WORLD_SIZE, watches
the workers and stops all of them when one fails.

We call `torch.distributed.run.run(parse_args(args))` (`main` without its error-file decorator)
in this process rather than running `python -m torch.distributed.run` as a child: the agent then
raises a `ChildFailedError` that carries every failed rank's exit code and error file, so we can
report the first failure as one clear message instead of scraping a child's console output; it
also costs no extra interpreter. A failed worker's exit code becomes ours.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from pstar_cli.config import Config
from pstar_cli.errors import PstarError

# NVLink SHARP / multicast stay off on multi-GPU machines: pstar is measured without them
# (benchmarks/README.md says why)
MULTI_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
NUM_ERROR_LOG_LINES = 15
MAX_REDIRECT_MAP_RANKS = 10
WORKER_MODULE = "pstar_cli.launch.worker"  # what torchrun starts in every worker process  # torchrun's per-rank redirect syntax takes one-digit local ranks


class WorkerFailed(PstarError):
    """A worker process failed; the job was stopped. Exits with the worker's code."""

    def __init__(self, lines: list[str], exit_code: int) -> None:
        self.exit_code = exit_code if exit_code > 0 else 1
        super().__init__(lines)


def launch(cfg: Config, config_path: Path, overrides: list[str], output_dir: Path, resume=None) -> None:
    """Train as the config says, from `resume` (a verified checkpoint.ResumePoint) if given;
    returns when training is done, raises PstarError on failure."""
    from pstar_cli.training.trainer import write_run_config

    write_run_config(cfg, output_dir)
    if cfg.distributed.nproc_per_node == 1 and cfg.distributed.nnodes == 1:
        train_in_process(cfg, output_dir, resume)
    else:
        run_workers(cfg, config_path, overrides, output_dir, resume)


def train_in_process(cfg: Config, output_dir: Path, resume=None) -> None:
    from engine.device import pick_compute_device
    from pstar_cli.observe.live import choose_view
    from pstar_cli.training.run import run_training
    from pstar_cli.training.trainer import Ranks, build_run_info

    ranks = Ranks()
    start_step = resume.step if resume is not None else 0
    device = pick_compute_device(ranks.local_rank, cfg.engine_config.compute_device)
    info = build_run_info(cfg, ranks.world_size, device, start_step)
    view = choose_view(info, is_main=True, is_tty=sys.stdout.isatty())
    run_training(cfg, output_dir, ranks, view, resume)


def run_workers(cfg: Config, config_path: Path, overrides: list[str], output_dir: Path, resume=None) -> None:
    """Start this node's workers through torchrun's elastic agent and wait for the job to end."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args as parse_torchrun_args
    from torch.distributed.run import run as torchrun

    num_gpus = gpus_used(cfg)
    check_gpu_count(cfg.distributed.nproc_per_node, num_gpus)
    set_worker_env(os.environ, cfg.distributed.nproc_per_node, num_gpus)
    args = torchrun_args(cfg, config_path, overrides, output_dir, console_is_tty=sys.stdout.isatty())
    if resume is not None:
        args.append(f"--resume={resume.path}")  # the worker's own option: its arguments come last
    try:
        torchrun(parse_torchrun_args(args))
    except ChildFailedError as exc:
        raise worker_failure(exc, output_dir / "logs") from None
    except json.JSONDecodeError as exc:  # a worker's error file was cut short: its logs still tell
        raise unreadable_failure(exc, output_dir / "logs", cfg.distributed.nproc_per_node) from None
    except SignalException as exc:
        # the agent passed the signal on to the workers: they finished their step and wrote a
        # checkpoint (pstar_cli/training/guards.py), unless it took longer than the agent waits (30 s)
        from pstar_cli.checkpoint import checkpoint_root, complete_checkpoints
        from pstar_cli.training.failures import StoppedBySignal

        found = complete_checkpoints(checkpoint_root(cfg, output_dir))
        raise StoppedBySignal(exc.sigval, [
            f"stopped by {exc.sigval.name}; the workers were stopped too; latest checkpoint: "
            f"{found[-1] if found else 'none'}",
            "continue with the same `pstar train` command and --resume",
        ]) from None
    except RendezvousError as exc:
        endpoint = cfg.distributed.rdzv_endpoint or "this machine"
        raise PstarError(
            f"the workers could not meet at {endpoint} ({type(exc).__name__}: {exc}); check "
            f"distributed.rdzv_endpoint and that all {cfg.distributed.nnodes} node(s) start `pstar train`"
        ) from None


def torchrun_args(
    cfg: Config, config_path: Path, overrides: list[str], output_dir: Path, console_is_tty: bool
) -> list[str]:
    """The command line for `torch.distributed.run` that starts this node's workers."""
    dist_cfg = cfg.distributed
    args = [f"--nproc_per_node={dist_cfg.nproc_per_node}", f"--nnodes={dist_cfg.nnodes}"]
    if dist_cfg.nnodes == 1:
        args.append("--standalone")  # a private rendezvous on a free local port
    else:
        args += [
            f"--rdzv_backend={dist_cfg.rdzv_backend}",
            f"--rdzv_endpoint={dist_cfg.rdzv_endpoint}",
            f"--rdzv_id={dist_cfg.rdzv_id}",
        ]
        if dist_cfg.rdzv_backend == "static":
            args.append(f"--node_rank={dist_cfg.node_rank}")  # c10d assigns ranks itself
    args += [f"--log_dir={output_dir / 'logs'}", "--max_restarts=0"]
    args += log_stream_args(dist_cfg.nproc_per_node, dist_cfg.node_rank, console_is_tty)
    args += ["-m", WORKER_MODULE, str(config_path), *overrides, f"--output-dir={output_dir}"]
    return args


def log_stream_args(nproc_per_node: int, node_rank: int, console_is_tty: bool) -> list[str]:
    """Every rank's stdout/stderr go to files under the log dir; local rank 0's still show here.

    On a terminal, local rank 0 of node 0 keeps the terminal itself (not redirected), so that it can
    draw the live view; it writes its plain log lines to `logs/rank0.log` itself. Elsewhere it is
    redirected and tee'd: its lines land in its log file and on this console."""
    if console_is_tty and node_rank == 0 and nproc_per_node <= MAX_REDIRECT_MAP_RANKS:
        others = ",".join(f"{local_rank}:3" for local_rank in range(1, nproc_per_node))
        return [f"--redirects={others}"] if others else []
    return ["--redirects=3", "--tee=0:3"]


def set_worker_env(environ: os._Environ | dict, nproc_per_node: int, num_gpus: int | None = None) -> None:
    """Environment the workers inherit; values the user set win. `num_gpus`: those the run uses
    (default: the machine's)."""
    # torchrun would set 1 thread per worker, which starves the host-side Adam step of pstar's
    # optimizer chunks: give each local worker its share of the cores instead
    environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    if (gpu_count() if num_gpus is None else num_gpus) > 1:
        for key, value in MULTI_GPU_ENV.items():
            environ.setdefault(key, value)


def check_gpu_count(nproc_per_node: int, num_gpus: int | None = None) -> None:
    """On a GPU machine each worker takes one GPU of its own; without GPUs (or with
    `engine.compute_device: cpu`), workers share the CPU. `num_gpus`: those the run uses."""
    num_gpus = gpu_count() if num_gpus is None else num_gpus
    if 0 < num_gpus < nproc_per_node:
        raise PstarError(
            f"distributed.nproc_per_node is {nproc_per_node} but this machine has {num_gpus} GPU(s) "
            f"(one worker per GPU); set distributed.nproc_per_node to at most {num_gpus}"
        )


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpus_used(cfg: Config) -> int:
    """The GPUs a run's workers use: the machine's, none with `engine.compute_device: cpu`."""
    return gpu_count() if cfg.engine_config.compute_device == "auto" else 0


# What a worker says when another one died first: symptoms, not the cause
PEER_LOST_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                     "remote worker", "remote process exited", "communicator was aborted")


def root_cause(failures: dict) -> tuple[int, object]:
    """The failure that caused the others: a worker that lost a peer, or that the agent stopped
    (SIGTERM) before it wrote an error of its own, is a consequence; among the rest the earliest
    error file wins (its mtime has sub-second precision, torch's timestamps only seconds)."""

    def order(item):
        _, failure = item
        stopped = failure.exitcode == -signal.SIGTERM and not os.path.isfile(failure.error_file)
        consequence = stopped or any(marker in str(failure.message) for marker in PEER_LOST_MARKERS)
        try:
            when = os.stat(failure.error_file).st_mtime_ns
        except OSError:
            when = failure.timestamp * 10**9
        return consequence, when

    return min(failures.items(), key=order)


def worker_failure(exc, log_dir: Path) -> WorkerFailed:
    """One clear message for the worker whose failure stopped the job: its rank, exit code and error."""
    rank, failure = root_cause(exc.failures)
    how = f"with exit code {failure.exitcode}" if failure.exitcode > 0 else f"(ended by {signal_name(failure)})"
    lines = [f"worker rank {rank} (local rank {failure.local_rank}) failed {how}"]
    lines += failure_details(failure, log_dir)
    num_others = len(exc.failures) - 1
    if num_others > 0:
        lines.append(f"({num_others} other worker(s) also stopped; see their logs)")
    lines.append(f"logs of every rank: {log_dir}")
    return WorkerFailed(lines, failure.exitcode)


def unreadable_failure(exc: Exception, log_dir: Path, nproc_per_node: int) -> WorkerFailed:
    """The job stopped on a worker's failure but an error file could not be parsed (a worker killed
    while writing it): the last lines of every rank's stderr instead."""
    lines = [f"a worker failed and the job was stopped; its error file could not be read "
             f"({type(exc).__name__}: {exc})"]
    for local_rank in range(nproc_per_node):
        lines += stderr_tail(log_dir, local_rank)
    lines.append(f"logs of every rank: {log_dir}")
    return WorkerFailed(lines, 1)


def signal_name(failure) -> str:
    try:
        return signal.Signals(-failure.exitcode).name
    except ValueError:
        return f"signal {-failure.exitcode}"


def failure_details(failure, log_dir: Path) -> list[str]:
    """The worker's own error message when it wrote one, else the last lines of its stderr."""
    message = failure.message
    if isinstance(message, dict):  # torch's error file: {"message": "...", "extraInfo": {...}}
        message = message.get("message", "")
    if os.path.isfile(failure.error_file):  # torch sets "<N/A>" when the worker wrote none
        return [str(message)]
    lines = [str(message)] if failure.exitcode < 0 else []  # e.g. "Signal 9 (SIGKILL) received by PID 7"
    return lines + stderr_tail(log_dir, failure.local_rank)


def stderr_tail(log_dir: Path, local_rank: int) -> list[str]:
    """The last lines of a rank's newest stderr log, under a line naming it; none without a log."""
    stderr_log = latest_rank_log(log_dir, local_rank, "stderr.log")
    if stderr_log is None:
        return []
    tail = stderr_log.read_text(encoding="utf-8", errors="replace").splitlines()[-NUM_ERROR_LOG_LINES:]
    return [f"last lines of {stderr_log}:", *tail]


def latest_rank_log(log_dir: Path, local_rank: int, name: str) -> Path | None:
    """torchrun writes `LOG_DIR/<run id>_<random>/attempt_<n>/<local rank>/<name>`: the newest one."""
    candidates = list(log_dir.glob(f"*/attempt_*/{local_rank}/{name}"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
