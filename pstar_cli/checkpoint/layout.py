"""Checkpoints on disk: their names, the manifest, verification, and finding one.

Checkpoints of a training run are written atomically, verified on reading, the last `keep` kept.

    checkpoint.dir/                   (default: <output dir>/checkpoints)
        step-00000120/
            rank-00000.pt ...         each rank's shard state (engine/checkpoint.py), torch.save
            metadata.json             step, data position, lr schedule position, loss scaler, the
                                      RNG states of every rank, world size and the config
            manifest.json             size and sha256 of every other file; written last
        .tmp-step-00000130/           a write in progress, or one that a crash interrupted

Every rank writes its own file straight from its chunks into the temporary directory and fsyncs
it; rank 0 then writes the metadata and the manifest, fsyncs the directory, renames it to
`step-N` and fsyncs the parent. A crash at any moment leaves at most a `.tmp-*` directory, which
readers ignore and the next write removes, so the previous checkpoints stay complete. Readers
check every file against the manifest (size, then sha256) before using it. With several nodes,
checkpoint.dir must be a directory that all of them share.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pstar_cli.errors import PstarError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.json"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = ".tmp-"
_HASH_BLOCK_BYTES = 8 << 20


class CheckpointError(PstarError):
    """A checkpoint that cannot be used as asked (missing, damaged, or of another config)."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, no permission): training stops there."""

    exit_code = 1


def checkpoint_root(cfg, output_dir: Path) -> Path:
    """`checkpoint.dir`, or `checkpoints/` in the run's output directory."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# ---- finding and checking ----------------------------------------------------------------------


def complete_checkpoints(root: Path) -> list[Path]:
    """The finished checkpoints in `root` (a manifest was written last), oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return [path for _, path in sorted(found)]


def verify_checkpoint(path: Path) -> list[str]:
    """Problems of a checkpoint directory, one line each naming the file; empty when it is intact."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        entries = manifest["files"]
    except FileNotFoundError:
        return [f"{path / MANIFEST}: missing (the checkpoint was never completed)"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{path / MANIFEST}: unreadable ({exc})"]
    problems = []
    for entry in entries:
        file = path / entry["name"]
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif (size := file.stat().st_size) != entry["bytes"]:
            problems.append(f"{file}: {size:,} bytes, the manifest says {entry['bytes']:,} (truncated or overwritten)")
        elif sha256_of(file) != entry["sha256"]:
            problems.append(f"{file}: contents differ from the manifest's sha256 (corrupted)")
    return problems


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(path: Path) -> dict:
    return json.loads((path / METADATA).read_text(encoding="utf-8"))


def checkpoint_at(requested: str) -> Path:
    """A checkpoint directory given by the user, or the newest one in a checkpoint.dir given."""
    path = Path(requested)
    if not path.is_dir():
        raise CheckpointError([f"{requested}: no such checkpoint directory"])
    if (path / MANIFEST).exists():
        return path
    if complete_checkpoints(path):
        return complete_checkpoints(path)[-1]
    raise CheckpointError([f"{requested}: not a complete checkpoint (no {MANIFEST}, written last), nor a "
                           "checkpoint.dir holding one"])


def damaged_checkpoint_error(path: Path, problems: list[str]) -> CheckpointError:
    """The damage found, and the newest older checkpoint that is intact, if any."""
    lines = [f"the checkpoint {path} is damaged:", *problems]
    older = [p for p in complete_checkpoints(path.parent) if _step_of(p) < _step_of(path)]
    intact = next((p for p in reversed(older) if not verify_checkpoint(p)), None)
    if intact is not None:
        lines.append(f"the previous checkpoint is intact: resume from it with --resume {intact}")
    else:
        lines.append(f"no intact checkpoint older than it in {path.parent}; train without --resume to start again")
    return CheckpointError(lines)


