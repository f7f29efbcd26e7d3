"""A training run, as `pstar train` runs it in every process: build the parts, train, say why it stopped.

`run_training` reads top to bottom: `build_run` makes the trainer with its parts (the engine's
model and optimizer, the data, metrics, the checkpointer, the loss guard, the agreed stop),
resumed from a checkpoint when given; `Trainer.train()` then calls them in the order the loop
shows. A run loses at most the steps since its last checkpoint; failures pstar can explain
become one message (pstar_cli/training/failures.py).
"""

from __future__ import annotations

import signal
from pathlib import Path

from pstar_cli.checkpoint import Checkpointer, ResumePoint, checkpoint_root, load_checkpoint
from pstar_cli.config import Config
from pstar_cli.observe.metrics import trim_metrics
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
    """The trainer of a run with all its parts, at the resumed step when `resume` is given."""
    if resume is not None and ranks.is_main:
        # a killed run logged steps that the resumed run redoes: drop them before appending
        trim_metrics(Path(output_dir) / "metrics.jsonl", resume.step)
    trainer = Trainer(cfg, output_dir, ranks, view, append_metrics=resume is not None)
    if resume is not None:
        resume_trainer(trainer, resume)
    trainer.loss_guard = LossGuard(cfg.engine_config.fp16)
    trainer.checkpointer = Checkpointer(
        checkpoint_root(cfg, output_dir), cfg.checkpoint.interval, cfg.checkpoint.keep,
        health_check=trainer.loss_guard.check, last_saved_step=resume.step if resume is not None else -1)
    trainer.stop = stop
    return trainer


def resume_trainer(trainer: Trainer, resume: ResumePoint) -> None:
    load_checkpoint(trainer, resume)
    saved_ranks = resume.metadata["world_size"]
    resharded = f" (re-split from {saved_ranks} rank(s))" if saved_ranks != trainer.ranks.world_size else ""
    trainer.view.note(f"resumed from {resume.path} at step {resume.step}{resharded}")
    if resume.step >= trainer.cfg.train.steps:
        trainer.view.note(f"nothing left to train: train.steps is {trainer.cfg.train.steps}; raise it to go on")
