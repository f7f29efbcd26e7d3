"""Failing well: every bad input or failure during training gives one clear message and a non-zero
exit, and loses nothing (the last checkpoint stays intact). `pstar train` runs in-process here
(Typer's CliRunner: the same boundary as the console script); failures that need a broken GPU or
a diverging run are injected through tests/faults.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pstar_cli import checkpoint as ckpt
from pstar_cli.training import failures, guards
from pstar_cli.training import run as run_module
from pstar_cli.training.trainer import Trainer
from tests.faults import with_faults
from pstar_cli.main import app
from pstar_cli.observe.metrics import read_metrics

CONFIG = {
    "model": {"family": "gpt", "size": "gpt-tiny"},
    "data": {"kind": "text"},
    "train": {"steps": 8, "batch_size": 4, "seq_len": 32, "lr": 3.0e-3, "warmup_steps": 2, "min_lr": 3.0e-4,
              "seed": 0, "log_interval": 100},
    "engine": {"bf16": {"enabled": False}, "default_chunk_size": 8192, "device_memory_limit": 2_000_000},
    "checkpoint": {"interval": 2, "keep": 5},
}


@pytest.fixture
def config_path(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    return path


def train(config_path: Path, out: Path, *extra: str, fault: str | None = None):
    """`pstar train` in this process; `fault` (KIND@STEP, tests/faults.py) is injected into the run."""
    args = ["train", str(config_path), *extra, "--output-dir", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        if fault:
            patch.setattr(run_module, "build_run", with_faults(run_module.build_run, fault))
        return CliRunner().invoke(app, args)


def assert_one_clear_error(result, exit_code: int, *phrases: str) -> list[str]:
    assert result.exit_code == exit_code, result.output
    # a user error ends in SystemExit; anything else would be a crash with a traceback
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for phrase in phrases:
        assert phrase in result.output, result.output
    return errors


def checkpoint_steps(out: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in ckpt.complete_checkpoints(out / "checkpoints")]


# ---- damaged checkpoints ----


@pytest.fixture
def two_checkpoints(config_path, tmp_path) -> Path:
    out = tmp_path / "run"
    result = train(config_path, out, "train.steps=4")
    assert result.exit_code == 0, result.output
    assert checkpoint_steps(out) == [2, 4]
    return out


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_damaged_checkpoint_is_named_and_the_previous_one_offered(config_path, two_checkpoints, damage):
    out = two_checkpoints
    rank_file = out / "checkpoints" / "step-00000004" / "rank-00000.pt"
    data = bytearray(rank_file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 1000]
    else:
        data[len(data) // 3] ^= 0x01
    rank_file.write_bytes(bytes(data))
    previous = out / "checkpoints" / "step-00000002"
    why = "truncated" if damage == "truncate" else "sha256"
    assert_one_clear_error(train(config_path, out, "--resume"), 2, "is damaged", str(rank_file), why,
                           f"resume from it with --resume {previous}")
    assert_one_clear_error(CliRunner().invoke(app, ["export", str(out / "checkpoints"), str(out / "m.pt")]), 2,
                           str(rank_file))
    # nothing lost: both checkpoints are still there, and the offered one works
    assert checkpoint_steps(out) == [2, 4] and ckpt.verify_checkpoint(previous) == []
    result = train(config_path, out, "train.steps=5", "--resume", str(previous))
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 5]  # steps past 2 redone


def test_a_checkpoint_without_its_manifest_is_not_offered(config_path, two_checkpoints):
    (two_checkpoints / "checkpoints" / "step-00000004" / ckpt.MANIFEST).unlink()  # as if killed before it
    result = train(config_path, two_checkpoints, "train.steps=5", "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "step-00000002 at step 2" in result.output


def test_resume_without_any_checkpoint_says_so(config_path, tmp_path):
    assert_one_clear_error(train(config_path, tmp_path / "fresh", "--resume"), 2,
                           "no checkpoint in", "train without --resume")


# ---- missing data ----


def test_missing_data_file_is_one_line_before_anything_runs(config_path, tmp_path):
    out = tmp_path / "run"
    result = train(config_path, out, "data.kind=tokens", f"data.path={tmp_path / 'gone.bin'}")
    assert_one_clear_error(result, 2, "data.path: file not found", "gone.bin")
    assert not out.exists()


def test_data_file_gone_on_resume_is_one_line_and_keeps_the_checkpoints(config_path, tmp_path):
    tokens = tmp_path / "tokens.bin"
    torch.randint(256, (4096,), dtype=torch.int16).numpy().tofile(tokens)
    out = tmp_path / "run"
    data = ["data.kind=tokens", f"data.path={tokens}", "model.vocab_size=256", "train.steps=2"]
    assert train(config_path, out, *data).exit_code == 0
    tokens.unlink()
    assert_one_clear_error(train(config_path, out, *data, "--resume"), 2, "data.path: file not found")
    assert checkpoint_steps(out) == [2]


# ---- out of memory, the engine's refusal ----


@pytest.mark.parametrize("kind, says", [
    ("cuda-oom", "out of GPU memory at step 5: needed 2.00 GiB more, 512.00 MiB was free of 79.10 GiB"),
    ("host-oom", "out of host memory at step 5: needed 4.00 GiB more"),
])
def test_out_of_memory_says_needed_and_available_and_keeps_the_checkpoint(config_path, tmp_path, kind, says):
    out = tmp_path / "run"
    result = train(config_path, out, fault=f"{kind}@5")
    assert_one_clear_error(result, 1, says, "pstar estimate-memory", "pstar's model data",
                           f"the last checkpoint, {out / 'checkpoints' / 'step-00000004'}, is intact")
    assert checkpoint_steps(out) == [2, 4]
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step-00000004") == []


def test_model_too_large_for_the_budgets_is_refused_with_the_way_forward(config_path, tmp_path):
    result = train(config_path, tmp_path / "run", "engine.device_memory_limit=10000",
                   "engine.host_memory_limit=20000")
    assert_one_clear_error(result, 1, "needs", "pstar estimate-memory")


def test_explains_the_allocators_own_messages():
    cuda = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 139.81 GiB of which "
        "1.02 GiB is free. Including non-PyTorch memory, this process has 138.7 GiB memory in use.")
    assert failures.explain_failure(cuda, None)[0] == (
        "out of GPU memory while building the model: needed 1.50 GiB more, 1.02 GiB was free of 139.81 GiB")
    host = RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")
    assert failures.explain_failure(host, None)[0].startswith(
        "out of host memory while building the model: needed 1.00 GiB more, ")
    assert failures.explain_failure(MemoryError(), None)[0].startswith("out of host memory")
    assert failures.explain_failure(RuntimeError("a bug"), None) is None  # keeps its traceback


# ---- non-finite loss, stuck loss scale ----


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_loss_stops_with_the_step_and_never_saves_the_nan_state(config_path, tmp_path, precision):
    out = tmp_path / "run"
    bf16 = f"engine.bf16.enabled={'true' if precision == 'bf16' else 'false'}"
    result = train(config_path, out, bf16, fault="nan@5")
    # not a log step: found before the checkpoint of step 6, which is not written
    assert_one_clear_error(result, 1, f"the loss became NaN or infinite at step 5 ({precision}); stopped at step 6",
                           f"the last checkpoint, {out / 'checkpoints' / 'step-00000004'}, is intact")
    assert checkpoint_steps(out) == [2, 4]
    # and the kept checkpoint holds finite weights
    shard = torch.load(out / "checkpoints" / "step-00000004" / "rank-00000.pt", weights_only=True)
    assert all(torch.isfinite(group["master"]).all() for group in shard["groups"])


def test_nan_loss_on_a_log_step_stops_right_there(config_path, tmp_path):
    out = tmp_path / "run"
    result = train(config_path, out, "train.log_interval=1", fault="nan@3")
    assert_one_clear_error(result, 1, "at step 3 (fp32); stopped at step 3")
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and math.isnan(records[-1]["loss"])
    assert checkpoint_steps(out) == [2]


def test_fp16_loss_scale_stuck_at_its_minimum_is_reported(config_path, tmp_path, monkeypatch):
    monkeypatch.setattr(guards, "STUCK_SCALE_STEPS", 4)
    # a scale so large that every step overflows: it halves each step down to the minimum, then stays
    fp16 = ["engine.bf16.enabled=false", "engine.fp16.enabled=true", "engine.fp16.initial_scale_power=112",
            "engine.fp16.min_loss_scale=1.0e33", "engine.fp16.hysteresis=1", "checkpoint.interval=0",
            "train.steps=10"]
    result = train(config_path, tmp_path / "run", *fp16)
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert "the fp16 loss scale has been at engine.fp16.min_loss_scale (1e+33) for 4 steps" in warning
    assert "4 of them skipped" in warning and "bf16" in warning


def test_a_checkpoint_that_cannot_be_written_stops_the_run_clearly(config_path, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = train(config_path, tmp_path / "run", f"checkpoint.dir={blocker / 'checkpoints'}")
    assert_one_clear_error(result, 1, "could not write the checkpoint of step 2", "Not a directory",
                           "no earlier checkpoint is intact")


def test_an_unexpected_error_keeps_the_checkpoint_and_names_its_traceback_file(config_path, tmp_path, monkeypatch):
    """A bug in the middle of training (injected): one `error:` line naming the traceback file in the
    output directory, exit code 1, and the checkpoints written before it intact."""
    original_step = Trainer.train_step

    def buggy_step(self):
        if self.state.step == 5:
            raise IndexError("injected by the test")
        return original_step(self)

    monkeypatch.setattr(Trainer, "train_step", buggy_step)
    out = tmp_path / "run"
    result = train(config_path, out)
    assert result.exit_code == 1, result.output
    [error] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    [written] = out.glob("traceback-train-*.txt")
    assert "IndexError: injected by the test" in error and error.endswith(str(written))
    assert "IndexError: injected by the test" in written.read_text() and "Traceback" not in result.output
    assert checkpoint_steps(out) == [2, 4]
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step-00000004") == []
