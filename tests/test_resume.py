"""Resume as a user meets it: real `pstar train` processes, real signals, kill -9 at a random
moment (also inside a checkpoint write); the resumed run's losses must equal the uninterrupted
run's bit for bit (fp32, CPU, dropout on so the RNG states matter), with one and two ranks.

The runs that are interrupted are real processes (a signal or kill -9 is the point); the one-rank
runs around them (the uninterrupted reference, the resumes) run in this process through CliRunner
where no GPU is present, which saves a Python start, a torch import and a model build per run.
With a GPU they stay subprocesses with the GPUs hidden: bitwise equality is promised on the CPU."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pstar_cli import checkpoint as ckpt
from tests.faults import PAUSE_ENV
from pstar_cli.main import app
from pstar_cli.observe.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 40
INTERVAL = 3
CONFIG = {
    "model": {"family": "gpt", "size": "gpt-tiny", "dropout": 0.1},
    "data": {"kind": "text"},
    "train": {"steps": NUM_STEPS, "batch_size": 4, "seq_len": 32, "lr": 3.0e-3, "warmup_steps": 4,
              "min_lr": 3.0e-4, "seed": 0, "log_interval": 1},
    "engine": {"bf16": {"enabled": False}, "default_chunk_size": 8192, "gradient_clipping": 1.0,
               "device_memory_limit": 2_000_000},  # chunks move every step
    "checkpoint": {"interval": INTERVAL, "keep": 3},
}
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "resume.yaml"
    path.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    return path


def train_args(config_path: Path, out: Path, *extra: str) -> list[str]:
    # tests.faults: pstar's app, with the faults that the environment asks for (none by default)
    return [sys.executable, "-m", "tests.faults", "train", str(config_path), *extra, "--output-dir", str(out)]


def environment(**extra: str) -> dict:
    # the CPU, also on a GPU machine: bitwise equality is promised for CPU runs (on CUDA the resumed
    # run's first step updates every optimizer group on the host, which rounds differently)
    return {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **extra}


def run(config_path: Path, out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_args(config_path, out, *extra), cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=environment(**env))


def run_cpu(config_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """A one-rank CPU `pstar train` that need not be a process of its own: in this process (CliRunner)
    where the CPU is the only device, else a subprocess with the GPUs hidden. The same result fields."""
    if torch.cuda.is_available():
        return run(config_path, out, *extra)
    result = CliRunner().invoke(app, ["train", str(config_path), *extra, "--output-dir", str(out)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess([], result.exit_code, result.stdout, result.stderr)


def start(config_path: Path, out: Path, *extra: str, **env: str) -> subprocess.Popen:
    """A training process whose output goes to files (a full pipe would stall it)."""
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(train_args(config_path, out, *extra), cwd=REPO, env=environment(**env),
                            stdout=open(out / "stdout.txt", "w"), stderr=open(out / "stderr.txt", "w"))


def wait_for(condition, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (code {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def num_logged(out: Path) -> int:
    try:
        return sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")]


def output_of(out: Path) -> str:
    return (out / "stdout.txt").read_text() + (out / "stderr.txt").read_text()


@pytest.fixture(scope="module")
def reference(config_path, tmp_path_factory) -> list[tuple[int, float]]:
    """The uninterrupted run's loss at every step."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_cpu(config_path, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(out)


def resume_and_compare(config_path: Path, out: Path, reference: list, *extra: str) -> subprocess.CompletedProcess:
    result = run_cpu(config_path, out, *extra, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    # metrics.jsonl was appended to: the steps before the kill are there once, the rest follow
    assert losses(out) == reference
    return result


def test_kill_9_at_a_random_moment_then_resume_continues_bitwise(config_path, reference, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_after = rng.randint(INTERVAL + 1, NUM_STEPS - 10)  # a step after the first checkpoint
    out = tmp_path / "run"
    process = start(config_path, out)
    wait_for(lambda: num_logged(out) >= kill_after, f"step {kill_after}", process)
    time.sleep(rng.uniform(0, 0.03))  # anywhere inside the next step
    process.send_signal(signal.SIGKILL)
    assert process.wait(TIMEOUT_S) == -signal.SIGKILL, f"seed {seed}"
    assert ckpt.complete_checkpoints(out / "checkpoints"), f"seed {seed}"
    resume_and_compare(config_path, out, reference)


def test_kill_9_inside_a_checkpoint_write_leaves_the_previous_one_valid(config_path, reference, tmp_path):
    out = tmp_path / "run"
    process = start(config_path, out, **{PAUSE_ENV: str(2 * INTERVAL)})
    wait_for(lambda: "test pause inside the checkpoint write" in output_of(out), "the paused write", process)
    process.send_signal(signal.SIGKILL)
    assert process.wait(TIMEOUT_S) == -signal.SIGKILL
    root = out / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-00000003"]
    assert ckpt.verify_checkpoint(root / "step-00000003") == []
    assert (root / ".tmp-step-00000006" / "rank-00000.pt").is_file()  # the write that was killed
    resume_and_compare(config_path, out, reference)
    assert not (root / ".tmp-step-00000006").exists()  # cleared by the resumed run's first write


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_continues(config_path, reference, tmp_path):
    out = tmp_path / "run"
    process = start(config_path, out)
    wait_for(lambda: num_logged(out) >= 5, "step 5", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(TIMEOUT_S) == 128 + signal.SIGTERM
    stopped_at = num_logged(out)
    assert stopped_at < NUM_STEPS
    latest = ckpt.complete_checkpoints(out / "checkpoints")[-1]
    assert latest.name == ckpt.step_dir_name(stopped_at) and ckpt.verify_checkpoint(latest) == []
    printed = output_of(out)
    assert f"stopped by SIGTERM after step {stopped_at} of {NUM_STEPS}; checkpoint: {latest}" in printed
    assert "--resume" in printed and "Traceback" not in printed
    resume_and_compare(config_path, out, reference)


@pytest.mark.slow
def test_ctrl_c_twice_quickly_is_one_request(config_path, tmp_path):
    """A terminal's Ctrl-C reaches torchrun's workers twice (from the terminal and the agent).
    (Slow: the default test_a_second_ctrl_c_stops_at_once starts with a quick double Ctrl-C that
    must still reach the stop's checkpoint write; the clean end of a stop is checked with SIGTERM,
    which the same handler takes, by test_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_continues.)"""
    out = tmp_path / "run"
    process = start(config_path, out)
    wait_for(lambda: num_logged(out) >= 2, "step 2", process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(TIMEOUT_S) == 128 + signal.SIGINT
    assert "stopped by SIGINT after step" in output_of(out)
    assert ckpt.verify_checkpoint(ckpt.complete_checkpoints(out / "checkpoints")[-1]) == []


def test_a_second_ctrl_c_stops_at_once(config_path, tmp_path):
    """A quick double Ctrl-C is one request (a terminal's reaches torchrun's workers twice, from the
    terminal and the agent): the run goes on to the stop's checkpoint write. A separate Ctrl-C
    during that write stops at once."""
    out = tmp_path / "run"
    process = start(config_path, out, "checkpoint.interval=0", **{PAUSE_ENV: "0"})  # the stop's write is the only one
    wait_for(lambda: num_logged(out) >= 2, "step 2", process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # the same request
    wait_for(lambda: "test pause inside the checkpoint write" in output_of(out), "the stop's write", process)
    assert "stopped at once" not in output_of(out)
    time.sleep(1.2)  # a second, separate Ctrl-C
    process.send_signal(signal.SIGINT)
    assert process.wait(20) == 130
    printed = output_of(out)
    assert "error: stopped at once by a second Ctrl-C" in printed and "Traceback" not in printed
    assert ckpt.complete_checkpoints(out / "checkpoints") == []


def test_resume_refuses_a_config_that_differs_and_lists_the_differences(config_path, reference, tmp_path):
    out = tmp_path / "run"
    result = run_cpu(config_path, out, "train.steps=6")  # stops after step 6 with checkpoints 3, 6
    assert result.returncode == 0, result.stderr[-3000:]
    result = CliRunner().invoke(app, ["train", str(config_path), "train.batch_size=8", "train.seed=3",
                                      "--output-dir", str(out), "--resume"])  # refused before any training
    assert result.exit_code == 2
    assert "was written with a different config" in result.output
    assert "train.batch_size: 4 in the checkpoint, 8 now" in result.output
    assert "train.seed: 0 in the checkpoint, 3 now" in result.output
    # train.steps and the lr may change (reported): the run goes on from step 3 to the new end
    result = run_cpu(config_path, out, "train.steps=8", "train.lr=0.002", "--resume",
                 str(out / "checkpoints" / "step-00000003"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "changed since the checkpoint: train.lr: 0.003 in the checkpoint, 0.002 now" in result.stdout
    assert [step for step, _ in losses(out)] == list(range(1, 9))
    assert losses(out)[:3] == reference[:3]


# ---- two ranks ----


def two_rank_support_problem(result: subprocess.CompletedProcess) -> str | None:
    """Why a 2-rank run could not train here, if it failed for a reason outside resume."""
    if result.returncode != 0 and "several ranks" in result.stderr and "not supported" in result.stderr:
        return "the engine does not train on several ranks yet"
    return None


# dropout off: one rank draws other dropout masks than two, which would hide the resharding check
TWO_RANKS = ("distributed.nproc_per_node=2", "train.steps=12", "checkpoint.interval=4", "model.dropout=0.0")


@pytest.fixture(scope="module")
def two_rank_run(config_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    result = run(config_path, out, *TWO_RANKS)
    if (why := two_rank_support_problem(result)) is not None:
        pytest.skip(why)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [step for step, _ in losses(out)] == list(range(1, 13))
    return out


@pytest.mark.slow
def test_two_ranks_resume_bitwise(config_path, two_rank_run, tmp_path):
    """Two ranks from scratch, resumed past a trimmed metrics file. (Slow: the default
    test_two_ranks_stop_together_on_sigterm_and_resume_bitwise resumes two ranks from their own
    checkpoint and compares with the same two-rank run uninterrupted, bit for bit; trimming is
    checked by the one-rank kill -9 tests.)"""
    # the state a run killed after step 5 leaves: checkpoint step-4, metrics up to step 5
    resumed = tmp_path / "resumed"
    shutil.copytree(two_rank_run / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    (resumed / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (two_rank_run / "metrics.jsonl").read_text().splitlines()[:5]))
    result = run(config_path, resumed, *TWO_RANKS, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(resumed) == losses(two_rank_run)


@pytest.mark.slow
def test_two_ranks_checkpoint_reshards_onto_one_rank(config_path, two_rank_run, tmp_path):
    """One rank takes its pieces from both ranks' files: the same run up to the order of float sums.
    (Slow: tests/test_checkpoint.py loads several ranks' shard states into one in-process.)"""
    checkpoint = two_rank_run / "checkpoints" / "step-00000004"
    assert ckpt.read_metadata(checkpoint)["files"] == ["rank-00000.pt", "rank-00001.pt"]
    one = tmp_path / "one"
    result = run(config_path, one, *TWO_RANKS[1:], "distributed.nproc_per_node=1", "--resume", str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [step for step, _ in losses(one)] == list(range(5, 13))
    expected = [loss for _, loss in losses(two_rank_run)[4:]]
    assert [loss for _, loss in losses(one)] == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def one_rank_run(config_path, tmp_path_factory) -> Path:
    """The two-rank settings on one rank, 12 steps, checkpoints at 4, 8, 12."""
    out = tmp_path_factory.mktemp("one_rank")
    result = run_cpu(config_path, out, *TWO_RANKS[1:], "distributed.nproc_per_node=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def resharded_onto_two_ranks(config_path, one_rank_run, tmp_path_factory) -> Path:
    """Two ranks resumed from the one-rank checkpoint of step 4, uninterrupted to step 12."""
    two = tmp_path_factory.mktemp("resharded")
    result = run(config_path, two, *TWO_RANKS, "--resume", str(one_rank_run / "checkpoints" / "step-00000004"))
    if (why := two_rank_support_problem(result)) is not None:
        pytest.skip(why)
    assert result.returncode == 0, result.stderr[-3000:]
    return two


def test_one_rank_checkpoint_reshards_onto_two_ranks(one_rank_run, resharded_onto_two_ranks):
    """Each of two ranks takes its shard of every chunk from the one rank's file."""
    two = resharded_onto_two_ranks
    assert [step for step, _ in losses(two)] == list(range(5, 13))
    expected = [loss for _, loss in losses(one_rank_run)[4:]]
    assert [loss for _, loss in losses(two)] == pytest.approx(expected, rel=1e-5)


def test_two_ranks_stop_together_on_sigterm_and_resume_bitwise(config_path, one_rank_run, resharded_onto_two_ranks,
                                                               tmp_path):
    """The launcher passes SIGTERM on to the workers; they agree on the step to stop after, write
    one checkpoint together, and the launcher names it. Resumed, the two ranks give the losses of
    the same two-rank run left uninterrupted, bit for bit (both start from the one-rank step 4)."""
    out = tmp_path / "run"
    steps = [*TWO_RANKS, "checkpoint.interval=0"]  # the only checkpoint is the stop's
    process = start(config_path, out, *steps, "--resume", str(one_rank_run / "checkpoints" / "step-00000004"))
    wait_for(lambda: num_logged(out) >= 2, "step 6", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(TIMEOUT_S) == 128 + signal.SIGTERM
    assert num_logged(out) < 8  # stopped before step 12
    [latest] = ckpt.complete_checkpoints(out / "checkpoints")
    assert ckpt.verify_checkpoint(latest) == [] and ckpt.read_metadata(latest)["world_size"] == 2
    assert f"stopped by SIGTERM; the workers were stopped too; latest checkpoint: {latest}" in output_of(out)
    result = run(config_path, out, *steps, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [step for step, _ in losses(out)] == list(range(5, 13))
    assert losses(out) == losses(resharded_onto_two_ranks)
