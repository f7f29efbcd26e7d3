"""Checkpoints of a training run: on-disk layout and verification (layout), crash-safe files
(durable), RNG states (rng), saving and loading (save), the resume rule (resume), export.

The names a caller needs are imported here; each module holds one concept."""

from pstar_cli.checkpoint.durable import prune_checkpoints, remove_unfinished, write_durably
from pstar_cli.checkpoint.layout import (MANIFEST, METADATA, CheckpointError, CheckpointWriteError, checkpoint_at,
                                         checkpoint_root, complete_checkpoints, damaged_checkpoint_error,
                                         rank_file_name, read_metadata, step_dir_name, verify_checkpoint)
from pstar_cli.checkpoint.resume import ResumePoint, config_changes, config_differences, find_resume_point
from pstar_cli.checkpoint.rng import capture_rng_state, restore_rng_state
from pstar_cli.checkpoint.save import Checkpointer, load_checkpoint, save_checkpoint

__all__ = [
    "MANIFEST", "METADATA", "CheckpointError", "CheckpointWriteError", "Checkpointer", "ResumePoint",
    "capture_rng_state", "checkpoint_at", "checkpoint_root", "complete_checkpoints", "config_changes",
    "config_differences", "damaged_checkpoint_error", "find_resume_point", "load_checkpoint",
    "prune_checkpoints", "rank_file_name", "read_metadata", "remove_unfinished", "restore_rng_state",
    "save_checkpoint", "step_dir_name", "verify_checkpoint", "write_durably",
]
