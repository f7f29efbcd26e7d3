"""A training run that loses at most the steps since its last checkpoint, and says why it stopped.

`run_training` is what `pstar train` runs in every process: it builds the Trainer, resumes it from
a checkpoint, attaches the checkpoint schedule and the guards below, and trains.

- Signals: the first SIGTERM or SIGINT lets the current step finish, writes a checkpoint and ends
  the run with `StoppedBySignal`: exit code 128 + the signal's number (143 for SIGTERM, 130 for
  SIGINT), as shells report a run ended by a signal. A second SIGINT stops at once, without a
  checkpoint (the previous one stays valid). A repeat within a second counts as the same request:
  torchrun forwards a terminal's Ctrl-C to workers that already received it.
- Non-finite loss (bf16 and fp32; fp16 skips overflowing steps by design): tracked on the device
  without a sync, checked at every logged step and before every checkpoint, so a NaN state is
  never saved. The run stops naming the first bad step and the last good checkpoint.
- fp16: a dynamic loss scale sitting at `min_loss_scale` for STUCK_SCALE_STEPS steps is reported.
- Out of memory (CUDA or host) and the engine's refusals: one message with what was needed and
  what was available, what to change, and the last checkpoint (intact: writes are atomic).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pstar_cli.checkpoint import (Checkpointer, ResumePoint, checkpoint_root, complete_checkpoints,
                                  load_checkpoint, trim_metrics)
from pstar_cli.errors import PstarError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_SIGNAL_S = 1.0  # a repeat of the first signal within this time is the same request
STUCK_SCALE_STEPS = 50
# Test hook: `KIND@STEP` injects a failure into the forward pass of that step; KIND is
# `cuda-oom`, `host-oom` or `nan` (the model's output becomes NaN, as a diverging run's does).
FAULT_ENV = "PSTAR_TEST_FAULT"


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


def run_training(cfg, output_dir: Path, ranks, view, resume: ResumePoint | None = None):
    """Train as `cfg` says, from `resume` if given; returns the final TrainState."""
    from pstar_cli.trainer import Trainer

    root = checkpoint_root(cfg, output_dir)
    report = FailureReport(root)
    with report, SignalStop(ranks.is_main) as stop:
        if resume is not None and ranks.is_main:
            trim_metrics(Path(output_dir) / "metrics.jsonl", resume.step)
        trainer = Trainer(cfg, output_dir, ranks, view, append_metrics=resume is not None)
        report.trainer = trainer
        if resume is not None:
            resume_trainer(trainer, resume)
        inject_test_fault(trainer, os.environ.get(FAULT_ENV))
        guard = LossGuard(trainer)
        trainer.hooks.step_end.append(guard.on_step_end)
        checkpointer = Checkpointer(root, cfg.checkpoint.interval, cfg.checkpoint.keep, guard.check,
                                    last_saved_step=resume.step if resume is not None else -1).attach(trainer)
        stop.attach(trainer)
        state = trainer.train()
    if stop.signum is not None and state.step < cfg.train.steps:
        raise StoppedBySignal(stop.signum, [
            f"stopped by {signal.Signals(stop.signum).name} after step {state.step} of {cfg.train.steps}; "
            f"checkpoint: {checkpointer.latest or 'none (nothing was trained)'}",
            "continue with the same `pstar train` command and --resume",
        ])
    return state


def resume_trainer(trainer, resume: ResumePoint) -> None:
    load_checkpoint(trainer, resume)
    saved_ranks = resume.metadata["world_size"]
    resharded = f" (re-split from {saved_ranks} rank(s))" if saved_ranks != trainer.ranks.world_size else ""
    trainer.view.note(f"resumed from {resume.path} at step {resume.step}{resharded}")
    if resume.step >= trainer.cfg.train.steps:
        trainer.view.note(f"nothing left to train: train.steps is {trainer.cfg.train.steps}; raise it to go on")


# ---- signals -----------------------------------------------------------------------------------


class SignalStop:
    """While active (main thread only), SIGTERM/SIGINT ask the run to stop after its current step.

    The handler only notes the signal; the decision is taken at the end of each step, agreed by
    all ranks (one all-reduce of a flag on a CPU group), so that every rank stops after the same
    step even when the signal reaches them during different steps."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._agree = False
        self._group = None

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous and self.signum is not None:
            # a fast stop: let the first signal's echoes arrive while they are still ignored
            time.sleep(max(0.0, self._first_at + SAME_SIGNAL_S - time.monotonic()))
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def attach(self, trainer) -> None:
        """Check for a stop after every step (every rank calls this at the same point)."""
        if trainer.ranks.world_size > 1 and dist.is_initialized():
            self._agree = True
            # a host-side flag: with NCCL, a CPU group avoids a device sync per step
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        trainer.hooks.step_end.append(self.on_step_end)

    def on_step_end(self, trainer, record: dict) -> None:
        signum = self.signum or 0
        if self._agree:
            flag = torch.tensor([signum], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            signum = int(flag.item())
        if signum:
            self.signum = self.signum or signum  # a peer's signal stops this rank too
            trainer.request_stop()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if self.is_main:
                print(f"pstar: {signal.Signals(signum).name} received: finishing this step, then writing a "
                      "checkpoint (Ctrl-C again to stop at once)", flush=True)
            return
        if signum == signal.SIGINT and now - self._first_at > SAME_SIGNAL_S:
            raise StoppedAtOnce(["stopped at once by a second Ctrl-C, without writing a checkpoint; "
                                 "the previous checkpoint is intact"])


# ---- non-finite loss, stuck loss scale -----------------------------------------------------------


class LossGuard:
    """Tracks the first step whose loss was not finite (a device scalar: no sync per step) and
    raises at the next check; with dynamic fp16 scaling, warns when the scale sits at its minimum."""

    def __init__(self, trainer) -> None:
        from engine.config import resolve_engine_config

        fp16 = resolve_engine_config(trainer.cfg.engine_dict()).fp16
        self.watch_scale = fp16.enabled and fp16.loss_scale == 0
        self.watch_loss = not fp16.enabled
        self.min_scale = float(fp16.min_loss_scale)
        self.first_bad_step: torch.Tensor | None = None  # 0 while every loss was finite
        self.steps_at_min = 0
        self.skipped_at_min = 0

    def on_step_end(self, trainer, record: dict) -> None:
        if self.watch_loss:
            self._track(trainer)
            if trainer.is_log_step(trainer.state.step):
                self.check(trainer)
        if self.watch_scale:
            self._watch_scale(trainer)

    def _track(self, trainer) -> None:
        loss = getattr(trainer, "last_loss", None)
        if loss is None:
            return
        if self.first_bad_step is None:
            self.first_bad_step = torch.zeros((), dtype=torch.int64, device=loss.device)
        first_time = ~torch.isfinite(loss) & (self.first_bad_step == 0)
        self.first_bad_step = torch.where(first_time, trainer.state.step, self.first_bad_step)

    def check(self, trainer) -> None:
        """Raise if any rank has seen a non-finite loss (every rank calls this at the same steps)."""
        if self.first_bad_step is None:
            return
        first = self.first_bad_step.clone()
        if trainer.ranks.world_size > 1 and dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        bad_step = int(first.item())
        if bad_step:
            raise TrainingFailed([
                f"the loss became NaN or infinite at step {bad_step} ({trainer.cfg.precision}); stopped at step "
                f"{trainer.state.step} without saving this state",
                last_checkpoint_line(trainer),
                "to get past it: a lower train.lr or a longer train.warmup_steps, engine.gradient_clipping "
                "(e.g. 1.0), or check the data; then continue with --resume",
            ])

    def _watch_scale(self, trainer) -> None:
        if float(trainer.optimizer.loss_scale) > self.min_scale:
            self.steps_at_min = self.skipped_at_min = 0
            return
        self.steps_at_min += 1
        self.skipped_at_min += bool(getattr(trainer.optimizer, "last_step_skipped", False))
        if self.steps_at_min == STUCK_SCALE_STEPS and trainer.ranks.is_main:
            trainer.view.note(
                f"warning: the fp16 loss scale has been at engine.fp16.min_loss_scale ({self.min_scale:g}) for "
                f"{self.steps_at_min} steps (step {trainer.state.step}), {self.skipped_at_min} of them skipped "
                "for overflowing gradients: training is barely progressing. Likely a diverging run (lower "
                "train.lr, set engine.gradient_clipping) or values fp16 cannot hold (use bf16: "
                "engine.fp16.enabled=false engine.bf16.enabled=true); a lower min_loss_scale only hides it")


# ---- out of memory and engine refusals -----------------------------------------------------------


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
        lines.append(last_checkpoint_line(self.trainer, self.root))
        raise TrainingFailed(lines) from None


_CUDA_OOM = re.compile(r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED")
_HOST_ALLOC = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_CUDA_NEED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")
_CUDA_FREE = re.compile(r"total capacity of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free")


def explain_failure(exc: BaseException, trainer) -> list[str] | None:
    """The message lines for a failure pstar can explain; None for anything else (a bug)."""
    from engine.errors import EngineError, ModelTooLargeError

    where = f" at step {trainer.state.step + 1}" if trainer is not None else " while building the model"
    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and _CUDA_OOM.search(text)):
        return [f"out of GPU memory{where}: {cuda_oom_numbers(text)}", *memory_context(trainer),
                *_advice("GPU")]
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _HOST_ALLOC.search(text)):
        return [f"out of host memory{where}: {host_oom_numbers(text)}", *memory_context(trainer),
                *_advice("host")]
    if isinstance(exc, ModelTooLargeError):
        return [text, "see what each part needs with `pstar estimate-memory CONFIG`; use a smaller model, "
                      "raise engine.device_memory_limit / engine.host_memory_limit, or add GPUs"]
    if isinstance(exc, EngineError):
        return [text]
    return None


def cuda_oom_numbers(text: str) -> str:
    need, free = _CUDA_NEED.search(text), _CUDA_FREE.search(text)
    parts = [f"needed {need.group(1)} more" if need else "an allocation failed"]
    if free:
        parts.append(f"{free.group(2)} was free of {free.group(1)}")
    return ", ".join(parts)


def host_oom_numbers(text: str) -> str:
    import psutil

    from pstar_cli.metrics import format_bytes

    need = _HOST_ALLOC.search(text)
    memory = psutil.virtual_memory()
    needed = f"needed {format_bytes(int(need.group(1)))} more" if need else "an allocation failed"
    return f"{needed}, {format_bytes(memory.available)} available of {format_bytes(memory.total)}"


def memory_context(trainer) -> list[str]:
    """What pstar itself holds: model data and the budgets it was given."""
    if trainer is None or not hasattr(trainer.model, "chunk_stats"):
        return []
    from pstar_cli.metrics import format_bytes

    stats = trainer.model.chunk_stats()
    return [f"pstar's model data: {format_bytes(stats.get('model_data_bytes'))}; budgets: device "
            f"{format_bytes(stats.get('device_budget_bytes'))}, host {format_bytes(stats.get('host_budget_bytes'))}"]


def _advice(which: str) -> list[str]:
    first = ("a smaller micro-batch (a larger train.grad_accum or a smaller train.batch_size), "
             "model.activation_checkpointing=true, or a lower engine.device_memory_limit (more GPU "
             "memory left to activations)" if which == "GPU" else
             "fewer processes per machine, a lower engine.host_memory_limit (pstar then refuses an "
             "impossible plan up front), a higher engine.device_memory_limit, or a smaller model")
    return ["see what this config needs with `pstar estimate-memory CONFIG`; then try " + first]


def last_checkpoint_line(trainer, root: Path | None = None) -> str:
    if root is None and trainer is not None:
        root = checkpoint_root(trainer.cfg, trainer.output_dir)
    found = complete_checkpoints(root) if root is not None else []
    if not found:
        return "no checkpoint had been written yet (set checkpoint.interval to write them)"
    return f"the last checkpoint, {found[-1]}, is intact: continue from it with --resume"


# ---- test hook -----------------------------------------------------------------------------------


def inject_test_fault(trainer, spec: str | None) -> None:
    """Install the failure `PSTAR_TEST_FAULT` asks for (tests only; see FAULT_ENV)."""
    if not spec:
        return
    kind, _, step_text = spec.partition("@")
    step = int(step_text)

    def failing_forward(module, args):
        if trainer.state.step + 1 != step:
            return
        if kind == "cuda-oom":
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB "
                f"of which 512.00 MiB is free. (injected by {FAULT_ENV})")
        if kind == "host-oom":
            raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                               f"memory: you tried to allocate 4294967296 bytes. (injected by {FAULT_ENV})")

    def poisoned_output(module, args, output):
        if trainer.state.step + 1 == step:
            return output * float("nan")
        return output

    if kind == "nan":
        trainer.model.module.register_forward_hook(poisoned_output)
    elif kind in ("cuda-oom", "host-oom"):
        trainer.model.module.register_forward_pre_hook(failing_forward)
    else:
        raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r}")
