"""Non-model memory per moment of the warm-up iteration, and the chunk budget derived from it.

Non-model data (activations, temporaries) grows through forward and shrinks through backward. The
warm-up iteration records, at every moment of the access schedule, the peak non-model memory since
the previous moment; from then on the chunks may use, at moment t,

    device budget - max(non_model[t], non_model[t + 1])

bytes of the device. During warm-up itself only `warmup_gpu_chunk_mem_ratio` of the budget is used.

How it is measured:
- CUDA: the caching allocator's peak (`max_memory_allocated`, reset at each moment) minus the chunk
  bytes resident on the device and minus what was allocated before the warm-up began (other
  models, the user's tensors; unreachable garbage is collected first). This is exact for
  everything torch allocates on the device, so no sampling thread is needed
  (`use_async_mem_monitor` is accepted for compatibility). An explicit `device_memory_limit`
  bounds pstar's own use; a budget taken as a share of the GPU's memory also leaves room for what
  others had allocated at warm-up.
- CPU: there is no allocator counter for the CPU, so we count what we can measure exactly: the bytes
  of the tensors autograd keeps for backward (deduplicated by storage), which dominate non-model
  memory. Temporaries that live only inside one operator are not seen.
"""

from __future__ import annotations

import gc

import torch


class _SavedActivation:
    """Wraps a tensor autograd saved for backward; tells the tracer when autograd lets go of it."""

    __slots__ = ("tensor", "_key", "_tracer")

    def __init__(self, tensor: torch.Tensor, key: int, tracer: "MemoryTracer"):
        self.tensor = tensor
        self._key = key
        self._tracer = tracer

    def __del__(self):
        self._tracer._release_saved(self._key)


class MemoryTracer:
    def __init__(self, device: torch.device, device_budget_bytes: int, warmup_ratio: float,
                 budget_shared_with_others: bool):
        self.device = device
        self.budget_shared_with_others = budget_shared_with_others
        self.outside_bytes = 0  # CUDA: bytes allocated by others when the warm-up began
        self.is_cuda = device.type == "cuda"
        self.device_budget_bytes = device_budget_bytes
        self.warmup_ratio = warmup_ratio
        self.non_model_bytes: list[int] = []  # per moment: peak non-model bytes since the previous one
        self.chunk_bytes_device: list[int] = []  # per moment: chunk bytes resident on the device
        self.tracing = False
        self.finished = False
        self._saved: dict[int, list[int]] = {}  # CPU: storage pointer -> [references, bytes]
        # Finished: the chunk budget of every moment, worked out once (`_moment_budgets`); dropped
        # whenever what it comes from changes (a new trace, the ranks' agreed figures)
        self._budgets: list[int] | None = None
        self._live_saved_bytes = 0
        self._peak_saved_bytes = 0

    @property
    def peak_non_model_bytes(self) -> int:
        return max(self.non_model_bytes, default=0)

    def start(self, device_chunk_bytes: int) -> None:
        self.tracing = True
        self._budgets = None
        self.non_model_bytes.clear()
        self.chunk_bytes_device.clear()
        if self.is_cuda:
            # Unreachable objects still holding device memory (a dropped model or engine in a reference
            # cycle) would count as outside here and, once the garbage collector runs during the
            # warm-up, make its peaks read that much low: they go first.
            gc.collect()
            self.outside_bytes = max(0, torch.cuda.memory_allocated(self.device) - device_chunk_bytes)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak_saved_bytes = self._live_saved_bytes

    def forget(self) -> None:
        """Drop the trace (the layout changed): the next forward traces a new warm-up."""
        self.tracing = False
        self._budgets = None
        self.finished = False
        self.non_model_bytes.clear()
        self.chunk_bytes_device.clear()

    def finish(self) -> None:
        self.tracing = False
        self._budgets = None
        self.finished = True

    def on_moment(self, moment: int, device_chunk_bytes: int) -> None:
        if not self.tracing or moment < 0:
            return
        non_model = self._measure(device_chunk_bytes)
        if moment == len(self.non_model_bytes):
            self.non_model_bytes.append(non_model)
            self.chunk_bytes_device.append(device_chunk_bytes)
        else:  # the same moment again (a repeated access): keep the worst case
            self.non_model_bytes[moment] = max(self.non_model_bytes[moment], non_model)

    def _measure(self, device_chunk_bytes: int) -> int:
        if self.is_cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return max(0, peak - device_chunk_bytes - self.outside_bytes)
        peak = self._peak_saved_bytes
        self._peak_saved_bytes = self._live_saved_bytes
        return peak

    def chunk_budget_bytes(self, moment: int | None) -> int:
        """Bytes the chunks may occupy on the device at `moment` (None: outside forward/backward)."""
        if moment is not None and self.finished and self.non_model_bytes:
            if self._budgets is None:
                self._budgets = self._moment_budgets()
            return self._budgets[min(max(moment, 0), len(self._budgets) - 1)]
        budget = self._whole_budget()
        return budget if self.finished else int(budget * self.warmup_ratio)

    def _whole_budget(self) -> int:
        budget = self.device_budget_bytes
        if self.budget_shared_with_others:
            budget -= self.outside_bytes
        return budget

    def _moment_budgets(self) -> list[int]:
        budget, measured = self._whole_budget(), self.non_model_bytes
        last = len(measured) - 1
        return [max(0, budget - max(measured[moment], measured[min(moment + 1, last)]))
                for moment in range(len(measured))]

    def agree(self, non_model_bytes: list[int]) -> None:
        """Replace the measured bytes per moment with those all ranks agreed on."""
        self.non_model_bytes[:] = non_model_bytes
        self._budgets = None

    def track_saved(self, tensor: torch.Tensor):
        """CPU warm-up: count a tensor autograd keeps for backward; returns what to store instead."""
        if self.is_cuda or not self.tracing:
            return tensor
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self._saved.get(key)
        if entry is None:
            self._saved[key] = [1, storage.nbytes()]
            self._live_saved_bytes += storage.nbytes()
            self._peak_saved_bytes = max(self._peak_saved_bytes, self._live_saved_bytes)
        else:
            entry[0] += 1
        return _SavedActivation(tensor, key, self)

    def _release_saved(self, key: int) -> None:
        entry = self._saved.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._saved[key]
            self._live_saved_bytes -= entry[1]

    def timeline(self) -> list[dict]:
        return [
            {
                "moment": moment,
                "non_model_bytes": non_model,
                "chunk_bytes_device": self.chunk_bytes_device[moment],
                "budget_bytes": self.chunk_budget_bytes(moment),
            }
            for moment, non_model in enumerate(self.non_model_bytes)
        ]
