"""The state one engine instance shares between its model wrapper, hooks and optimizer.

Built once by `initialize_engine` and passed explicitly (no module-level state), it also keeps the
step's coarse timings: host wall-clock seconds, so on CUDA the forward/backward figures are the time
to issue the work, not to finish it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.chunk import ChunkGroup, TensorInfo
from engine.chunk_manager import ChunkManager
from engine.config import EngineConfig
from engine.device import Copier
from engine.distributed import Comm
from engine.errors import EngineError
from engine.memory_tracer import MemoryTracer
from engine.precision import LossScaler
from engine.schedule import AccessSchedule

TIMING_KEYS = ("forward", "backward", "optimizer_device", "optimizer_host", "transfer", "moving", "wait")


@dataclass
class EngineRuntime:
    config: EngineConfig
    device: torch.device
    compute_dtype: torch.dtype
    copier: Copier
    schedule: AccessSchedule
    tracer: MemoryTracer
    manager: ChunkManager
    scaler: LossScaler
    groups: list[ChunkGroup]
    infos: list[TensorInfo]  # one per distinct parameter, in layout order
    param_order: list[TensorInfo]  # the same, in the model's parameters() order
    comm: Comm | None = None  # several ranks: the process group; None on one rank
    num_micro_steps: int = 0  # backward passes since the last optimizer step
    num_backward_ends: int = 0  # calls of end_backward (the autograd callback's or backward's)
    optimizer_placed: bool = False
    host_moments_pending: bool = False  # placed, but the host groups' moments are not allocated yet
    repack_checked: bool = False
    retrace_after_backward: bool = False  # the warm-up must be traced again (reads outside hooks)
    first_used: list[TensorInfo] = field(default_factory=list)  # warm-up forward's first uses
    host_updates: object = None  # the optimizer's HostUpdates: host groups' updates still running
    hooks: object = None  # the model wrapper's EngineHooks (the optimizer settles them)
    param_groups: list | None = None  # the optimizer's param_groups (checkpoints keep them)
    _timing: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))
    last_step_timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))
    _step_marks: tuple[float, float, float] = (0.0, 0.0, 0.0)  # transfer, wait, moving at the last step

    @property
    def grad_accumulation(self) -> bool:
        return self.config.gradient_accumulation_steps > 1

    def finish_host_updates(self) -> None:
        """Wait for every host update still running (before reading or replacing chunk state)."""
        if self.host_updates is not None:
            with self.manager.lock:
                self.host_updates.finish()

    # ---- phases --------------------------------------------------------------------------

    def begin_forward(self) -> None:
        with self.manager.lock:
            self.schedule.restart()
            self.manager.in_fwd_bwd = True
            if not self.schedule.recorded and not self.schedule.recording and torch.is_grad_enabled():
                # The warm-up iteration: the first forward + backward with autograd on.
                self.schedule.start_recording()
                self.tracer.start(self.manager.device_bytes)
                self._agree_on_outside_bytes()
                self.first_used.clear()

    def end_forward_without_grad(self) -> None:
        """A forward under no_grad has no backward to wait for."""
        self.manager.in_fwd_bwd = False

    def end_backward(self) -> None:
        with self.manager.lock:
            self.num_backward_ends += 1
            if self.manager.in_fwd_bwd:
                self.num_micro_steps += 1
            self.manager.in_fwd_bwd = False
            if self.comm is not None:
                self.manager.finish_backward()
            if self.schedule.recording:
                self.schedule.finish_recording()
                self.tracer.finish()
                self._agree_on_non_model_bytes()
            if self.retrace_after_backward:
                self.retrace_after_backward = False
                self.schedule.forget()
                self.tracer.forget()

    # ---- several ranks: identical placement decisions ---------------------------------------

    def _agree_on_outside_bytes(self) -> None:
        """Every rank plans with the largest foreign allocation seen by any rank."""
        if self.comm is not None:
            self.tracer.outside_bytes = self.comm.agree_max([self.tracer.outside_bytes])[0]

    def _agree_on_non_model_bytes(self) -> None:
        """Budgets per moment from the largest non-model memory any rank measured at that moment,
        so that every rank evicts, prefetches and gathers the same chunks at the same moments."""
        if self.comm is None:
            return
        measured = self.tracer.non_model_bytes
        fewest, most = self.comm.agree_min(len(measured)), self.comm.agree_max([len(measured)])[0]
        if fewest != most:  # every rank sees this, so none is left waiting in a collective
            raise EngineError(f"the ranks recorded between {fewest} and {most} chunk accesses in the "
                              "warm-up step: every rank must run the same model on batches of the "
                              "same shape")
        self.tracer.agree(self.comm.agree_max(measured))

    # ---- timings -------------------------------------------------------------------------

    def add_time(self, key: str, start: float) -> None:
        self._timing[key] += time.perf_counter() - start

    def end_step_timings(self) -> None:
        transfer, wait, moving = self.copier.transfer_s, self.copier.wait_s, self.manager.move_s
        self._timing["transfer"] = transfer - self._step_marks[0]
        self._timing["moving"] = moving - self._step_marks[2]
        self._timing["wait"] += wait - self._step_marks[1]
        self._step_marks = (transfer, wait, moving)
        self.last_step_timings = dict(self._timing)
        self._timing = dict.fromkeys(TIMING_KEYS, 0.0)
