"""A training run, as `pstar train` runs it in every process: build the parts, train, say why it stopped.

`run_training` reads top to bottom: `build_run` builds the run's parts in order (the engine's
model and optimizer, the data, metrics, the loss guard, the checkpointer; the agreed stop comes
from `run_training`) and hands them to the trainer, resumed from a checkpoint when given;
`Trainer.train()` then calls them in the order the loop shows. A run loses at most the steps
since its last checkpoint; failures pstar can explain become one message
(pstar_cli/training/failures.py).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import torch

import models
from engine.device import pick_compute_device as compute_device
from pstar_cli.checkpoint import Checkpointer, ResumePoint, checkpoint_root, load_checkpoint
from pstar_cli.config import Config
from pstar_cli.observe.metrics import MemoryProbe, MetricsWriter, trim_metrics
from pstar_cli.training.failures import FailureReport, StoppedBySignal
from pstar_cli.training.guards import LossGuard, StopSignal
from pstar_cli.training.trainer import Ranks, Trainer, TrainState


def run_training(cfg: Config, output_dir: Path, ranks: Ranks, view, resume: ResumePoint | None = None) -> TrainState:
    """Train as `cfg` says, from `resume` if given; returns the final TrainState."""
    report = FailureReport(checkpoint_root(cfg, output_dir))
    with report, StopSignal(ranks.is_main) as stop:
        trainer = report.trainer = build_run(cfg, output_dir, ranks, view, resume, stop)
        state = trainer.train()
    if stop.signum is not None and state.step < cfg.train.steps:
        raise StoppedBySignal(stop.signum, [
            f"stopped by {signal.Signals(stop.signum).name} after step {state.step} of {cfg.train.steps}; "
            f"checkpoint: {trainer.checkpointer.latest or 'none (nothing was trained)'}",
            "continue with the same `pstar train` command and --resume",
        ])
    return state


def build_run(cfg: Config, output_dir: Path, ranks: Ranks, view, resume: ResumePoint | None,
              stop: StopSignal) -> Trainer:
    """The run's parts, built in this order, and the trainer that calls them; at the resumed step
    when `resume` is given."""
    resuming = resume is not None
    if resuming and ranks.is_main:
        # a killed run logged steps that the resumed run redoes: drop them before appending
        trim_metrics(Path(output_dir) / "metrics.jsonl", resume.step)
    device = compute_device(ranks.local_rank, cfg.engine_config.compute_device)
    model, optimizer, init_s = build_engine_model(cfg, ranks)
    data = build_run_data(cfg)
    memory = MemoryProbe(device)
    metrics = open_metrics(output_dir, ranks, append=resuming)
    loss_guard = LossGuard(cfg.engine_config.fp16)
    checkpointer = Checkpointer(
        checkpoint_root(cfg, output_dir), cfg.checkpoint.interval, cfg.checkpoint.keep,
        health_check=loss_guard.check, last_saved_step=resume.step if resuming else -1)
    trainer = Trainer(cfg, output_dir, ranks, view, model=model, optimizer=optimizer, data=data, device=device,
                      memory=memory, metrics=metrics, init_s=init_s,
                      checkpointer=checkpointer, loss_guard=loss_guard, stop=stop)
    if resuming:
        resume_trainer(trainer, resume)
    return trainer


def build_trainer(cfg: Config, output_dir: Path, ranks: Ranks = Ranks(), view=None) -> Trainer:
    """A trainer with the loop's own parts only (model, data, metrics): no checkpoints, no loss
    guard, never stops early. The profiler and the tests of the loop use it."""
    device = compute_device(ranks.local_rank, cfg.engine_config.compute_device)
    model, optimizer, init_s = build_engine_model(cfg, ranks)
    data = build_run_data(cfg)
    return Trainer(cfg, output_dir, ranks, view, model=model, optimizer=optimizer, data=data, device=device,
                   memory=MemoryProbe(device), metrics=open_metrics(output_dir, ranks, append=False), init_s=init_s)


def param_groups_of(cfg: Config):
    """The optimizer's parameter groups for the config's `train.weight_decay_on`."""
    return param_groups_for(cfg.train.weight_decay_on, cfg.engine_config.optimizer.weight_decay)


def param_groups_for(rule: str, weight_decay: float):
    """nanoGPT's rule ("matrices": decay on tensors of 2+ dims only) as two groups, or None for one
    group that decays everything ("all")."""
    from engine.param_groups import weight_decay_groups

    if rule == "all":
        return None
    return lambda module: weight_decay_groups(module, weight_decay)


def build_engine_model(cfg: Config, ranks: Ranks) -> tuple[Any, Any, float]:
    """Seed, then build the model through the engine (on meta, materialised into chunks); returns
    the engine's model and optimizer and the seconds it took."""
    from engine import initialize_engine

    model_cfg = cfg.model_dict()
    if ranks.is_main:
        # building a large model takes a while: say what is happening before the view starts
        print(f"pstar: building {cfg.model.size or cfg.model.family or cfg.model.hf_path} "
              f"({models.num_params(model_cfg) / 1e6:,.1f}M parameters) through the engine ...", flush=True)
    started = time.perf_counter()
    # the seed fixes the initial weights: same seed, same weights as a plain PyTorch build
    torch.manual_seed(cfg.train.seed)
    model, optimizer = initialize_engine(
        model_func=models.model_func(model_cfg),  # a built-in family or a Hugging Face directory
        local_rank=ranks.local_rank,
        config=cfg.engine_config,
        param_groups=param_groups_of(cfg),
    )
    # After init every rank holds the same weights; from here on each rank draws its own random
    # numbers (dropout masks), so ranks working on different samples do not share one mask.
    # Rank 0 keeps the plain seed, so a one-rank run draws what a plain PyTorch loop would.
    if ranks.rank > 0:
        torch.manual_seed(cfg.train.seed + ranks.rank)
    return model, optimizer, time.perf_counter() - started


def build_run_data(cfg: Config):
    """The run's data in its global order (`get_batch(start, count)`)."""
    from pstar_cli.training.data import build_data

    data_cfg = cfg.to_dict()["data"]
    return build_data(data_cfg, cfg.train.seq_len, cfg.model_spec["vocab_size"], cfg.train.seed)


def open_metrics(output_dir: Path, ranks: Ranks, append: bool) -> MetricsWriter | None:
    """metrics.jsonl, written by rank 0 only; a resumed run appends to it."""
    return MetricsWriter(Path(output_dir) / "metrics.jsonl", append) if ranks.is_main else None


def resume_trainer(trainer: Trainer, resume: ResumePoint) -> None:
    load_checkpoint(trainer, resume)
    saved_ranks = resume.metadata["world_size"]
    resharded = f" (re-split from {saved_ranks} rank(s))" if saved_ranks != trainer.ranks.world_size else ""
    trainer.view.note(f"resumed from {resume.path} at step {resume.step}{resharded}")
    if resume.step >= trainer.cfg.train.steps:
        trainer.view.note(f"nothing left to train: train.steps is {trainer.cfg.train.steps}; raise it to go on")
