"""The training loop: lr schedule, batch split, metrics.jsonl, numerics against a plain PyTorch loop,
hooks/stop/resume extension points, and `pstar train` as a real subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import models
from pstar_cli import checkpoint as ckpt
from pstar_cli.config import load_config
from pstar_cli.training.data import build_data
from pstar_cli.errors import PstarError
from pstar_cli.observe.metrics import MetricsWriter, measure_throughput, read_metrics
from pstar_cli.training.lr_schedule import LRSchedule
from pstar_cli.config import BatchSplit
from pstar_cli.observe.metrics import CHUNK_STAT_KEYS
from pstar_cli.training.run import build_trainer, param_groups_of
from pstar_cli.training.trainer import Ranks, TrainState

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def engine_is_ready() -> bool:
    """False while engine.initialize_engine is still the placeholder that raises NotImplementedError."""
    from engine import initialize_engine

    try:
        initialize_engine(model_func=lambda: torch.nn.Linear(2, 2), local_rank=0, config={})
    except NotImplementedError:
        return False
    except Exception:
        return True  # it exists; whatever it objects to is the tests' business
    return True


needs_engine = pytest.mark.skipif(not engine_is_ready(), reason="engine.initialize_engine is not implemented yet")


# ---- lr schedule ----


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    schedule = LRSchedule(peak_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert [schedule(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)  # first decay step is at the peak
    assert schedule(109) == pytest.approx(0.1)  # last step reaches min_lr
    assert schedule(500) == pytest.approx(0.1)  # past the end it stays there
    # half-way through the decay: halfway between peak and min
    assert schedule(10 + 99 / 2) == pytest.approx(0.55)
    decay = [schedule(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_schedule_without_warmup_starts_at_peak():
    schedule = LRSchedule(peak_lr=3e-4, total_steps=5, warmup_steps=0, min_lr=0.0)
    assert schedule(0) == pytest.approx(3e-4)
    assert schedule(4) == pytest.approx(0.0)
    assert schedule(2) == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("kwargs", [{"total_steps": 0}, {"warmup_steps": -1}, {"min_lr": 2.0}])
def test_schedule_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        LRSchedule(**{"peak_lr": 1.0, "total_steps": 10, **kwargs})


# ---- batch split, throughput, metrics file ----


def test_batch_split_per_rank_and_micro_batch():
    split = BatchSplit.of(global_batch=16, world_size=2, grad_accum=4)
    assert (split.per_rank, split.micro_batch, split.num_micro_batches) == (8, 2, 4)
    with pytest.raises(PstarError, match="multiple of 6"):
        BatchSplit.of(global_batch=16, world_size=2, grad_accum=3)


def test_throughput_counts_all_tokens_and_flops_per_device():
    speed = measure_throughput(num_tokens=8192, step_s=0.5, flops_per_token=6e9, num_devices=2)
    assert speed.tokens_per_s == pytest.approx(16384)
    assert speed.tflops == pytest.approx(6e9 * 8192 / 2 / 0.5 / 1e12)


def test_metrics_writer_writes_one_object_per_line_and_appends(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write({"step": 1, "loss": 2.5})
        writer.write({"step": 2, "loss": float("nan")})
    with MetricsWriter(path, append=True) as writer:
        writer.write({"step": 3, "loss": 2.0})
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert math.isnan(records[1]["loss"])
    with MetricsWriter(path) as writer:  # a fresh run starts the file over
        writer.write({"step": 1})
    assert len(read_metrics(path)) == 1


# ---- the loop against plain PyTorch (a stand-in engine with the engine's interface) ----


class PlainEngineModel(torch.nn.Module):
    """The engine's model interface on a plain module: forward, backward(loss), chunk_stats()."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def chunk_stats(self) -> dict[str, int]:
        return {key: 0 for key in CHUNK_STAT_KEYS}


def plain_optimizer(module: torch.nn.Module, config, param_groups=None) -> torch.optim.Optimizer:
    """torch's AdamW with the engine config's settings (the typed config the CLI hands the engine),
    over the same parameter groups the engine was given."""
    from engine.config import resolve_engine_config

    params = resolve_engine_config(config).optimizer
    groups = module.parameters() if param_groups is None else param_groups(module)
    optimizer = torch.optim.AdamW(
        groups, lr=params.lr, betas=params.betas, eps=params.eps, weight_decay=params.weight_decay,
    )
    optimizer.loss_scale = 1.0
    optimizer.last_step_skipped = False
    return optimizer


def plain_initialize_engine(model_func, local_rank=0, config=None, param_groups=None):
    module = model_func()
    return PlainEngineModel(module), plain_optimizer(module, config, param_groups)


@pytest.fixture
def plain_engine(monkeypatch):
    import engine

    monkeypatch.setattr(engine, "initialize_engine", plain_initialize_engine)
    # the stand-in and the hand-written loop compute on the CPU, also on a machine with a GPU
    monkeypatch.setattr("pstar_cli.training.run.compute_device", lambda local_rank, setting="auto": torch.device("cpu"))


def tiny_config(engine: tuple[str, ...] = (), **train):
    overrides = ["model.size=gpt-tiny", "engine.gradient_clipping=0.0", "train.warmup_steps=2",
                 "train.log_interval=1", "train.steps=4", "train.batch_size=4", "train.seq_len=32"]
    overrides += [f"train.{key}={value}" for key, value in train.items()]
    overrides += [f"engine.{setting}" for setting in engine]
    return load_config(TINY, overrides)


def hand_written_losses(cfg) -> list[float]:
    """The loop the Trainer must equal: same seed, data order, micro-batches, lr schedule."""
    torch.manual_seed(cfg.train.seed)
    module = models.build_model(cfg.model_dict())
    optimizer = plain_optimizer(module, cfg.engine_dict(), param_groups_of(cfg))
    data = build_data(cfg.to_dict()["data"], cfg.train.seq_len, 256, cfg.train.seed)
    schedule = LRSchedule(cfg.train.lr, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    losses = []
    for step in range(cfg.train.steps):
        optimizer.zero_grad()
        step_losses = []
        for i in range(cfg.train.grad_accum):
            x, y = data.get_batch(step * cfg.train.batch_size + i * micro, micro)
            loss = module(x, y)
            (loss / cfg.train.grad_accum).backward()
            step_losses.append(loss.item())
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        optimizer.step()
        losses.append(sum(step_losses) / len(step_losses))
    return losses


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainer_matches_a_plain_pytorch_loop(plain_engine, tmp_path, grad_accum):
    cfg = tiny_config(grad_accum=grad_accum)
    build_trainer(cfg, tmp_path).train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    torch.testing.assert_close([r["loss"] for r in records], hand_written_losses(cfg), rtol=1e-6, atol=0)
    schedule = LRSchedule(cfg.train.lr, 4, 2, cfg.train.min_lr)
    assert [r["lr"] for r in records] == pytest.approx([schedule(s) for s in range(4)])


def test_grad_accum_divides_the_loss(plain_engine, tmp_path):
    """Two micro-batches of 2 must train like one batch of 4: the loss is divided by grad_accum."""
    whole = build_trainer(tiny_config(grad_accum=1), tmp_path / "whole").train()
    split = build_trainer(tiny_config(grad_accum=2), tmp_path / "split").train()
    assert whole.step == split.step == 4
    losses_whole = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    losses_split = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    torch.testing.assert_close(losses_split, losses_whole, rtol=1e-5, atol=1e-6)


def test_metrics_records_hold_every_field(plain_engine, tmp_path):
    cfg = tiny_config(log_interval=2, steps=5)
    build_trainer(cfg, tmp_path).train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 4, 5]  # step 1 (warm-up), every 2nd, the last
    expected = {"step", "loss", "lr", "tokens_per_s", "tflops", "loss_scale", "step_s", "gpu_mem_bytes",
                "host_rss_bytes", *CHUNK_STAT_KEYS}
    for record in records:
        assert expected <= record.keys()
        assert record["tokens_per_s"] > 0 and record["tflops"] > 0 and record["step_s"] > 0
        assert record["loss_scale"] == 1.0 and record["gpu_mem_bytes"] is None
        assert record["host_rss_bytes"] > 10 * 2**20
    assert records[-1]["tokens"] == 5 * 4 * 32
    # TFLOPS and tokens/s describe the same step time
    flops = models.flops_per_token(cfg.model_dict(), 32)
    assert records[-1]["tflops"] == pytest.approx(records[-1]["tokens_per_s"] * flops / 1e12)


class StopAfter:
    """A stand-in for the run's agreed stop (a signal): asked after every step, stops after `step`."""

    def __init__(self, step: int) -> None:
        self.step, self.seen = step, []

    def agreed(self, ranks) -> bool:
        self.seen.append(self.trainer.state.step)
        return self.trainer.state.step == self.step


class EndRecorder:
    """A stand-in checkpointer: records the state it is asked to save at the end of the loop."""

    def __init__(self) -> None:
        self.ended = []

    def after_step(self, trainer) -> None:
        pass

    def at_end(self, trainer, stopped: bool) -> None:
        self.ended.append((trainer.state.state_dict(), stopped))


def test_stop_ends_the_loop_and_the_state_resumes(plain_engine, tmp_path):
    cfg = tiny_config(steps=6)
    trainer = build_trainer(cfg, tmp_path)
    trainer.stop = stop = StopAfter(3)
    stop.trainer = trainer
    trainer.checkpointer = recorder = EndRecorder()
    state = trainer.train()
    seen = stop.seen
    ended = [saved for saved, stopped in recorder.ended if stopped]
    assert seen == [1, 2, 3]
    assert ended == [{"step": 3, "sequences_seen": 12}]

    # a resumed trainer continues from the state: the data position and the lr schedule follow it
    resumed = build_trainer(cfg, tmp_path / "resumed")
    resumed.state.load_state_dict(state.state_dict())
    starts = []
    original_get_batch = resumed.data.get_batch
    resumed.data.get_batch = lambda start, count: starts.append(start) or original_get_batch(start, count)
    resumed.train()
    assert starts == [12, 16, 20]
    records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in records] == [4, 5, 6]
    assert records[0]["lr"] == pytest.approx(LRSchedule(cfg.train.lr, 6, 2, cfg.train.min_lr)(3))


def test_train_state_round_trip():
    state = TrainState(step=7, sequences_seen=56)
    other = TrainState()
    other.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert other == state


def test_launch_writes_the_resolved_config(plain_engine, tmp_path):
    from pstar_cli.launch import launch

    cfg = tiny_config(steps=2)
    launch(cfg, TINY, [], tmp_path)
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written == cfg.to_dict()
    assert written["train"]["steps"] == 2
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2


# ---- with the real engine ----


@needs_engine
def test_trainer_with_the_engine_matches_plain_pytorch_fp32(tmp_path):
    # the hand-written loop builds its model on the CPU: the engine's init there too (on a GPU it
    # would draw on the GPU's generator)
    cfg = tiny_config(engine=("init_device=cpu",), grad_accum=2)
    build_trainer(cfg, tmp_path).train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    # the hand-written loop runs on the CPU; on a GPU the engine's fp32 kernels sum in another order
    rtol = 1e-4 if torch.cuda.is_available() else 1e-5
    torch.testing.assert_close(losses, hand_written_losses(cfg), rtol=rtol, atol=1e-6)


# `pstar ARGS...` for each JSON list of ARGS given, in order, in one process (one torch import),
# with numpy unimportable as in a clean venv: numpy is no dependency of pstar.
NO_NUMPY_PSTAR = """
import json, sys
sys.modules["numpy"] = None  # every `import numpy` fails
from pstar_cli.main import app
for args in map(json.loads, sys.argv[1:]):
    try:
        app(args, prog_name="pstar")
    except SystemExit as done:
        if done.code:
            raise
    print("pstar: command done", flush=True)
"""


def run_without_numpy(*commands: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """The pstar commands, one after the other, in one real process that cannot import numpy."""
    return subprocess.run([sys.executable, "-c", NO_NUMPY_PSTAR, *map(json.dumps, commands)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@needs_engine
def test_pstar_train_subprocess_loss_falls(tmp_path):
    """The README's demo command with few steps: a real process, metrics.jsonl and config.yaml;
    then the same command with more steps and --resume goes on from its checkpoint. Both without
    numpy, as in a clean venv (the RNG states go into the checkpoint as bytes taken from torch)."""
    out = tmp_path / "run"
    demo = ["train", str(TINY), "train.warmup_steps=2", "train.log_interval=5", "checkpoint.interval=6",
            "--output-dir", str(out)]
    result = run_without_numpy([*demo, "train.steps=12"], [*demo, "train.steps=14", "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("pstar: command done") == 2
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 5, 10, 12, 14]  # the warm-up step, every 5th, the last
    assert records[3]["loss"] < records[0]["loss"] - 0.5, [r["loss"] for r in records]
    assert (out / "config.yaml").exists()
    assert "step 12/12" in result.stdout  # plain log lines: stdout is not a terminal
    assert records[3]["param_chunks_device"] + records[3]["param_chunks_host"] > 1
    assert "resumed from" in result.stdout and "step 14/14" in result.stdout
    checkpoints = ckpt.complete_checkpoints(out / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000012", "step-00000014"]  # checkpoint.keep is 2
    assert all(ckpt.verify_checkpoint(p) == [] for p in checkpoints)


def test_pstar_train_reports_a_bad_override_in_one_line(tmp_path):
    """In this process (CliRunner, the console script's boundary); a real process's user mistake is
    tests/test_cli_basic.py::test_real_process_reports_a_user_mistake_in_one_line."""
    from typer.testing import CliRunner

    from pstar_cli.main import app

    result = CliRunner().invoke(app, ["train", str(TINY), "train.stepz=3", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "train.stepz" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.gpu
def test_pstar_train_on_a_gpu_reports_gpu_memory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pstar_cli", "train", str(TINY), "train.steps=12", "train.warmup_steps=2",
         "train.log_interval=5", "engine.bf16.enabled=true", "--output-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    last = records[-1]
    assert last["gpu_total_bytes"] > 10 * 2**30 and 0 < last["gpu_mem_bytes"] <= last["gpu_total_bytes"]
    assert 0 < last["gpu_peak_allocated_bytes"] < last["gpu_total_bytes"]
    assert last["loss"] < records[0]["loss"] - 0.5
    assert "cuda" in result.stdout and "bf16" in result.stdout


def test_ranks_share_initial_weights_but_draw_their_own_dropout(plain_engine, tmp_path):
    """Every rank builds the same weights from train.seed; afterwards rank r > 0 reseeds, so dropout
    masks differ between ranks (which train on different samples), while rank 0 draws as one rank does."""
    cfg = tiny_config()
    draws, weights = [], []
    for rank in (0, 1):
        trainer = build_trainer(cfg, tmp_path / f"rank{rank}", ranks=Ranks(rank=rank, local_rank=0, world_size=2))
        weights.append({k: v.clone() for k, v in trainer.model.module.state_dict().items()})
        draws.append(torch.rand(8))
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    assert not torch.equal(draws[0], draws[1])
    single = build_trainer(cfg, tmp_path / "single")  # one rank: the stream continues from the init
    assert torch.equal(torch.rand(8), draws[0])
    assert single.ranks.world_size == 1
