"""The guards of a training run, called by the loop after every step (pstar_cli/training/trainer.py).

- Signals: the first SIGTERM or SIGINT lets the current step finish, writes a checkpoint and ends
  the run with `StoppedBySignal`: exit code 128 + the signal's number (143 for SIGTERM, 130 for
  SIGINT), as shells report a run ended by a signal. A second SIGINT stops at once, without a
  checkpoint (the previous one stays valid). A repeat within a second counts as the same request:
  torchrun forwards a terminal's Ctrl-C to workers that already received it.
- Non-finite loss (bf16 and fp32; fp16 skips overflowing steps by design): tracked on the device
  without a sync, checked at every logged step and before every checkpoint, so a NaN state is
  never saved. The run stops naming the first bad step and the last good checkpoint.
- fp16: a dynamic loss scale sitting at `min_loss_scale` for STUCK_SCALE_STEPS steps is reported.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

from engine.config import Fp16Config
from pstar_cli.checkpoint import checkpoint_root
from pstar_cli.training.failures import StoppedAtOnce, TrainingFailed, last_checkpoint_line

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_SIGNAL_S = 1.0  # a repeat of the first signal within this time is the same request
STUCK_SCALE_STEPS = 50


class StopSignal:
    """While active (main thread only), SIGTERM/SIGINT ask the run to stop after its current step.

    The handler only notes the signal; the decision is taken at the end of each step, agreed by
    all ranks (one all-reduce of a flag on a CPU group), so that every rank stops after the same
    step even when the signal reaches them during different steps."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._group = None  # the gloo group of the agreement, made at the first check

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous and self.signum is not None:
            # a fast stop: let the first signal's echoes arrive while they are still ignored
            time.sleep(max(0.0, self._first_at + SAME_SIGNAL_S - time.monotonic()))
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self, ranks) -> bool:
        """Whether any rank has received a stop signal; every rank calls this after the same step."""
        signum = self.signum or 0
        if ranks.world_size > 1 and dist.is_initialized():
            if self._group is None and dist.get_backend() != "gloo":
                # a host-side flag: with NCCL, a CPU group avoids a device sync per step
                self._group = dist.new_group(backend="gloo")
            flag = torch.tensor([signum], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            signum = int(flag.item())
        if signum:
            self.signum = self.signum or signum  # a peer's signal stops this rank too
        return bool(signum)

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


class LossGuard:
    """Tracks the first step whose loss was not finite (a device scalar: no sync per step) and
    raises at the next check; with dynamic fp16 scaling, warns when the scale sits at its minimum."""

    def __init__(self, fp16: Fp16Config) -> None:
        self.watch_scale = fp16.enabled and fp16.loss_scale == 0
        self.watch_loss = not fp16.enabled
        self.min_scale = float(fp16.min_loss_scale)
        self.first_bad_step: torch.Tensor | None = None  # 0 while every loss was finite
        self.steps_at_min = 0
        self.skipped_at_min = 0

    def after_step(self, trainer) -> None:
        if self.watch_loss:
            self._track(trainer)
            if trainer.is_log_step(trainer.state.step):
                self.check(trainer)
        if self.watch_scale:
            self._watch_scale(trainer)

    def _track(self, trainer) -> None:
        loss = trainer.last_loss
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
                last_checkpoint_line(checkpoint_root(trainer.cfg, trainer.output_dir)),
                "to get past it: a lower train.lr or a longer train.warmup_steps, engine.gradient_clipping "
                "(e.g. 1.0), or check the data; then continue with --resume",
            ])

    def _watch_scale(self, trainer) -> None:
        if float(trainer.optimizer.loss_scale) > self.min_scale:
            self.steps_at_min = self.skipped_at_min = 0
            return
        self.steps_at_min += 1
        self.skipped_at_min += bool(trainer.optimizer.last_step_skipped)
        if self.steps_at_min == STUCK_SCALE_STEPS and trainer.ranks.is_main:
            trainer.view.note(
                f"warning: the fp16 loss scale has been at engine.fp16.min_loss_scale ({self.min_scale:g}) for "
                f"{self.steps_at_min} steps (step {trainer.state.step}), {self.skipped_at_min} of them skipped "
                "for overflowing gradients: training is barely progressing. Likely a diverging run (lower "
                "train.lr, set engine.gradient_clipping) or values fp16 cannot hold (use bf16: "
                "engine.fp16.enabled=false engine.bf16.enabled=true); a lower min_loss_scale only hides it")
