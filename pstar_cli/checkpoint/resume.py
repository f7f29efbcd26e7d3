"""Resuming: the checkpoint `--resume` means, and whether the run's config may continue from it.

The rule lives with the settings: every key of the config declares what changing it between a
checkpoint and its resumed run does (`pstar_cli.config.resume_effect`): nothing to what a step
computes (memory placement, run length, logging, checkpointing, the number of processes: the shards
are re-split), the numbers from the resumed step on (the lr schedule, clipping: allowed and
reported), or the meaning of the saved state (the model, the data, the optimizer: refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pstar_cli.checkpoint.layout import (CheckpointError, checkpoint_at, complete_checkpoints,
                                         damaged_checkpoint_error, read_metadata, verify_checkpoint)
from pstar_cli.config import ResumeEffect, full_config_tree, resume_effect

_MISSING = "(not set)"


@dataclass(frozen=True)
class ResumePoint:
    """A verified checkpoint to resume from, with its metadata."""

    path: Path
    metadata: dict
    changes: tuple[str, ...] = ()  # settings changed since the checkpoint that alter the numbers

    @property
    def step(self) -> int:
        return int(self.metadata["step"])


def find_resume_point(requested: str, root: Path, config: dict) -> ResumePoint:
    """The checkpoint `--resume` means ("latest": the newest in `root`; else a path), verified and
    checked against the run's config (`Config.to_dict()`); raises CheckpointError saying why not."""
    path = _requested_path(requested, root)
    problems = verify_checkpoint(path)
    if problems:
        raise damaged_checkpoint_error(path, problems)
    metadata = read_metadata(path)
    differences = config_differences(metadata["config"], config)
    if differences:
        raise CheckpointError([
            f"the checkpoint {path} was written with a different config; these settings differ:",
            *differences,
            "(train.steps, the lr schedule, clipping, memory limits, checkpoint.* and distributed.* may "
            "change); to start afresh, train without --resume or with another output directory",
        ])
    return ResumePoint(path, metadata, tuple(config_changes(metadata["config"], config)))


def _requested_path(requested: str, root: Path) -> Path:
    if requested == "latest":
        found = complete_checkpoints(root)
        if not found:
            raise CheckpointError([f"--resume: no checkpoint in {root} (checkpoint.dir); train without "
                                   "--resume to start, or give the path of a checkpoint"])
        return found[-1]
    return checkpoint_at(requested)


def config_differences(saved: dict, current: dict) -> list[str]:
    """`key: value in the checkpoint, value now` for every differing setting that the saved state
    depends on (the resume is refused)."""
    return [line for key, line in _differing(saved, current) if resume_effect(key) is ResumeEffect.STATE]


def config_changes(saved: dict, current: dict) -> list[str]:
    """The differing settings that may change on resume but alter the numbers (reported)."""
    return [line for key, line in _differing(saved, current) if resume_effect(key) is ResumeEffect.NUMBERS]


def _differing(saved: dict, current: dict) -> list[tuple[str, str]]:
    old, new = _flatten(full_config_tree(saved)), _flatten(full_config_tree(current))
    found = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _MISSING), new.get(key, _MISSING)
        if before != after:
            found.append((key, f"{key}: {_show(before)} in the checkpoint, {_show(after)} now"))
    return found


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    return value if value == _MISSING else json.dumps(value)
