"""The training loop: `Trainer.train()` → `train_step()` → `forward_backward_step()`.

`Trainer.train()` is the whole loop, in the order it runs: a step, the loss guard, the checkpoint
schedule, the agreed stop (a signal); after the loop the checkpoint of a stopped or finished run.
The parts come from `pstar_cli.training.run.build_run`; one from `build_trainer` has only the
loop's own (no checkpoints, no guard, never stops early), which is what the tests of the loop use.

`TrainState` (steps done and the data position) is, together with the engine's model and optimizer
and the RNG states, everything a resumed run needs; the lr schedule is a pure function of
`state.step`. Load it before `train()` and the loop continues from there.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import yaml

import models
from pstar_cli.config import BatchSplit, Config
from pstar_cli.observe.live import NullView, View
from pstar_cli.observe.metrics import CHUNK_STAT_KEYS, MemoryProbe, MetricsWriter, measure_throughput
from pstar_cli.training.lr_schedule import build_lr_schedule

if TYPE_CHECKING:
    from pstar_cli.checkpoint import Checkpointer
    from pstar_cli.training.guards import LossGuard, StopSignal


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job (torchrun's RANK, LOCAL_RANK, WORLD_SIZE)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainState:
    """What the loop itself must remember to resume: steps done and the position in the data order."""

    step: int = 0  # optimizer steps completed
    sequences_seen: int = 0  # global data position: sequences consumed by all ranks together

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "sequences_seen": self.sequences_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.sequences_seen = int(state["sequences_seen"])


def write_run_config(cfg: Config, output_dir: Path) -> Path:
    """`OUTPUT_DIR/config.yaml`: the resolved config, defaults filled (atomic, so nodes sharing a
    directory never read half a file)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "config.yaml"
    tmp = path.with_name(f".config.yaml.{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


class Trainer:
    """The loop over a run's parts. The parts are built by `pstar_cli.training.run`: `build_run`
    (every part) or `build_trainer` (the loop's own parts only: no checkpoints, no loss guard, never
    stops early, which is what the profiler and the tests of the loop itself use)."""

    def __init__(
        self,
        cfg: Config,
        output_dir: Path,
        ranks: Ranks,
        view: View | None,
        *,
        model: Any,
        optimizer: Any,
        data: Any,
        device: torch.device,
        memory: MemoryProbe,
        metrics: MetricsWriter | None,
        init_s: float = 0.0,
        checkpointer: Checkpointer | None = None,
        loss_guard: LossGuard | None = None,
        stop: StopSignal | None = None,
    ) -> None:
        self.cfg = cfg
        self.output_dir = output_dir
        self.ranks = ranks
        self.view: View = view or NullView()
        self.model, self.optimizer = model, optimizer  # the engine's (initialize_engine)
        self.data = data  # get_batch(start, count): the global data order
        self.device = device  # where the model computes
        self.memory = memory
        self.metrics = metrics  # metrics.jsonl, on rank 0 only
        self.init_s = init_s  # seconds the engine took to build the model
        self.checkpointer = checkpointer
        self.loss_guard = loss_guard
        self.stop = stop
        # pure functions of the config
        self.split = BatchSplit.of(cfg.train.batch_size, ranks.world_size, cfg.train.grad_accum)
        self.model_cfg = cfg.model_dict()
        self.schedule = build_lr_schedule(cfg.train)
        recompute = cfg.model_spec["activation_checkpointing"]  # of the blocks model.recompute_layers names
        self.flops_per_token = models.flops_per_token(self.model_cfg, cfg.train.seq_len, recompute)
        self.state = TrainState()
        self.last_loss: torch.Tensor | None = None  # this rank's mean loss of the last step, on the device
        self._interval_start = time.perf_counter()
        self._interval_steps = 0

    # ---- the loop ----

    def train(self) -> TrainState:
        """Run steps until `train.steps` are done or the ranks agree to stop; returns the final state."""
        stopped = False
        with contextlib.ExitStack() as stack:
            stack.callback(self.close)
            stack.enter_context(self.view)
            self.view.note(self.describe())
            self._interval_start, self._interval_steps = time.perf_counter(), 0
            while self.state.step < self.cfg.train.steps:
                self.train_step()
                if self.loss_guard is not None:
                    self.loss_guard.after_step(self)  # raises on a non-finite loss at log steps
                if self.checkpointer is not None:
                    self.checkpointer.after_step(self)  # every checkpoint.interval steps
                if self.stop is not None and self.stop.agreed(self.ranks):
                    stopped = True  # a signal on any rank: every rank stops after this step
                    break
            if self.checkpointer is not None:
                self.checkpointer.at_end(self, stopped)
        return self.state

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the next global batch; returns the step's record."""
        step_start = time.perf_counter()
        lr = self.schedule(self.state.step)
        # the step's lr is set before backward: the engine may start host optimizer groups'
        # updates during backward, with the hyper-parameters it finds then
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        loss = self.forward_backward_step()
        self.last_loss = loss  # the guards check it lazily (no device sync per step)
        self.optimizer.step()
        self.state.step += 1
        self.state.sequences_seen += self.split.global_batch
        self._interval_steps += 1

        logged = self.is_log_step(self.state.step)
        record = self.step_record(loss, lr, time.perf_counter() - step_start, logged)
        if logged and self.metrics is not None:
            self.metrics.write(record)
        self.view.on_step(record, logged)
        return record

    def forward_backward_step(self) -> torch.Tensor:
        """Forward and backward over this rank's share of the global batch, in micro-batches.

        Returns the mean loss of the share (detached, on the compute device: read it only when
        logging, as `.item()` waits for the device)."""
        rank_start = self.state.sequences_seen + self.ranks.rank * self.split.per_rank
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for micro in range(self.split.num_micro_batches):
            x, y = self.data.get_batch(rank_start + micro * self.split.micro_batch, self.split.micro_batch)
            x, y = self.to_device(x), self.to_device(y)  # (micro_batch, seq_len) each
            loss = self.model(x, y)
            # dividing here makes the accumulated gradient that of the mean over micro-batches
            self.model.backward(loss / self.split.num_micro_batches)
            loss_sum += loss.detach().float()
        return loss_sum / self.split.num_micro_batches

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return batch
        # pinned host memory lets the copy overlap the previous step's work
        return batch.pin_memory().to(self.device, non_blocking=True)

    def is_log_step(self, step: int) -> bool:
        """Step 1 (the engine's traced warm-up, slower than the rest), every log_interval, the last."""
        return step == 1 or step % self.cfg.train.log_interval == 0 or step == self.cfg.train.steps

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.memory.close()

    # ---- measurements ----

    def step_record(self, loss: torch.Tensor, lr: float, step_s: float, logged: bool) -> dict[str, Any]:
        """The numbers of a finished step: what metrics.jsonl holds and the views show."""
        if logged:
            loss_value = self.mean_over_ranks(loss)
            step_s = self._interval_seconds()  # exact: the device was synchronised by the reduction
        elif self.view.live:
            # the live view shows every step; between log steps this is rank 0's own loss
            loss_value = loss.item()
        else:
            loss_value = None
        if not logged and not self.view.live:
            # nothing will look at this record: skip the measurements
            return {"step": self.state.step, "loss": None, "lr": lr, "step_s": step_s}
        num_tokens = self.split.global_batch * self.cfg.train.seq_len
        speed = measure_throughput(num_tokens, step_s, self.flops_per_token, self.ranks.world_size)
        memory = self.memory.sample()
        record = {
            "step": self.state.step,
            "loss": loss_value,
            "lr": lr,
            "tokens_per_s": speed.tokens_per_s,
            "tflops": speed.tflops,
            "loss_scale": float(self.optimizer.loss_scale),
            "skipped": bool(self.optimizer.last_step_skipped),
            "step_s": step_s,
            "tokens": self.state.sequences_seen * self.cfg.train.seq_len,
            "gpu_mem_bytes": memory.gpu_used_bytes,
            "gpu_total_bytes": memory.gpu_total_bytes,
            "gpu_allocated_bytes": memory.gpu_allocated_bytes,
            "gpu_peak_allocated_bytes": memory.gpu_peak_allocated_bytes,
            "host_rss_bytes": memory.host_rss_bytes,
            "host_total_bytes": memory.host_total_bytes,
        }
        record.update(self.chunk_stats())
        return record

    def chunk_stats(self) -> dict[str, int | None]:
        stats = self.model.chunk_stats()
        return {key: stats.get(key) for key in CHUNK_STAT_KEYS}

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks: one all_reduce, only on log steps."""
        if self.ranks.world_size > 1 and dist.is_initialized():
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
            value /= self.ranks.world_size
        result = value.item()
        if self.device.type == "cuda":
            # .item() waited for the loss only; the step time must include the optimizer's work
            torch.cuda.synchronize(self.device)
        return result

    def _interval_seconds(self) -> float:
        """Mean seconds per step since the previous log step."""
        now = time.perf_counter()
        step_s = (now - self._interval_start) / max(1, self._interval_steps)
        self._interval_start, self._interval_steps = now, 0
        return step_s

    def describe(self) -> str:
        params = models.num_params(self.model_cfg)
        return (
            f"model {params / 1e6:.1f}M params, global batch {self.split.global_batch} x {self.cfg.train.seq_len}"
            f" tokens ({self.split.num_micro_batches} micro-batch(es) of {self.split.micro_batch} per rank),"
            f" {self.ranks.world_size} rank(s) on {self.device.type}, engine ready in {self.init_s:.1f} s"
        )


def build_run_info(cfg: Config, world_size: int, device: torch.device, start_step: int = 0):
    """The run's title line and totals for the views."""
    from pstar_cli.observe.live import RunInfo

    model = cfg.model.size or cfg.model.family or cfg.model.hf_path or "model"
    ranks = f"{world_size} rank" + ("s" if world_size > 1 else "")
    return RunInfo(
        title=f"{model} · {cfg.precision} · {ranks} · {device.type}",
        total_steps=cfg.train.steps,
        start_step=start_step,
        device_label="GPU" if device.type == "cuda" else "device",
    )
