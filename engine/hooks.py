"""The hooks that make chunks resident when torch needs them and take gradients into chunks.

- Module forward pre/post hooks: before a module runs, the chunks of its *direct* parameters are made
  resident and marked in use, one count per chunk for the tensors the module has in it (counts add
  up, so tied parameters and modules called twice work); afterwards the counts are taken back,
  exactly those the start hook took, however the forward ended (a refused forward raises halfway
  through a start hook; a KeyboardInterrupt skips torch's end hooks, and the engine model's forward
  gives back what they would have). The module's chunks and counts are worked out once per layout,
  so a hook does one thing per chunk.
- Saved-tensor hooks: a tensor autograd saves for backward that lives in a chunk (a weight, or a
  view such as `weight.t()`) is stored as a reference to its place in the chunk, not as the
  tensor. When backward unpacks it, the chunk is made resident and pinned for that autograd node,
  and the reference becomes a view of the chunk's buffer wherever it is now; a saved parameter is
  returned as itself, since a move points it at the chunk's current buffer in place. Chunks can
  therefore move between forward and backward. (Autograd skips its version check for tensors that
  go through these hooks, which is what lets gradients be written into a chunk while other tensors
  of it are still saved.) The warm-up forward runs wholly under these hooks and notes whether a
  tensor of a chunk was saved outside every module holding chunk parameters (a module handing out
  a view of its parameter). If none was, later forwards have the hooks only inside those modules:
  the outermost one pushes them at its start and pops them at its end, unless other saved-tensor
  hooks are active (activation checkpointing's, or the caller's around the whole forward, which
  keeps the hooks over the whole forward). Attention, activation functions and the loss then save
  their tensors as in plain PyTorch, without a call into Python per tensor.
- Post-accumulate-grad hooks: once a parameter's gradient is final for this backward (all its uses
  are done; tied parameters accumulate first), the hook takes it from `param.grad` and keeps it.
  Gradients arrive a chunk at a time, so they are written a chunk at a time (`_write_gradients`):
  into the param chunk in place of the weights (or added to the grad chunk with gradient
  accumulation), one foreach copy for the run of gradients of one chunk, once its last gradient
  arrives (or, where a tensor got none, when another chunk's gradient or saved tensor comes, or at
  the end of backward). A small run (biases, norms) whose chunk is not resident then is held to the
  end of backward instead of fetching the chunk, which with no room beside the chunk in use would
  evict the chunk whose gradients come next (`_defer_if_small`). The optimizer is told once per
  such run (`after_gradients`: it counts a host group's gradients, engine/host_adam.py). With
  several ranks each gradient is written at once over its weight in the gathered chunk, and the
  chunk manager reduces the chunk's gradients over ranks into this rank's shard once the chunk's
  backward is over.
- A callback queued on the autograd engine marks the end of each backward.
- Settled (`settle`, chosen by the optimizer after placement when nothing can move any more: one
  rank, every chunk resident on the device for good, every optimizer group on the device): the
  module and saved-tensor hooks are removed, since a chunk that never moves needs no fetch, no
  pin and no reference in place of a saved tensor, and each parameter's gradient hook is replaced
  by one bound to the gradient's fixed place in its chunk (a copy and a flag). What is left per
  step is one small hook per parameter; the check that a forward does not run over gradients
  still in place of weights moves to the start of the engine model's forward.
  On a GPU with room for the gradients beside the weights (`grad_chunks`), each trainable group
  gets an fp32 grad chunk instead and no gradient hook is left at all: autograd leaves each
  gradient in `.grad` as torch does (it hands over the tensor it computed, no copy, no kernel),
  and `step()` takes them into the grad chunk in one foreach cast, which is also device Adam's
  fp32 input. So backward issues exactly what plain PyTorch's does; the weights are never
  overwritten (a forward before `step()`, a second backward that accumulates, `.grad` read or
  changed by the user, `model.zero_grad()`: all as in torch). A `.grad` view into a chunk instead
  would make autograd add each new gradient into it, a kernel launch per parameter.
  With fp32 weights (`SETTLED_PARAMS_AS_MASTERS`, on any device) the fp32 master is the weight
  itself: each group's param chunk becomes its master (the master chunk is freed, which makes room
  for `.grad`) and step() is torch.optim's own: one fused Adam call over the parameters' views,
  the gradients in `.grad` and the moments' views, with no cast, no copy, no grad chunk.
- Compiled blocks (`compile_blocks`): settled, no engine hook runs inside a block, so each repeated
  block (every member of an nn.ModuleList) can be compiled whole by torch.compile, its backward
  included; the gradient hooks run after it, on the parameters' accumulators. Before settling the
  module hooks (locks, chunk moves) would break every block's graph into pieces, so the blocks are
  compiled only once settled.
- Reads outside the owning module's hooks: the warm-up forward runs under a torch-function mode that
  notices an engine parameter used while no module holding it is running (a parent calling
  `F.linear(x, self.wte.weight)`). Such a parameter's chunk is made resident right then (waiting
  for its upload or its host update), and from then on every forward makes it resident at its start
  and holds it until the forward ends, so no read ever sees a buffer still being written or a
  placeholder. The warm-up is then traced again in that order.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from engine.chunk import Chunk, ChunkGroup, Location, TensorInfo
from engine.chunk_manager import ChunkManager
from engine.device import to_device_without_sync
from engine.errors import EngineError


# How a settled run's gradients reach the optimizer (module doc): written over the weights by a
# hook per parameter; left in `.grad` and cast by step() into an fp32 grad chunk per group; or, with
# fp32 weights, left in `.grad` and used there, each param chunk being its group's master.
SETTLED_IN_PLACE = "in place"
SETTLED_GRAD_CHUNKS = "grad chunks"
SETTLED_PARAMS_AS_MASTERS = "params as masters"


class ChunkRef:
    """Where a saved tensor lives inside a chunk (element offsets within the chunk's buffer), and
    the parameter itself when that is what was saved (it is pointed at the chunk's buffer wherever
    the chunk is, so unpacking returns it and makes no view). A plain slotted class: one is made
    for every weight autograd saves, every step."""

    __slots__ = ("chunk", "storage_offset", "size", "stride", "param")

    def __init__(self, chunk: Chunk, storage_offset: int, size: torch.Size, stride: tuple[int, ...],
                 param: nn.Parameter | None = None):
        self.chunk, self.storage_offset, self.size, self.stride = chunk, storage_offset, size, stride
        self.param = param


class EngineHooks:
    def __init__(self, root: nn.Module, manager: ChunkManager, infos: dict[int, TensorInfo],
                 grad_accumulation: bool, compute_device: torch.device,
                 host_only_modules: list[nn.Module], on_backward_end: Callable[[], None],
                 first_used: list[TensorInfo]):
        self.root = root
        self.manager = manager
        self.infos = infos  # id(parameter) -> its TensorInfo
        self.grad_accumulation = grad_accumulation
        self.compute_device = compute_device
        self.host_only_modules = host_only_modules
        self.on_backward_end = on_backward_end
        self.first_used = first_used  # filled during the warm-up forward, in order of first use
        self._first_used_ids: set[int] = set()
        self._direct: dict[nn.Module, list[TensorInfo]] = {}
        self._plans: dict[nn.Module, tuple[int, list]] = {}  # see _by_chunk
        self._pinned: list[Chunk] = []
        self._pinned_node = None  # the autograd node the pinned chunks are pinned for
        # gradients of one grad chunk that arrived and are not written yet (_write_gradients)
        self._grads_chunk: Chunk | None = None
        self._grads: list[tuple[TensorInfo, torch.Tensor]] = []
        # runs of gradients held for the end of backward: their chunk was not resident and they are
        # small (_defer_if_small); at most DEFERRED_GRAD_BYTES in all
        self._deferred: list[tuple[Chunk, list[tuple[TensorInfo, torch.Tensor]]]] = []
        self._deferred_bytes = 0
        self._backward_end_queued = False
        self._handles: list = []
        self.read_outside: list[TensorInfo] = []  # parameters read outside their modules' hooks
        # Saved-tensor hooks only inside modules holding chunk parameters (saved_tensors_context):
        self.scoped = False  # this forward runs so
        self.saved_outside_modules = False  # a tensor in a chunk was saved outside them: never so
        # Modules holding chunk parameters whose forward is running, innermost last: for each, what
        # its start hook made in use, so that its end hook gives back exactly that (_pre_forward)
        self._running: list[list] = []
        self._scopes: list[int] = []  # len(_running) at each module that pushed the hooks
        self.retrace = False  # a read outside the hooks was found while the warm-up was traced
        self._held: list[TensorInfo] = []
        self._module_handles: list = []
        self._grad_handles: list = []
        self.settled = False  # nothing moves any more: the lean hooks only (module doc)
        self.grads_in_place = False  # settled: a backward wrote gradients that no step consumed yet
        self.compiled_blocks = 0
        # The optimizer's part of gradients' arrival (one rank, before settling): called with the
        # chunk group and how many gradients were just written into its chunk, under the lock.
        self.after_gradients: Callable[[ChunkGroup, int], None] | None = None
        self.settled_mode: str | None = None  # settled: one of the SETTLED_* ways below
        # settled with gradients left in .grad: (info, its place in the fp32 grad chunk, or None
        # where the step uses `.grad` itself) of every trainable parameter, in the model's
        # parameters() order (the norm's)
        self.grad_places: list[tuple[TensorInfo, torch.Tensor | None]] = []

    def discard_gradients(self) -> None:
        """Gradients since the last step are dropped (settled with gradients left in `.grad`: those,
        as torch's zero_grad does)."""
        for info, _ in self.grad_places:
            info.param.grad = None
        self.grads_in_place = False

    def take_gradients(self) -> tuple[list[TensorInfo], list[torch.Tensor]]:
        """Settled with gradients left in `.grad`: the parameters that have one and their gradients,
        in parameters() order, marked. With grad chunks the gradients are also cast into their
        places there by one foreach copy (the returned ones stay in the compute dtype, for the
        norm). `.grad` stays as it is, as torch.optim leaves it, until zero_grad() (a backward
        before that adds to it, as in torch). Dropping the gradients in step() instead freed them
        just before the next forward: on a CPU, glibc then gave that memory back to the system and
        the next backward faulted it in again (measured: 11 000 page faults, 8% of the wide
        overhead shape's backward, benchmarks/NOTES.md)."""
        infos, grads, places = [], [], []
        for info, place in self.grad_places:
            param = info.param
            grad = param.grad
            if grad is not None:  # (torch has checked its shape and dtype when it was set)
                infos.append(info)
                grads.append(grad)
                places.append(place)
                if not info._has_grad:
                    info.has_grad = True
        if grads and self.settled_mode == SETTLED_GRAD_CHUNKS:
            torch._foreach_copy_(places, grads)
        return infos, grads

    # ---- installation --------------------------------------------------------------------

    def install(self) -> None:
        for module in self.root.modules():
            infos = self._direct_infos(module)
            if not infos:
                continue
            self._direct[module] = infos
            self._module_handles.append(module.register_forward_pre_hook(self._pre_forward))
            self._module_handles.append(module.register_forward_hook(self._post_forward, always_call=True))
        for info in self._trainable_infos():
            self._grad_handles.append(info.param.register_post_accumulate_grad_hook(self._on_grad))
        for module in self.host_only_modules:
            self._handles.append(module.register_forward_pre_hook(self._inputs_to_host))
            self._handles.append(module.register_forward_hook(self._output_to_device))

    def _trainable_infos(self) -> list[TensorInfo]:
        unique = {id(info.param): info for info in self.infos.values() if info.requires_grad}
        return list(unique.values())

    def settle(self, order: list[TensorInfo], mode: str = SETTLED_IN_PLACE, compile_blocks: bool = False) -> None:
        """Nothing will move any more: drop the module and saved-tensor hooks; then, by `mode`,
        bind each gradient hook to its gradient's place, or leave gradients to autograd (module
        doc); then compile the blocks if asked. `order`: the parameters() order. With
        SETTLED_PARAMS_AS_MASTERS the caller has made each param chunk its group's master.
        `after_gradients` is not called from here on: settled, no host group waits for gradients."""
        for handle in self._module_handles + self._grad_handles:
            handle.remove()
        self._module_handles, self._grad_handles = [], []
        copier = self.manager.copier
        trainable = self._trainable_infos()
        if mode == SETTLED_GRAD_CHUNKS:
            for group in {id(info.group): info.group for info in trainable}.values():
                self.manager.add_settled_grad_chunk(group, torch.float32)
        if mode != SETTLED_IN_PLACE:  # no hook: autograd keeps each gradient in .grad (module doc)
            trainable = [info for info in order if info.requires_grad]
            self.grad_places = [(info, info.view_of(copier.current_flat(info.group.grad_chunk))
                                 if mode == SETTLED_GRAD_CHUNKS else None) for info in trainable]
        for info in trainable:
            chunk = info.group.grad_chunk
            assert chunk.pinned_forever and chunk.location is Location.DEVICE, f"{chunk} may still move"
            if mode == SETTLED_IN_PLACE:
                hook = _SettledGradient(self, info, info.region_of(copier.current_flat(chunk)))
                self._grad_handles.append(info.param.register_post_accumulate_grad_hook(hook))
        self.settled = True
        self.settled_mode = mode
        if compile_blocks:
            self.compiled_blocks = compile_repeated_blocks(self.root)

    def refuse_forward_over_gradients(self) -> None:
        """Settled: a forward may not compute with gradients sitting where the weights belong."""
        if self.grads_in_place and not self.grad_places:
            pending = [info for info in self.infos.values() if info.has_grad]
            self._refuse_pending_grads(pending[0].group.working, pending[:1])

    def _direct_infos(self, module: nn.Module) -> list[TensorInfo]:
        infos: list[TensorInfo] = []
        for param in module._parameters.values():
            info = self.infos.get(id(param)) if param is not None else None
            if info is not None and info not in infos:
                infos.append(info)
        return infos

    def saved_tensors_context(self):
        """The engine model's forward runs in this: the saved-tensor hooks over the whole forward,
        or, once the warm-up has shown that every tensor in a chunk autograd saves is saved inside
        a module holding chunk parameters, only inside those (`_ScopedSavedTensors`, module doc)."""
        if self.settled:
            return contextlib.nullcontext()
        schedule = self.manager.schedule
        if (schedule.recorded and not schedule.recording  # (the tracer traces while it records)
                and not self.read_outside and not self.saved_outside_modules
                and _top_saved_tensors_hooks(False) is None):
            return _ScopedSavedTensors(self)
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    # ---- parameters read outside their modules' hooks --------------------------------------

    def outside_reads_context(self):
        """The warm-up forward's watch for parameters read outside their modules' hooks."""
        if not self.manager.schedule.recording:
            return contextlib.nullcontext()
        return _OutsideReadWatch(self)

    def hold_outside_reads(self) -> None:
        """Forward start: the chunks of parameters read outside hooks, resident and held."""
        if self.settled:
            return  # resident for good
        with self.manager.lock:
            for info in self.read_outside:
                self._hold(info)

    def release_outside_reads(self) -> None:
        with self.manager.lock:
            for info in self._held:
                info.end_compute()
            self._held.clear()

    def note_reads(self, tensors) -> None:
        """Called by the watch with an op's tensor arguments."""
        for tensor in tensors:
            if not isinstance(tensor, nn.Parameter):
                continue
            info = self.infos.get(id(tensor))
            if info is None or info.num_users > 0 or info in self.read_outside:
                continue
            with self.manager.lock:
                self.read_outside.append(info)
                self.retrace = True
                self._hold(info)

    def _hold(self, info: TensorInfo) -> None:
        self.manager.access(info.group.working)
        info.start_compute()
        self._held.append(info)

    # ---- forward -------------------------------------------------------------------------

    def _pre_forward(self, module: nn.Module, args) -> None:
        # [module, its chunks, how many of them this call made in use, whether it counted users]:
        # pushed first, so that however this hook ends (a refused forward raises halfway) the end
        # hook gives back exactly what was taken
        entry = [module, (), 0, False]
        self._running.append(entry)
        infos = self._direct[module]
        manager = self.manager
        if self.scoped and _top_saved_tensors_hooks(False) is None:
            # the outermost module holding chunk parameters: its saves go through the hooks
            _push_saved_tensors_hooks(self._pack, self._unpack)
            self._scopes.append(len(self._running))
        with manager.lock:
            recording = entry[3] = manager.schedule.recording
            if recording:
                self._note_first_use(infos)
            plan = entry[1] = self._by_chunk(module, infos)
            for chunk, in_chunk in plan:
                if not self.grad_accumulation and chunk.group.num_grads:
                    self._refuse_pending_grads(chunk, in_chunk)
                manager.access(chunk)
                # In use right away, so fetching the module's next chunk cannot evict this one:
                # counted once per chunk; per tensor only while the warm-up watches for reads
                # outside the hooks (note_reads)
                chunk.num_tensors_in_compute += len(in_chunk)
                if recording:
                    for info in in_chunk:
                        info.num_users += 1
                entry[2] += 1

    def _by_chunk(self, module: nn.Module, infos: list[TensorInfo]) -> list[tuple[Chunk, list[TensorInfo]]]:
        """The module's direct parameters by param chunk, in order of first appearance; kept until
        the chunk layout changes (a re-packing gives the tensors new groups)."""
        cached = self._plans.get(module)
        if cached is not None and cached[0] == self.manager.layout_version:
            return cached[1]
        by_chunk: dict[Chunk, list[TensorInfo]] = {}
        for info in infos:
            by_chunk.setdefault(info.group.working, []).append(info)
        plan = list(by_chunk.items())
        self._plans[module] = (self.manager.layout_version, plan)
        return plan

    def _note_first_use(self, infos: list[TensorInfo]) -> None:
        if not self.first_used:  # a new warm-up began (the runtime emptied the list)
            self._first_used_ids.clear()
        for info in infos:
            if id(info) not in self._first_used_ids:
                self._first_used_ids.add(id(info))
                self.first_used.append(info)

    def _post_forward(self, module: nn.Module, args, output) -> None:
        running = self._running
        if not running or running[-1][0] is not module:
            return  # this call's start hook never ran (an earlier hook of the module raised)
        self._end_innermost_module()

    def _end_innermost_module(self) -> None:
        """The innermost running module's end: the saved-tensor hooks it pushed popped, and what
        its start hook made in use (its entry in `_running`) given back."""
        running = self._running
        if self._scopes and self._scopes[-1] == len(running):
            self._scopes.pop()
            _pop_saved_tensors_hooks()
        _, plan, made, recording = running.pop()
        with self.manager.lock:
            for chunk, in_chunk in (plan if made == len(plan) else plan[:made]):
                chunk.num_tensors_in_compute -= len(in_chunk)
                if recording:
                    for info in in_chunk:
                        info.num_users -= 1

    def end_forward(self) -> None:
        """The engine model's forward is over, however it ended. torch runs the modules' end
        hooks on an Exception but not on a KeyboardInterrupt: what modules left in use then is
        given back here, and the saved-tensor hooks they pushed are popped."""
        while self._running:
            self._end_innermost_module()

    def _refuse_pending_grads(self, chunk: Chunk, infos: list[TensorInfo]) -> None:
        pending = [info.names[0] for info in infos if info.group.working is chunk and info.has_grad]
        if pending:
            raise EngineError(
                f"parameter '{pending[0]}' still holds the gradient of the last backward in place of "
                "its weight: call optimizer.step() or optimizer.zero_grad() after model.backward() "
                "and before the next forward, or set gradient_accumulation_steps to the number of "
                "backward passes per optimizer step"
            )

    def _inputs_to_host(self, module: nn.Module, args):
        # use_cpu_embedding: the table stays on the host, so the lookup runs there.
        return tuple(a.to("cpu") if isinstance(a, torch.Tensor) else a for a in args)

    def _output_to_device(self, module: nn.Module, args, output):
        # (B, T, C) activations: from pinned memory, so the forward does not wait for the GPU
        if isinstance(output, torch.Tensor):
            return to_device_without_sync(output, self.compute_device)
        return output

    # ---- saved tensors -------------------------------------------------------------------

    def _pack(self, tensor: torch.Tensor):
        """What autograd keeps for a tensor it saves: a ChunkRef for a tensor in a chunk, else the
        tensor itself (wrapped by the memory tracer while it counts them). Called for every saved
        tensor, activations included, so written for the activation's path: one lookup."""
        base = tensor._base
        info = self.infos.get(id(tensor if base is None else base))
        if info is not None:
            chunk = self._chunk_of_weight(info, tensor)
        elif tensor.requires_grad:
            chunk = None  # an activation
        else:
            chunk = self.manager.chunk_of(tensor)
        if chunk is not None:
            if not self._running:
                self.saved_outside_modules = True  # so the hooks stay over the whole forward
            return ChunkRef(chunk, tensor.storage_offset(), tensor.size(), tensor.stride(),
                            tensor if base is None and info is not None else None)
        tracer = self.manager.tracer
        return tracer.track_saved(tensor) if tracer.tracing else tensor

    def _chunk_of_weight(self, info: TensorInfo, tensor: torch.Tensor) -> Chunk | None:
        """The chunk of a saved parameter, or of an autograd view of it (`weight.t()`), if the
        tensor lives in the chunk's current buffer: a parameter of an evicted chunk points at a
        placeholder on CUDA instead, which must stay as it is and fail loudly.

        Any other tensor in a chunk's storage shares it without being a view (`.detach()`,
        `.data`) and so does not require grad; only those are looked up by storage (_pack), which
        for the many activations would cost a storage object each."""
        chunk = info.group.working
        flat = chunk.device_flat if chunk.location is Location.DEVICE else chunk.host_flat
        if (flat is None or tensor.dtype != chunk.dtype
                or not 0 <= tensor.data_ptr() - flat.data_ptr() < chunk.nbytes):
            return None
        return chunk

    def _unpack(self, packed):
        if type(packed) is not ChunkRef:
            tensor = getattr(packed, "tensor", None)  # the memory tracer's wrapper during warm-up
            return tensor if tensor is not None else packed
        chunk = packed.chunk
        manager = self.manager
        with manager.lock:
            pending = self._grads_chunk
            if pending is not None and pending is not chunk and not self._defer_if_small():
                self._write_gradients()  # before another chunk's fetch may evict that one
            self._pin_for_current_node(chunk)
            flat = manager.access(chunk)
        if packed.param is not None:
            return packed.param  # pointed at the buffer `access` made resident
        return flat.as_strided(packed.size, packed.stride, packed.storage_offset)

    def _pin_for_current_node(self, chunk: Chunk) -> None:
        """Keep `chunk` resident while the autograd node now running uses it."""
        if not self._backward_end_queued:
            self._queue_backward_end()
        if torch._C._current_autograd_node() is not self._pinned_node:
            self._switch_node()
        if not chunk.group.host_only:
            chunk.num_pins += 1
            self._pinned.append(chunk)

    def _switch_node(self) -> None:
        # Autograd runs one node at a time per device and unpacks its saved tensors first, so
        # a new current node means the previous one has finished with its chunks.
        node = torch._C._current_autograd_node()
        if node is not self._pinned_node:
            self._unpin_all()
            self._pinned_node = node

    def _unpin_all(self) -> None:
        for chunk in self._pinned:
            chunk.num_pins -= 1
        self._pinned.clear()
        self._pinned_node = None

    # ---- gradients -----------------------------------------------------------------------

    def _on_grad(self, param: nn.Parameter) -> None:
        info = self.infos[id(param)]
        grad = param.grad
        param.grad = None  # the chunk holds it from here on (once written; see _write_gradients)
        with self.manager.lock:
            if not self._backward_end_queued:
                self._queue_backward_end()
            group = info.group
            if group.gathered is not None:
                self._switch_node()
                self._write_grad_for_reduction(info, grad)
                return
            chunk = group.grad_chunk
            if chunk is not self._grads_chunk:
                if not self._defer_if_small():
                    self._write_gradients()
                self._grads_chunk = chunk
            grads = self._grads
            grads.append((info, grad))
            if len(grads) == group.num_trainable:
                # the chunk's last gradient: written at once, so that a host group's download
                # starts as soon as it can (unless a small run for a chunk not resident is held)
                if not self._defer_if_small():
                    self._write_gradients()

    def _defer_if_small(self) -> bool:
        """Hold the pending run of gradients for the end of backward, if its chunk is not resident
        and the run is small. Fetching the chunk for it would evict, where the budget has no room
        beside the chunk in use, the chunk whose gradients come next: a Linear whose bias went into
        the chunk after its weight's has its bias's gradient arrive first, and with the weight's
        chunk evicted for it that chunk is uploaded again for its own gradient. Held, the small
        run is written after backward, when there is room (measured on benchmarks.overhead's wide
        shape: each block's 4 MiB weight chunk uploaded twice in backward)."""
        chunk = self._grads_chunk
        if chunk is None or chunk.location is not Location.HOST or chunk.group.host_only:
            return False
        nbytes = sum(grad.numel() * grad.element_size() for _, grad in self._grads)
        if self._deferred_bytes + nbytes > DEFERRED_GRAD_BYTES:
            return False
        self._deferred.append((chunk, self._grads))
        self._deferred_bytes += nbytes
        self._grads_chunk, self._grads = None, []
        return True

    def _write_deferred(self) -> None:
        """The held runs written (lock held): after the pending one, each as its hook would have."""
        self._write_gradients()
        deferred, self._deferred, self._deferred_bytes = self._deferred, [], 0
        for chunk, grads in deferred:
            self._write_run(chunk, grads)

    def begin_forward(self) -> None:
        """The engine model's forward starts (outside any backward). A backward that raised never
        ran its end-of-backward callback: what it does for the hooks is done here (gradients kept
        by their hooks written as they would have been, pins let go), and the next backward queues
        a callback again."""
        if self._backward_end_queued and torch._C._current_autograd_node() is None:
            with self.manager.lock:
                self._backward_end_queued = False
                self._write_deferred()
                self._unpin_all()

    def write_pending_gradients(self) -> None:
        """Gradients kept by their hooks and not written yet (a backward that raised), written as
        their hooks would have: before step() or zero_grad() reads the chunks."""
        if self._grads_chunk is not None or self._deferred:
            with self.manager.lock:
                self._write_deferred()

    def _write_gradients(self) -> None:
        """The gradients that arrived for one grad chunk, written into it at once (lock held).

        Gradients arrive a chunk at a time (a chunk's tensors are neighbours in the model), so the
        hook of each parameter only keeps its gradient, and the chunk is fetched, the gradients
        copied (one foreach copy, or add over several backwards) and the optimizer told, once per
        run of gradients of one chunk: when the last of the chunk's gradients arrives, or else (a
        tensor without a gradient this time) when a gradient of another chunk arrives, before a
        saved tensor of another chunk is used, and at the end of backward. A gradient is final
        when its hook runs, so writing it later (over its weight, in the param chunk) is as safe as
        at once; what is kept meanwhile is at most one chunk's gradients, and the small runs held
        for the end of backward (`_defer_if_small`, at most DEFERRED_GRAD_BYTES)."""
        chunk, pending = self._grads_chunk, self._grads
        if chunk is None:
            return
        self._grads_chunk, self._grads = None, []
        self._write_run(chunk, pending)

    def _write_run(self, chunk: Chunk, pending: list[tuple[TensorInfo, torch.Tensor]]) -> None:
        """One run of gradients of `chunk` written into it (lock held; _write_gradients)."""
        self._switch_node()
        flat = self.manager.access(chunk)
        # The parameters of a param chunk are views of its buffer (the manager points them
        # there): written through them, no view is made per gradient. In a backward that builds
        # a graph (create_graph) a parameter may not be written in place: its region is.
        through_params = chunk is chunk.group.param and not torch.is_grad_enabled()
        copies: tuple[list, list] = ([], [])
        adds: tuple[list, list] = ([], [])
        for info, grad in pending:
            place = info.param if through_params else info.region_of(flat)
            if place.shape != grad.shape:
                grad = grad.reshape(place.shape)
            places, grads = adds if info._has_grad else copies
            places.append(place)
            grads.append(grad)
        if copies[0]:
            torch._foreach_copy_(*copies)
        if adds[0]:
            torch._foreach_add_(*adds)
        if chunk.location is Location.DEVICE:
            chunk.dirty = True
        for info, _ in pending:
            if not info._has_grad:
                info.has_grad = True
        if self.after_gradients is not None:
            self.after_gradients(chunk.group, len(pending))

    def _write_grad_for_reduction(self, info: TensorInfo, grad: torch.Tensor) -> None:
        """Several ranks: this rank's whole gradient goes over the weight in the gathered chunk
        (the weight's last use is over); the manager sums it over ranks into the shard."""
        region = info.region_of(self.manager.access(info.group.gathered))
        region.copy_(grad.reshape(-1))
        self.manager.note_gradient(info)

    def _queue_backward_end(self) -> None:
        if not self._backward_end_queued:
            self._backward_end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_finished)

    def _backward_finished(self) -> None:
        with self.manager.lock:
            self._backward_end_queued = False
            self._write_deferred()
            self._unpin_all()
        self.on_backward_end()


# At most this many bytes of gradients are held for the end of backward at once (_defer_if_small):
# biases and norms, never a weight's worth
DEFERRED_GRAD_BYTES = 1 << 20

# torch.compile's options for the blocks (tests use a backend that needs no C++ compiler)
COMPILE_OPTIONS: dict = {"fullgraph": True}


def compile_repeated_blocks(root: nn.Module) -> int:
    """torch.compile every member of every nn.ModuleList in place; returns how many."""
    blocks = [block for module in root.modules() if isinstance(module, nn.ModuleList) for block in module]
    for block in blocks:
        block.compile(**COMPILE_OPTIONS)
    return len(blocks)


class _SettledGradient:
    """A settled parameter's gradient hook: the gradient into its fixed place in the chunk."""

    __slots__ = ("hooks", "info", "region")

    def __init__(self, hooks: EngineHooks, info: TensorInfo, region: torch.Tensor):
        self.hooks, self.info, self.region = hooks, info, region

    def __call__(self, param: nn.Parameter) -> None:
        grad = param.grad
        param.grad = None
        hooks = self.hooks
        if not hooks._backward_end_queued:
            hooks._queue_backward_end()
        _accumulate(self.info, self.region, grad)  # a second backward before a step: refused at the next forward
        hooks.grads_in_place = True


def _accumulate(info: TensorInfo, place: torch.Tensor, grad: torch.Tensor) -> None:
    """A gradient into its place: copied if it is the first since the last step, else added."""
    if place.shape != grad.shape:
        grad = grad.reshape(place.shape)
    if info._has_grad:
        place.add_(grad)
    else:
        place.copy_(grad)
        info.has_grad = True


_top_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_push_saved_tensors_hooks = torch._C._autograd._push_saved_tensors_default_hooks
_pop_saved_tensors_hooks = torch._C._autograd._pop_saved_tensors_default_hooks


class _ScopedSavedTensors:
    """The engine model's forward with the saved-tensor hooks only inside the modules that hold
    chunk parameters: the outermost such module pushes them at its start and pops them at its
    end (only when no other saved-tensor hooks are active, such as activation checkpointing's).
    Tensors saved elsewhere (attention, activation functions, the loss) are activations, kept by
    autograd as in plain PyTorch, without a call into Python each."""

    def __init__(self, hooks: EngineHooks):
        self._hooks = hooks

    def __enter__(self) -> None:
        self._hooks.scoped = True

    def __exit__(self, *exc) -> None:
        self._hooks.scoped = False  # (EngineHooks.end_forward pops what a module left pushed)


class _OutsideReadWatch(TorchFunctionMode):
    """Sees every torch function of the warm-up forward and reports its tensor arguments.
    Attribute gets and sets (`.data`, `.grad`) are not reads of the values."""

    def __init__(self, hooks: EngineHooks):
        super().__init__()
        self._hooks = hooks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in ("__get__", "__set__"):
            self._hooks.note_reads(tree_leaves((args, kwargs)))
        return func(*args, **kwargs)
