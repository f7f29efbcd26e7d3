"""HybridAdam: Adam/AdamW over chunk groups, on the device as far as memory allows, else on the host.

Each chunk group's fp32 master, exp_avg and exp_avg_sq chunks share the param chunk's layout, so a
step is torch's fused Adam/AdamW kernel (`torch._fused_adam_` / `torch._fused_adamw_`, the kernels
behind `torch.optim.AdamW(fused=True)`, on CUDA and CPU) over a few flat spans per chunk, followed by
one cast-copy of the updated masters into the param chunk. A span is a run of neighbouring tensors
that received a gradient, share a step count and belong to one parameter group; a tensor without a
gradient is not touched (no weight decay either), as in torch. Frozen tensors live in chunk groups
of their own, without any optimizer state.

On the device the spans of a chunk group go to the kernel as one multi-tensor call per (step
number, parameter group), after one cast of the group's gradients to fp32. A settled run
(engine/hooks.py) with room for it goes further: the gradients autograd left in `.grad` are cast
into an fp32 grad chunk per group by one foreach copy, so the whole step is that cast, one foreach
multiply (unscale/clip), one fused call per parameter group and one foreach copy of the new
weights, whatever the number of chunks; the lists of views those calls take are built once and
kept while the spans stay the same (host_adam.DeviceAdamPlan), so a step does not slice a few
hundred spans again.
The arithmetic is elementwise the same on every path, so the numbers are too.

Parameter groups (torch.optim's format, engine/param_groups.py): `optimizer.param_groups` holds one
dict per group, read at every `step()`, so a value changed there (an lr schedule per group) applies
from the next step. Groups do not decide the packing: tensors of several groups share a chunk, and
each span carries its group's hyper-parameters. Packing by group would split every module's weight
and bias (decay / no decay) into different chunks, so each module would need two chunks resident
and the fetches per forward would double; per-span hyper-parameters cost one more kernel call per
group change inside a chunk, and the kernels are elementwise, so the result is the same.

Placement: which groups keep their optimizer state on the device (as far as memory allows:
the first groups in packing order) and which step on the host (engine/host_adam.py) is decided
once after the warm-up iteration, in engine/optimizer_placement.py. On one GPU, part of the host
groups are stepped there over their streamed state each step (engine/streamed_adam.py).

Host groups overlap the next forward, not backward. During backward a host group's gradients only
go down (to its pinned host copy) once they are complete; `step()` computes the global decisions
(clipping's norm, fp16's overflow), steps the device groups and hands every host group to the worker
with them, then returns. The next forward waits for a host group's update at the first use of its
chunks (the host groups are the last layers, used last), and anything else that needs it (another
step, a state dict, a checkpoint) waits too. Why not speculate (step host groups during backward
assuming no clip and no overflow, redo the rare step that clips): clipping is not rare. Measured on
CPU with `python -m benchmarks.clip_rate --steps 300` (configs/tiny.yaml's model, data, schedule
and clipping 1.0, plain PyTorch): clipping fired on 132 of 300 steps — 45 of the first 50, then
7 to 33 in each further block of 50. A speculative host update would be redone (rolled back from
a copy of its state, 12 B/param more host memory, then a second CPU Adam and H2D) on nearly half
the steps and on most of the first ones. Consequences, all torch's semantics: hyper-parameters are read in `step()`; `zero_grad()` discards a backward (no host
state changed before `step()`); clipped and fp16 steps equal the non-overlapped path bit for bit.
`overlap_backward = False` on the optimizer makes `step()` wait for the host groups before it
returns (same numbers, bitwise). `model.chunk_stats()` reports `step_host_groups_after_step` (updates
still running when `step()` returned, finished during the next forward) and
`step_host_groups_redone` (0: nothing is speculated).

Precision: with clipping or fp16 the global gradient norm is computed on the devices holding the
gradients (fp16 reads it once on the host: the step's one synchronisation, to decide on a skip);
unscaling and clipping become one multiplier tensor applied to the fp32 gradient copy fed to the
kernel. Host Adam gets its copy of the multiplier through an asynchronous copy that its worker waits
for, so `step()` itself does not wait for the end of backward. An fp16 overflow skips the step:
masters and moments are not touched and the compute weights are restored bitwise from the masters.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from engine.chunk import ChunkGroup, Location, TensorInfo
from engine.device import device_capacity_bytes, host_adam_threads, to_device_without_sync
from engine.hooks import SETTLED_GRAD_CHUNKS, SETTLED_IN_PLACE, SETTLED_PARAMS_AS_MASTERS
from engine.host_adam import (AdamHyper, DeviceAdamPlan, GroupFlats, HostAdamWorker, HostUpdates, MastersPlan,
                              Span, adam_on_device_groups, adam_on_device_spans)
from engine.distributed import gather_flat, global_grad_norm
from engine.optimizer_placement import (activation_margin_bytes, allocate_host_moments, settle_optimizer_placement,
                                        step_scratch_bytes)
from engine.precision import clip_coefficient
from engine.runtime import EngineRuntime
from engine.streamed_adam import StreamedAdam

log = logging.getLogger("pstar.engine")


def _spans(group: ChunkGroup) -> list[tuple[int, int, list[TensorInfo]]]:
    """Runs of neighbouring tensors with a gradient, equal step counts and one parameter group:
    (start, end, tensors),
    in the group's storage chunks (with several ranks: this rank's parts of them).

    Alignment gaps between neighbours are zero in every chunk of the group, so covering them keeps
    them zero (Adam of a zero weight with a zero gradient is zero).

    A dense group (every tensor has a gradient) keeps its spans: a step that steps every tensor
    keeps their step counts equal where they were, so the runs stay the same. A step that is not
    dense, or a load of step counts, drops them.
    """
    if not group.dense:
        group.dense_spans = None
        return _find_spans(group)
    if group.dense_spans is None:
        group.dense_spans = _find_spans(group)
    return group.dense_spans


def _find_spans(group: ChunkGroup) -> list[tuple[int, int, list[TensorInfo]]]:
    spans: list[tuple[int, int, list[TensorInfo]]] = []
    for info in group.tensors:
        if not info.has_grad:
            spans.append(None)  # a break
            continue
        begin, end = info.local_range()
        if begin == end:
            continue  # wholly in another rank's shard (so not between two tensors of this one)
        last = spans[-1] if spans else None
        previous = None if last is None else last[2][-1]
        if previous is not None and (previous.num_steps, previous.param_group) == (info.num_steps, info.param_group):
            spans[-1] = (last[0], end, last[2] + [info])
        else:
            spans.append((begin, end, [info]))
    return [s for s in spans if s is not None]


class HybridAdam(torch.optim.Optimizer):
    """The engine's optimizer: `param_groups` holds one dict per parameter group (lr, betas, eps,
    weight_decay), read at every step(); torch's lr schedulers work on it as on any optimizer."""

    def __init__(self, runtime: EngineRuntime, group_hypers: list[dict] | None = None):
        opt = runtime.config.optimizer
        defaults = {"lr": opt.lr, "betas": opt.betas, "eps": opt.eps, "weight_decay": opt.weight_decay}
        group_hypers = group_hypers or [{}]
        members: list[list[torch.nn.Parameter]] = [[] for _ in group_hypers]
        for info in runtime.param_order:
            if info.requires_grad:
                members[info.param_group].append(info.param)
        groups = [{"params": params, **hyper} for params, hyper in zip(members, group_hypers)]
        super().__init__(groups, defaults)
        self._rt = runtime
        self.last_step_skipped = False
        self.overlap_backward = True  # host updates may run after step() returns (module doc)
        self.last_step_overlapped_groups = 0  # host groups whose gradients went down in backward
        self._said_not_compiled = False
        self._settled_grad_regions: dict | None = None  # settled: every gradient's place, for the norm
        # settled with gradients left in .grad: this step's parameters that had one, and those gradients
        self._taken_infos: list[TensorInfo] = []
        self._taken: list[torch.Tensor] | None = None
        self._masters_plan: MastersPlan | None = None  # settled, params as masters: Adam's lists
        # id(info) -> (a grad buffer that stays put: host, or on the device for good; the gradient's view)
        self._kept_regions: dict[int, tuple] = {}
        self._device_plan: DeviceAdamPlan | None = None  # settled with grad chunks: device Adam's lists
        streamer = StreamedAdam(runtime.copier) if runtime.config.stream_host_optimizer else None
        self._host = HostUpdates(runtime.copier, runtime.manager, self._step_spans,
                                 HostAdamWorker(runtime.copier, host_adam_threads(runtime.copier.device)), streamer)
        runtime.manager.host_updates = self._host  # chunk accesses wait for a group's update
        runtime.host_updates = self._host
        runtime.param_groups = self.param_groups
        self._step_hypers: list[AdamHyper] = []
        # Called by the engine's hooks once a run of a chunk's gradients is written, under the
        # manager's lock (engine/hooks.py): once per chunk, not per gradient.
        runtime.hooks.after_gradients = self._on_gradients

    @property
    def loss_scale(self) -> float:
        return self._rt.scaler.scale

    # ---- public API ----------------------------------------------------------------------

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard the gradients since the last step, as torch does: nothing was applied yet."""
        with self._rt.manager.lock:
            self._rt.hooks.write_pending_gradients()  # (a backward that raised left them unwritten)
            groups = self._groups_with_grads()
            self._host.cancel()  # gradients that went down during backward are not used
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
            rt.hooks.write_pending_gradients()  # (a backward that raised left them unwritten)
            self._host.finish()  # the last step's host updates (the forward waited for most)
            if rt.hooks.grad_places:  # settled: the gradients autograd left in .grad
                self._taken_infos, self._taken = rt.hooks.take_gradients()
            if not rt.optimizer_placed:
                settle_optimizer_placement(rt, self._host)
            self._step_hypers = [AdamHyper.read(rt.config.optimizer.type, g) for g in self.param_groups]
            groups = self._groups_with_grads()
            # The norm first, where the gradients are now (mostly the device); then host groups'
            # gradients go down, which also frees device room for the device groups.
            multiplier, overflow = self._gradient_multiplier(groups)
            if overflow:
                self._host.cancel()
                self._restore_weights(groups)
                allocate_host_moments(rt)  # (after a placement) the optimizer state is complete
            else:
                self._update(groups, multiplier)
            self.last_step_overlapped_groups = self._host.num_started_in_backward
            self._host.end_step(wait=not self.overlap_backward)
            rt.scaler.update(overflow)
            self.last_step_skipped = overflow
            if not rt.grad_accumulation:  # consumed: the param chunks hold weights again
                self._clear_grads(groups, taken=self._taken is not None)
            rt.num_micro_steps = 0
            self._taken_infos, self._taken = [], None
            busy_s, wait_s = self._host.take_seconds()
            _add_seconds(rt, "optimizer_host", busy_s)
            _add_seconds(rt, "wait", wait_s)
            rt.manager.end_step()
            rt.end_step_timings()
            if not rt.hooks.settled and nothing_moves(rt):
                self._settle()
            elif (rt.config.compile_blocks and rt.optimizer_placed and not rt.hooks.settled
                  and not self._said_not_compiled):  # placed and still not settled: it never will
                self._said_not_compiled = True
                log.warning("pstar: compile_blocks is not applied: chunks of this run still move between "
                            "host and device, and the hooks that move them would break every block's "
                            "graph; it applies when the model, its gradients and its optimizer state all "
                            "fit the device, on one rank, without gradient accumulation")
        return None

    def _settle(self) -> None:
        """Nothing moves from here on (`nothing_moves`): no host group waits for gradients in
        backward, and the model's hooks shrink to one lean gradient hook per parameter, or none
        (`_settled_mode`)."""
        mode = self._settled_mode()
        if mode == SETTLED_PARAMS_AS_MASTERS:
            for group in self._rt.groups:
                if group.trainable:
                    self._rt.manager.make_param_the_master(group)
        self._rt.hooks.settle(self._rt.param_order, mode, compile_blocks=self._rt.config.compile_blocks)
        if self._rt.config.compile_blocks:
            log.info("pstar: settled; %d blocks compiled with torch.compile", self._rt.hooks.compiled_blocks)

    def _update(self, groups: list[ChunkGroup], multiplier: torch.Tensor | None) -> None:
        """Host groups to the worker (their gradients on the way down), device groups on the
        device meanwhile; the host updates finish when their chunks are next needed."""
        device_groups = [g for g in groups if g.optimizer_on_device]
        streamed, host_groups = _split([g for g in groups if not g.optimizer_on_device], self._host.streams)
        for group in host_groups:
            self._host.send_to_host(group)
        frozen = [g for g in self._rt.groups if not g.trainable and not g.host_only
                  and not g.param.pinned_forever] if self._host.keep_resident else []
        self._bring_to_device(device_groups + frozen)
        allocate_host_moments(self._rt)
        # Making room for the device groups may have evicted a streamed group's param chunk (its
        # gradients went down with it): host Adam steps that one.
        streamed, evicted = _split(streamed, self._host.streams)
        host_groups += evicted
        if streamed:  # on the device's side streams, after this point of the compute stream
            self._host.stream(streamed, multiplier)
        if host_groups:
            on_host, ready = self._multiplier_on_host(multiplier)
            for group in host_groups:
                self._host.submit(group, on_host, ready)
        self._adam(device_groups, multiplier)

    def _multiplier_on_host(self, multiplier: torch.Tensor | None) -> tuple[torch.Tensor | None, object]:
        """The multiplier for host Adam, copied down without stopping this thread: the worker waits
        for the copy (the returned CUDA event) before its first job, while this thread goes on to
        issue the device groups' step and the next forward."""
        if multiplier is None or multiplier.device.type == "cpu":
            return multiplier, None
        try:
            on_host = torch.empty(multiplier.shape, dtype=multiplier.dtype, pin_memory=True)
        except RuntimeError:  # no page-locked memory to be had: a copy that waits here instead
            return multiplier.to("cpu"), None
        on_host.copy_(multiplier, non_blocking=True)
        return on_host, self._rt.copier.compute_point()

    def _settled_mode(self) -> str:
        """How a settled run's gradients reach Adam (engine/hooks.py). fp32 weights are their own
        masters: gradients stay in `.grad` and the step is torch.optim's (the freed masters make
        room for `.grad`). Other compute dtypes take grad chunks where `_use_grad_chunks` says so,
        else gradients go over the weights."""
        if all(group.param.dtype == torch.float32 for group in self._rt.groups if group.trainable):
            return SETTLED_PARAMS_AS_MASTERS
        return SETTLED_GRAD_CHUNKS if self._use_grad_chunks() else SETTLED_IN_PLACE

    def _use_grad_chunks(self) -> bool:
        """Settled on a GPU with room: gradients left in `.grad` and cast into fp32 grad chunks by
        step() (engine/hooks.py). There the copy per parameter into the param chunk that they spare
        is a kernel launch issued from Python. On a CPU that copy is a memory pass like the cast,
        and autograd's fresh gradient tensors each step cost more than it (benchmarks.overhead
        with the mode forced, wide shape: 1.06-1.07 against 1.01-1.04 for gradients over the
        weights)."""
        return self._rt.copier.is_cuda and self._room_for_grad_chunks()

    def _room_for_grad_chunks(self) -> bool:
        """Whether the device has room, beside what placement counted (every chunk, the traced
        activation peak with its margin, a step's scratch), for the gradients autograd leaves in
        `.grad` and an fp32 grad chunk per trainable group (device Adam's input, for every group at
        once)."""
        rt = self._rt
        need = sum(g.param.nbytes + 4 * g.numel for g in rt.groups if g.trainable)
        peak = rt.tracer.peak_non_model_bytes
        activations = peak + activation_margin_bytes(peak, rt.config.mem_tracer.margin_use_ratio)
        scratch = step_scratch_bytes(rt.groups)
        budget = rt.manager.device_budget_bytes
        capacity = device_capacity_bytes(rt.device, rt.manager.device_bytes)
        if capacity is not None:
            budget = min(budget, capacity)
        return rt.manager.device_bytes + need + activations + scratch <= budget

    def _step_spans(self, group: ChunkGroup) -> list[Span]:
        """(begin, end, Adam step number, hyper-parameters) of each span of the group this step."""
        return [(begin, end, infos[0].num_steps + 1, self._step_hypers[infos[0].param_group])
                for begin, end, infos in _spans(group)]

    # ---- host groups' gradients during backward ----------------------------------------------

    def _on_gradients(self, group: ChunkGroup, count: int) -> None:
        """`count` more gradients of a chunk group are in its chunk (one rank; the manager's lock is
        held): start the group's download if it is complete."""
        rt = self._rt
        if not (self.overlap_backward and rt.optimizer_placed and rt.manager.in_fwd_bwd):
            return
        if rt.num_micro_steps + 1 < rt.config.gradient_accumulation_steps:
            return  # accumulating: only the last micro-batch's backward makes gradients final
        if self._host.on_gradients(group, count):
            self._host.start_in_backward(group)

    def state_dict(self) -> dict:
        """Adam state by parameter name (a tied parameter under its first name): `step` and the
        fp32 `exp_avg` / `exp_avg_sq` shaped like the parameter (views, not copies); the
        hyper-parameters; the loss scaler. Parameters of chunk groups never stepped have no entry
        (a parameter stepped 0 times beside stepped ones has zero moments and step 0)."""
        state = {}
        moments = self._whole_moments()
        for info in self._rt.infos:
            group = info.group
            if not info.requires_grad or not group.trainable or group.exp_avg.location is Location.NOWHERE:
                continue
            exp_avg, exp_avg_sq = moments[id(group)]
            state[info.names[0]] = {
                "step": info.num_steps,
                "exp_avg": info.view_of(exp_avg),
                "exp_avg_sq": info.view_of(exp_avg_sq),
            }
        hypers = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        return {"state": state, "param_groups": hypers, "loss_scaler": self._rt.scaler.state_dict()}

    def _whole_moments(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """id(group) -> (exp_avg, exp_avg_sq) whole chunks; several ranks: gathered (host copies)."""
        rt = self._rt
        self._host.finish()  # the moments of running host updates
        stepped = [g for g in rt.groups if g.trainable and g.exp_avg.location is not Location.NOWHERE]
        if rt.comm is None:
            return {id(g): (rt.copier.current_flat(g.exp_avg), rt.copier.current_flat(g.exp_avg_sq))
                    for g in stepped}
        with rt.manager.lock:  # a collective per chunk, in group order on every rank
            return {id(g): (gather_flat(rt.comm, g.exp_avg, rt.copier.current_flat),
                            gather_flat(rt.comm, g.exp_avg_sq, rt.copier.current_flat))
                    for g in stepped}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        rt = self._rt
        by_name = {info.names[0]: info for info in rt.infos}
        unknown = [name for name in state_dict["state"] if name not in by_name]
        if unknown:
            raise RuntimeError(f"optimizer state for unknown parameters: {unknown[:5]}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise RuntimeError(f"optimizer state with {len(saved_groups)} parameter group(s) for an "
                               f"optimizer with {len(self.param_groups)}")
        with rt.manager.lock:
            self._host.finish()
            for info in rt.infos:
                if info.requires_grad:
                    # As in torch, a parameter without an entry starts afresh (never stepped).
                    self._load_moments(info, state_dict["state"].get(info.names[0]))
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
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
        info.group.dense_spans = None  # the step counts' runs may differ now
        self._masters_plan = None

    # ---- device groups' chunks --------------------------------------------------------

    def _bring_to_device(self, groups: list[ChunkGroup]) -> None:
        """Device groups: gradients (and the param chunk the new weights go to) onto the device.
        When every param chunk fits the device, a device group's param chunk stays there for good
        and its host copy is freed (2 B/param of host memory: 15 GB on gpt-12b); so does a frozen
        group's."""
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
        if self._rt.hooks.grad_places:  # settled, gradients in .grad: as autograd left them, in torch's order
            grads = self._taken
            if grads is None:  # asked before step() took them
                grads = [info.param.grad for info, _ in self._rt.hooks.grad_places if info.param.grad is not None]
            return _norm_of({self._rt.device: grads} if grads else {}, self._rt.device)
        every = all(group.dense for group in self._rt.groups)  # every tensor has a gradient
        per_device = self._settled_grad_regions if every and self._rt.hooks.settled else None
        if per_device is None:
            per_device = {}
            regions = self._kept_regions
            chunk = flat = None
            for info in self._rt.param_order:  # torch's order, so the norm rounds the same way
                if not info.has_grad:
                    continue
                if info.group.grad_chunk is not chunk:
                    chunk = info.group.grad_chunk
                    flat = self._rt.copier.current_flat(chunk)
                if chunk.location is Location.HOST or chunk.pinned_forever:  # the buffer stays: views kept
                    kept = regions.get(id(info))
                    if kept is None or kept[0] is not flat:
                        kept = regions[id(info)] = (flat, info.region_of(flat))
                    region = kept[1]
                else:  # a device buffer is new at every upload (and a view would keep it alive)
                    region = info.region_of(flat)
                per_device.setdefault(flat.device, []).append(region)
            if every and self._rt.hooks.settled:
                self._settled_grad_regions = per_device  # settled: the regions never move again
        return _norm_of(per_device, self._rt.device)

    def _adam(self, groups: list[ChunkGroup], multiplier: torch.Tensor | None) -> None:
        """Device groups: the fused kernel on the compute stream, each group's spans in place."""
        rt = self._rt
        start = time.perf_counter()
        step_tensors: dict[int, torch.Tensor] = {}  # one device tensor per step number, for every group
        if rt.hooks.settled_mode == SETTLED_PARAMS_AS_MASTERS:
            if self._masters_plan is None or not self._masters_plan.matches(self._taken_infos):
                self._masters_plan = MastersPlan(self._taken_infos, self._device_flats)
            self._masters_plan.run(self._taken, self._step_hypers, multiplier, step_tensors)
        elif (plan := self._device_plan_for(groups)) is not None:
            plan.run(self._step_hypers, multiplier, step_tensors)
        else:
            items = []
            for group in groups:
                flats = self._device_flats(group)
                if rt.hooks.settled_mode == SETTLED_GRAD_CHUNKS:  # fp32 grad chunks: every group in a few calls
                    items.append((flats, self._step_spans(group), group.dense))
                else:
                    adam_on_device_spans(flats, self._step_spans(group), multiplier, group.dense, step_tensors)
            if items:
                adam_on_device_groups(items, multiplier, None, step_tensors)
        for group in groups:
            dense = group.dense
            for info in group.tensors:  # every rank counts every tensor's steps, in its shard or not
                if dense or info.has_grad:
                    info.num_steps += 1
            self._mark_written(group)
        rt.add_time("optimizer_device", start)

    def _device_plan_for(self, groups: list[ChunkGroup]) -> DeviceAdamPlan | None:
        """Settled with grad chunks, every group dense: device Adam's lists, kept while the groups'
        spans stay the same (DeviceAdamPlan); None where they are built for this step alone."""
        if self._rt.hooks.settled_mode != SETTLED_GRAD_CHUNKS or not all(group.dense for group in groups):
            return None
        spans_lists = [_spans(group) for group in groups]
        if any(not spans for spans in spans_lists):
            return None
        if self._device_plan is None or not self._device_plan.matches(spans_lists):
            self._device_plan = DeviceAdamPlan([(self._device_flats(group), spans)
                                                for group, spans in zip(groups, spans_lists)])
        return self._device_plan

    def _device_flats(self, group: ChunkGroup) -> GroupFlats:
        return GroupFlats(*(self._rt.copier.current_flat(c) for c in (
            group.grad_chunk, group.param, group.master, group.exp_avg, group.exp_avg_sq)))

    def _restore_weights(self, groups: list[ChunkGroup]) -> None:
        """Put the compute weights back (cast from the untouched masters) where grads overwrote them."""
        rt = self._rt
        for group in groups:
            if group.grad is not None or group.master is group.param:
                continue  # grads live in their own chunk or in .grad; the weights were never overwritten
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
        return [g for g in self._rt.groups if g.num_grads]

    def _clear_grads(self, groups: list[ChunkGroup], taken: bool = False) -> None:
        """`taken`: the gradients left in `.grad` were taken by this step (nothing left to drop)."""
        if not taken:
            self._rt.hooks.discard_gradients()
        for group in groups:
            for info in group.tensors:
                info.has_grad = False


def _norm_of(per_device: dict[torch.device, list[torch.Tensor]], compute_device: torch.device) -> torch.Tensor:
    """The L2 norm of gradient lists grouped by device, as an fp32 scalar on the compute device:
    one copy of each device's per-tensor norms, not one per tensor."""
    if not per_device:
        return torch.zeros((), device=compute_device)
    norms = [to_device_without_sync(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)),
                                    compute_device)
             for grads in per_device.values()]
    return torch.linalg.vector_norm(torch.cat(norms), 2)


def nothing_moves(rt: EngineRuntime) -> bool:
    """True once no chunk can move any more: one rank, placed, no gradient accumulation (its grad
    chunks come and go), and every chunk group resident on the device for good with its optimizer
    state there (frozen groups: their param chunk)."""
    if rt.comm is not None or rt.grad_accumulation or not rt.optimizer_placed or rt.retrace_after_backward:
        return False
    if not rt.schedule.recorded or rt.schedule.recording:
        return False
    for group in rt.groups:
        if group.host_only or not group.param.pinned_forever or group.param.location is not Location.DEVICE:
            return False
        if group.trainable and not group.optimizer_on_device:
            return False
    return True


def _split(groups: list[ChunkGroup], chosen) -> tuple[list[ChunkGroup], list[ChunkGroup]]:
    """(the groups for which `chosen` holds, the others)."""
    yes, no = [], []
    for group in groups:
        (yes if chosen(group) else no).append(group)
    return yes, no


def _add_seconds(rt: EngineRuntime, key: str, seconds: float) -> None:
    """Add time measured elsewhere (the host Adam worker) to a step timing."""
    rt.add_time(key, time.perf_counter() - seconds)
