"""The access schedule recorded in warm-up, and the eviction / prefetch choices made from it.

During the warm-up iteration every chunk access (a module about to run forward, an autograd node
reading a saved weight, a gradient written back) is one *moment*; consecutive accesses of the same
chunk are one moment. After warm-up each step is expected to repeat that order, so the distance to a
chunk's next use is known: Belady's rule evicts the resident chunk whose next use is farthest away,
and prefetch uploads the next chunk the schedule names before it is asked for.

What every access would otherwise work out again is worked out once per recording: the chunks of the
moments just ahead of each moment (prefetch), and, in engine/memory_tracer.py, each moment's budget.

A step that departs from the recorded order (data-dependent control flow) stays correct: the position
re-synchronises on the next matching access and, until then, the choices are merely less good.
"""

from __future__ import annotations

import bisect
import math

from engine.chunk import Chunk, ChunkKind

# How far ahead (in moments) a step may have jumped before the position is considered lost.
_RESYNC_WINDOW = 64


class AccessSchedule:
    def __init__(self) -> None:
        self.order: list[int] = []  # chunk id of each moment of one forward + backward
        self._uses: dict[int, list[int]] = {}  # chunk id -> moments that use it, ascending
        self.recording = False
        self.recorded = False
        self.position = -1  # moment of the latest access in the current forward + backward
        self._clock = 0  # warm-up only: LRU order when no schedule exists yet
        self._last_used: dict[int, int] = {}
        # Recorded: for a window of moments, the chunks of the moments after each one, without
        # repeats (`upcoming`), worked out once per recording instead of at every access.
        self._upcoming: dict[int, list[tuple[int, ...]]] = {}

    @property
    def num_moments(self) -> int:
        return len(self.order)

    def start_recording(self) -> None:
        self.recording = True
        self.order.clear()
        self.position = -1

    def finish_recording(self) -> None:
        if not self.recording:
            return
        self.recording = False
        self.recorded = True
        self._uses = {}
        self._upcoming = {}
        for moment, chunk_id in enumerate(self.order):
            self._uses.setdefault(chunk_id, []).append(moment)

    def forget(self) -> None:
        """Drop the recording (the layout changed): the next forward records a new warm-up."""
        self.order.clear()
        self._uses = {}
        self._upcoming = {}
        self.recording = False
        self.recorded = False
        self.position = -1
        self._last_used.clear()

    def restart(self) -> None:
        """A new forward begins: the next access is moment 0 again."""
        self.position = -1

    def on_access(self, chunk_id: int) -> int:
        """Advance to the moment of this access (recording it during warm-up); returns the moment."""
        if self.recorded and not self.recording:
            self.position = self._resync(chunk_id)
            return self.position
        self._clock += 1
        self._last_used[chunk_id] = self._clock
        if self.recording:
            if not self.order or self.order[-1] != chunk_id:
                self.order.append(chunk_id)
            self.position = len(self.order) - 1
        return self.position

    def _resync(self, chunk_id: int) -> int:
        order, position = self.order, self.position
        if position + 1 < len(order) and order[position + 1] == chunk_id:
            return position + 1  # the step follows the recording (the common case)
        if 0 <= position < len(order) and order[position] == chunk_id:
            return position
        uses = self._uses.get(chunk_id)
        if not uses:
            return self.position
        i = bisect.bisect_right(uses, self.position)
        if i < len(uses) and uses[i] - self.position <= _RESYNC_WINDOW:
            return uses[i]
        return self.position

    def distance_to_next_use(self, chunk_id: int) -> float:
        """Moments until the chunk is used again (wrapping into the next step); inf if never."""
        if not self.recorded:
            # Warm-up: least recently used goes first, i.e. the longest ago looks farthest away.
            return float(self._clock - self._last_used.get(chunk_id, -10**9))
        uses = self._uses.get(chunk_id)
        if not uses:
            return math.inf
        i = bisect.bisect_right(uses, self.position)
        if i < len(uses):
            return uses[i] - self.position
        return uses[0] + len(self.order) - self.position

    def upcoming(self, max_moments: int) -> tuple[int, ...]:
        """Chunk ids of the next moments after the current one, in order, without repeats."""
        if not self.recorded or self.position < 0:
            return ()
        table = self._upcoming.get(max_moments)
        if table is None:
            table = self._upcoming[max_moments] = [self._distinct_after(moment, max_moments)
                                                   for moment in range(len(self.order))]
        return table[self.position] if self.position < len(table) else ()

    def _distinct_after(self, moment: int, max_moments: int) -> tuple[int, ...]:
        seen: list[int] = []
        for chunk_id in self.order[moment + 1:moment + 1 + max_moments]:
            if chunk_id not in seen:
                seen.append(chunk_id)
        return tuple(seen)

    def eviction_order(self, candidates: list[Chunk]) -> list[Chunk]:
        """Belady: the chunk whose next use is farthest away first; with several ranks, gathered
        chunks before all others. Dropping one costs nothing now and an all-gather later (over
        NVLink, about a millisecond for 128 MiB), while evicting a shard costs a copy down and one
        back up over PCIe (several times that): a shard's next use is often far (next step's
        gather), so plain Belady would evict the shards first."""
        return sorted(candidates, key=lambda c: (c.kind is ChunkKind.GATHERED,
                                                 self.distance_to_next_use(c.chunk_id)), reverse=True)
