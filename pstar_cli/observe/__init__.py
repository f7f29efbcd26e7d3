"""What a run shows and writes: metrics.jsonl and memory readings (metrics), the live view and log
lines (live), `pstar profile` (profiler) and its memory picture (svg)."""
