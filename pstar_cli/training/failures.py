"""How a run that cannot go on ends: one message saying what happened and what to do.

Out of memory (CUDA or host) and the engine's refusals become a `TrainingFailed` with what was
needed and what was available, what to change, and the last checkpoint (intact: writes are atomic).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pstar_cli.checkpoint import complete_checkpoints
from pstar_cli.errors import PstarError


class TrainingFailed(PstarError):
    """Training cannot go on (out of memory, a non-finite loss, an engine refusal)."""

    exit_code = 1


class StoppedAtOnce(TrainingFailed):
    """A second Ctrl-C: stopped where it was, nothing written."""

    exit_code = 130


class StoppedBySignal(TrainingFailed):
    """The run stopped on SIGTERM/SIGINT after writing a checkpoint; exit code 128 + signal."""

    def __init__(self, signum: int, lines: list[str]) -> None:
        super().__init__(lines)
        self.exit_code = 128 + signum


class FailureReport:
    """Turns out-of-memory errors and engine refusals escaping its block into one clear message."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trainer = None

    def __enter__(self) -> "FailureReport":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, PstarError):
            return False
        lines = explain_failure(exc, self.trainer)
        if lines is None:
            return False
        lines.append(last_checkpoint_line(self.root))
        raise TrainingFailed(lines) from None


# "out of memory" also covers NCCL and cuBLAS failing to allocate their workspace on the GPU
_CUDA_OOM = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)
_HOST_OOM = re.compile(r"can't allocate memory|DefaultCPUAllocator")
_HOST_ALLOC = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_CUDA_NEED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")
_CUDA_FREE = re.compile(r"total capacity of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free")


def explain_failure(exc: BaseException, trainer) -> list[str] | None:
    """The message lines for a failure pstar can explain; None for anything else (a bug)."""
    from engine.errors import EngineError, ModelTooLargeError

    where = f" at step {trainer.state.step + 1}" if trainer is not None else " while building the model"
    text, kind = str(exc), out_of_memory_kind(exc)
    if kind == "gpu":
        return [f"out of GPU memory{where}: {cuda_oom_numbers(text)}", *memory_context(trainer),
                *_advice("GPU")]
    if kind == "host":
        return [f"out of host memory{where}: {host_oom_numbers(text)}", *memory_context(trainer),
                *_advice("host")]
    if isinstance(exc, ModelTooLargeError):
        return [text, "see what each part needs with `pstar estimate-memory CONFIG`; use a smaller model, "
                      "raise engine.device_memory_limit / engine.host_memory_limit, or add GPUs"]
    if isinstance(exc, EngineError):
        return [text]
    return None


def out_of_memory_kind(exc: BaseException) -> str | None:
    """"gpu" or "host" for an out-of-memory failure, None for anything else: the one rule for
    `pstar train`, `pstar profile` and the benchmarks. A failed NCCL or cuBLAS workspace
    allocation counts as GPU memory."""
    from engine.errors import EngineError

    if isinstance(exc, EngineError):  # the engine's refusals say what they are themselves
        return None
    if isinstance(exc, torch.OutOfMemoryError):
        return "gpu"
    if isinstance(exc, MemoryError):
        return "host"
    return out_of_memory_in_text(str(exc)) if isinstance(exc, RuntimeError) else None


def out_of_memory_in_text(text: str) -> str | None:
    """"gpu" or "host" when an error's text (or a log line) says memory ran out, else None."""
    if _HOST_OOM.search(text):  # first: torch's host allocator message does not say "out of memory"
        return "host"
    return "gpu" if _CUDA_OOM.search(text) else None


def cuda_oom_numbers(text: str) -> str:
    need, free = _CUDA_NEED.search(text), _CUDA_FREE.search(text)
    parts = [f"needed {need.group(1)} more" if need else "an allocation failed"]
    if free:
        parts.append(f"{free.group(2)} was free of {free.group(1)}")
    return ", ".join(parts)


def host_oom_numbers(text: str) -> str:
    import psutil

    from pstar_cli.observe.metrics import format_bytes

    need = _HOST_ALLOC.search(text)
    memory = psutil.virtual_memory()
    needed = f"needed {format_bytes(int(need.group(1)))} more" if need else "an allocation failed"
    return f"{needed}, {format_bytes(memory.available)} available of {format_bytes(memory.total)}"


def memory_context(trainer) -> list[str]:
    """What pstar itself holds: model data and the budgets it was given."""
    if trainer is None:
        return []
    from pstar_cli.observe.metrics import format_bytes

    stats = trainer.model.chunk_stats()
    return [f"pstar's model data: {format_bytes(stats.get('model_data_bytes'))}; budgets: device "
            f"{format_bytes(stats.get('device_budget_bytes'))}, host {format_bytes(stats.get('host_budget_bytes'))}"]


def _advice(which: str) -> list[str]:
    first = ("a smaller micro-batch (a larger train.grad_accum or a smaller train.batch_size), "
             "model.activation_checkpointing=true (or a larger model.recompute_layers), or a lower "
             "engine.device_memory_limit (more GPU memory left to activations)" if which == "GPU" else
             "fewer processes per machine, a lower engine.host_memory_limit (pstar then refuses an "
             "impossible plan up front), a higher engine.device_memory_limit, or a smaller model")
    return ["see what this config needs with `pstar estimate-memory CONFIG`; then try " + first]


def last_checkpoint_line(root: Path) -> str:
    found = complete_checkpoints(root)
    if not found:
        return "no checkpoint had been written yet (set checkpoint.interval to write them)"
    return f"the last checkpoint, {found[-1]}, is intact: continue from it with --resume"
