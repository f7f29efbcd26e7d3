"""Checkpoints of a training run: written atomically, verified on reading, the last `keep` kept.

    checkpoint.dir/                   (default: <output dir>/checkpoints)
        step-00000120/
            rank-00000.pt ...         each rank's shard state (engine/checkpoint.py), torch.save
            metadata.json             step, data position, lr schedule position, loss scaler, the
                                      RNG states of every rank, world size, the config and its hash
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

import base64
import datetime
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from pstar_cli.errors import PstarError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_HASH_BLOCK_BYTES = 8 << 20
# Test hook: a step number (0: every step); the checkpoint write of that step stops after the rank
# files are written, before the checkpoint is complete, and waits to be killed or interrupted.
PAUSE_ENV = "PSTAR_TEST_CHECKPOINT_PAUSE"
_PAUSE_S = 600

# Settings that may differ between a checkpoint and the run resuming it: the run's length and
# logging, checkpointing itself, the number of processes (the shards are re-split), how memory is
# used (none of these changes what a step computes), and the knobs one turns to get a diverging
# run going again (these are reported when they changed). Entries ending in "." cover a section.
MAY_CHANGE = (
    "train.steps", "train.log_interval", "train.grad_accum", "model.activation_checkpointing",
    "checkpoint.", "distributed.", "engine.device_memory_limit", "engine.host_memory_limit",
    "engine.default_chunk_size", "engine.release_after_init", "engine.use_cpu_embedding", "engine.init_device",
    "engine.client.", "engine.optimizer.params.use_hybrid_adam",
    "train.lr", "train.min_lr", "train.warmup_steps", "engine.gradient_clipping",
)  # fmt: skip
# Of those, the ones that change the numbers from the resumed step on.
REPORTED_CHANGES = ("train.lr", "train.min_lr", "train.warmup_steps", "train.steps", "engine.gradient_clipping")


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
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# ---- finding and checking ----------------------------------------------------------------------


def complete_checkpoints(root: Path) -> list[Path]:
    """The finished checkpoints in `root` (a manifest was written last), oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
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


# ---- config differences ------------------------------------------------------------------------


def config_differences(saved: dict, current: dict) -> list[str]:
    """`key: value in the checkpoint, value now` for every setting that differs and matters."""
    return [line for key, line in _differing(saved, current) if not _may_change(key)]


def config_changes(saved: dict, current: dict) -> list[str]:
    """The settings that may change on resume but alter the numbers (lr schedule, clipping)."""
    return [line for key, line in _differing(saved, current) if key in REPORTED_CHANGES]


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def _differing(saved: dict, current: dict) -> list[tuple[str, str]]:
    old, new = _comparable(saved), _comparable(current)
    found = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _engine_default(key)), new.get(key, _engine_default(key))
        if before != after:
            found.append((key, f"{key}: {_show(before)} in the checkpoint, {_show(after)} now"))
    return found


def _comparable(config: dict) -> dict[str, Any]:
    """Dotted key -> value, JSON-normalised (tuples as lists); the model section fully resolved,
    so a size name and the same numbers written out compare equal."""
    import models

    config = json.loads(json.dumps(config))
    model = {k: v for k, v in config.get("model", {}).items() if v is not None}
    model["seq_len"] = config.get("train", {}).get("seq_len")
    try:
        config["model"] = json.loads(json.dumps(models.resolve_model_config(model)))
    except Exception:  # a model config this pstar cannot resolve: compare what was written
        pass
    return _flatten(config)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_MISSING = "(not set)"


def _engine_default(key: str) -> Any:
    """The value the engine uses for an engine key left out of a config."""
    if not key.startswith("engine."):
        return _MISSING
    from engine.config import resolve_engine_config

    defaults = resolve_engine_config({})
    path = key.split(".")[1:]
    owner = {"optimizer": defaults.optimizer, "fp16": defaults.fp16, "client": defaults.mem_tracer}.get(path[0])
    name = "bf16_enabled" if path == ["bf16", "enabled"] else path[-1]
    value = getattr(owner if owner is not None else defaults, name, _MISSING)
    return list(value) if isinstance(value, tuple) else value


def _show(value: Any) -> str:
    return value if value == _MISSING else json.dumps(value)


# ---- RNG states --------------------------------------------------------------------------------


def capture_rng_state(device: torch.device) -> dict:
    """This process's torch CPU, CUDA (of its device) and Python `random` states, JSON-friendly."""
    cuda = None
    if device.type == "cuda":
        cuda = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    version, internal, gauss = random.getstate()
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": cuda,
        "python": [version, list(internal), gauss],
    }


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]), device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


# ---- writing -----------------------------------------------------------------------------------


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


def _write_json(path: Path, value: dict) -> dict:
    text = json.dumps(value, indent=1).encode()
    return write_durably(path, lambda f: f.write(text))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def save_checkpoint(trainer, root: Path, keep: int) -> Path:
    """Write the trainer's state as checkpoint `step-N` in `root` (every rank calls this)."""
    ranks, step = trainer.ranks, trainer.state.step
    group = _Collectives(ranks.world_size)
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
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
        _pause_for_tests(step)
        _complete(tmp, final, _metadata(trainer, reports), [r["entry"] for r in reports])
        prune_checkpoints(root, keep)
    group.barrier()  # no rank goes on (or exits) before the checkpoint is complete
    return final


def _metadata(trainer, reports: list[dict]) -> dict:
    from pstar_cli import __version__
    from pstar_cli.config import config_hash

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
        "config_hash": config_hash(trainer.cfg),
        "config": trainer.cfg.to_dict(),
    }


def _complete(tmp: Path, final: Path, metadata: dict, entries: list[dict]) -> None:
    missing = [e["name"] for e in entries if not (tmp / e["name"]).is_file()]
    if missing:
        raise CheckpointError([f"checkpoint files {', '.join(missing)} are not in {tmp}: with several "
                               "nodes, checkpoint.dir must be a directory that all nodes share"])
    entries = [*entries, _write_json(tmp / METADATA, metadata)]
    _write_json(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "files": entries})
    fsync_dir(tmp)
    if final.exists():  # resumed from an older checkpoint and reached this step again
        _remove(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _pause_for_tests(step: int) -> None:
    wanted = os.environ.get(PAUSE_ENV)
    if wanted is not None and int(wanted) in (0, step):
        print(f"pstar: test pause inside the checkpoint write of step {step}", file=sys.stderr, flush=True)
        time.sleep(_PAUSE_S)


def remove_unfinished(root: Path) -> None:
    """Drop `.tmp-*` directories: writes that a crash or a kill interrupted."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints."""
    for path in complete_checkpoints(root)[:-keep]:
        _remove(path)


def _remove(path: Path) -> None:
    # renamed first, so that a crash half-way through never leaves a step-* directory that
    # still has its manifest but lacks other files
    doomed = path.with_name(f"{_TMP_PREFIX}removed-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ---- loading -----------------------------------------------------------------------------------


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


def trim_metrics(path: Path, step: int) -> None:
    """Drop records past `step` from metrics.jsonl (a killed run logged steps that the resumed run
    will redo) and a last line cut short by the kill, so that appending gives one record per
    step; written atomically."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _record_step(line) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.trim")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _record_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # not a record: drop it


@dataclass
class Checkpointer:
    """The run's checkpoint schedule: every `interval` steps (0: none), at the last step when
    `interval` is set, and whenever the run is stopped early (a signal). `health_check` runs just
    before each write and raises on a state that must not be saved (a non-finite loss)."""

    root: Path
    interval: int
    keep: int
    health_check: Callable[[Any], None] = lambda trainer: None
    last_saved_step: int = -1

    def attach(self, trainer) -> "Checkpointer":
        trainer.hooks.step_end.append(self.on_step_end)
        trainer.hooks.train_end.append(self.on_train_end)
        return self

    def on_step_end(self, trainer, record: dict) -> None:
        if self.interval and trainer.state.step % self.interval == 0:
            self.save(trainer)

    def on_train_end(self, trainer) -> None:
        step = trainer.state.step
        finished = step >= trainer.cfg.train.steps
        if 0 < step != self.last_saved_step and (trainer.stop_requested or (finished and self.interval)):
            self.save(trainer)

    def save(self, trainer) -> Path:
        self.health_check(trainer)
        try:
            path = save_checkpoint(trainer, self.root, self.keep)
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


# ---- export ------------------------------------------------------------------------------------

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Export:
    source: Path
    out: Path
    step: int
    num_tensors: int
    num_params: int
    model: dict  # the config's model section + seq_len: what `models.build_model` takes


def export_checkpoint(requested: str, out: Path, dtype: str = "float32") -> Export:
    """Write a checkpoint's weights as one plain state dict (torch.save) that the `models/` model
    built from the checkpoint's config accepts with `load_state_dict(strict=True)`. Needs host
    memory for the whole model in `dtype`: the one place pstar assembles it."""
    from engine.checkpoint import full_state_dict

    source = checkpoint_at(requested)
    problems = verify_checkpoint(source)
    if problems:
        raise damaged_checkpoint_error(source, problems)
    metadata = read_metadata(source)
    shards = [torch.load(source / name, map_location="cpu", mmap=True, weights_only=True)
              for name in metadata["files"]]
    state = full_state_dict(shards, EXPORT_DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    write_durably(tmp, lambda f: torch.save(state, f))
    os.replace(tmp, out)
    num_params = sum(t.numel() for t in {id(t): t for t in state.values()}.values() if t.is_floating_point())
    saved = metadata["config"]
    model = {**{k: v for k, v in saved["model"].items() if v is not None}, "seq_len": saved["train"]["seq_len"]}
    return Export(source, out, int(metadata["step"]), len(state), num_params, model)
