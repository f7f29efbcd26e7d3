"""HybridAdam: Adam/AdamW over chunk groups, on the device as far as memory allows, else on the host.

Each chunk group's fp32 master, exp_avg and exp_avg_sq chunks share the param chunk's layout, so a
step is torch's fused Adam/AdamW kernel (`torch._fused_adam_` / `torch._fused_adamw_`, the kernels
behind `torch.optim.AdamW(fused=True)`, on CUDA and CPU) over a few flat spans per chunk, followed by
one cast-copy of the updated masters into the param chunk. A span is a run of neighbouring tensors
that received a gradient and share a step count; a tensor without a gradient is not touched (no
weight decay either), as in torch.

Placement, decided once after the warm-up iteration: with `use_hybrid_adam`, the first chunk groups
(in packing order, i.e. the ones whose backward finishes last) keep their optimizer state on the
device while it fits in `margin_use_ratio` of the device margin left when all param chunks and the
peak non-model memory are resident; the rest step on the host with the fused CPU kernel.

Precision: with clipping or fp16 the global gradient norm is computed on the devices holding the
gradients (fp16 reads it once on the host: the step's one synchronisation, to decide on a skip);
unscaling and clipping become one multiplier tensor applied to the fp32 gradient copy fed to the
kernel. An fp16 overflow skips the step: masters and moments are not
touched and the compute weights are restored bitwise from the masters.
"""

from __future__ import annotations

import math
import time

import torch

from engine.chunk import ChunkGroup, Location, TensorInfo, TensorState
from engine.distributed import gather_flat, global_grad_norm
from engine.packing import repack_in_first_use_order
from engine.precision import clip_coefficient
from engine.runtime import EngineRuntime


def plan_num_device_groups(groups: list[ChunkGroup], device_budget_bytes: int,
                           peak_non_model_bytes: int, margin_use_ratio: float,
                           use_hybrid_adam: bool, scratch_bytes: int) -> int:
    """How many leading chunk groups keep their optimizer state (12 B/param) on the device."""
    if not use_hybrid_adam:
        return 0
    moving = [g for g in groups if not g.host_only]
    # With several ranks a param chunk in use is the gathered whole chunk, next to the shards.
    param_bytes = sum(c.nbytes for g in moving for c in (g.gathered, g.param, g.grad) if c is not None)
    margin = device_budget_bytes - peak_non_model_bytes - param_bytes - scratch_bytes
    allowance = margin * margin_use_ratio
    num_groups, used = 0, 0
    for group in moving:
        need = sum(c.nbytes for c in group.optimizer_chunks)
        if used + need > allowance:
            break
        used += need
        num_groups += 1
    return num_groups


def _spans(group: ChunkGroup) -> list[tuple[int, int, list[TensorInfo]]]:
    """Runs of neighbouring tensors with a gradient and equal step counts: (start, end, tensors),
    in the group's storage chunks (with several ranks: this rank's parts of them).

    Alignment gaps between neighbours are zero in every chunk of the group, so covering them keeps
    them zero (Adam of a zero weight with a zero gradient is zero).
    """
    spans: list[tuple[int, int, list[TensorInfo]]] = []
    for info in group.tensors:
        if not info.has_grad:
            spans.append(None)  # a break
            continue
        begin, end = info.local_range()
        if begin == end:
            continue  # wholly in another rank's shard (so not between two tensors of this one)
        last = spans[-1] if spans else None
        if last is not None and last[2][-1].num_steps == info.num_steps:
            spans[-1] = (last[0], end, last[2] + [info])
        else:
            spans.append((begin, end, [info]))
    return [s for s in spans if s is not None]


class HybridAdam(torch.optim.Optimizer):
    """The engine's optimizer. `param_groups[0]` holds lr, betas, eps, weight_decay; set
    `param_groups[0]["lr"]` before `step()` to follow a schedule (torch lr schedulers work too)."""

    def __init__(self, params: list[torch.nn.Parameter], runtime: EngineRuntime):
        opt = runtime.config.optimizer
        defaults = {"lr": opt.lr, "betas": opt.betas, "eps": opt.eps, "weight_decay": opt.weight_decay}
        # torch requires a non-empty list; a model without trainable params still gets steps.
        super().__init__(params or [torch.nn.Parameter(torch.zeros(1))], defaults)
        self._rt = runtime
        self.last_step_skipped = False

    @property
    def loss_scale(self) -> float:
        return self._rt.scaler.scale

    # ---- public API ----------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        groups = self._groups_with_grads()
        if not self._rt.grad_accumulation:
            self._restore_weights(groups)  # the grads sit where the weights belong
        self._clear_grads(groups)
        self._rt.num_micro_steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("HybridAdam.step does not take a closure")
        rt = self._rt
        with rt.manager.lock:
            if not rt.optimizer_placed:
                self._settle_layout_and_placement()
            groups = self._groups_with_grads()
            self._bring_to_optimizer(groups)
            multiplier, overflow = self._gradient_multiplier(groups)
            if overflow:
                self._restore_weights(groups)
            else:
                self._adam(groups, multiplier)
            rt.scaler.update(overflow)
            self.last_step_skipped = overflow
            if not rt.grad_accumulation:
                self._clear_grads(groups)  # consumed: the param chunks hold weights again
            rt.num_micro_steps = 0
            rt.manager.end_step()
            rt.end_step_timings()
        return None

    def state_dict(self) -> dict:
        """Adam state by parameter name (a tied parameter under its first name): `step` and the
        fp32 `exp_avg` / `exp_avg_sq` shaped like the parameter (views, not copies); the
        hyper-parameters; the loss scaler. Parameters that were never stepped have no entry."""
        state = {}
        moments = self._whole_moments()
        for info in self._rt.infos:
            group = info.group
            if not info.requires_grad or group.exp_avg.location is Location.NOWHERE:
                continue
            exp_avg, exp_avg_sq = moments[id(group)]
            state[info.names[0]] = {
                "step": info.num_steps,
                "exp_avg": info.view_of(exp_avg),
                "exp_avg_sq": info.view_of(exp_avg_sq),
            }
        hyper = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [hyper], "loss_scaler": self._rt.scaler.state_dict()}

    def _whole_moments(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """id(group) -> (exp_avg, exp_avg_sq) whole chunks; several ranks: gathered (host copies)."""
        rt = self._rt
        if rt.comm is None:
            return {id(g): (rt.copier.current_flat(g.exp_avg), rt.copier.current_flat(g.exp_avg_sq))
                    for g in rt.groups if g.exp_avg.location is not Location.NOWHERE}
        with rt.manager.lock:  # a collective per chunk, in group order on every rank
            return {id(g): (gather_flat(rt.comm, g.exp_avg, rt.copier.current_flat),
                            gather_flat(rt.comm, g.exp_avg_sq, rt.copier.current_flat))
                    for g in rt.groups if g.exp_avg.location is not Location.NOWHERE}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        rt = self._rt
        by_name = {info.names[0]: info for info in rt.infos}
        unknown = [name for name in state_dict["state"] if name not in by_name]
        if unknown:
            raise RuntimeError(f"optimizer state for unknown parameters: {unknown[:5]}")
        with rt.manager.lock:
            for name, entry in state_dict["state"].items():
                info = by_name[name]
                for key in ("exp_avg", "exp_avg_sq"):
                    chunk = getattr(info.group, key)
                    if chunk.location is Location.NOWHERE:
                        rt.manager.allocate_host(chunk)  # placement after warm-up may move it
                    begin, tensor_begin, length = info.shard_piece()  # several ranks: this rank's part
                    rt.copier.current_flat(chunk).narrow(0, begin, length).copy_(
                        entry[key].reshape(-1).narrow(0, tensor_begin, length))
                info.num_steps = int(entry["step"])
        self.param_groups[0].update(state_dict["param_groups"][0])
        rt.scaler.load_state_dict(state_dict["loss_scaler"])

    # ---- placement -----------------------------------------------------------------------

    def _settle_layout_and_placement(self) -> None:
        """First step(s): re-pack in first-use order (once), then place the optimizer state after
        a warm-up traced with the final layout; until then it stays on the host."""
        rt = self._rt
        if not rt.repack_checked:
            rt.repack_checked = True
            repack_in_first_use_order(rt, rt.first_used)
        if rt.tracer.finished:
            self._place_optimizer_state()
            return
        for group in rt.groups:
            for chunk in group.optimizer_chunks:
                if chunk.location is Location.NOWHERE:
                    rt.manager.allocate_host(chunk)

    def _place_optimizer_state(self) -> None:
        rt = self._rt
        scratch = max((g.numel for g in rt.groups), default=0) * 4
        num_device = plan_num_device_groups(
            rt.groups, rt.tracer.chunk_budget_bytes(None), rt.tracer.peak_non_model_bytes,
            rt.config.mem_tracer.margin_use_ratio, rt.config.optimizer.use_hybrid_adam, scratch)
        moving = [g for g in rt.groups if not g.host_only]
        for index, group in enumerate(moving):
            group.optimizer_on_device = index < num_device
        for group in rt.groups:
            if group.optimizer_on_device:
                self._put_optimizer_state_on_device(group)
            else:
                for chunk in group.optimizer_chunks:
                    if chunk.host_flat is None:
                        rt.manager.allocate_host(chunk)  # moments start at zero
        rt.optimizer_placed = True

    def _put_optimizer_state_on_device(self, group: ChunkGroup) -> None:
        manager = self._rt.manager
        budget = manager.current_budget_bytes()
        for chunk in group.optimizer_chunks:
            manager.ensure_on_device(chunk, budget_bytes=budget)  # master: uploaded; moments: zeros
            chunk.pinned_forever = True
            if chunk.host_flat is not None:
                manager.free_host(chunk)  # the device copy is the only one from now on

    def _bring_to_optimizer(self, groups: list[ChunkGroup]) -> None:
        """Gradients (and the param chunk the new weights go to) where the group's optimizer is."""
        manager = self._rt.manager
        host_side = [g for g in groups if not g.optimizer_on_device]
        for group in host_side:  # first, as it frees device room for the device groups
            for chunk in {id(c): c for c in (group.grad_chunk, group.param)}.values():
                manager.move_to_host(chunk)
        for group in groups:
            if group.optimizer_on_device:
                for chunk in {id(c): c for c in (group.grad_chunk, group.param)}.values():
                    manager.ensure_on_device(chunk, budget_bytes=manager.current_budget_bytes())

    # ---- numerics ------------------------------------------------------------------------

    def _gradient_multiplier(self, groups: list[ChunkGroup]) -> tuple[torch.Tensor | None, bool]:
        """(what to multiply the gradients by, or None for nothing; whether the step overflowed).

        Clipping follows torch.nn.utils.clip_grad_norm_ operation for operation (per-tensor norms,
        the norm of those, then min(1, max_norm / (norm + 1e-6)) as an fp32 tensor), so a clipped
        step equals the plain one. Only fp16 reads the norm on the host: the step's one sync.
        """
        rt = self._rt
        scaler, max_norm = rt.scaler, rt.config.gradient_clipping
        if not scaler.enabled and max_norm <= 0:
            return None, False
        start = time.perf_counter()
        total_norm = self._global_norm()
        if scaler.enabled:
            overflow = not math.isfinite(total_norm.item())
            rt.add_time("wait", start)
            if overflow:
                return None, True
            total_norm = total_norm / scaler.scale
        multiplier = torch.ones_like(total_norm)
        if max_norm > 0:
            multiplier = clip_coefficient(total_norm, max_norm)
        if scaler.enabled:
            multiplier = multiplier / scaler.scale
        return multiplier, False

    def _global_norm(self) -> torch.Tensor:
        """L2 norm over every gradient, as an fp32 scalar tensor on the compute device."""
        if self._rt.comm is not None:  # several ranks: one all-reduce of per-tensor partial sums
            return global_grad_norm(self._rt.param_order, self._rt.copier.current_flat, self._rt.comm,
                                    self._rt.device)
        per_device: dict[torch.device, list[torch.Tensor]] = {}
        for info in self._rt.param_order:  # torch's order, so the norm rounds the same way
            if info.has_grad:
                flat = self._rt.copier.current_flat(info.group.grad_chunk)
                per_device.setdefault(flat.device, []).append(info.region_of(flat))
        norms = []
        for grads in per_device.values():
            norms += torch._foreach_norm(grads, 2, dtype=torch.float32)
        if not norms:
            return torch.zeros((), device=self._rt.device)
        return torch.linalg.vector_norm(torch.stack([n.to(self._rt.device) for n in norms]), 2)

    def _adam(self, groups: list[ChunkGroup], multiplier: torch.Tensor | None) -> None:
        rt = self._rt
        hyper = self.param_groups[0]
        beta1, beta2 = hyper["betas"]
        kernel = torch._fused_adamw_ if rt.config.optimizer.type == "AdamW" else torch._fused_adam_
        multipliers = {}  # one copy per device the groups step on
        for group in groups:
            start = time.perf_counter()
            flats = [rt.copier.current_flat(c) for c in (group.grad_chunk, group.param, group.master,
                                                        group.exp_avg, group.exp_avg_sq)]
            grad, param, master, exp_avg, exp_avg_sq = flats
            spans = _spans(group)
            # The kernel wants fp32 gradients like the masters; this copy is also where the
            # unscale/clip multiplier is applied, so the chunk's own gradient stays as it was.
            grads = [grad[b:e].float() for b, e, _ in spans]
            if multiplier is not None:
                if master.device not in multipliers:
                    multipliers[master.device] = multiplier.to(master.device)
                grads = [g * multipliers[master.device] for g in grads]
            steps = [torch.full((), float(infos[0].num_steps + 1), dtype=torch.float32,
                                device=master.device) for _, _, infos in spans]
            if spans:  # with several ranks, this rank's shard may hold none of the gradients
                kernel([master[b:e] for b, e, _ in spans], grads,
                       [exp_avg[b:e] for b, e, _ in spans], [exp_avg_sq[b:e] for b, e, _ in spans],
                       [], steps, lr=hyper["lr"], beta1=beta1, beta2=beta2,
                       weight_decay=hyper["weight_decay"], eps=hyper["eps"], amsgrad=False,
                       maximize=False)
            for begin, end, infos in spans:
                param[begin:end].copy_(master[begin:end])  # new compute weights (cast)
            for info in group.tensors:  # every rank counts every tensor's steps, in its shard or not
                if info.has_grad:
                    info.num_steps += 1
            self._mark_written(group)
            rt.add_time("optimizer_device" if group.optimizer_on_device else "optimizer_host", start)

    def _restore_weights(self, groups: list[ChunkGroup]) -> None:
        """Put the compute weights back (cast from the untouched masters) where grads overwrote them."""
        rt = self._rt
        if rt.grad_accumulation:
            return  # grads live in their own chunks; the weights were never overwritten
        for group in groups:
            param = rt.copier.current_flat(group.param)
            master = rt.copier.current_flat(group.master)
            for begin, end, _ in _spans(group):
                param[begin:end].copy_(master[begin:end])
            self._mark_written(group)

    # ---- bookkeeping ---------------------------------------------------------------------

    def _mark_written(self, group: ChunkGroup) -> None:
        if group.param.location is Location.DEVICE:
            group.param.dirty = True

    def _groups_with_grads(self) -> list[ChunkGroup]:
        return [g for g in self._rt.groups if any(info.has_grad for info in g.tensors)]

    def _clear_grads(self, groups: list[ChunkGroup]) -> None:
        for group in groups:
            for info in group.tensors:
                info.has_grad = False
                if info.num_users == 0:
                    info.state = TensorState.HOLD
