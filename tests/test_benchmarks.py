"""The benchmark harness: its FLOPs formula, its rows and table, and how it survives failing cases.

The smoke tests run the real harness on CPU with gpt-tiny, each case in its own process as on the GPU
machine; failures are rehearsed through the test entry point tests/bench_faults.py.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import run as bench_run
from benchmarks.flops import gpt_num_params, tflops, train_flops_per_step
from benchmarks.launch import REPO_ROOT, CaseOutcome, classify, run_case_process
from benchmarks.report import build_row, fill_ratios, format_table, read_rows
from benchmarks import launch as bench_launch
from benchmarks.spec import CaseSpec
from tests.bench_faults import CASE_MODULE as FAULTY_CASE_MODULE
from tests.bench_faults import SIMULATE_ENV

ISSUE_FIELDS = ("system", "model", "batch", "seq", "step_s", "model_tflops", "hardware_tflops", "clip", "config",
                "gpus", "gpu_peak_gib", "host_peak_gib", "machine")
TINY_SHAPE = {"hidden": 64, "layers": 2, "vocab_size": 256, "seq_len": 64}


def run_harness(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    out = tmp_path / "results.json"
    # with a rehearsed failure in `env`, the harness whose cases rehearse it (tests/bench_faults.py)
    harness = "tests.bench_faults" if env and SIMULATE_ENV in env else "benchmarks.run"
    command = [sys.executable, "-m", harness, "--device", "cpu", "--steps", "2", "--warmup", "1",
               "--batch", "2", "--out", str(out), "--log-dir", str(tmp_path / "logs"), "--machine", "test-box",
               *args]
    return subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def tiny_spec(system: str = "pytorch", **overrides) -> CaseSpec:
    fields = dict(system=system, model="gpt-tiny", batch=2, seq=64, num_steps=2, num_warmup=1, device="cpu")
    return CaseSpec(**{**fields, **overrides})


# ---- the formula ----

def test_num_params_matches_hand_computed_counts():
    # 50304·2048 + 24·(12·2048² + 13·2048)
    assert gpt_num_params(2048, 24) == 1_311_621_120
    assert gpt_num_params(3072, 36) == 4_232_835_072


def test_step_flops_and_tflops_match_hand_computed_numbers():
    tokens = 8 * 1024
    # 6·N·tokens = 64_468_801_290_240; 12·L·h·s·tokens = 4_947_802_324_992
    flops = train_flops_per_step(2048, 24, 1024, tokens)
    assert flops == 69_416_603_615_232
    # the recorded peer: plain PyTorch on gpt-1.3b b8 took 0.147 s/step and is quoted at 472 TFLOPS.
    assert tflops(flops, 0.147) == pytest.approx(472.22, abs=0.01)


def test_recompute_adds_one_forward():
    plain = train_flops_per_step(2048, 24, 1024, 8192)
    assert train_flops_per_step(2048, 24, 1024, 8192, recompute=True) == plain + plain // 3
    assert train_flops_per_step(2048, 24, 1024, 8192, recompute=True) == 92_555_471_486_976


def test_recomputing_some_blocks_adds_their_part_of_the_forward():
    plain = train_flops_per_step(2048, 24, 1024, 8192)
    full = train_flops_per_step(2048, 24, 1024, 8192, recompute=True)
    counted = [train_flops_per_step(2048, 24, 1024, 8192, recompute=True, recompute_layers=k) for k in range(25)]
    assert counted[0] == plain and counted[24] == full and counted[6] == plain + plain // 3 // 4
    assert all(a < b for a, b in zip(counted, counted[1:]))
    assert train_flops_per_step(2048, 24, 1024, 8192, recompute_layers=6) == plain  # no recompute: no count


# ---- rows, ratios, table ----

def ok_outcome(step_s: float, host_bytes: int = 2**30) -> CaseOutcome:
    rank0 = {"rank": 0, "status": "ok", "step_s": step_s, "step_times_s": [step_s], "init_s": 1.0,
             "host_peak_bytes": host_bytes, "torch_version": "x", "loss": 5.5}
    return CaseOutcome(status="ok", rank_results=[rank0])


def test_rows_get_the_ratio_to_the_best_plain_pytorch_recipe_of_the_same_case():
    rows = [build_row(tiny_spec("pytorch"), TINY_SHAPE, ok_outcome(0.25), "m"),
            build_row(tiny_spec("pytorch-bf16"), TINY_SHAPE, ok_outcome(0.2), "m"),  # the best recipe
            build_row(tiny_spec("pytorch-compile"), TINY_SHAPE, CaseOutcome(status="out of memory"), "m"),
            build_row(tiny_spec("pstar"), TINY_SHAPE, ok_outcome(0.4), "m"),
            build_row(tiny_spec("pstar", batch=4), TINY_SHAPE, ok_outcome(0.4), "m"),  # no baseline
            build_row(tiny_spec("pstar", clip=0.0), TINY_SHAPE, ok_outcome(0.1), "m")]  # clip 0: none either
    fill_ratios(rows)
    assert [r["ratio_to_best_pytorch"] for r in rows] == [0.8, 1.0, None, 0.5, None, None]
    assert rows[3]["best_pytorch"] == "pytorch-bf16"
    assert rows[2]["step_s"] is None and rows[2]["model_tflops"] is None
    flops = train_flops_per_step(64, 2, 64, 2 * 64, vocab_size=256)
    assert rows[3]["model_tflops"] == pytest.approx(flops / 0.4 / 1e12, rel=1e-3)
    assert rows[3]["hardware_tflops"] == rows[3]["model_tflops"]  # nothing recomputed
    assert rows[3]["host_peak_gib"] == 1.0 and rows[3]["clip"] == 1.0 and rows[5]["clip"] == 0.0


def test_recompute_counts_in_hardware_flops_only():
    row = build_row(tiny_spec("pstar", activation_checkpointing=True), TINY_SHAPE, ok_outcome(0.4), "m")
    flops = train_flops_per_step(64, 2, 64, 2 * 64, vocab_size=256)
    assert row["model_tflops"] == pytest.approx(flops / 0.4 / 1e12, rel=1e-3)
    assert row["hardware_tflops"] == pytest.approx(flops * 4 / 3 / 0.4 / 1e12, rel=1e-3)


def test_hardware_flops_count_only_the_recomputed_blocks():
    spec = tiny_spec("pstar", activation_checkpointing=True, recompute_layers=1)  # of gpt-tiny's 2
    row = build_row(spec, TINY_SHAPE, ok_outcome(0.4), "m")
    flops = train_flops_per_step(64, 2, 64, 2 * 64, vocab_size=256)
    assert row["model_tflops"] == pytest.approx(flops / 0.4 / 1e12, rel=1e-3)
    assert row["hardware_tflops"] == pytest.approx(flops * 7 / 6 / 0.4 / 1e12, rel=1e-3)
    assert row["recompute_layers"] == 1
    assert spec.model_config()["recompute_layers"] == 1 and CaseSpec.from_json(spec.to_json()) == spec


def test_a_shipped_configs_recompute_count_reaches_the_pstar_case_only():
    args = bench_run.build_parser().parse_args(["--systems", "pstar,pytorch", "--batch", "8"])
    shipped = bench_run.shipped_config(REPO_ROOT / "configs/gpt-12b.yaml", 1, ["model.recompute_layers=24"])
    assert shipped["recompute_layers"] == 24
    pstar, pytorch = bench_run.build_specs(args, "cuda", bench_run.model_shapes(["gpt-12b"], 1024), shipped)
    assert (pstar.activation_checkpointing, pstar.recompute_layers) == (True, 24)
    assert (pytorch.activation_checkpointing, pytorch.recompute_layers) == (False, None)
    too_many = bench_run.build_parser().parse_args(["--batch", "8", "--activation-checkpointing",
                                                    "--recompute-layers", "39"])
    with pytest.raises(bench_run.UsageError, match="gpt-12b has 38 blocks"):
        bench_run.build_specs(too_many, "cuda", bench_run.model_shapes(["gpt-12b"], 1024))


def test_multi_gpu_row_sums_host_memory_and_takes_largest_gpu_peak():
    ranks = [{"rank": r, "status": "ok", "step_s": 0.5, "host_peak_bytes": 2**30, "gpu_peak_bytes": (r + 1) * 2**30}
             for r in range(4)]
    row = build_row(tiny_spec("fsdp2", gpus=4), TINY_SHAPE, CaseOutcome(status="ok", rank_results=ranks), "m")
    assert row["host_peak_gib"] == 4.0 and row["gpu_peak_gib"] == 4.0
    assert row["tokens_per_s"] == pytest.approx(4 * 2 * 64 / 0.5)


def test_table_has_a_line_per_row_and_shows_missing_figures_as_dashes():
    rows = [build_row(tiny_spec(), TINY_SHAPE, ok_outcome(0.25), "m"),
            build_row(tiny_spec("pstar"), TINY_SHAPE, CaseOutcome(status="out of memory"), "m")]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].startswith("system")
    assert "0.25" in lines[2] and lines[2].endswith("ok")
    assert lines[3].endswith("out of memory") and " - " in lines[3]


# ---- how a case's end becomes a status ----

def test_classify_reads_results_exit_codes_and_logs():
    oom_rank = {"rank": 1, "status": "out of memory"}
    assert classify([{"rank": 0, "status": "failed: x"}, oom_rank], 1, False, 60, []) == "out of memory"
    assert classify([{"rank": 0, "status": "ok"}], 0, False, 60, []) == "ok"
    assert classify([], None, True, 60, ["still going"]) == "timed out after 60 s"
    assert classify([], 1, False, 60, ["torch.OutOfMemoryError: CUDA out of memory."]) == "out of memory"
    assert classify([], -signal.SIGKILL, False, 60, []).startswith("out of memory (host)")
    assert classify([], 1, False, 60, ["a", "boom"]) == "failed: boom (exit code 1)"
    assert classify([], -signal.SIGSEGV, False, 60, ["x"]) == "failed: x (killed by SIGSEGV)"


def test_simulated_gpu_oom_becomes_a_row_and_the_harness_goes_on(tmp_path):
    out = tmp_path / "results.json"
    out.write_text(json.dumps([{"system": "earlier run"}]))
    done = run_harness(tmp_path, "--systems", "pytorch", env={SIMULATE_ENV: "oom"})
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert rows[0] == {"system": "earlier run"}  # appended, not overwritten
    assert rows[1]["status"] == "out of memory" and rows[1]["step_s"] is None
    assert "simulated" in rows[1]["error"]
    assert done.stdout.rstrip().splitlines()[-1].endswith("out of memory")  # the table comes last


@pytest.fixture
def faulty_cases(monkeypatch):
    """Case processes started by run_case_process rehearse the failure of PSTAR_BENCH_SIMULATE."""
    monkeypatch.setattr(bench_launch, "CASE_MODULE", FAULTY_CASE_MODULE)


def test_oom_after_init_keeps_what_was_measured(faulty_cases, tmp_path):
    outcome = run_case_process(tiny_spec(), tmp_path / "case", timeout_s=120, extra_env={SIMULATE_ENV: "oom@steps"})
    row = build_row(tiny_spec(), TINY_SHAPE, outcome, "m")
    assert row["status"] == "out of memory" and row["failed_in"] == "steps"
    assert row["init_s"] > 0 and row["host_init_peak_gib"] > 0 and row["step_s"] is None


def test_case_that_dies_without_a_result_is_reported_with_its_last_line(faulty_cases, tmp_path):
    outcome = run_case_process(tiny_spec(), tmp_path / "case", timeout_s=120, extra_env={SIMULATE_ENV: "abort"})
    assert outcome.status.startswith("failed: simulated abort")
    assert outcome.status.endswith("(killed by SIGABRT)")


def test_case_exception_is_reported_by_the_case_itself(faulty_cases, tmp_path):
    outcome = run_case_process(tiny_spec(), tmp_path / "case", timeout_s=120, extra_env={SIMULATE_ENV: "crash"})
    assert outcome.status == "failed: RuntimeError: simulated crash"
    assert outcome.rank_results[0]["host_peak_bytes"] > 0


def test_hanging_case_is_stopped_at_its_timeout(faulty_cases, tmp_path):
    outcome = run_case_process(tiny_spec(), tmp_path / "case", timeout_s=3, extra_env={SIMULATE_ENV: "hang"})
    assert outcome.status == "timed out after 3 s"
    assert outcome.wall_s < 3 + 15


def test_cases_beyond_the_time_budget_are_skipped_not_started(tmp_path):
    done = run_harness(tmp_path, "--systems", "pytorch,pstar", "--time-budget", "10")
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in rows] == ["skipped: time budget spent"] * 2
    assert not list((tmp_path / "logs").glob("*.log"))  # no case process was started


# ---- the real thing on CPU ----

@pytest.mark.parametrize("systems", [
    "pytorch,pytorch-bf16",
    pytest.param("pytorch,pytorch-bf16,fsdp2-offload", marks=pytest.mark.slow),
])
def test_cpu_smoke_pytorch_recipes(tmp_path, systems):
    done = run_harness(tmp_path, "--systems", systems)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["system"] for r in rows] == systems.split(",")
    for row in rows:
        assert set(ISSUE_FIELDS) <= set(row)
        assert row["status"] == "ok", row
        assert row["machine"] == "test-box" and row["model"] == "gpt-tiny" and row["seq"] == 64
        assert row["step_s"] > 0 and len(row["step_times_s"]) == 2
        flops = train_flops_per_step(64, 2, 64, 2 * 64, vocab_size=256)
        assert row["model_tflops"] == pytest.approx(flops / row["step_s"] / 1e12, rel=2e-3)
        assert row["clip"] == 1.0 and row["gpus"] == 1
        assert 0.05 < row["host_peak_gib"] < 8
        assert abs(row["loss"] - math.log(256)) < 1.0  # random tokens: about ln(vocab)
        assert row["torch_version"] == torch.__version__
    best = max(rows[:2], key=lambda r: r["model_tflops"])
    assert best["ratio_to_best_pytorch"] == 1.0 and all(r["best_pytorch"] == best["system"] for r in rows)
    assert all(r["ratio_to_best_pytorch"] > 0 for r in rows)
    table = done.stdout.rstrip().splitlines()[-(len(rows) + 2):]  # header, rule, one line per row
    assert table[0].startswith("system") and table[-1].startswith(rows[-1]["system"])


def test_cpu_smoke_pstar_runs_the_shipped_config(tmp_path):
    """The real harness on pstar, with --config: its engine section, model size, batch and sequence
    come from the config, so the row is what `pstar train` gets; clipping as the config sets it (1.0)."""
    from pstar_cli.config import load_config

    config = REPO_ROOT / "configs" / "tiny.yaml"
    done = run_harness(tmp_path, "--systems", "pstar", "--config", str(config), "--batch", "2", "--seq", "32")
    assert done.returncode == 0, done.stderr
    row = json.loads((tmp_path / "results.json").read_text())[0]
    assert row["status"] == "ok", row
    assert row["step_s"] > 0 and row["init_s"] > 0
    assert row["details"]["chunk_stats"]["model_data_bytes"] > 0
    assert abs(row["loss"] - math.log(256)) < 1.0  # random tokens: about ln(vocab)
    assert row["config"] == str(config) and row["model"] == "gpt-mini" and row["clip"] == 1.0
    shipped = load_config(config).engine_dict()
    ran = row["details"]["engine_config"]
    assert row["details"]["param_groups"] == 2  # nanoGPT's weight-decay rule, as pstar train builds it
    assert ran["default_chunk_size"] == shipped["default_chunk_size"]
    assert ran["device_memory_limit"] == shipped["device_memory_limit"]
    assert ran["gradient_clipping"] == 1.0


@pytest.mark.slow
def test_cpu_smoke_compiled_blocks(tmp_path):
    """AMP with every block compiled (Inductor builds C++ kernels on the CPU: slow)."""
    done = run_harness(tmp_path, "--systems", "pytorch-compile")
    assert done.returncode == 0, done.stderr
    row = json.loads((tmp_path / "results.json").read_text())[0]
    assert row["status"] == "ok", row
    assert row["details"]["compiled_blocks"] is True


@pytest.mark.slow
def test_cpu_smoke_two_processes(tmp_path):
    done = run_harness(tmp_path, "--systems", "pytorch,fsdp2,fsdp2-bf16", "--gpus", "2")
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert rows[2]["details"]["reduce_dtype"] == "bfloat16" and rows[2]["details"]["reshard_after_forward"] is False
    assert all(r["gpus"] == 2 for r in rows)


@pytest.mark.gpu
def test_gpu_smoke_reports_device_memory(tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--models", "gpt-tiny", "--seq", "64",
               "--systems", "pytorch,pstar", "--steps", "3", "--warmup", "2", "--out", str(out),
               "--log-dir", str(tmp_path / "logs")]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    pytorch_row = json.loads(out.read_text())[0]
    assert pytorch_row["status"] == "ok" and pytorch_row["gpu_peak_gib"] > 0


# ---- user mistakes: one message, no traceback ----

@pytest.mark.parametrize("args, message", [
    (["--systems", "pytorch,deepspeed"], "unknown system(s) deepspeed"),
    (["--models", "gpt-13b"], "unknown GPT size(s) gpt-13b"),
    (["--batch", "8,x"], "--batch"),
    (["--host-memory-limit", "lots"], "is not a size"),
    (["--gpus", "0"], "--gpus must be at least 1"),
])
def test_usage_errors_name_the_problem(args, message, tmp_path, capsys):
    try:
        code = bench_run.main(["--device", "cpu", "--out", str(tmp_path / "r.json"), *args])
    except SystemExit as exit_info:  # argparse's own checks (types, choices) exit directly
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_out_file_that_is_not_a_list_is_refused(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a list"):
        read_rows(bad)


def test_sizes_parse_with_units():
    assert bench_run.parse_bytes("120GiB") == 120 * 2**30
    assert bench_run.parse_bytes("100GB") == 100 * 10**9
    assert bench_run.parse_bytes("4096") == 4096


# ---- FSDP2 set-up details, in this process with a one-member gloo group ----

@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_falls_back_to_plain_init_when_model_init_fails(one_process_group, monkeypatch):
    import models
    from benchmarks.systems import Runtime, build_fsdp2

    real_build = models.build_model

    def build_with_failing_init(cfg):
        model = real_build(cfg)

        def init_weights():
            raise NotImplementedError("no DTensor support here")

        model.init_weights = init_weights
        return model

    monkeypatch.setattr(models, "build_model", build_with_failing_init)
    trainer = build_fsdp2(tiny_spec("fsdp2-offload"), Runtime(device=torch.device("cpu")), offload=True)
    assert "no DTensor support here" in trainer.details()["init_note"]
    x = torch.randint(0, 256, (2, 64))
    losses = [trainer.step(x, x).item() for _ in range(2)]
    assert all(math.isfinite(loss) for loss in losses)
    assert abs(losses[0] - math.log(256)) < 1.0  # N(0, 0.02) weights: near-uniform predictions


def test_init_host_ratio_uses_what_init_built_and_every_rank():
    from benchmarks.report import GIB, _host_model_data

    stats = {"param_bytes_host": 0, "optim_bytes_host": 4 * GIB, "init_host_bytes": 6 * GIB,
             "model_data_bytes": 14 * GIB}
    one = _host_model_data({"chunk_stats": stats}, 6.6)
    assert one["init_rss_over_init_host_plan"] == 1.1 and one["init_rss_over_host_model_data"] == 1.65
    two = _host_model_data({"chunk_stats": stats}, 13.2, num_ranks=2)  # peaks summed over ranks
    assert two["init_rss_over_init_host_plan"] == 1.1
    # Rows from before the engine reported init_host_bytes: params (bf16) and masters of the data.
    older = {k: v for k, v in stats.items() if k != "init_host_bytes"}
    derived = _host_model_data({"chunk_stats": older, "engine_config": {"bf16": {"enabled": True}}}, 6.6)
    assert derived["init_host_model_data_gib"] == 6.0


def test_profile_init_names_where_init_spends_its_time():
    """On the CPU, gpt-tiny's init runs the model's own RNG on the host: normal_ must be there."""
    from benchmarks import profile_init

    command = [sys.executable, "-m", "benchmarks.profile_init", "gpt-tiny", "--top", "40"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("gpt-tiny: init ") and "init_device auto" in first
    assert "normal_" in done.stdout and "tottime" in done.stdout
    assert profile_init.__doc__.startswith("Where `initialize_engine` spends its time")


# ---- RESULTS.md ----

def test_results_tables_are_generated_from_results_json():
    """RESULTS.md's tables are what `python -m benchmarks.tables` makes of results.json now."""
    from benchmarks import tables

    assert tables.main(["--check"]) == 0


def test_tables_give_legacy_rows_model_flops_and_keep_the_prose():
    from benchmarks import tables

    legacy = {"system": "pstar", "model": "gpt-12b", "batch": 8, "gpus": 1, "machine": "m", "status": "ok",
              "tflops": 400.0, "activation_checkpointing": True, "step_s": 2.0}
    current = dict(legacy, tflops=None, model_tflops=300.0, hardware_tflops=400.0, clip=1.0,
                   config="configs/gpt-12b.yaml", ratio_to_best_pytorch=None)
    text = f"prose before\n{tables.BEGIN}\nold table\n{tables.END}\nprose after\n"
    out = tables.render(text, [legacy, current])
    assert out.startswith("prose before\n") and out.endswith("prose after\n") and "old table" not in out
    legacy_line, current_line = [line for line in out.splitlines() if line.startswith("| pstar")]
    assert "| 300.0 | 400.0 |" in legacy_line  # recompute: model FLOPs are 3/4 of what it counted
    assert "| 300.0 | 400.0 |" in current_line and "`gpt-12b.yaml`" in current_line
    some = tables.render(text, [dict(current, recompute_layers=24)])
    assert "| gpt-12b, recompute 24 blocks |" in some
