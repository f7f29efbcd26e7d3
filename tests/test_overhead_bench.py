"""`python -m benchmarks.overhead` runs: tiny shapes, a few steps. The ratio it prints is a benchmark
figure, not asserted; what is asserted is that the shapes are what they say (moves or none)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import host_profile, overhead


def test_overhead_benchmark_runs_and_its_shapes_move_as_named(capsys):
    rows = overhead.main(["--steps", "2", "--warmup", "3", "--shapes", "tiny"])
    assert [(r["shape"], r["clipping"]) for r in rows] == [
        ("tiny, no moves", 0.0), ("tiny, no moves", 1.0), ("tiny, moves", 0.0), ("tiny, moves", 1.0)]
    for row in rows:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert (row["evictions_per_step"] > 0) == row["shape"].endswith(", moves"), row
        # the split of pstar's time: copies and the moves' own work only where chunks move, and the
        # parts add up
        assert (row["copies_s"] > 0) == row["shape"].endswith(", moves"), row
        assert (row["moving_s"] > 0) == row["shape"].endswith(", moves"), row
        assert math.isfinite(row["optimizer_s"])
        parts = row["plain_s"] + row["copies_s"] + row["moving_s"] + row["optimizer_s"] + row["rest_s"]
        assert math.isclose(parts, row["pstar_s"])
        assert math.isclose(row["floor_s"] + row["own_s"], row["rest_s"], abs_tol=1e-12)
    assert "pstar/plain" in capsys.readouterr().out


@pytest.mark.parametrize("index", [0, 1], ids=["no moves", "moves"])
def test_the_hooks_floor_mirrors_the_hooks_the_engine_keeps(index):
    """Settled without hooks (fp32 on the CPU: each param chunk its master) the floor has none;
    while chunks move it has the engine's module hooks, one gradient hook per parameter and its
    saved-tensor hooks only inside the modules holding parameters."""
    from engine import initialize_engine
    from models import build_model

    shape = overhead.SHAPES["tiny"][index]
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=lambda: build_model(overhead._model_cfg(shape)),
                                         config=overhead._engine_cfg(shape, 0.0))
    for x, y in overhead._batches(shape, 3):
        optimizer.zero_grad()
        model.backward(model(x, y))
        optimizer.step()
    plain = build_model(overhead._model_cfg(shape))
    floor = overhead.HookFloor(plain, model)
    hooks = model._rt.hooks
    assert hooks.settled == (index == 0)
    if hooks.settled:
        assert floor.num_module_hooks == floor.num_grad_hooks == 0
        return
    assert floor.num_module_hooks == len(hooks._direct) > 0
    assert floor.num_grad_hooks == sum(p.requires_grad for p in plain.parameters())
    active = {}
    top = torch._C._autograd._top_saved_tensors_default_hooks
    for name in ("attn", "attn.qkv"):  # holds no parameter itself; holds its weight and bias
        plain.blocks[0].get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: active.__setitem__(name, top(False) is not None))
    x, y = overhead._batches(shape, 1)[0]
    with floor.forward_context():
        plain(x, y)
    assert active == {"attn": False, "attn.qkv": True}


def test_host_profile_times_and_profiles_each_system(capsys):
    results = host_profile.main(["--systems", "pytorch-bf16,pstar", "--device", "cpu", "--model", "gpt-tiny",
                                 "--batch", "1", "--seq", "16", "--steps", "2", "--warmup", "2", "--top", "5"])
    assert [r["system"] for r in results] == ["pytorch-bf16", "pstar"]
    for result in results:
        assert 0 < result["issue_s"] <= result["step_s"] * 1.01 + 1e-4
        assert "function calls" in result["profile"]
    assert results[1]["step_timings"]["forward"] > 0  # the engine's own split of the step
    assert "== pstar gpt-tiny b1 s16" in capsys.readouterr().out


@pytest.mark.parametrize("args, named", [(["--model", "gpt-nope"], "gpt-nope"),
                                         (["--config", "no-such.yaml"], "no-such.yaml")])
def test_host_profile_names_a_bad_argument_in_one_line(args, named, capsys):
    with pytest.raises(SystemExit) as stop:
        host_profile.main(["--device", "cpu", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures the host link where there is one")
def test_host_link_says_in_one_line_that_it_needs_a_gpu():
    from benchmarks import host_link
    with pytest.raises(SystemExit) as stop:
        host_link.main([])
    assert "CUDA" in str(stop.value.code) and len(str(stop.value.code).splitlines()) == 1
