"""Host Adam: the optimizer groups kept on the host, stepped by torch's fused CPU Adam/AdamW in a
worker thread, pipelined with the copies that feed it.

One job per host group: wait until the group's gradients are on the host (the D2H copy started on
the download stream), step its spans with the fused CPU kernel in pieces of a few million elements
— the compute-dtype gradients cast into one reused fp32 scratch buffer (times the unscale/clip
multiplier, if any), so nothing is allocated or page-faulted per chunk — cast the new masters into
the param chunk's host buffer and, when the param chunk stays on the device, copy it back (H2D on
the copy stream). One worker runs the jobs in order while the caller goes on, so D2H, CPU Adam and
H2D of different chunks overlap each other and the caller's work. torch ops release the GIL, so the
worker runs beside autograd's threads.

When (`HostUpdates`): during backward a complete host group's gradients only start *down* (as soon
as its last gradient is written: the post-accumulate-grad hooks count each group's gradients). No
host master or moment changes before `optimizer.step()`, so `zero_grad()` discards a backward
exactly as torch does, and the update knows the global decisions (clipping's norm, fp16's overflow)
before it starts: every host result equals the non-overlapped path bit for bit, with nothing to
validate or redo. `step()` submits every host job and returns; the jobs finish during the next
forward, which waits for a group's job at the first use of its chunks (host groups hold the last
layers, used last in forward) — or anything else that reads the group's state first (another step,
a state dict, a checkpoint) waits for it. The worker never touches the engine's books (tensor
states, step counts, placement): a job's spans and step numbers are fixed when it is submitted.

Where (`HostUpdates._choose_streamed`): on one GPU with the param chunks in place, each step gives
some host groups to the GPU instead (engine/streamed_adam.py: their state streamed up and back down
over PCIe), the rest to this worker, by the rates both measured in the steps before. A streamed
group's gradients never go down, and its update starts in `step()` too, after the global decisions.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from engine.chunk import Chunk, ChunkGroup, Location, TensorInfo
from engine.device import Copier

if TYPE_CHECKING:
    from engine.chunk_manager import ChunkManager
    from engine.streamed_adam import StreamedAdam

# Host steps go in pieces of this many elements: the fp32 scratch they are cast into stays small
# (16 MiB) and is reused while still in the caches, and each piece's new masters are cast into the
# param chunk right after the kernel wrote them. Results do not depend on it (Adam is elementwise).
HOST_PIECE_ELEMENTS = 1 << 22

# (begin, end, Adam step number[, the span's hyper-parameters]) within a group's chunks
Span = tuple


@dataclass(frozen=True)
class AdamHyper:
    """The hyper-parameters of one Adam step of one parameter group, as read from its dict."""

    decoupled: bool  # AdamW: the decay shrinks the weight instead of joining the gradient
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def read(cls, optimizer_type: str, param_group: dict) -> "AdamHyper":
        beta1, beta2 = param_group["betas"]
        return cls(decoupled=optimizer_type == "AdamW", lr=float(param_group["lr"]),
                   beta1=float(beta1), beta2=float(beta2), eps=float(param_group["eps"]),
                   weight_decay=float(param_group["weight_decay"]))


class GroupFlats(NamedTuple):
    """A chunk group's flat buffers at the place it steps (all on the device, or all on the host)."""

    grad: torch.Tensor
    param: torch.Tensor
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


class HostScratch:
    """One fp32 buffer the host gradients are cast into, allocated on first use and kept."""

    def __init__(self, numel: int):
        self.numel = numel
        self._buf: torch.Tensor | None = None

    def take(self, numel: int) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.empty(self.numel, dtype=torch.float32, device="cpu")
        return self._buf[:numel]


def adam_on_spans(flats: GroupFlats, spans: list[Span], hyper: AdamHyper | None,
                  multiplier: torch.Tensor | None, scratch: HostScratch | None = None) -> None:
    """One Adam step of the span elements of a chunk group, then the new masters cast into the
    param chunk. A span carrying its own hyper-parameters (its parameter group's) uses them, else
    `hyper`. `multiplier` (unscale/clip) lives where the flats do. With `scratch` (host) the spans
    go in pieces of its size; without (device) each span is one kernel call."""
    for begin, end, step_number, *own in spans:
        span_hyper = own[0] if own else hyper
        _adam_span(flats, begin, end, step_number, span_hyper, multiplier, scratch)


def _adam_span(flats: GroupFlats, begin: int, end: int, step_number: int, hyper: AdamHyper,
               multiplier: torch.Tensor | None, scratch: HostScratch | None) -> None:
    kernel = torch._fused_adamw_ if hyper.decoupled else torch._fused_adam_
    step = torch.full((), float(step_number), dtype=torch.float32, device=flats.master.device)
    piece = end - begin if scratch is None else scratch.numel
    for lo in range(begin, end, piece):
        hi = min(lo + piece, end)
        grad = _fp32_gradient(flats.grad[lo:hi], multiplier, scratch)
        kernel([flats.master[lo:hi]], [grad], [flats.exp_avg[lo:hi]], [flats.exp_avg_sq[lo:hi]],
               [], [step], lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2,
               weight_decay=hyper.weight_decay, eps=hyper.eps, amsgrad=False, maximize=False)
        flats.param[lo:hi].copy_(flats.master[lo:hi])  # the new compute weights (a cast)


def adam_on_device_spans(flats: GroupFlats, spans: list[Span], multiplier: torch.Tensor | None,
                         dense: bool, step_tensors: dict[int, torch.Tensor] | None = None) -> None:
    """One device group's step in a few kernel calls: `adam_on_device_groups` for it alone, with
    its fp32 gradients in a buffer of their own."""
    adam_on_device_groups([(flats, spans, dense)], multiplier, None, {} if step_tensors is None else step_tensors)


def adam_on_device_groups(items: list[tuple[GroupFlats, list[Span], bool]], multiplier: torch.Tensor | None,
                          scratch: torch.Tensor | None, step_tensors: dict[int, torch.Tensor]) -> None:
    """Device groups' Adam step in a handful of kernel calls, whatever their number of groups and
    spans. `items`: (flats, spans, dense) per group; `dense`: every tensor in the span range got a
    gradient, so the range holds only gradients and zero padding and is read in one piece.

    The compute-dtype gradients are cast into `scratch` (fp32, room for all; None: allocated here)
    by one foreach copy (fp32 gradients are used where they are), multiplied by one foreach multiply
    (unscale/clip), stepped by one multi-tensor fused call per (step number, hyper-parameters), and
    the new masters copied into the param chunks by one foreach copy. Elementwise the same arithmetic
    as `adam_on_spans`, so the same numbers. `step_tensors` (step number -> its device scalar) lets
    the calls of one step share them."""
    ranges = []  # (flats, begin, end): the gradient pieces, each read once
    for flats, spans, dense in items:
        if spans:
            ranges += [(flats, spans[0][0], spans[-1][1])] if dense else [(flats, b, e) for b, e, *_ in spans]
    if not ranges:
        return
    sources = [flats.grad[begin:end] for flats, begin, end in ranges]
    grads = sources
    if sources[0].dtype != torch.float32:
        sizes = [end - begin for _, begin, end in ranges]
        if scratch is None:
            scratch = torch.empty(sum(sizes), dtype=torch.float32, device=sources[0].device)
        grads = list(scratch[:sum(sizes)].split(sizes))
        torch._foreach_copy_(grads, sources)
    if multiplier is not None:
        torch._foreach_mul_(grads, multiplier)  # in place, as clip_grad_norm_ does
    calls: dict[tuple, list[list[torch.Tensor]]] = {}
    pieces = iter(zip(ranges, grads))
    for flats, spans, dense in items:
        if not spans:
            continue
        if dense:
            (_, lo, _), whole = next(pieces)
            span_grads = [whole[begin - lo:end - lo] for begin, end, *_ in spans]
        else:
            span_grads = [next(pieces)[1] for _ in spans]
        for (begin, end, step_number, hyper), grad in zip(spans, span_grads):
            lists = calls.setdefault((step_number, hyper), [[], [], [], []])
            for target, tensor in zip(lists, (flats.master[begin:end], grad, flats.exp_avg[begin:end],
                                              flats.exp_avg_sq[begin:end])):
                target.append(tensor)
    for (step_number, hyper), lists in calls.items():
        _fused_call(hyper, step_number, lists, step_tensors)
    torch._foreach_copy_([flats.param[begin:end] for flats, begin, end in ranges],
                         [flats.master[begin:end] for flats, begin, end in ranges])


def _fused_call(hyper: AdamHyper, step_number: int, lists: list[list[torch.Tensor]],
                step_tensors: dict[int, torch.Tensor]) -> None:
    """One multi-tensor fused Adam/AdamW call over (masters, grads, exp_avgs, exp_avg_sqs)."""
    masters, grads, exp_avgs, exp_avg_sqs = lists
    kernel = torch._fused_adamw_ if hyper.decoupled else torch._fused_adam_
    step = step_tensors.get(step_number)
    if step is None:
        step = step_tensors[step_number] = torch.full((), float(step_number), dtype=torch.float32,
                                                      device=masters[0].device)
    kernel(masters, grads, exp_avgs, exp_avg_sqs, [], [step] * len(masters), lr=hyper.lr,
           beta1=hyper.beta1, beta2=hyper.beta2, weight_decay=hyper.weight_decay, eps=hyper.eps,
           amsgrad=False, maximize=False)


class DeviceAdamPlan:
    """`adam_on_device_groups`' tensor lists for dense groups with fp32 gradients whose buffers
    never move (a settled run's), built once: a step then issues its kernels without slicing
    each span's buffers again (a few hundred spans with two parameter groups).

    `items`: (flats, spans) per group, spans as (begin, end, tensors). Each fused call keeps its
    first tensor, whose step count and parameter group give the call's step number and
    hyper-parameters at every step: a dense group steps all its tensors together, so spans that
    shared a step count still do. The arithmetic is `adam_on_device_groups`' element for element."""

    def __init__(self, items: list[tuple[GroupFlats, list[tuple[int, int, list]]]]):
        self.spans_lists = [spans for _, spans in items]  # held: identity says the plan still applies
        self.grads, self.params, self.masters = [], [], []
        calls: dict[tuple[int, int], list] = {}
        for flats, spans in items:
            lo, hi = spans[0][0], spans[-1][1]
            self.grads.append(flats.grad[lo:hi])  # dense: gradients and zero padding only
            self.params.append(flats.param[lo:hi])
            self.masters.append(flats.master[lo:hi])
            for begin, end, infos in spans:
                first = infos[0]
                call = calls.setdefault((first.num_steps, first.param_group), [first, [], [], [], []])
                for target, flat in zip(call[1:], (flats.master, flats.grad, flats.exp_avg, flats.exp_avg_sq)):
                    target.append(flat[begin:end])
        self.calls = list(calls.values())

    def matches(self, spans_lists: list) -> bool:
        return (len(spans_lists) == len(self.spans_lists)
                and all(mine is theirs for mine, theirs in zip(self.spans_lists, spans_lists)))

    def run(self, hypers: list[AdamHyper], multiplier: torch.Tensor | None,
            step_tensors: dict[int, torch.Tensor]) -> None:
        if multiplier is not None:
            torch._foreach_mul_(self.grads, multiplier)  # in place, as clip_grad_norm_ does
        for first, *lists in self.calls:
            _fused_call(hypers[first.param_group], first.num_steps + 1, lists, step_tensors)
        torch._foreach_copy_(self.params, self.masters)


class MastersPlan:
    """A settled fp32 run's Adam step as torch.optim takes it (engine/hooks.py
    SETTLED_PARAMS_AS_MASTERS): one fused call per (step count, parameter group) over the
    parameters' views in their param chunks (which are the masters), the gradients autograd left in
    `.grad`, and the moments' views. The views are made once, for the parameters that had a
    gradient when the plan was built; a step whose parameters with a gradient are exactly those
    (`matches`) keeps it. As in DeviceAdamPlan, each call's step number and hyper-parameters are
    read from its first tensor at every step."""

    def __init__(self, infos: list[TensorInfo], flats_of: Callable[[ChunkGroup], GroupFlats]):
        self.infos = infos
        calls: dict[tuple[int, int], list] = {}
        for index, info in enumerate(infos):
            flats = flats_of(info.group)
            call = calls.setdefault((info.num_steps, info.param_group), [info, [], [], [], []])
            call[1].append(index)
            for target, flat in zip(call[2:], (flats.master, flats.exp_avg, flats.exp_avg_sq)):
                target.append(info.view_of(flat))
        self.calls = list(calls.values())

    def matches(self, infos: list[TensorInfo]) -> bool:
        return len(infos) == len(self.infos) and all(a is b for a, b in zip(infos, self.infos))

    def run(self, grads: list[torch.Tensor], hypers: list[AdamHyper], multiplier: torch.Tensor | None,
            step_tensors: dict[int, torch.Tensor]) -> None:
        if multiplier is not None:
            torch._foreach_mul_(grads, multiplier)  # in place, as clip_grad_norm_ does
        for first, indices, masters, exp_avgs, exp_avg_sqs in self.calls:
            _fused_call(hypers[first.param_group], first.num_steps + 1,
                        [masters, [grads[i] for i in indices], exp_avgs, exp_avg_sqs], step_tensors)


def _fp32_gradient(grad: torch.Tensor, multiplier: torch.Tensor | None,
                   scratch: HostScratch | None) -> torch.Tensor:
    """The kernel wants fp32 gradients like the masters; a compute-dtype gradient is cast into a
    copy, where the multiplier is applied too; an fp32 one is used where it is."""
    if grad.dtype == torch.float32:
        if multiplier is not None:
            grad.mul_(multiplier)  # in place, as clip_grad_norm_ does: the chunk's gradients are consumed
        return grad
    if scratch is None:
        out = torch.empty(grad.numel(), dtype=torch.float32, device=grad.device)
    else:
        out = scratch.take(grad.numel())
    out.copy_(grad)
    if multiplier is not None:
        out.mul_(multiplier)
    return out


# ---- the worker ------------------------------------------------------------------------------

@dataclass(eq=False)
class HostJob:
    group: ChunkGroup
    flats: GroupFlats  # host buffers
    spans: list[Span]
    hyper: AdamHyper | None  # None: every span carries its parameter group's
    multiplier: torch.Tensor | None  # on the host
    grads_ready: list  # CUDA events of the copies bringing the gradients and multiplier (none on a CPU)
    upload: Chunk | None  # copy this chunk's host buffer into its device buffer afterwards
    upload_after: object = None  # CUDA event: the compute stream's last use of that buffer
    seconds: float = 0.0  # the worker's time on this job


class HostAdamWorker:
    """One thread that runs host jobs in submission order, with `num_threads` intra-op threads."""

    def __init__(self, copier: Copier, num_threads: int, piece_elements: int = HOST_PIECE_ELEMENTS):
        self._copier = copier
        self._num_threads = num_threads
        self._scratch = HostScratch(piece_elements)
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, job: HostJob) -> Future:
        if self._executor is None:  # a thread only for engines that have host groups
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pstar-host-adam",
                                                initializer=self._start_thread)
        return self._executor.submit(self._run, job)

    def _start_thread(self) -> None:
        if self._copier.is_cuda:
            torch.cuda.set_device(self._copier.device)  # the current device is per thread
        # Per thread with OpenMP: the caller's own intra-op threads are left as they are.
        torch.set_num_threads(self._num_threads)

    @torch.no_grad()
    def _run(self, job: HostJob) -> None:
        start = time.perf_counter()
        for event in job.grads_ready:
            event.synchronize()  # releases the GIL while the download finishes
        adam_on_spans(job.flats, job.spans, None, job.multiplier, self._scratch)
        if job.upload is not None:
            self._copier.upload_into_place(job.upload, job.upload_after)
        job.seconds = time.perf_counter() - start


# ---- when host groups start, and their books ---------------------------------------------------

@dataclass
class HostStepReport:
    """What the host updates of the last step did (chunk_stats)."""

    num_downloaded_in_backward: int = 0  # host groups whose gradients started down in backward
    num_after_step: int = 0  # host groups whose update was still running when step() returned
    num_redone: int = 0  # host updates computed twice (none: nothing is speculated)
    num_streamed: int = 0  # host groups the device stepped over streamed state (engine/streamed_adam.py)


# Parameters per second that host Adam and the streamed device step are first assumed to manage
# (measured on the H200 machine inside a step: about 2.4 G and 4 G); each step's own measurement
# then takes over.
FIRST_HOST_RATE = 2.5e9
FIRST_STREAM_RATE = 4.0e9


@dataclass
class HostUpdates:
    """The host groups of the optimizer steps: their transfers, their jobs and their books.

    In place (`keep_resident`, chosen at placement when every param chunk fits the device next to
    the activations and the device's optimizer groups): a host group's param chunk stays on the
    device; its gradients are copied down into its pinned host buffer and the new weights copied
    back up into the same device buffer, so the next forward finds it in place. The chunk is pinned
    meanwhile (never evicted, never handed to another use). Otherwise the param chunk is evicted
    (its gradients go down with it) and the next forward fetches it once its job is done.
    """

    copier: Copier
    manager: "ChunkManager"
    spans_of: Callable[[ChunkGroup], list[Span]]
    worker: HostAdamWorker
    streamer: "StreamedAdam | None" = None  # steps some host groups on the device (None: off)
    keep_resident: bool = False
    stream_on_cpu: bool = False  # tests: stream on a CPU "device" too (the arithmetic, not the overlap)
    _expected: dict[int, int] = field(default_factory=dict)  # id(group) -> gradients completing it
    _arrived: dict[int, int] = field(default_factory=dict)
    _in_place: dict[int, ChunkGroup] = field(default_factory=dict)  # pinned, gradients going down
    _jobs: dict[int, tuple[HostJob, Future]] = field(default_factory=dict)  # submitted, not waited for
    num_started_in_backward: int = 0
    _host_groups: list[ChunkGroup] = field(default_factory=list)  # forward order
    _streamed: set[int] = field(default_factory=set)  # id(group): the device steps it this step
    _streamed_last: list[ChunkGroup] = field(default_factory=list)  # streamed in this step()
    rates: list[float] = field(default_factory=lambda: [FIRST_HOST_RATE, FIRST_STREAM_RATE])  # for the split
    measured_rates: list[float] = field(default_factory=lambda: [0.0, 0.0])  # the last measured (0: none yet)
    _host_done: list[float] = field(default_factory=lambda: [0.0, 0.0])  # (elements, seconds) waited for
    last_report: HostStepReport = field(default_factory=HostStepReport)
    busy_s: float = 0.0  # the worker's seconds on jobs waited for since the last take_seconds()
    wait_s: float = 0.0  # seconds callers waited for the worker, likewise

    def plan(self, groups: list[ChunkGroup], keep_resident: bool, start_in_backward: bool) -> None:
        """After placement: which host groups start their downloads during backward, and after how
        many gradients (every tensor of the group got one in the traced backward, so none of its
        weights is read after its last gradient; a frozen or unused tensor would still be read, or
        never complete the group)."""
        self.keep_resident = keep_resident
        self._expected = {}
        self._host_groups = [g for g in groups if g.trainable and not g.optimizer_on_device and not g.host_only]
        self._streamed = set()  # the first placed step runs on the host: the moments are made then
        if not start_in_backward:
            return
        for group in groups:
            if group.optimizer_on_device or group.host_only:
                continue
            if all(info.has_grad for info in group.tensors):
                self._expected[id(group)] = len(group.tensors)

    # ---- during backward ---------------------------------------------------------------------

    def on_gradients(self, group: ChunkGroup, count: int) -> bool:
        """Count `count` gradients written into the group's chunk; True when that completes it."""
        expected = self._expected.get(id(group))
        if expected is None or id(group) in self._streamed:
            return False  # (a streamed group's gradients stay on the device)
        before = self._arrived.get(id(group), 0)
        self._arrived[id(group)] = before + count
        return before < expected <= before + count

    def start_in_backward(self, group: ChunkGroup) -> bool:
        """Start the download of a complete group's gradients; False if its chunk was evicted
        meanwhile (it goes down in step()). With gradient accumulation (called in the last
        micro-batch's backward only) the fp32 grad chunk is evicted: its download starts now."""
        if group.grad is not None:
            if group.grad.location is not Location.DEVICE or not group.grad.movable:
                return False
            self.manager.move_to_host(group.grad)
            self.num_started_in_backward += 1
            return True
        if group.param.location is not Location.DEVICE or id(group) in self._in_place:
            return False
        self._download_in_place(group)
        self.num_started_in_backward += 1
        return True

    # ---- in step() -----------------------------------------------------------------------------

    def streams(self, group: ChunkGroup) -> bool:
        """Whether the device steps this group now: chosen for this step, and its gradients are
        still in its device param chunk (nothing evicted it)."""
        return (id(group) in self._streamed and group.grad is None and id(group) not in self._in_place
                and group.param.location is Location.DEVICE)

    def stream(self, groups: list[ChunkGroup], multiplier: torch.Tensor | None) -> None:
        """Step these host groups on the device over their streamed state (engine/streamed_adam.py),
        after the compute stream's current point; their step counts advance now."""
        self.streamer.begin_step(self.copier.compute_point())
        for group in groups:
            self.streamer.step_group(group, self.spans_of(group), multiplier)
            for info in group.tensors:
                if info.has_grad:
                    info.num_steps += 1
        self.streamer.end_step()
        self._streamed_last = list(groups)

    def send_to_host(self, group: ChunkGroup) -> None:
        """Start moving a group's gradients to the host (if backward has not already)."""
        if id(group) in self._in_place:
            return
        chunk = group.grad_chunk
        if self.keep_resident and chunk is group.param and chunk.location is Location.DEVICE:
            self._download_in_place(group)
            return
        for chunk in _unique((group.grad_chunk, group.param)):
            self.manager.move_to_host(chunk)  # evicted: an async download if it changed

    def submit(self, group: ChunkGroup, multiplier: torch.Tensor | None, multiplier_ready=None) -> None:
        """Queue the group's update; its step counts advance now (the spans carry the numbers).
        `multiplier` is a host tensor, written by a copy that `multiplier_ready` (CUDA) marks."""
        assert id(group) not in self._jobs, "a group's previous update must be waited for first"
        in_place = id(group) in self._in_place
        # The gradients coming down, and the state if the device streamed it back last step
        chunks = _unique((group.grad_chunk, group.param, *group.optimizer_chunks))
        job = HostJob(
            group=group,
            flats=GroupFlats(group.grad_chunk.host_flat, group.param.host_flat, group.master.host_flat,
                             group.exp_avg.host_flat, group.exp_avg_sq.host_flat),
            spans=self.spans_of(group), hyper=None, multiplier=multiplier,
            grads_ready=[c.host_ready_event for c in chunks if c.host_ready_event is not None]
            + ([multiplier_ready] if multiplier_ready is not None else []),
            upload=group.param if in_place else None,
            upload_after=self.copier.compute_point() if in_place else None)
        for info in group.tensors:  # as the device path counts (several ranks: every tensor)
            if info.has_grad:
                info.num_steps += 1
        self._jobs[id(group)] = (job, self.worker.submit(job))

    def end_step(self, wait: bool) -> None:
        """step() returns: what is still running finishes during the next forward (or is waited for
        now, `wait`); downloads that began in backward are all in jobs by now."""
        streamed, self._streamed_last = self._streamed_last, []
        if wait:
            self.finish()
            for group in streamed:  # its state back on the host (its weights are on the device by then)
                for chunk in group.optimizer_chunks:
                    self.copier.wait_downloaded(chunk)
        self.last_report = HostStepReport(num_downloaded_in_backward=self.num_started_in_backward,
                                          num_after_step=len(self._jobs) + (0 if wait else len(streamed)),
                                          num_streamed=len(streamed))
        self._in_place.clear()
        self._arrived.clear()
        self.num_started_in_backward = 0
        self._choose_streamed()

    def _choose_streamed(self) -> None:
        """Which host groups the device steps next step: in forward order, each goes where it would
        finish first at the rates measured so far, so both finish together and in about the order
        the next forward needs them. Off unless the param chunks stay on the device (CUDA, one rank:
        placement's in-place mode)."""
        self._streamed = set()
        for which, (numel, seconds) in enumerate((self._host_done,
                                                  self.streamer.measured() if self.streamer else (0, 0.0))):
            if seconds > 0:
                self.measured_rates[which] = numel / seconds
                self.rates[which] = 0.5 * self.rates[which] + 0.5 * numel / seconds
        self._host_done = [0.0, 0.0]
        if self.streamer is None or not self.keep_resident or not (self.copier.is_cuda or self.stream_on_cpu):
            return
        host_rate, stream_rate = self.rates
        host_end = stream_end = 0.0
        for group in self._host_groups:
            if group.exp_avg.host_flat is None or not self.streamer.can_stream(group):
                host_end += group.numel / host_rate
            elif stream_end + group.numel / stream_rate <= host_end + group.numel / host_rate:
                stream_end += group.numel / stream_rate
                self._streamed.add(id(group))
            else:
                host_end += group.numel / host_rate

    def take_seconds(self) -> tuple[float, float]:
        """(worker busy, callers waiting) seconds since the last call."""
        seconds = (self.busy_s, self.wait_s)
        self.busy_s = self.wait_s = 0.0
        return seconds

    @property
    def running(self) -> bool:
        """Some submitted update is not waited for yet."""
        return bool(self._jobs)

    def pending(self, group: ChunkGroup) -> bool:
        return id(group) in self._jobs

    def wait_for(self, group: ChunkGroup) -> None:
        """The group's update is done and its books are settled (a no-op when none is running)."""
        entry = self._jobs.pop(id(group), None)
        if entry is None:
            return
        job, future = entry
        start = time.perf_counter()
        future.result()  # re-raises a failure of the worker
        self.wait_s += time.perf_counter() - start
        self.busy_s += job.seconds
        self._host_done[0] += sum(end - begin for begin, end, *_ in job.spans)
        self._host_done[1] += job.seconds
        for chunk in _unique((group.grad_chunk, group.param)):
            self.copier.wait_downloaded(chunk)  # long done: clears the event
        if job.upload is not None:
            self._release(job.upload)
            job.upload.dirty = False  # device and host copies hold the same new weights
            _count(self.manager, h2d=job.upload.nbytes)

    def finish(self) -> None:
        """Wait for every submitted update (in submission order, as the worker runs them). State the
        device streamed back needs no wait here: its chunks' `host_ready_event` makes every reader
        of it wait (`Copier.current_flat`, and the worker through a job's events)."""
        for job, _ in list(self._jobs.values()):
            self.wait_for(job.group)

    def cancel(self) -> None:
        """No update of this backward (fp16 overflow, zero_grad): gradients that went down in place
        are waited for and their chunks released; the caller restores the weights."""
        for group in self._in_place.values():
            self.copier.wait_downloaded(group.param)
            self._release(group.param)
        self._in_place.clear()
        self._arrived.clear()
        self.num_started_in_backward = 0

    # ---- helpers -----------------------------------------------------------------------------

    def _download_in_place(self, group: ChunkGroup) -> None:
        chunk = group.param
        self.copier.download(chunk)
        chunk.num_pins += 1  # owned by this update until its job is waited for, or cancel()
        self._in_place[id(group)] = group
        _count(self.manager, d2h=chunk.nbytes)

    def _release(self, chunk: Chunk) -> None:
        chunk.num_pins -= 1


def _unique(chunks) -> list[Chunk]:
    return list({id(c): c for c in chunks}.values())


def _count(manager, h2d: int = 0, d2h: int = 0) -> None:
    """Count a transfer in the chunk manager's totals (chunk_stats' step_* and total_* figures)."""
    totals = manager.totals
    totals.h2d_bytes += h2d
    totals.d2h_bytes += d2h
    totals.h2d_moves += h2d > 0
    totals.d2h_moves += d2h > 0
