"""Files that survive a crash: fsynced as they are written, hashed on the way, renamed into place.

A crash at any moment leaves at most a `.tmp-*` directory, which readers ignore and the next write
removes; a checkpoint is removed by renaming it to `.tmp-removed-*` first, so no `step-*` directory
ever has its manifest but lacks other files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from pstar_cli.checkpoint.layout import TMP_PREFIX, complete_checkpoints


class _HashingFile:
    """A file that hashes what is written to it, so a checkpoint file is never read back to hash."""

    def __init__(self, f) -> None:
        self._f = f
        self.digest = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.num_bytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def write_durably(path: Path, write: Callable[[Any], None]) -> dict:
    """Write a file through `write(file)`, fsync it; returns its manifest entry."""
    with open(path, "wb") as f:
        hashing = _HashingFile(f)
        write(hashing)
        f.flush()
        os.fsync(f.fileno())
    return {"name": path.name, "bytes": hashing.num_bytes, "sha256": hashing.digest.hexdigest()}


def write_json(path: Path, value: dict) -> dict:
    text = json.dumps(value, indent=1).encode()
    return write_durably(path, lambda f: f.write(text))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def remove_unfinished(root: Path) -> None:
    """Drop `.tmp-*` directories: writes that a crash or a kill interrupted."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints."""
    for path in complete_checkpoints(root)[:-keep]:
        remove_checkpoint(path)


def remove_checkpoint(path: Path) -> None:
    # renamed first, so that a crash half-way through never leaves a step-* directory that
    # still has its manifest but lacks other files
    doomed = path.with_name(f"{TMP_PREFIX}removed-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


