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
Python at all. A third system measures it ("hooks floor"): plain PyTorch again, from the same weights,
with the hooks the engine has on its model once warmed up, each doing nothing (module start and end
hooks where a module holds parameters, saved-tensor hooks where the engine has them, a gradient hook
per parameter; none where the engine settled without them). "own" is the rest beyond that floor:
the engine's own bookkeeping.
"""

from __future__ import annotations

import argparse
import contextlib
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
    floor_s: float = 0.0  # median step of plain PyTorch with the engine's hooks as no-ops, less plain's

    @property
    def rest_s(self) -> float:
        """pstar's extra over plain that is neither copies, moves nor optimizer: its forward's and
        backward's bookkeeping."""
        return self.pstar_s - self.plain_s - self.copies_s - self.moving_s - self.optimizer_s

    @property
    def own_s(self) -> float:
        """The rest beyond the hooks' floor: the engine's own bookkeeping."""
        return self.rest_s - self.floor_s


class HookFloor:
    """The hooks the engine has on its model, installed on a plain copy of it, each doing nothing.

    Read from the engine once it is warmed up (settled or not, saved-tensor hooks inside the modules
    holding parameters or over the whole forward). `forward_context()` is what the engine model's
    forward runs in."""

    def __init__(self, plain: nn.Module, engine_model) -> None:
        hooks = engine_model._rt.hooks
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
            self._handles.append(param.register_post_accumulate_grad_hook(_nothing))
        self.num_grad_hooks = len(params)

    def forward_context(self):
        if self._saved_hooks == "whole forward":
            return torch.autograd.graph.saved_tensors_hooks(_same, _same)
        return contextlib.nullcontext()

    def _start(self, module: nn.Module, args) -> None:
        if self._saved_hooks == "scoped" and self._pushed_by is None:
            _push_saved_tensors_hooks(_same, _same)
            self._pushed_by = module

    def _end(self, module: nn.Module, args, output) -> None:
        if self._pushed_by is module:
            _pop_saved_tensors_hooks()
            self._pushed_by = None


def _nothing(*args) -> None:
    return None


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
        start = time.perf_counter()
        hooked_opt.zero_grad()
        with floor.forward_context() if floor is not None else contextlib.nullcontext():
            loss = hooked(x, y)
        loss.backward()
        if clipping > 0:
            torch.nn.utils.clip_grad_norm_(hooked.parameters(), clipping)
        hooked_opt.step()
        if measured:
            hooked_s.append(time.perf_counter() - start)

    def pstar_step(x, y) -> None:
        start, copied_before, moved_before = time.perf_counter(), copier.transfer_s, manager.move_s
        optimizer.zero_grad()
        model.backward(model(x, y))
        optimizing, copied, moved = time.perf_counter(), copier.transfer_s, manager.move_s
        optimizer.step()
        # pstar's host updates would run on into its next forward; here that would be the plain
        # step, on the same cores: they are waited for inside pstar's step instead
        model._rt.finish_host_updates()
        end = time.perf_counter()
        if measured:
            pstar_s.append(end - start)
            copies_s.append(copier.transfer_s - copied_before)
            moving_s.append(moved - moved_before)
            pstar_opt_s.append(end - optimizing - (copier.transfer_s - copied))

    systems = [plain_step, pstar_step, hooked_step]
    for index, (x, y) in enumerate(_batches(shape, num_warmup + num_steps)):
        measured = index >= num_warmup
        if index == num_warmup:
            floor = HookFloor(hooked, model)
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
          f"{'copies ms':>9s} {'moving ms':>9s} {'optim ms':>8s} {'rest ms':>7s} {'hooks floor':>11s} "
          f"{'own ms':>6s} {'evictions':>9s}")
    for shape in SHAPES[args.shapes]:
        for clipping in (0.0, 1.0):
            m = measure(shape, clipping, args.steps, args.warmup)
            rows.append({"shape": shape.name, "clipping": clipping, "plain_s": m.plain_s, "pstar_s": m.pstar_s,
                         "ratio": m.pstar_s / m.plain_s, "copies_s": m.copies_s, "moving_s": m.moving_s,
                         "optimizer_s": m.optimizer_s, "rest_s": m.rest_s, "hooks_floor_s": m.floor_s,
                         "own_s": m.own_s, "evictions_per_step": m.evictions})
            print(f"{shape.name:26s} {clipping:4.1f} {m.plain_s * 1e3:9.2f} {m.pstar_s * 1e3:9.2f} "
                  f"{m.pstar_s / m.plain_s:11.3f} {m.copies_s * 1e3:9.2f} {m.moving_s * 1e3:9.2f} "
                  f"{m.optimizer_s * 1e3:8.2f} {m.rest_s * 1e3:7.2f} {m.floor_s * 1e3:11.2f} "
                  f"{m.own_s * 1e3:6.2f} {m.evictions:9d}", flush=True)
    return rows


if __name__ == "__main__":
    main()
