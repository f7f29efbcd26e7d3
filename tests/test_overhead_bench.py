"""`python -m benchmarks.overhead` runs: tiny shapes, a few steps. The ratio it prints is a benchmark
figure, not asserted; what is asserted is that the shapes are what they say (moves or none)."""

from __future__ import annotations

import math

from benchmarks import overhead


def test_overhead_benchmark_runs_and_its_shapes_move_as_named(capsys):
    rows = overhead.main(["--steps", "2", "--warmup", "3", "--shapes", "tiny"])
    assert [(r["shape"], r["clipping"]) for r in rows] == [
        ("tiny, no moves", 0.0), ("tiny, no moves", 1.0), ("tiny, moves", 0.0), ("tiny, moves", 1.0)]
    for row in rows:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert (row["evictions_per_step"] > 0) == row["shape"].endswith(", moves"), row
    assert "pstar/plain" in capsys.readouterr().out
