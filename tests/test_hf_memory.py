"""Issue 14's bound, measured: loading a Hugging Face checkpoint through the engine grows host RSS by
at most 1.10x the chunk bytes init builds on the host (`chunk_stats()["init_host_bytes"]`).

`benchmarks/hf_14b.py` makes a random bf16 Llama checkpoint and, in a fresh process (so the
kernel's RSS high-water mark, ru_maxrss, is the run's own), measures RSS with psutil right before
`initialize_engine`, the peak during it (50 ms psutil samples and ru_maxrss, which also catches
shorter spikes) and the chunk bytes. The growth is compared, not the absolute RSS: torch and
transformers alone take ~400 MB before any model exists, which no model of a test's size could
hide within 10%. What the load adds beyond the chunks is one tensor's file bytes at a time (the
largest is the embedding) and the meta model's bookkeeping."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs the optional extra pstar[hf]")

REPO = Path(__file__).resolve().parents[1]
BOUND = 1.10


def measured_row(tmp_path: Path, size: str, steps: int) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / "hf_14b.py"), "--dir", str(tmp_path / size),
               "--size", size, "--steps", str(steps), "--batch", "1", "--seq-len", "16",
               "--chunk-elements", str(4 << 20)]
    # the bound is the host's, for chunks built on the CPU: GPUs hidden
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_bound(row: dict, min_chunk_bytes: int) -> None:
    assert row["init_host_bytes"] >= min_chunk_bytes  # the model is as big as the test says
    growth = row["host_peak_init_bytes"] - row["host_rss_before_init_bytes"]
    assert growth >= 0.9 * row["init_host_bytes"], "the chunks were built where RSS sees them"
    assert growth <= BOUND * row["init_host_bytes"], row


def test_loading_a_40m_checkpoint_stays_within_the_host_bound_and_trains(tmp_path):
    # 40M parameters: 320 MB of fp32 chunks on the CPU. The engine's own bookkeeping adds ~7 MB to
    # any init (a pstar model of this shape too), which is why the fast test is not smaller
    row = measured_row(tmp_path, "50m", steps=2)
    check_bound(row, 300 << 20)
    assert row["steps"] == 2 and row["step_s"] > 0 and row["model_tflops"] is not None


@pytest.mark.slow
def test_loading_a_300m_checkpoint_stays_within_the_host_bound(tmp_path):
    row = measured_row(tmp_path, "300m", steps=0)  # ~0.3B parameters: about 2.4 GB of chunks
    check_bound(row, 2 << 30)
