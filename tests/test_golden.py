"""Golden losses: a change that should not touch numerics gives the same `configs/tiny.yaml` losses
to the bit (tests/golden/tiny_losses.json, made by tests/golden/make_golden.py at a reference commit).

Bitwise equality holds only on the CPU kind and torch build that made the file: another SIMD width or
BLAS build sums in another order. There the test skips and says how to make a file for that machine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"
spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
make_golden = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_golden)


def test_tiny_losses_are_bitwise_the_golden_ones(tmp_path):
    golden = json.loads((GOLDEN_DIR / "tiny_losses.json").read_text(encoding="utf-8"))
    here = make_golden.machine()
    if {k: golden[k] for k in here} != here:
        pytest.skip(f"golden losses were made on {golden['cpu']} / torch {golden['torch']}, this is "
                    f"{here['cpu']} / torch {here['torch']}: run tests/golden/make_golden.py at a reference commit")
    losses = make_golden.run_tiny(tmp_path / "run")
    assert len(losses) == golden["steps"]
    assert [float(x).hex() for x in losses] == golden["losses_hex"]
