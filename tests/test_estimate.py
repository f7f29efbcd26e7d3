"""Memory estimates: pure functions checked against numbers worked out by hand."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.optimizer_placement import plan_placement_of_sizes
from engine.streamed_adam import STREAM_PIECE_ELEMENTS, ring_bytes
from pstar_cli.config import config_from_dict, load_config
from pstar_cli.estimate import (GIB, Hardware, Workload, activation_bytes, estimate_report,
                                estimate_systems, largest_layer_params, largest_trainable,
                                layer_activation_bytes, llama_layer_activation_bytes,
                                pstar_bytes_per_param, workload_from_config)
from pstar_cli.estimate.systems import pstar_chunk_groups
from pstar_cli.main import app

REPO = Path(__file__).resolve().parents[1]
H200 = Hardware(gpu_bytes=140 * GIB, host_bytes=128 * GIB, gpu_source="given", host_source="given")

# gpt-1.3b, micro-batch 8, sequence 1024, bf16 (the T1 workload of benchmarks/README.md)
GPT_1_3B = Workload(
    family="gpt", size="gpt-1.3b", num_params=1_313_722_368, largest_layer_params=50304 * 2048,
    hidden=2048, layers=24, heads=16, ffn_hidden=4 * 2048, vocab_size=50304, seq_len=1024, micro_batch_size=8,
    activation_checkpointing=False, precision="bf16", grad_accum=1, gpus_per_node=1, num_nodes=1,
    chunk_size=64 * 2**20, device_memory_limit=None, host_memory_limit=None, gpu_mem_ratio=0.9,
    host_mem_ratio=0.8)


def test_layer_activations_follow_korthikanti():
    # s·b·h·34 = 1024·8·2048·34; the scores add 5·a·s²·b = 5·16·1024²·8
    assert layer_activation_bytes(1024, 8, 2048, 16) == 570_425_344
    assert layer_activation_bytes(1024, 8, 2048, 16, materialised_scores=True) == 570_425_344 + 671_088_640
    assert layer_activation_bytes(1024, 8, 2048, 16, compute_bytes=4) == 2 * 570_425_344


def test_activations_with_and_without_recomputation():
    loss = 8 * 1024 * 50304 * 12  # fp32 log-probs (4 B) kept, 8 B more in the loss's backward
    assert activation_bytes(GPT_1_3B) == 24 * 570_425_344 + loss
    recompute = dataclasses.replace(GPT_1_3B, activation_checkpointing=True)
    # each layer keeps its 2·s·b·h input; one layer is rebuilt in full during backward
    assert activation_bytes(recompute) == 24 * 2 * 1024 * 8 * 2048 + 570_425_344 + loss
    fp32 = dataclasses.replace(GPT_1_3B, precision="fp32")
    assert activation_bytes(fp32) == 2 * 24 * 570_425_344 + loss


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_activations_shrink_with_each_recomputed_block(family):
    work = GPT_1_3B if family == "gpt" else dataclasses.replace(
        GPT_1_3B, family="llama", layers=16, heads=32, ffn_hidden=8192, vocab_size=32000)
    full = dataclasses.replace(work, activation_checkpointing=True)
    layers = work.layers
    peaks = [activation_bytes(dataclasses.replace(full, recompute_layers=k)) for k in range(layers + 1)]
    assert peaks[0] == activation_bytes(work) and peaks[layers] == activation_bytes(full)
    assert all(a > b for a, b in zip(peaks[:layers], peaks[1:layers]))
    # the last block's activations are needed first in backward: recomputing it too saves nothing, and
    # the full-recompute count keeps its input beside the layer it rebuilds
    block_input = 2 * 1024 * 8 * 2048
    assert peaks[layers] == peaks[layers - 1] + block_input
    # gpt-1.3b: 10 of 24 recomputed keep 10 inputs and the other 14 layers in full
    if family == "gpt":
        loss = 8 * 1024 * 50304 * 12
        assert peaks[10] == 10 * block_input + 14 * 570_425_344 + loss


def test_recompute_count_reaches_the_estimate_and_its_summary_lines():
    from pstar_cli.commands.estimate_memory import footer_lines
    from pstar_cli.commands.validate import summary_lines

    raw = {"model": {"size": "gpt-1.3b", "activation_checkpointing": True, "recompute_layers": 10},
           "train": {"seq_len": 1024, "batch_size": 8}, "engine": {"bf16": {"enabled": True}}}
    cfg = config_from_dict(raw, bf16_supported=True)
    w = workload_from_config(cfg)
    assert w.recompute_layers == 10 and w.recomputed_layers == 10
    assert activation_bytes(w) == activation_bytes(dataclasses.replace(GPT_1_3B, activation_checkpointing=True,
                                                                       recompute_layers=10))
    report = estimate_report(w, H200)
    assert report["workload"]["recompute_layers"] == 10
    assert ", activation checkpointing (10 of 24 blocks)," in footer_lines(report)[0]
    assert summary_lines(cfg)[0].endswith(", activation checkpointing (10 of 24 blocks)")
    every = config_from_dict({**raw, "model": {"size": "gpt-1.3b", "activation_checkpointing": True}},
                             bf16_supported=True)
    assert summary_lines(every)[0].endswith(", activation checkpointing")
    assert workload_from_config(every).recomputed_layers == 24


def test_llama_layers_keep_their_swiglu_and_fp32_norm_tensors():
    # llama-1b at b8 s2048: s·b·(26·2048 + 8·8192) bytes per layer
    assert llama_layer_activation_bytes(2048, 8, 2048, 8192) == 2048 * 8 * 118_784
    llama = dataclasses.replace(GPT_1_3B, family="llama", hidden=2048, layers=16, heads=32,
                                ffn_hidden=8192, vocab_size=32000, seq_len=2048)
    assert activation_bytes(llama) == 16 * 2048 * 8 * 118_784 + 8 * 2048 * 32000 * 12


def test_bytes_per_param_by_precision():
    assert sum(pstar_bytes_per_param("bf16", grad_accum=1).values()) == 14
    assert sum(pstar_bytes_per_param("fp16", grad_accum=4).values()) == 16
    assert sum(pstar_bytes_per_param("fp32", grad_accum=1).values()) == 16


def test_placement_is_the_engines_plan_on_the_configs_numbers():
    """The estimate runs engine/optimizer_placement.py's planning on chunk groups made from the
    config's numbers: a change to the engine's placement changes the estimate."""
    n = GPT_1_3B.num_params
    groups = pstar_chunk_groups(GPT_1_3B)
    # the embedding (larger than a chunk) gets a chunk of its own, the rest fill chunk_size chunks
    embedding = GPT_1_3B.largest_layer_params
    assert len(groups) == 1 + -(-(n - embedding) // GPT_1_3B.chunk_size)
    assert groups[0].param_bytes == 2 * embedding
    assert sum(g.param_bytes for g in groups) == 2 * n and sum(g.optimizer_bytes for g in groups) == 12 * n
    small = Hardware(32 * GIB, 128 * GIB, "given", "given")
    budget = int(32 * GIB * 0.9)
    # Host groups there may step on the GPU over streamed state, so the engine keeps the pipeline's
    # slots on the device (engine/streamed_adam.py); with that turned off it does not.
    slots = ring_bytes(min(STREAM_PIECE_ELEMENTS, max(GPT_1_3B.chunk_size, embedding)))
    for streams, scratch in ((True, GPT_1_3B.chunk_size * 4 + slots), (False, GPT_1_3B.chunk_size * 4)):
        plan = plan_placement_of_sizes(groups, budget, activation_bytes(GPT_1_3B), 0.8, True, scratch)
        assert 0 < plan.num_device_groups < len(groups)  # some groups on the GPU, the rest on the host
        est = estimate_systems(dataclasses.replace(GPT_1_3B, stream_host_optimizer=streams), small)["pstar"]
        optimizer_on_gpu = sum(est.gpu.model_data[k] for k in ("master", "exp_avg", "exp_avg_sq"))
        assert optimizer_on_gpu == pytest.approx(sum(g.optimizer_bytes for g in groups[:plan.num_device_groups]),
                                                 abs=3), streams
        if streams:
            on_gpu = optimizer_on_gpu
    # a larger safety margin over the activations (a lower margin_use_ratio) leaves fewer groups there
    careful = dataclasses.replace(GPT_1_3B, margin_use_ratio=0.3)
    est_careful = estimate_systems(careful, small)["pstar"]
    assert sum(est_careful.gpu.model_data[k] for k in ("master", "exp_avg", "exp_avg_sq")) < on_gpu
    # without hybrid Adam every optimizer group steps on the host
    host_adam = estimate_systems(dataclasses.replace(GPT_1_3B, use_hybrid_adam=False), H200)["pstar"]
    assert sum(host_adam.host.model_data[k] for k in ("master", "exp_avg", "exp_avg_sq")) == 12 * n
    nothing = estimate_systems(GPT_1_3B, Hardware(1, 128 * GIB, "given", "given"))["pstar"]
    assert sum(nothing.gpu.model_data.values()) == 0  # no room at all: everything on the host


def test_pstar_splits_model_data_between_gpu_and_host():
    n = GPT_1_3B.num_params
    est = estimate_systems(GPT_1_3B, H200)["pstar"]
    # all of it on the GPU, and room to spare: once settled, an fp32 grad chunk per group (4 B/param)
    assert sum(est.gpu.model_data.values()) == 14 * n + 4 * n
    assert est.gpu.model_data["grad"] == 4 * n
    assert est.host.model_data["param"] == 0 and est.host.total == 6 * n  # init's params + masters
    assert est.gpu.activations == activation_bytes(GPT_1_3B)
    # the engine's margin over the activations (1 - margin_use_ratio of them), a group's fp32 scratch
    # and, settled, the bf16 gradients autograd leaves in .grad
    assert est.gpu.other == math.ceil(0.2 * activation_bytes(GPT_1_3B)) + GPT_1_3B.chunk_size * 4 + 2 * n
    assert est.gpu.budget == int(140 * GIB * 0.9) and est.fits is True
    # a 32 GiB GPU: the leading optimizer groups take the room left after activations and the margin
    small = Hardware(32 * GIB, 128 * GIB, "given", "given")
    est = estimate_systems(GPT_1_3B, small)["pstar"]
    room = int(32 * GIB * 0.9) - activation_bytes(GPT_1_3B) - est.gpu.other
    assert room - GPT_1_3B.chunk_size * 12 < sum(est.gpu.model_data.values()) <= room  # whole groups only
    assert est.gpu.model_data["param"] == 2 * n  # params first
    optimizer_kinds = ("master", "exp_avg", "exp_avg_sq")
    host_optimizer = sum(est.host.model_data[k] for k in optimizer_kinds)
    assert host_optimizer == 14 * n - sum(est.gpu.model_data.values())
    # the host groups' param chunks keep a host buffer their gradients go down into
    assert est.host.model_data["param"] == int(2 * n * host_optimizer / (12 * n))
    steady = sum(est.host.model_data.values())
    assert est.gpu.total <= est.gpu.budget and est.host.total == max(steady, 6 * n)  # or init's peak


def test_pstar_host_peak_is_the_larger_of_init_and_the_steady_state():
    """Measured on one H200 with gpt-12b b8, recompute, 132 GiB device budget: host peak 70.1 GiB,
    of which 68.3 GiB are init's param chunks and fp32 masters."""
    w = dataclasses.replace(GPT_1_3B, num_params=12_211_000_000, device_memory_limit=132 * GIB)
    est = estimate_systems(w, H200)["pstar"]
    assert est.host.total == pytest.approx(6 * w.num_params, rel=1e-6)
    assert 60 * GIB < est.host.total < 70.1 * GIB


def test_pstar_shards_over_ranks_and_sums_ranks_per_host():
    two = dataclasses.replace(GPT_1_3B, gpus_per_node=2, micro_batch_size=4)
    tiny_gpu = Hardware(1, 128 * GIB, "given", "given")  # nothing fits on the GPU: all on the host
    est = estimate_systems(two, tiny_gpu)["pstar"]
    per_rank = sum(-(-two.num_params * b // 2) for b in pstar_bytes_per_param("bf16", 1).values())
    assert est.host.total == 2 * per_rank
    assert est.gpu.fits is False


def test_plain_pytorch_peaks_at_backward_start_or_at_the_step():
    n, act = GPT_1_3B.num_params, activation_bytes(GPT_1_3B)
    est = estimate_systems(GPT_1_3B, H200)["pytorch"]
    assert sum(est.gpu.model_data.values()) == 18 * n
    # start of backward: no grads yet (4 + 8 + 2 B/param and all activations)
    assert est.gpu.total == 14 * n + act
    # a model with little activation memory peaks at the step instead: 16 B/param, no copies
    short = dataclasses.replace(GPT_1_3B, seq_len=8, micro_batch_size=1)
    assert estimate_systems(short, H200)["pytorch"].gpu.total == 16 * n
    assert est.host.total == 0


def test_deepspeed_offload_follows_its_estimator_formulas():
    n = GPT_1_3B.num_params
    systems = estimate_systems(GPT_1_3B, H200)
    assert systems["zero2_offload"].gpu.model_data == {"param": 2 * n}
    assert systems["zero2_offload"].host.total == int(n * 16 * 1.5)
    assert systems["zero3_offload"].host.total == int(n * 18 * 1.5)
    assert systems["zero3_offload"].gpu.other == 4 * 50304 * 2048
    eight = dataclasses.replace(GPT_1_3B, gpus_per_node=8)
    # ZeRO-2: every rank builds the fp32 model at start, 4 bytes x 8 GPUs beats the 16 B/param
    assert estimate_systems(eight, H200)["zero2_offload"].host.total == int(n * 32 * 1.5)


def test_unknown_gpu_leaves_fit_open():
    no_gpu = Hardware(None, 128 * GIB, "no GPU detected", "given")
    systems = estimate_systems(GPT_1_3B, no_gpu)
    assert all(e.fits is None for e in systems.values())
    assert systems["zero2_offload"].host.fits is True


def test_largest_layer_is_the_embedding_or_the_mlp():
    assert largest_layer_params({"family": "gpt", "hidden": 2048, "vocab_size": 50304}) == 50304 * 2048
    assert largest_layer_params({"family": "gpt", "hidden": 64, "vocab_size": 256}) == 4 * 64 * 64 + 4 * 64
    assert largest_layer_params({"family": "llama", "hidden": 64, "vocab_size": 32, "ffn_hidden": 176}) \
        == 64 * 176


def test_largest_trainable_grows_with_memory():
    small = largest_trainable(GPT_1_3B, Hardware(24 * GIB, 64 * GIB, "given", "given"))
    big = largest_trainable(GPT_1_3B, H200)
    assert small is not None and big is not None and small.num_params < big.num_params
    assert estimate_systems(big, H200)["pstar"].fits
    # chunks close at the size their tensors use (engine/chunk.py), so the smallest size fits 200 MiB;
    # a micro-batch's activations of even that size do not fit 1 MiB
    assert largest_trainable(GPT_1_3B, Hardware(200 * 2**20, GIB, "given", "given")).size == "gpt-tiny"
    assert largest_trainable(GPT_1_3B, Hardware(2**20, GIB, "given", "given")) is None


def test_workload_from_a_config():
    cfg = load_config(REPO / "configs" / "gpt-1.3b.yaml", bf16_supported=False)
    w = workload_from_config(cfg)
    assert (w.num_params, w.micro_batch_size, w.precision) == (1_313_722_368, 8, "bf16")
    assert w.gpu_mem_ratio == cfg.engine["client"]["mem_tracer"]["overall_gpu_mem_ratio"]
    assert workload_from_config(cfg, gpus_per_node=4).micro_batch_size == 2
    tiny = config_from_dict({"model": {"size": "gpt-tiny"}, "train": {"seq_len": 32, "grad_accum": 2,
                             "batch_size": 8}}, bf16_supported=False)
    assert workload_from_config(tiny).micro_batch_size == 4


def test_report_is_plain_json_data():
    report = estimate_report(GPT_1_3B, H200)
    assert json.loads(json.dumps(report)) == report
    assert set(report["systems"]) == {"pstar", "pytorch", "zero2_offload", "zero3_offload"}


def test_cli_json_output_for_the_12b_config():
    result = CliRunner().invoke(app, ["estimate-memory", "configs/gpt-12b.yaml", "--gpu-mem", "140",
                                      "--host-mem", "128", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"] == "configs/gpt-12b.yaml"
    assert report["model"]["num_params"] == 12_219_105_280
    fits = {name: s["fits"] for name, s in report["systems"].items()}
    # benchmarks/README.md: only pstar is meant to train gpt-12b on one H200 with 128 GB of host memory
    assert fits == {"pstar": True, "pytorch": False, "zero2_offload": False, "zero3_offload": False}
    assert report["largest_pstar_model"]["num_params"] >= 12_219_105_280


def test_cli_table_output_without_a_gpu():
    result = CliRunner().invoke(app, ["estimate-memory", "configs/tiny.yaml", "--host-mem", "8", "--detail"])
    assert result.exit_code == 0, result.output
    for text in ("Per GPU", "Per host", "pstar", "DeepSpeed ZeRO-3 offload", "exp_avg_sq"):
        assert text in result.stdout


def test_cli_default_output_is_compact_and_fits_80_columns():
    result = CliRunner().invoke(app, ["estimate-memory", "configs/gpt-4b.yaml", "--gpu-mem", "141",
                                      "--host-mem", "128"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if line.startswith("│")]
    # one row per system and the available memory: no cell wrapped onto a second line
    assert [row.split("│")[1].strip() for row in rows] == [
        "pstar", "plain PyTorch (AMP)", "DeepSpeed ZeRO-2 offload", "DeepSpeed ZeRO-3 offload", "available"]
    assert "GPU need" in result.stdout and "exp_avg_sq" not in result.stdout
    assert "verdict: pstar trains this config here" in result.stdout


def test_without_a_gpu_the_footer_asks_for_its_size_in_gib():
    from pstar_cli.commands.estimate_memory import footer_lines

    report = estimate_report(GPT_1_3B, Hardware(None, 128 * GIB, "no GPU detected", "given"))
    assert "no GPU detected (give its size in GiB with --gpu-mem)" in footer_lines(report)[1]


def test_a_run_on_the_cpu_is_estimated_without_a_gpu_whatever_the_machine_has(monkeypatch):
    """`engine.compute_device: cpu`: the GPU is not looked for (here, one of 80 GiB would be found)."""
    from pstar_cli.commands.estimate_memory import footer_lines
    from pstar_cli.estimate import hardware

    monkeypatch.setattr(hardware, "detect_gpu", lambda: (80 * GIB, "a detected GPU"))
    assert hardware.detect_hardware(host_gib=64).gpu_bytes == 80 * GIB
    on_cpu = hardware.detect_hardware(host_gib=64, compute_device="cpu")
    assert on_cpu.gpu_bytes is None
    assert "no GPU (engine.compute_device: cpu)" in footer_lines(estimate_report(GPT_1_3B, on_cpu))[1]
    result = CliRunner().invoke(app, ["estimate-memory", "configs/tiny.yaml", "engine.compute_device=cpu",
                                      "--host-mem", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hardware"]["gpu_bytes"] is None


# Peaks measured on one H200 with torch 2.11 (torch.cuda.max_memory_allocated, GiB): activations
# of one forward + backward with bf16 weights, and three steps of plain PyTorch AMP + fused AdamW.
MEASURED_H200 = [
    # size, batch, seq, recompute, activation peak, plain AMP peak
    ("gpt-1.3b", 8, 1024, False, 16.71, 35.40),
    ("gpt-1.3b", 8, 1024, True, 5.42, None),
    ("gpt-6.7b", 4, 1024, False, 18.38, 107.23),
    ("llama-1b", 8, 2048, False, 35.14, 54.55),
]


@pytest.mark.parametrize("size,batch,seq_len,recompute,activations_gib,amp_gib", MEASURED_H200)
def test_estimates_match_peaks_measured_on_h200(size, batch, seq_len, recompute, activations_gib, amp_gib):
    cfg = config_from_dict({"model": {"size": size, "activation_checkpointing": recompute},
                            "train": {"seq_len": seq_len, "batch_size": batch},
                            "engine": {"bf16": {"enabled": True}}}, bf16_supported=True)
    w = workload_from_config(cfg)
    assert activation_bytes(w) / GIB == pytest.approx(activations_gib, rel=0.09)
    if amp_gib is not None:
        assert estimate_systems(w, H200)["pytorch"].gpu.total / GIB == pytest.approx(amp_gib, rel=0.10)


def test_sizes_and_counts_read_well():
    from pstar_cli.observe.metrics import format_bytes, format_count

    assert [format_bytes(b) for b in (None, 512, 1.5 * GIB, 140 * GIB, 2048 * GIB)] == [
        "-", "512 B", "1.50 GiB", "140.0 GiB", "2.00 TiB"]
    assert [format_count(n) for n in (999, 858_624, 1_313_722_368, 174_563_733_504)] == [
        "999", "859 K", "1.31 B", "175 B"]


def test_settled_extras_only_where_the_gpu_has_room_for_them():
    n = GPT_1_3B.num_params
    roomy = estimate_systems(GPT_1_3B, H200)["pstar"]
    without_extras = sum(roomy.gpu.model_data.values()) - 4 * n + roomy.gpu.activations + roomy.gpu.other - 2 * n
    tight_budget = without_extras + 3 * n  # everything fits, the 6 B/param of settled extras do not
    tight = Hardware(math.ceil(tight_budget / 0.9) + 1, 128 * GIB, "given", "given")
    est = estimate_systems(GPT_1_3B, tight)["pstar"]
    assert est.fits is True and est.gpu.model_data["grad"] == 0
    assert sum(est.gpu.model_data.values()) == 14 * n  # still all on the GPU
    assert est.gpu.other == roomy.gpu.other - 2 * n


def test_an_fp32_run_that_settles_keeps_its_gradients_beside_the_chunks():
    """fp32 weights are their own masters once a run settles (engine/optimizer.py): of its 16 B per
    parameter, the 4 B of gradients are autograd's `.grad`, beside the chunks. A run that cannot
    settle (gradient accumulation) keeps them in chunks. The total is the same."""
    fp32 = dataclasses.replace(GPT_1_3B, precision="fp32")
    n = fp32.num_params
    settles = estimate_systems(fp32, H200)["pstar"]
    accumulates = estimate_systems(dataclasses.replace(fp32, grad_accum=2), H200)["pstar"]
    assert sum(settles.gpu.model_data.values()) == 12 * n and settles.gpu.model_data["grad"] == 0
    assert sum(accumulates.gpu.model_data.values()) == 16 * n
    assert settles.gpu.other == accumulates.gpu.other + 4 * n
