"""Writes tests/golden/tiny_losses.json: the losses of `configs/tiny.yaml` for 30 steps.

Run it only at a commit whose numerics are the reference (`.venv/bin/python tests/golden/make_golden.py`);
tests/test_golden.py then asserts that every later commit gives the same losses to the bit. The file
records the CPU and torch build it was made with: another CPU kind or torch build rounds differently.
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("tiny_losses.json")
NUM_STEPS = 30


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_tiny(output_dir: Path) -> list[float]:
    """The per-step losses of `pstar train configs/tiny.yaml` for NUM_STEPS steps, every step logged.

    In this process (CliRunner: the console script's boundary; a run seeds itself, so what ran
    before in the process does not matter), which spares the test a Python start and a torch import."""
    from typer.testing import CliRunner

    from pstar_cli.main import app

    result = CliRunner().invoke(app, ["train", str(REPO / "configs" / "tiny.yaml"), f"train.steps={NUM_STEPS}",
                                      "train.log_interval=1", "--output-dir", str(output_dir)])
    if result.exit_code != 0:
        raise RuntimeError(f"pstar train failed ({result.exit_code}):\n{result.output[-3000:]}") from result.exception
    with open(output_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def machine() -> dict[str, str]:
    return {"cpu": cpu_model(), "torch": torch.__version__}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        losses = run_tiny(Path(tmp) / "run")
    record = {"config": "configs/tiny.yaml", "steps": NUM_STEPS, **machine(),
              "losses_hex": [float(x).hex() for x in losses], "losses": losses}
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN} ({len(losses)} losses)")
