"""Saving a run's state as a checkpoint and loading it back; the run's checkpoint schedule.

Every rank writes its own file straight from its chunks into the temporary directory and fsyncs
it; rank 0 then writes the metadata and the manifest, fsyncs the directory, renames it to
`step-N` and fsyncs the parent (pstar_cli/checkpoint/durable.py).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from pstar_cli.checkpoint.durable import (fsync_dir, prune_checkpoints, remove_checkpoint, remove_unfinished,
                                          write_durably, write_json)
from pstar_cli.checkpoint.layout import (FORMAT_VERSION, MANIFEST, METADATA, TMP_PREFIX, CheckpointError,
                                         CheckpointWriteError, complete_checkpoints, rank_file_name,
                                         step_dir_name)
from pstar_cli.checkpoint.resume import ResumePoint
from pstar_cli.checkpoint.rng import capture_rng_state, restore_rng_state


def _no_pause(step: int) -> None:
    """The default `before_complete`: nothing happens between the rank files and the manifest."""


class _Collectives:
    """The collectives a checkpoint needs; plain calls on one process."""

    def __init__(self, world_size: int) -> None:
        self.active = world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_gather(self, value: Any) -> list[Any]:
        if not self.active:
            return [value]
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values


def save_checkpoint(trainer, root: Path, keep: int, before_complete: Callable[[int], None] = _no_pause) -> Path:
    """Write the trainer's state as checkpoint `step-N` in `root` (every rank calls this).

    `before_complete(step)` runs on rank 0 after every rank file is written and before the checkpoint
    is complete: a seam for tests that kill a run inside a write."""
    ranks, step = trainer.ranks, trainer.state.step
    group = _Collectives(ranks.world_size)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if ranks.is_main:
        remove_unfinished(root)
        tmp.mkdir(parents=True)
    group.barrier()
    shard = trainer.model.shard_state(copy=False)  # live buffers: torch.save streams them
    entry = write_durably(tmp / rank_file_name(ranks.rank), lambda f: torch.save(shard, f))
    report = {"entry": entry, "rng": capture_rng_state(trainer.device), "loss_scaler": shard["loss_scaler"]}
    del shard
    reports = group.all_gather(report)
    if ranks.is_main:
        before_complete(step)
        _complete(tmp, final, _metadata(trainer, reports), [r["entry"] for r in reports])
        prune_checkpoints(root, keep)
    group.barrier()  # no rank goes on (or exits) before the checkpoint is complete
    return final


def _metadata(trainer, reports: list[dict]) -> dict:
    from pstar_cli import __version__

    step = trainer.state.step
    return {
        "format_version": FORMAT_VERSION,
        "pstar_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "step": step,
        "sequences_seen": trainer.state.sequences_seen,
        "lr_schedule": {"step": step, "next_lr": trainer.schedule(step)},
        "loss_scaler": reports[0]["loss_scaler"],
        "world_size": trainer.ranks.world_size,
        "files": [rank_file_name(rank) for rank in range(len(reports))],
        "rng": [r["rng"] for r in reports],
        "config": trainer.cfg.to_dict(),
    }


def _complete(tmp: Path, final: Path, metadata: dict, entries: list[dict]) -> None:
    missing = [e["name"] for e in entries if not (tmp / e["name"]).is_file()]
    if missing:
        raise CheckpointError([f"checkpoint files {', '.join(missing)} are not in {tmp}: with several "
                               "nodes, checkpoint.dir must be a directory that all nodes share"])
    entries = [*entries, write_json(tmp / METADATA, metadata)]
    write_json(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "files": entries})
    fsync_dir(tmp)
    if final.exists():  # resumed from an older checkpoint and reached this step again
        remove_checkpoint(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def load_checkpoint(trainer, point: ResumePoint) -> None:
    """Put the trainer where the checkpoint was: weights, optimizer state, loss scaler, step, data
    position (so the lr schedule too) and this rank's RNG states. Any number of ranks: every rank
    reads the pieces it needs from the memory-mapped files of all saved ranks."""
    metadata = point.metadata
    shards = [torch.load(point.path / name, map_location="cpu", mmap=True, weights_only=True)
              for name in metadata["files"]]
    trainer.model.load_shard_state(shards)
    del shards
    trainer.state.load_state_dict({"step": metadata["step"], "sequences_seen": metadata["sequences_seen"]})
    rng = metadata["rng"]
    # another number of ranks continues each rank's RNG from a saved one: runs then differ anyway
    restore_rng_state(rng[min(trainer.ranks.rank, len(rng) - 1)], trainer.device)


@dataclass
class Checkpointer:
    """The run's checkpoint schedule: every `interval` steps (0: none), at the last step when
    `interval` is set, and whenever the run is stopped early (a signal). The training loop calls
    `after_step` after every step and `at_end` once after the loop. `health_check` runs just before
    each write and raises on a state that must not be saved (a non-finite loss)."""

    root: Path
    interval: int
    keep: int
    health_check: Callable[[Any], None] = lambda trainer: None
    last_saved_step: int = -1
    before_complete: Callable[[int], None] = field(default=_no_pause, repr=False)

    def attach(self, trainer) -> "Checkpointer":
        """Make this the trainer's checkpointer (its loop calls it)."""
        trainer.checkpointer = self
        return self

    def after_step(self, trainer) -> None:
        if self.interval and trainer.state.step % self.interval == 0:
            self.save(trainer)

    def at_end(self, trainer, stopped: bool) -> None:
        """After the loop: a stopped run is saved, and a finished one when checkpoints are on."""
        step = trainer.state.step
        finished = step >= trainer.cfg.train.steps
        if 0 < step != self.last_saved_step and (stopped or (finished and self.interval)):
            self.save(trainer)

    def save(self, trainer) -> Path:
        self.health_check(trainer)
        try:
            path = save_checkpoint(trainer, self.root, self.keep, self.before_complete)
        except OSError as exc:  # a full disk, a read-only or missing directory
            raise CheckpointWriteError([
                f"could not write the checkpoint of step {trainer.state.step} in {self.root}: {exc}",
                f"training stopped here; {self.latest or 'no earlier checkpoint'} is intact. Make room or "
                "fix checkpoint.dir, then continue with --resume",
            ]) from None
        self.last_saved_step = trainer.state.step
        trainer.view.note(f"checkpoint: {path}")
        return path

    @property
    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None
