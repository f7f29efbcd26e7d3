"""The engine's own cost on CPU: pstar's step time over plain PyTorch's, same model, one process.

    python -m benchmarks.overhead                 # the default shapes, a few minutes on 2 cores
    python -m benchmarks.overhead --steps 5 --shapes tiny
    python -m benchmarks.overhead --threads 1        # steadier where other jobs share the cores

Each shape is trained twice side by side from the same weights on the same batches, steps
alternating, each system first in every other step, so that both see the same machine state:
plain PyTorch (fp32, `torch.optim.AdamW(fused=True)`, `clip_grad_norm_` when clipping) and pstar
(fp32, the same optimizer settings). "no moves" gives pstar a device budget that holds everything (nothing is
evicted or fetched: all it adds is bookkeeping); "moves" gives it a budget that forces evictions
every step. The ratio is the median pstar step over the median plain step, after warm-up steps
(pstar's first steps trace and place). It is a benchmark figure, not a pass/fail check. pstar's
host optimizer updates, which in training run on beside its next forward, are waited for at the
end of its own step here, so that they never run during (and slow) the plain step that follows:
a figure on the safe side for pstar.

pstar's extra time is split four ways. "copies" is the time its chunk copies took in the step
(the engine's copier's own count; on a CPU a copy runs while it is issued). "moving" is the time
its forward and backward spent moving chunks beyond those copies (the chunk manager's own count):
choosing what to evict and prefetch, allocating the new buffer, pointing the chunk's parameters at
it. "optimizer" is what its optimizer phase (`step()`, with the host updates waited for) took
beyond plain PyTorch's (`clip_grad_norm_` and AdamW), less the copies inside it: the host
optimizer's worker in place of the fused step, the norm, the step's books. "rest" is the
remainder, the bookkeeping of forward and backward that is not a move: the module, saved-tensor and
gradient hooks, the gradients' copies into their chunks, the chunk manager's accesses that find the
chunk resident.

Part of the rest is what any engine driven by Python hooks pays: autograd and nn.Module calling into
Python at all. Where chunks move, part of it is what the copies cost beyond their own time: on a CPU
a copy runs through the caches the model's compute uses next (measured on the wide shape: plain
PyTorch with 51 extra 4 MiB copies a step slowed by 7 ms more than the copies took by themselves).
A third system measures both ("floor"): plain PyTorch again, from the same weights, with the hooks
the engine has on its model once warmed up (module start and end hooks where a module holds
parameters, saved-tensor hooks where the engine has them, a gradient hook per parameter; none where
the engine settled without them), doing nothing but the copies pstar made in its last warm-up step:
as many, of the same mean size, in the same phase (forward, backward, optimizer), spread evenly over
the module starts of the forward and the gradient hooks of the backward, between a set of host
buffers and a few reused device-side ones. Its step less its own copies' time is the floor. "own"
is the rest beyond that floor: the engine's own bookkeeping.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from engine import initialize_engine
from engine.hooks import (SETTLED_IN_PLACE, _pop_saved_tensors_hooks, _push_saved_tensors_hooks,
                          _ScopedSavedTensors)
from models import build_model


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    batch: int
    seq: int
    device_memory_limit: int | None  # None: everything fits (nothing moves)
    chunk_elements: int = 1 << 20


SHAPES = {
    "default": [
        Shape("deep-narrow, no moves", hidden=64, layers=24, heads=4, batch=4, seq=64, device_memory_limit=None),
        Shape("wide, no moves", hidden=512, layers=4, heads=8, batch=4, seq=64, device_memory_limit=None),
        Shape("deep-narrow, moves", hidden=64, layers=24, heads=4, batch=4, seq=64,
              device_memory_limit=6 << 20, chunk_elements=1 << 16),
        # fewer, larger chunks (4 MiB) than deep-narrow's 256 KiB: the bookkeeping per move is the
        # same, the bytes moved per move 16 times as many
        Shape("wide, moves", hidden=512, layers=4, heads=8, batch=4, seq=64,
              device_memory_limit=24 << 20, chunk_elements=1 << 20),
    ],
    "tiny": [
        Shape("tiny, no moves", hidden=32, layers=2, heads=2, batch=2, seq=16, device_memory_limit=None),
        Shape("tiny, moves", hidden=32, layers=2, heads=2, batch=2, seq=16, device_memory_limit=256 << 10,
              chunk_elements=4096),
    ],
}

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 1e-8, 0.1
VOCAB = 256


def _model_cfg(shape: Shape) -> dict:
    return {"family": "gpt", "size": "gpt-mini", "hidden": shape.hidden, "layers": shape.layers,
            "heads": shape.heads, "vocab_size": VOCAB, "seq_len": shape.seq}


def _engine_cfg(shape: Shape, clipping: float) -> dict:
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                     "weight_decay": WEIGHT_DECAY}},
           "default_chunk_size": shape.chunk_elements, "gradient_clipping": clipping,
           "client": {"mem_tracer": {"warmup_gpu_chunk_mem_ratio": 1.0}},
           "compute_device": "cpu"}  # a CPU benchmark, on a GPU machine too
    cfg["device_memory_limit"] = shape.device_memory_limit or 8 << 30
    return cfg


def _batches(shape: Shape, num_steps: int):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(VOCAB, (shape.batch, shape.seq), generator=gen),
             torch.randint(VOCAB, (shape.batch, shape.seq), generator=gen)) for _ in range(num_steps)]


@dataclass(frozen=True)
class Measured:
    plain_s: float  # median step, after warm-up
    pstar_s: float
    copies_s: float  # median over pstar's steps of its chunk copies' time
    moving_s: float  # median of its forward's and backward's moves beyond their copies
    optimizer_s: float  # median of pstar's optimizer phase less its copies, less plain's median one
    evictions: int  # chunks pstar evicted in its last step
    floor_s: float = 0.0  # median step of the floor system less its copies' own time, less plain's

    @property
    def rest_s(self) -> float:
        """pstar's extra over plain that is neither copies, moves nor optimizer: its forward's and
        backward's bookkeeping."""
        return self.pstar_s - self.plain_s - self.copies_s - self.moving_s - self.optimizer_s

    @property
    def own_s(self) -> float:
        """The rest beyond the floor: the engine's own bookkeeping."""
        return self.rest_s - self.floor_s


@dataclass(frozen=True)
class PhaseMoves:
    """pstar's copies in one phase of a step: (number, bytes) each way."""
    uploads: int = 0
    upload_bytes: int = 0
    downloads: int = 0
    download_bytes: int = 0

    @classmethod
    def between(cls, before, after) -> "PhaseMoves":
        moved = after.minus(before)
        return cls(moved.h2d_moves, moved.h2d_bytes, moved.d2h_moves, moved.d2h_bytes)


class CopyReplay:
    """The floor's copies: those of one pstar step, phase by phase (module doc). On a CPU a copy is
    done when it returns, so its time is the time spent in `_copy`."""

    def __init__(self, phases: dict[str, PhaseMoves], num_host_buffers: int, device_bytes: int) -> None:
        self.phases = dict(phases)
        moves = sum(m.uploads + m.downloads for m in phases.values())
        nbytes = sum(m.upload_bytes + m.download_bytes for m in phases.values())
        numel = max(1, nbytes // max(1, moves) // 4)  # fp32, the benchmark's chunks' dtype
        self._host = [torch.randn(numel) for _ in range(max(1, num_host_buffers))]
        self._device = [torch.empty(numel) for _ in range(max(1, device_bytes // (numel * 4)))]
        self._next = 0
        self.copy_s = 0.0  # this step's copies' own time
        self._phase, self._name = PhaseMoves(), ""
        self._done = self._calls = self._expected = 0
        self._calls_seen: dict[str, int] = {}

    def start_step(self) -> None:
        self.copy_s = 0.0

    def start_phase(self, name: str, expected_calls: int) -> None:
        """Phase `name` begins: its copies are spread over its hook calls, as many as it had the
        step before (`expected_calls` the first time)."""
        self._phase, self._name = self.phases.get(name, PhaseMoves()), name
        self._done = self._calls = 0
        self._expected = max(1, self._calls_seen.get(name, expected_calls))

    def on_call(self) -> None:
        """One hook call of the phase: the copies due by now."""
        self._calls += 1
        self._calls_seen[self._name] = self._calls
        total = self._phase.uploads + self._phase.downloads
        self._copy_up_to(min(total, round(total * self._calls / self._expected)))

    def finish_phase(self) -> None:
        self._copy_up_to(self._phase.uploads + self._phase.downloads)

    def _copy_up_to(self, due: int) -> None:
        while self._done < due:
            host = self._host[self._next % len(self._host)]
            device = self._device[self._next % len(self._device)]
            self._next += 1
            start = time.perf_counter()
            if self._done < self._phase.uploads:
                device.copy_(host)
            else:
                host.copy_(device)
            self.copy_s += time.perf_counter() - start
            self._done += 1


class HookFloor:
    """The hooks the engine has on its model, installed on a plain copy of it, each doing nothing
    but the copies of a `CopyReplay` (where chunks move).

    Read from the engine once it is warmed up (settled or not, saved-tensor hooks inside the modules
    holding parameters or over the whole forward). `forward_context()` is what the engine model's
    forward runs in."""

    def __init__(self, plain: nn.Module, engine_model, replay: CopyReplay | None = None) -> None:
        hooks = engine_model._rt.hooks
        self.replay = replay
        self._handles: list = []
        self._saved_hooks: str | None = None  # None (settled), "scoped" or "whole forward"
        self._pushed_by: nn.Module | None = None
        self.num_module_hooks = self.num_grad_hooks = 0
        trainable = [p for p in plain.parameters() if p.requires_grad]
        if hooks.settled:
            if hooks.settled_mode == SETTLED_IN_PLACE:
                self._add_grad_hooks(trainable)
            return
        engine_modules = dict(engine_model.module.named_modules())
        for name, module in plain.named_modules():
            if engine_modules.get(name) in hooks._direct:
                self._handles.append(module.register_forward_pre_hook(self._start))
                self._handles.append(module.register_forward_hook(self._end, always_call=True))
                self.num_module_hooks += 1
        self._add_grad_hooks(trainable)
        scoped = isinstance(hooks.saved_tensors_context(), _ScopedSavedTensors)
        self._saved_hooks = "scoped" if scoped else "whole forward"

    def _add_grad_hooks(self, params: list[nn.Parameter]) -> None:
        for param in params:
            self._handles.append(param.register_post_accumulate_grad_hook(self._on_grad))
        self.num_grad_hooks = len(params)

    def _on_grad(self, param: nn.Parameter) -> None:
        if self.replay is not None:
            self.replay.on_call()

    def forward_context(self):
        if self._saved_hooks == "whole forward":
            return torch.autograd.graph.saved_tensors_hooks(_same, _same)
        return contextlib.nullcontext()

    def _start(self, module: nn.Module, args) -> None:
        if self.replay is not None:
            self.replay.on_call()
        if self._saved_hooks == "scoped" and self._pushed_by is None:
            _push_saved_tensors_hooks(_same, _same)
            self._pushed_by = module

    def _end(self, module: nn.Module, args, output) -> None:
        if self._pushed_by is module:
            _pop_saved_tensors_hooks()
            self._pushed_by = None


def _same(tensor):
    return tensor



def measure(shape: Shape, clipping: float, num_steps: int, num_warmup: int) -> Measured:
    """Both systems' steps, alternating, on the same batches (module doc)."""
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=lambda: build_model(_model_cfg(shape)),
                                         config=_engine_cfg(shape, clipping))
    plain = build_model(_model_cfg(shape))
    plain.load_state_dict(model.state_dict())
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                  weight_decay=WEIGHT_DECAY, fused=True)
    hooked = build_model(_model_cfg(shape))
    hooked.load_state_dict(model.state_dict())
    hooked_opt = torch.optim.AdamW(hooked.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                   weight_decay=WEIGHT_DECAY, fused=True)
    floor: HookFloor | None = None  # installed once pstar is warmed up
    copier, manager = model._rt.copier, model._rt.manager
    plain_s, hooked_s, pstar_s, copies_s, moving_s, plain_opt_s, pstar_opt_s = [], [], [], [], [], [], []
    last_moves: dict[str, PhaseMoves] = {}  # pstar's last step's copies, by phase

    def plain_step(x, y) -> None:
        start = time.perf_counter()
        plain_opt.zero_grad()
        plain(x, y).backward()
        optimizing = time.perf_counter()
        if clipping > 0:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), clipping)
        plain_opt.step()
        end = time.perf_counter()
        if measured:
            plain_s.append(end - start)
            plain_opt_s.append(end - optimizing)

    def hooked_step(x, y) -> None:
        replay = floor.replay if floor is not None else None
        if replay is not None:
            replay.start_step()
        start = time.perf_counter()
        hooked_opt.zero_grad()
        if replay is not None:
            replay.start_phase("forward", floor.num_module_hooks)
        with floor.forward_context() if floor is not None else contextlib.nullcontext():
            loss = hooked(x, y)
        if replay is not None:
            replay.finish_phase()
            replay.start_phase("backward", floor.num_grad_hooks)
        loss.backward()
        if clipping > 0:
            torch.nn.utils.clip_grad_norm_(hooked.parameters(), clipping)
        hooked_opt.step()
        if replay is not None:
            replay.finish_phase()
            replay.start_phase("optimizer", 1)
            replay.finish_phase()
        if measured:
            hooked_s.append(time.perf_counter() - start - (replay.copy_s if replay is not None else 0.0))

    def pstar_step(x, y) -> None:
        counts = [dataclasses.replace(manager.totals)]
        start, copied_before, moved_before = time.perf_counter(), copier.transfer_s, manager.move_s
        optimizer.zero_grad()
        loss = model(x, y)
        counts.append(dataclasses.replace(manager.totals))
        model.backward(loss)
        optimizing, copied, moved = time.perf_counter(), copier.transfer_s, manager.move_s
        counts.append(dataclasses.replace(manager.totals))
        optimizer.step()
        # pstar's host updates would run on into its next forward; here that would be the plain
        # step, on the same cores: they are waited for inside pstar's step instead
        model._rt.finish_host_updates()
        end = time.perf_counter()
        counts.append(dataclasses.replace(manager.totals))
        for name, before, after in zip(("forward", "backward", "optimizer"), counts, counts[1:]):
            last_moves[name] = PhaseMoves.between(before, after)
        if measured:
            pstar_s.append(end - start)
            copies_s.append(copier.transfer_s - copied_before)
            moving_s.append(moved - moved_before)
            pstar_opt_s.append(end - optimizing - (copier.transfer_s - copied))

    systems = [plain_step, pstar_step, hooked_step]
    for index, (x, y) in enumerate(_batches(shape, num_warmup + num_steps)):
        measured = index >= num_warmup
        if index == num_warmup:
            replay = None
            if any(m.uploads + m.downloads for m in last_moves.values()):
                replay = CopyReplay(last_moves, num_host_buffers=len(manager.chunks),
                                    device_bytes=manager.device_budget_bytes)
            floor = HookFloor(hooked, model, replay)
        # Which system goes first rotates: whichever follows another finds the allocator as that
        # one left it (measured: the second one's backward page-faulted its fresh gradients in,
        # 40 MB a step on the wide shape, either way round).
        for step in systems[index % 3:] + systems[:index % 3]:
            step(x, y)
    median = statistics.median
    return Measured(median(plain_s), median(pstar_s), median(copies_s), median(moving_s),
                    median(pstar_opt_s) - median(plain_opt_s), model.chunk_stats()["step_evictions"],
                    median(hooked_s) - median(plain_s))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per shape (after warm-up)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="default")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is steadier on a shared machine")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"{'shape':26s} {'clip':>4s} {'plain ms':>9s} {'pstar ms':>9s} {'pstar/plain':>11s} "
          f"{'copies ms':>9s} {'moving ms':>9s} {'optim ms':>8s} {'rest ms':>7s} {'floor ms':>8s} "
          f"{'own ms':>6s} {'evictions':>9s}")
    for shape in SHAPES[args.shapes]:
        for clipping in (0.0, 1.0):
            m = measure(shape, clipping, args.steps, args.warmup)
            rows.append({"shape": shape.name, "clipping": clipping, "plain_s": m.plain_s, "pstar_s": m.pstar_s,
                         "ratio": m.pstar_s / m.plain_s, "copies_s": m.copies_s, "moving_s": m.moving_s,
                         "optimizer_s": m.optimizer_s, "rest_s": m.rest_s, "floor_s": m.floor_s,
                         "own_s": m.own_s, "evictions_per_step": m.evictions})
            print(f"{shape.name:26s} {clipping:4.1f} {m.plain_s * 1e3:9.2f} {m.pstar_s * 1e3:9.2f} "
                  f"{m.pstar_s / m.plain_s:11.3f} {m.copies_s * 1e3:9.2f} {m.moving_s * 1e3:9.2f} "
                  f"{m.optimizer_s * 1e3:8.2f} {m.rest_s * 1e3:7.2f} {m.floor_s * 1e3:8.2f} "
                  f"{m.own_s * 1e3:6.2f} {m.evictions:9d}", flush=True)
    return rows


if __name__ == "__main__":
    main()
