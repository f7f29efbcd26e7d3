"""`pstar profile`: report, memory timeline picture, Chrome trace, estimates next to measurements."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from rich.console import Console

from pstar_cli.commands.profile import print_report
from pstar_cli.config import load_config
from pstar_cli.observe.metrics import TIMING_KEYS
from pstar_cli.observe.profiler import run_profile, single_process_config
from pstar_cli.observe.svg import memory_timeline_svg, nice_ceiling
from tests.test_train import REPO, TINY, PlainEngineModel, needs_engine, plain_optimizer

MIB = 2**20


class TimedPlainEngineModel(PlainEngineModel):
    """The stand-in engine plus the engine's profiling interface (fixed, known numbers)."""

    def step_timings(self) -> dict[str, float]:
        return dict(zip(TIMING_KEYS, (0.010, 0.020, 0.003, 0.004, 0.001, 0.0007, 0.0005)))

    def memory_timeline(self) -> list[dict[str, int]]:
        return [
            {"moment": i, "non_model_bytes": (i % 5) * MIB, "chunk_bytes_device": 3 * MIB,
             "budget_bytes": 8 * MIB}
            for i in range(12)
        ]


@pytest.fixture
def timed_plain_engine(monkeypatch):
    import engine

    def initialize(model_func, local_rank=0, config=None, param_groups=None):
        module = model_func()
        return TimedPlainEngineModel(module), plain_optimizer(module, config, param_groups)

    monkeypatch.setattr(engine, "initialize_engine", initialize)
    monkeypatch.setattr("pstar_cli.training.run.compute_device", lambda local_rank, setting="auto": torch.device("cpu"))


def test_profile_writes_report_picture_and_trace(timed_plain_engine, tmp_path):
    cfg = load_config(TINY, ["model.size=gpt-tiny", "train.batch_size=2", "train.seq_len=32"])
    result = run_profile(cfg, tmp_path, num_steps=2)

    assert len(result.steps) == 2
    assert result.summary["time_split_s"]["backward"] == pytest.approx(0.020)
    # transfers and moves happen within the phases: not counted twice in what is left unaccounted
    phases = 0.010 + 0.020 + 0.003 + 0.004 + 0.0005
    assert result.summary["unaccounted_s"] == pytest.approx(max(0.0, result.summary["step_s"] - phases))
    assert result.summary["step_s"] > 0 and result.summary["tflops"] > 0
    assert result.summary["tokens_per_s"] == pytest.approx(2 * 32 / result.summary["step_s"])

    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["summary"]["step_s"] == pytest.approx(result.summary["step_s"])
    assert len(report["memory_timeline"]) == 12
    rows = {row["what"]: row for row in report["memory_check"]}
    activations = rows["activations (peak non-model data on the device)"]
    assert activations["measured_bytes"] == 4 * MIB and activations["estimate_bytes"] > 0
    host = rows["host peak (process RSS above its start)"]
    assert host["measured_bytes"] > 0 and host["estimate_bytes"] > 0

    svg = ET.fromstring((tmp_path / "memory_timeline.svg").read_text())  # well-formed XML
    lines = {p.get("data-series"): p for p in svg.iter("{http://www.w3.org/2000/svg}polyline")}
    assert set(lines) == {"non_model_bytes", "chunk_bytes_device", "device_total_bytes", "budget_bytes"}
    assert len(lines["budget_bytes"].get("points").split()) == 12

    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("aten::" in name for name in names)  # the traced step's operators

    console = Console(record=True, width=120, file=io.StringIO())
    print_report(result, console)
    text = console.export_text()
    for expected in ("TFLOPS", "optimizer on the host", "chunk transfers", "moving chunks", "waiting",
                     "moves per step", "measured / estimate", "memory_timeline.svg", "trace.json"):
        assert expected in text, expected


def test_an_engine_refusal_is_one_clear_message(monkeypatch, tmp_path):
    import engine
    from engine.errors import ModelTooLargeError
    from typer.testing import CliRunner

    from pstar_cli.main import app

    def refuse(model_func, local_rank=0, config=None, param_groups=None):
        raise ModelTooLargeError("the model's data needs 9 bytes but the budgets allow 2")

    monkeypatch.setattr(engine, "initialize_engine", refuse)
    monkeypatch.setattr("pstar_cli.training.run.compute_device", lambda local_rank, setting="auto": torch.device("cpu"))
    result = CliRunner().invoke(app, ["profile", str(TINY), "model.size=gpt-tiny", "train.seq_len=32",
                                      "--output-dir", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "error: the model's data needs 9 bytes but the budgets allow 2"
    assert "pstar estimate-memory" in lines[1] and len(lines) == 2


def test_svg_axis_and_an_empty_timeline():
    assert nice_ceiling(3 * MIB) == 5 * MIB
    assert nice_ceiling(1.2 * 2**30) == 2 * 2**30
    assert nice_ceiling(130 * 2**30) == 200 * 2**30
    empty = memory_timeline_svg([], "nothing")
    assert "the engine recorded no moments" in ET.tostring(ET.fromstring(empty), encoding="unicode")
    one = ET.fromstring(memory_timeline_svg([{"non_model_bytes": 5, "chunk_bytes_device": 1, "budget_bytes": 9}],
                                            "a <title> & more"))
    assert one.find("{http://www.w3.org/2000/svg}text").text == "a <title> & more"


def test_multi_rank_config_is_profiled_as_one_rank():
    cfg = load_config(TINY, ["distributed.nproc_per_node=2", "train.batch_size=8"])
    single, notes = single_process_config(cfg)
    assert single.world_size == 1 and single.train.batch_size == 4 and single.train.log_interval == 1
    assert notes and "2-rank" in notes[0]


@needs_engine
def test_pstar_profile_with_the_engine(tmp_path):
    """`pstar profile` with the real engine, in this process (CliRunner: the console script's boundary)."""
    from typer.testing import CliRunner

    from pstar_cli.main import app

    result = CliRunner().invoke(app, ["profile", str(TINY), "--steps", "2", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output[-3000:]
    assert "TFLOPS" in result.stdout and "measured / estimate" in result.stdout
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["memory_timeline"], "the engine recorded no warm-up moments"
    assert report["summary"]["traffic_per_step"]["step_h2d_moves"] > 0  # tiny.yaml forces chunk moves
    ET.fromstring((tmp_path / "memory_timeline.svg").read_text())
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert torch.tensor([s["step_s"] for s in report["steps"]]).min() > 0


@pytest.mark.gpu
def test_pstar_profile_on_a_gpu_traces_cuda_kernels(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pstar_cli", "profile", str(TINY), "engine.bf16.enabled=true", "--steps", "2",
         "--output-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["summary"]["device"].startswith("cuda")
    rows = {row["what"]: row for row in report["memory_check"]}
    assert rows["device peak (CUDA max allocated)"]["measured_bytes"] > 0
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert any(event.get("cat") == "kernel" for event in events)  # GPU kernels in the trace
