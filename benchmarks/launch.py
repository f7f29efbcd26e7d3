"""The harness side of one case: start its process (or torchrun group), wait, and say what happened.

The case process reports through its result files; when it leaves none (killed, aborted, timed out),
the exit code and the last lines of its log tell the status instead.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.spec import MULTICAST_OFF_ENV, CaseSpec
from pstar_cli.training.failures import out_of_memory_in_text

REPO_ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 10  # after SIGTERM, how long a case gets to exit before SIGKILL
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class CaseOutcome:
    status: str
    rank_results: list[dict] = field(default_factory=list)
    returncode: int | None = None
    wall_s: float = 0.0
    log_path: Path | None = None


CASE_MODULE = "benchmarks.case"  # the module every case process runs


def case_command(spec: CaseSpec, result_prefix: Path) -> list[str]:
    case_args = ["--spec", spec.to_json(), "--result", str(result_prefix)]
    if spec.gpus == 1:
        return [sys.executable, "-m", CASE_MODULE, *case_args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.gpus}"]
    return [*launcher, "--module", CASE_MODULE, *case_args]


def case_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MULTICAST_OFF_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # the log's last line must be the last thing the case said
    env.update(extra or {})
    return env


def run_case_process(spec: CaseSpec, result_prefix: Path, timeout_s: float,
                     extra_env: dict[str, str] | None = None) -> CaseOutcome:
    """Run one case to completion or timeout; never raises for the case's own failures."""
    log_path = result_prefix.with_suffix(".log")
    for stale in result_prefix.parent.glob(result_prefix.name + ".rank*.json"):
        stale.unlink()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # A session of its own, so a timeout can end the case and everything it started.
        process = subprocess.Popen(case_command(spec, result_prefix), cwd=REPO_ROOT, env=case_env(extra_env),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=die_with_parent)
        timed_out = False
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_process_group(process)
        except BaseException:  # interrupted: take the case down with the harness
            stop_process_group(process)
            raise
    rank_results = read_rank_results(result_prefix)
    status = classify(rank_results, process.returncode, timed_out, timeout_s, log_tail(log_path))
    return CaseOutcome(status=status, rank_results=rank_results, returncode=process.returncode,
                       wall_s=time.perf_counter() - start, log_path=log_path)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies.

    Cases run in sessions of their own (so a timeout can stop a whole torchrun group), which also
    shields them from a kill aimed at the harness; without this, a harness killed at a machine's time
    limit would leave a case holding the GPU for whoever comes next.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: a timeout still stops the case
        pass


def stop_process_group(process: subprocess.Popen) -> None:
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    # Whatever is left of the group: torchrun's workers, or a leader that ignored SIGTERM.
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def read_rank_results(result_prefix: Path) -> list[dict]:
    results = []
    for path in sorted(result_prefix.parent.glob(result_prefix.name + ".rank*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # half-written by a killed process: the log tells the story
    return sorted(results, key=lambda r: r.get("rank", 0))


def log_tail(log_path: Path, num_lines: int = 40) -> list[str]:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.rstrip() for line in lines if line.strip()][-num_lines:]


def classify(rank_results: list[dict], returncode: int | None, timed_out: bool, timeout_s: float,
             tail: list[str]) -> str:
    """One status for the case: "ok", "out of memory...", "timed out...", "not implemented..." or "failed: ..."."""
    failed = [r for r in rank_results if r.get("status") != "ok"]
    if failed:
        oom = [r for r in failed if str(r.get("status", "")).startswith("out of memory")]
        return (oom or failed)[0].get("status", "failed")
    if rank_results and rank_results[0].get("rank") == 0 and returncode == 0:
        return "ok"
    if timed_out:
        return f"timed out after {timeout_s:.0f} s"
    if any(out_of_memory_in_text(line) == "gpu" or "OutOfMemoryError" in line for line in tail):
        return "out of memory"
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) or any("SIGKILL" in line for line in tail):
        return "out of memory (host): killed by SIGKILL, most likely the kernel's OOM killer"
    last_line = tail[-1][:300] if tail else "no output"
    if returncode is not None and returncode < 0:
        return f"failed: {last_line} (killed by {_signal_name(-returncode)})"
    return f"failed: {last_line} (exit code {returncode})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
