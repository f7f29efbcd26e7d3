"""The launcher: torchrun arguments, worker environment, failure reports, real 2-process CPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args as parse_torchrun_args

from pstar_cli.launch import launcher as launch
from pstar_cli.config import load_config
from pstar_cli.observe.metrics import read_metrics
from pstar_cli.launch.worker import parse_args as parse_worker_args, record_failure
from pstar_cli.launch.process_group import resolve_backend
from tests.test_train import REPO, TINY, needs_engine


def config(*overrides: str):
    return load_config(TINY, list(overrides))


def test_single_node_arguments_are_valid_for_torchrun(tmp_path):
    cfg = config("distributed.nproc_per_node=2")
    args = launch.torchrun_args(cfg, TINY, ["train.steps=3"], tmp_path, console_is_tty=False)
    parsed = parse_torchrun_args(args)
    assert parsed.standalone and parsed.nproc_per_node == "2" and parsed.nnodes == "1"
    assert parsed.log_dir == str(tmp_path / "logs")
    assert (parsed.redirects, parsed.tee) == ("3", "0:3")  # every rank to files, rank 0 also here
    assert parsed.max_restarts == 0 and parsed.module
    assert parsed.training_script == "pstar_cli.launch.worker"
    worker = parse_worker_args(parsed.training_script_args)
    assert worker.config == TINY and worker.overrides == ["train.steps=3"] and worker.output_dir == tmp_path


def test_on_a_terminal_local_rank_0_keeps_the_console(tmp_path):
    cfg = config("distributed.nproc_per_node=4")
    args = launch.torchrun_args(cfg, TINY, [], tmp_path, console_is_tty=True)
    parsed = parse_torchrun_args(args)
    assert parsed.redirects == "1:3,2:3,3:3" and parsed.tee == "0"
    # too many local ranks for torchrun's one-digit map: every rank redirected and rank 0 tee'd
    assert launch.log_stream_args(16, 0, console_is_tty=True) == ["--redirects=3", "--tee=0:3"]
    # other nodes never draw the live view
    assert launch.log_stream_args(2, 1, console_is_tty=True) == ["--redirects=3", "--tee=0:3"]


@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_multi_node_arguments(tmp_path, backend):
    cfg = config("distributed.nnodes=2", "distributed.node_rank=1", "distributed.rdzv_endpoint=10.0.0.1:29400",
                 f"distributed.rdzv_backend={backend}", "distributed.rdzv_id=job7", "train.batch_size=8")
    parsed = parse_torchrun_args(launch.torchrun_args(cfg, TINY, [], tmp_path, console_is_tty=False))
    assert not parsed.standalone and parsed.nnodes == "2"
    assert (parsed.rdzv_backend, parsed.rdzv_endpoint, parsed.rdzv_id) == (backend, "10.0.0.1:29400", "job7")
    # static rendezvous takes the node's rank from us; c10d assigns ranks itself
    assert parsed.node_rank == (1 if backend == "static" else 0)


def test_worker_environment(monkeypatch):
    monkeypatch.setattr(launch, "gpu_count", lambda: 4)
    env = {"NCCL_NVLS_ENABLE": "1"}
    launch.set_worker_env(env, nproc_per_node=2)
    assert env["NCCL_NVLS_ENABLE"] == "1"  # the user's choice wins
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert int(env["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 2)
    monkeypatch.setattr(launch, "gpu_count", lambda: 0)
    env = {}
    launch.set_worker_env(env, nproc_per_node=1)
    assert "NCCL_NVLS_ENABLE" not in env


def test_more_workers_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(launch, "gpu_count", lambda: 1)
    with pytest.raises(launch.PstarError, match="nproc_per_node is 2 but this machine has 1 GPU"):
        launch.check_gpu_count(2)
    launch.check_gpu_count(1)
    monkeypatch.setattr(launch, "gpu_count", lambda: 0)
    launch.check_gpu_count(8)  # CPU workers share the cores


def test_a_run_kept_on_the_cpu_uses_no_gpu_of_the_machine(monkeypatch):
    monkeypatch.setattr(launch, "gpu_count", lambda: 1)
    assert launch.gpus_used(config()) == 1
    on_cpu = config("engine.compute_device=cpu", "distributed.nproc_per_node=2")
    assert launch.gpus_used(on_cpu) == 0
    launch.check_gpu_count(2, launch.gpus_used(on_cpu))  # two CPU workers: not refused
    env = {}
    launch.set_worker_env(env, 2, num_gpus=0)
    assert "NCCL_NVLS_ENABLE" not in env


def test_backend_choice():
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"


def failure_with_error_file(tmp_path: Path, local_rank: int, message: str) -> ProcessFailure:
    error_file = tmp_path / f"error{local_rank}.json"
    error_file.write_text(json.dumps(
        {"message": {"message": message, "extraInfo": {"py_callstack": "...", "timestamp": str(int(time.time()))}}}))
    return ProcessFailure(local_rank=local_rank, pid=100 + local_rank, exitcode=2, error_file=str(error_file))


def test_failure_report_uses_the_workers_error_file(tmp_path):
    failures = {1: failure_with_error_file(tmp_path, 1, "DataError: data.path: file not found: x.bin")}
    failures[0] = ProcessFailure(local_rank=0, pid=100, exitcode=-15, error_file=str(tmp_path / "missing.json"))
    failures[0].timestamp = failures[1].timestamp + 5  # stopped after rank 1 failed
    error = launch.worker_failure(ChildFailedError("pstar_cli.launch.worker", failures), tmp_path / "logs")
    assert error.exit_code == 2
    lines = error.message_lines()
    assert lines[0] == "worker rank 1 (local rank 1) failed with exit code 2"
    assert "DataError: data.path: file not found: x.bin" in lines
    assert any("1 other worker" in line for line in lines)


def test_the_root_cause_is_not_the_worker_that_lost_its_peer(tmp_path):
    cause = failure_with_error_file(tmp_path, 1, "RuntimeError: injected failure on rank 1")
    time.sleep(0.01)
    # the peer fails later, in the same second, with a symptom of the first failure
    peer = failure_with_error_file(tmp_path, 0, "RuntimeError: [pair.cc:537] Read error: Connection reset by peer")
    peer.timestamp = cause.timestamp
    assert launch.root_cause({0: peer, 1: cause})[0] == 1
    stopped = ProcessFailure(local_rank=2, pid=9, exitcode=-15, error_file=str(tmp_path / "none.json"))
    stopped.timestamp = cause.timestamp - 1
    assert launch.root_cause({2: stopped, 1: cause})[0] == 1
    # between two real errors the earlier error file wins, though torch's timestamps tie
    later = failure_with_error_file(tmp_path, 3, "ValueError: later")
    later.timestamp = cause.timestamp
    assert launch.root_cause({3: later, 1: cause})[0] == 1
    # stopped by the agent while exiting after its own error: still the cause
    cause.exitcode = -15
    assert launch.root_cause({0: peer, 1: cause})[0] == 1


def test_failure_report_falls_back_to_the_stderr_log(tmp_path):
    log = tmp_path / "logs" / "run_abc" / "attempt_0" / "1" / "stderr.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(40)) + "Segmentation fault\n")
    failure = ProcessFailure(local_rank=1, pid=7, exitcode=-11, error_file=str(log.parent / "error.json"))
    error = launch.worker_failure(ChildFailedError("pstar_cli.launch.worker", {3: failure}), tmp_path / "logs")
    lines = error.message_lines()
    assert lines[0] == "worker rank 3 (local rank 1) failed (ended by SIGSEGV)"
    assert error.exit_code == 1  # killed by a signal: still a failure
    assert lines[-2] == "Segmentation fault" and "line 39" in lines and "line 10" not in lines


def test_a_workers_error_file_is_what_torchrun_reads(tmp_path):
    error_file = tmp_path / "error.json"
    try:
        raise RuntimeError("boom on rank 1")
    except RuntimeError as exc:
        record_failure(exc, str(error_file))
    failure = ProcessFailure(local_rank=1, pid=7, exitcode=1, error_file=str(error_file))
    assert failure.message["message"] == "RuntimeError: boom on rank 1"
    assert "boom on rank 1" in failure.message["extraInfo"]["py_callstack"]


def test_an_error_file_cut_short_is_never_left_where_torchrun_reads(tmp_path, monkeypatch, capsys):
    def dump_then_die(data, fp):
        fp.write('{"message": {"mess')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", dump_then_die)  # inside torch's ErrorHandler
    error_file = tmp_path / "error.json"
    record_failure(RuntimeError("boom"), str(error_file))
    assert not error_file.exists()  # torchrun then reports the rank from its stderr log
    assert "could not write the error file" in capsys.readouterr().err


WORKER_STOPPED_WHILE_REPORTING = """
import json, sys, time
import pstar_cli.launch.worker as worker

def fail(*args):
    raise RuntimeError("boom on this rank")

real_dump = json.dump

def slow_dump(data, fp):
    print("writing", flush=True)
    time.sleep(1.0)  # the agent's SIGTERM arrives in here
    real_dump(data, fp)

worker.run_worker = fail
json.dump = slow_dump
worker.main(["cfg.yaml", "--output-dir", "out"])
"""


def test_a_sigterm_while_a_worker_writes_its_report_waits_for_the_report(tmp_path):
    import signal

    error_file = tmp_path / "error.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHELASTIC_ERROR_FILE": str(error_file)}
    child = subprocess.Popen([sys.executable, "-c", WORKER_STOPPED_WHILE_REPORTING], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGTERM)  # what torchrun's agent sends the ranks still running
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 1, stderr  # the worker's own failure, not the signal's
    failure = ProcessFailure(local_rank=0, pid=child.pid, exitcode=1, error_file=str(error_file))
    assert failure.message["message"] == "RuntimeError: boom on this rank"


def test_an_unreadable_error_file_still_reports_every_ranks_log(tmp_path):
    for local_rank in (0, 1):
        log = tmp_path / "logs" / "run_abc" / "attempt_0" / str(local_rank) / "stderr.log"
        log.parent.mkdir(parents=True)
        log.write_text(f"rank {local_rank} said this\n")
    try:
        json.loads('{"message": ')
    except json.JSONDecodeError as exc:
        error = launch.unreadable_failure(exc, tmp_path / "logs", nproc_per_node=2)
    lines = error.message_lines()
    assert lines[0].startswith("a worker failed and the job was stopped; its error file could not be read")
    assert "rank 0 said this" in lines and "rank 1 said this" in lines and error.exit_code == 1


# ---- real launches through torch.distributed.run (gloo on CPU) ----


def run_pstar(args: list[str], extra_env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m pstar_cli ARGS` with the GPUs hidden: these are CPU (gloo) runs on any machine.
    With `extra_env`, the test entry point tests/faults.py injects the faults it names."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **(extra_env or {})}
    entry = "tests.faults" if extra_env else "pstar_cli"
    return subprocess.run([sys.executable, "-m", entry, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@needs_engine
def test_a_failing_worker_stops_the_job_with_its_message(tmp_path):
    started = time.monotonic()
    result = run_pstar(["train", str(TINY), "distributed.nproc_per_node=2", "train.steps=50",
                        "--output-dir", str(tmp_path)], extra_env={"PSTAR_TEST_FAIL_RANK": "1"})
    assert result.returncode != 0
    saved = "".join(path.read_text() for path in tmp_path.glob("traceback-*.txt"))
    assert "worker rank 1" in result.stderr and "injected failure on rank 1" in result.stderr, saved
    assert "Traceback" not in result.stderr.split("error: ")[-1]
    assert time.monotonic() - started < 300  # rank 0, waiting for rank 1, was stopped, not left hanging
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or len(read_metrics(metrics)) < 50
