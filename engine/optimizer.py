"""HybridAdam: Adam/AdamW over chunk groups, on the device as far as memory allows, else on the host.

Each chunk group's fp32 master, exp_avg and exp_avg_sq chunks share the param chunk's layout, so a
step is torch's fused Adam/AdamW kernel (`torch._fused_adam_` / `torch._fused_adamw_`, the kernels
behind `torch.optim.AdamW(fused=True)`, on CUDA and CPU) over a few flat spans per chunk, followed by
one cast-copy of the updated masters into the param chunk. A span is a run of neighbouring tensors
that received a gradient and share a step count; a tensor without a gradient is not touched (no
weight decay either), as in torch.

Placement: which groups keep their optimizer state on the device (as far as memory allows:
the first groups in packing order) and which step on the host (engine/host_adam.py) is decided
once after the warm-up iteration, in engine/optimizer_placement.py.

Host groups and backward: when every param chunk stays on the device (they fit beside the
activations and the device's optimizer groups), a host group's update starts during backward, as
soon as its last gradient is written: its gradients go down to the pinned host copy on the download
stream, a worker thread steps it with the fused CPU kernel and copies the new weights back up, while
backward goes on. `step()` then only steps the device groups (fused CUDA kernel) and waits for the
worker. With fp16 or clipping the update needs the global norm first, so only the downloads start
during backward and the host steps begin in `step()` (still pipelined chunk by chunk); with
gradient accumulation or several ranks every host group starts in `step()`. Consequences of starting
during backward, for users of the overlapped path:
- The hyper-parameters (lr, betas, eps, weight_decay) are read from `param_groups[0]` when backward
  reaches the first host group, so a schedule sets the lr before `model.backward()` (before the
  forward, as the loop in engine/api.py does). If they change between backward and `step()`, that
  is logged, and host updates wait for `step()` from then on.
- A backward is committed to its step: `zero_grad()` after such a backward, instead of `step()`,
  completes the step (logged) rather than discarding gradients that already updated host groups.
`overlap_backward = False` on the optimizer turns the overlap off (same numbers, bitwise).

Precision: with clipping or fp16 the global gradient norm is computed on the devices holding the
gradients (fp16 reads it once on the host: the step's one synchronisation, to decide on a skip);
unscaling and clipping become one multiplier tensor applied to the fp32 gradient copy fed to the
kernel. An fp16 overflow skips the step: masters and moments are not
touched and the compute weights are restored bitwise from the masters.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from engine.chunk import ChunkGroup, Location, TensorInfo, TensorState
from engine.device import host_adam_threads, to_device_without_sync
from engine.host_adam import AdamHyper, GroupFlats, HostAdamWorker, HostUpdates, adam_on_spans
from engine.distributed import gather_flat, global_grad_norm
from engine.optimizer_placement import allocate_host_moments, settle_optimizer_placement
from engine.precision import clip_coefficient
from engine.runtime import EngineRuntime

log = logging.getLogger("pstar.engine")


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
    `param_groups[0]["lr"]` before the step's `model.backward()` to follow a schedule (host groups
    may start stepping during backward; torch lr schedulers, stepped after `step()`, work too)."""

    def __init__(self, params: list[torch.nn.Parameter], runtime: EngineRuntime):
        opt = runtime.config.optimizer
        defaults = {"lr": opt.lr, "betas": opt.betas, "eps": opt.eps, "weight_decay": opt.weight_decay}
        # torch requires a non-empty list; a model without trainable params still gets steps.
        super().__init__(params or [torch.nn.Parameter(torch.zeros(1))], defaults)
        self._rt = runtime
        self.last_step_skipped = False
        self.overlap_backward = True  # host groups may start during backward (see the module doc)
        self.last_step_overlapped_groups = 0  # host groups whose update began during backward
        self._host = HostUpdates(runtime.copier, runtime.manager, _spans,
                                 HostAdamWorker(runtime.copier, host_adam_threads()))
        self._hyper_in_backward: AdamHyper | None = None
        self._hyper_stable = True  # False once the hyper-parameters changed between backward and step
        self._warned_zero_grad = False
        self._info_of = {id(info.param): info for info in runtime.infos}
        # Registered after the model wrapper's own hooks (it is built first), so each of these runs
        # once the gradient is in its chunk.
        for info in runtime.infos:
            if info.requires_grad:
                info.param.register_post_accumulate_grad_hook(self._on_gradient)

    @property
    def loss_scale(self) -> float:
        return self._rt.scaler.scale

    # ---- public API ----------------------------------------------------------------------

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        with self._rt.manager.lock:
            if self._host.committed:
                self._complete_committed_step()
                return
            self._host.cancel()
            groups = self._groups_with_grads()
            if not self._rt.grad_accumulation:
                self._restore_weights(groups)  # the grads sit where the weights belong
            self._clear_grads(groups)
            self._rt.num_micro_steps = 0
            self._hyper_in_backward = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("HybridAdam.step does not take a closure")
        rt = self._rt
        with rt.manager.lock:
            if not rt.optimizer_placed:
                settle_optimizer_placement(rt, self._host)
            self._check_hyper_unchanged()
            groups = self._groups_with_grads()
            host_groups = [g for g in groups if not g.optimizer_on_device]
            device_groups = [g for g in groups if g.optimizer_on_device]
            # The norm first, where the gradients are now (mostly the device); then host groups'
            # gradients start down, which also frees device room for the device groups.
            multiplier, overflow = self._gradient_multiplier(groups)
            self.last_step_overlapped_groups = 0
            if overflow:
                self._host.cancel()
                self._restore_weights(groups)
                allocate_host_moments(rt)  # (after a placement) the optimizer state is complete
            else:
                for group in host_groups:
                    self._host.send_to_host(group)
                self._bring_to_device(device_groups)
                allocate_host_moments(rt)
                self._update(host_groups, device_groups, multiplier)
            rt.scaler.update(overflow)
            self.last_step_skipped = overflow
            if not rt.grad_accumulation:
                self._clear_grads(groups)  # consumed: the param chunks hold weights again
            rt.num_micro_steps = 0
            self._hyper_in_backward = None
            rt.manager.end_step()
            rt.end_step_timings()
        return None

    def _update(self, host_groups: list[ChunkGroup], device_groups: list[ChunkGroup],
                multiplier: torch.Tensor | None) -> None:
        """Host groups to the worker (behind those started in backward), device groups on the
        device meanwhile, then wait for the worker."""
        rt = self._rt
        hyper = self._hyper()
        if host_groups:
            on_host = None if multiplier is None else multiplier.to("cpu")  # the step's one sync
            for group in host_groups:
                self._host.submit(group, hyper, on_host)
        self._adam(device_groups, multiplier, hyper)
        report = self._host.finish()
        self.last_step_overlapped_groups = report.num_started_in_backward
        _add_seconds(rt, "optimizer_host", report.busy_s)
        _add_seconds(rt, "wait", report.wait_s)

    def _complete_committed_step(self) -> None:
        if not self._warned_zero_grad:
            self._warned_zero_grad = True
            log.warning("pstar: optimizer.zero_grad() after model.backward(): the host optimizer "
                        "groups were already being updated during backward, so the step was "
                        "completed instead of discarded (call optimizer.step() after backward; "
                        "set optimizer.overlap_backward = False to discard backward passes)")
        self.step()

    # ---- host groups during backward -----------------------------------------------------

    def _on_gradient(self, param: torch.nn.Parameter) -> None:
        """A parameter's gradient is in its chunk: start its group's host update if it is complete."""
        info = self._info_of.get(id(param))
        if info is None or not info.has_grad:
            return  # several ranks: gradients count once reduced, in step()
        with self._rt.manager.lock:
            if self._hyper_in_backward is None:
                self._hyper_in_backward = self._hyper()
            if not self._may_start_in_backward():
                return
            group = self._host.on_gradient(info)
            if group is None or not self._host.start_in_backward(group):
                return
            if self._adam_in_backward():
                self._host.submit(group, self._hyper_in_backward, None, in_backward=True)

    def _may_start_in_backward(self) -> bool:
        rt = self._rt
        return (self.overlap_backward and self._hyper_stable and rt.optimizer_placed
                and rt.manager.in_fwd_bwd)

    def _adam_in_backward(self) -> bool:
        """Adam may run before step() only when it needs no global decision (fp16 skip, clipping)."""
        rt = self._rt
        return not rt.scaler.enabled and rt.config.gradient_clipping <= 0

    def _hyper(self) -> AdamHyper:
        return AdamHyper.read(self._rt.config.optimizer.type, self.param_groups[0])

    def _check_hyper_unchanged(self) -> None:
        """Hyper-parameters changed between backward and step(): host updates that began during
        backward used the old ones; from now on, host updates wait for step()."""
        seen = self._hyper_in_backward
        if seen is None or seen == self._hyper() or not self._hyper_stable:
            return
        self._hyper_stable = False
        if self._host.committed:
            log.warning("pstar: the optimizer's hyper-parameters (lr, ...) changed between "
                        "model.backward() and optimizer.step(); host groups already updated during "
                        "backward used the earlier values. Set them before backward: host updates "
                        "now wait for step(), which is slower")
        elif self.overlap_backward:
            log.info("pstar: the optimizer's hyper-parameters are set between model.backward() and "
                     "optimizer.step(), so host optimizer groups are stepped in step() rather than "
                     "during backward (set them before backward to overlap host Adam with it)")

    def state_dict(self) -> dict:
        """Adam state by parameter name (a tied parameter under its first name): `step` and the
        fp32 `exp_avg` / `exp_avg_sq` shaped like the parameter (views, not copies); the
        hyper-parameters; the loss scaler. Parameters of chunk groups never stepped have no entry
        (a parameter stepped 0 times beside stepped ones has zero moments and step 0)."""
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
            for info in rt.infos:
                if info.requires_grad:
                    # As in torch, a parameter without an entry starts afresh (never stepped).
                    self._load_moments(info, state_dict["state"].get(info.names[0]))
        self.param_groups[0].update(state_dict["param_groups"][0])
        rt.scaler.load_state_dict(state_dict["loss_scaler"])

    def _load_moments(self, info: TensorInfo, entry: dict | None) -> None:
        """This rank's part of one parameter's moments and step count; zeros and 0 without an entry."""
        rt = self._rt
        begin, tensor_begin, length = info.shard_piece()  # several ranks: this rank's part
        for key in ("exp_avg", "exp_avg_sq"):
            chunk = getattr(info.group, key)
            if entry is None:
                if chunk.location is not Location.NOWHERE:
                    rt.copier.current_flat(chunk).narrow(0, begin, length).zero_()
                continue
            if chunk.location is Location.NOWHERE:
                rt.manager.allocate_host(chunk)  # placement after warm-up may move it
            rt.copier.current_flat(chunk).narrow(0, begin, length).copy_(
                entry[key].reshape(-1).narrow(0, tensor_begin, length))
        info.num_steps = 0 if entry is None else int(entry["step"])

    # ---- device groups' chunks --------------------------------------------------------

    def _bring_to_device(self, groups: list[ChunkGroup]) -> None:
        """Device groups: gradients (and the param chunk the new weights go to) onto the device.
        When every param chunk fits the device, a device group's param chunk stays there for good
        and its host copy is freed (2 B/param of host memory: 15 GB on gpt-12b)."""
        manager = self._rt.manager
        for_good = []
        for group in groups:
            for chunk in {id(c): c for c in (group.grad_chunk, group.param)}.values():
                manager.ensure_on_device(chunk, budget_bytes=manager.current_budget_bytes())
            if self._host.keep_resident and not group.param.pinned_forever:
                group.param.pinned_forever = True
                for_good.append(group.param)
        if for_good and self._rt.copier.is_cuda:
            # Their uploads may be long consumed by the compute stream but not known finished on the
            # host: nothing may still read the host buffers when they are freed (once per chunk).
            torch.cuda.synchronize(self._rt.device)
        for chunk in for_good:
            if chunk.host_flat is not None:
                manager.free_host(chunk)

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
        if not per_device:
            return torch.zeros((), device=self._rt.device)
        # One copy of each device's norms to the compute device, not one per tensor.
        norms = [to_device_without_sync(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)),
                                        self._rt.device)
                 for grads in per_device.values()]
        return torch.linalg.vector_norm(torch.cat(norms), 2)

    def _adam(self, groups: list[ChunkGroup], multiplier: torch.Tensor | None, hyper: AdamHyper) -> None:
        """Device groups: the fused kernel on the compute stream, each group's spans in place."""
        rt = self._rt
        start = time.perf_counter()
        for group in groups:
            flats = GroupFlats(*(rt.copier.current_flat(c) for c in (
                group.grad_chunk, group.param, group.master, group.exp_avg, group.exp_avg_sq)))
            spans = [(begin, end, infos[0].num_steps + 1) for begin, end, infos in _spans(group)]
            adam_on_spans(flats, spans, hyper, multiplier)
            for info in group.tensors:  # every rank counts every tensor's steps, in its shard or not
                if info.has_grad:
                    info.num_steps += 1
            self._mark_written(group)
        rt.add_time("optimizer_device", start)

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


def _add_seconds(rt: EngineRuntime, key: str, seconds: float) -> None:
    """Add time measured elsewhere (the host Adam worker) to a step timing."""
    rt.add_time(key, time.perf_counter() - seconds)
