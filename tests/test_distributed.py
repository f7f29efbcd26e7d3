"""Sharded training over torch.distributed (issue 5) against one rank, on the CPU with gloo.

Every comparison trains the same model from the same seed on the same global batches: once in this
process on one rank, once on several ranks (spawned with torch.multiprocessing, started by plain
torchrun, or by `pstar train`), each rank taking its contiguous share of every batch. Chunks are
small and the device budget tight, so every step gathers, evicts and fetches chunks again, and
gradients are reduced from partly evicted chunks.

With several ranks a gradient is the average of per-rank means instead of one mean over the batch,
which rounds differently in the last bits, so nothing is bitwise. How far apart the two runs may end
follows from float32 arithmetic, not from what one CPU happened to give (see `adam_tolerances`):
losses and gradient norms agree to 1e-5 relative, and each weight to 1e-5 relative plus what Adam
can make of a gradient's rounding noise: nothing where the element's second moment is large, up to
2 lr a step where it is tiny (Adam divides by its root). Wrong sharding (a slice reduced to the wrong
rank, a missing reduction) moves well-conditioned weights by ~lr; an average taken twice leaves
Adam's steps nearly unchanged but halves the gradient norm and quarters the second moments.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import initialize_engine
from engine.chunk import TensorInfo, new_chunk_group
from engine.distributed import gradient_writes, padded_capacity
from engine.errors import EngineError
from pstar_cli.launch import MULTI_GPU_ENV
from tests.engine_models import MAKERS, VOCAB, OddModel, TinyGPT
from tests.engine_models import engine_config as shared_engine_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def engine_config(**overrides) -> dict:
    # eps 1e-6 rather than 1e-8: the attention key bias's gradient is pure rounding noise
    # (~1e-9; softmax ignores the bias), which eps 1e-8 would turn into steps of ~lr/10 that
    # differ between any two summation orders
    return shared_engine_config(eps=1e-6, **overrides)


def global_batches(kind: str, num_steps: int, batch: int = 4, seq: int = 16):
    gen = torch.Generator().manual_seed(1234)
    for _ in range(num_steps):
        x = torch.randint(0, VOCAB[kind], (batch, seq), generator=gen)
        y = torch.randint(0, VOCAB[kind], (batch, seq), generator=gen)
        yield x, y


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def host_copy(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def compute_device() -> torch.device:
    """Where the engine computes (initialize_engine made this rank's GPU the current one)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def train_steps(model, optimizer, batches, grad_accum: int = 1) -> tuple[list[float], list[float]]:
    """Steps on this rank's share of each global batch: (mean loss over ranks, global grad norm)."""
    rank, world_size = world()
    losses, norms = [], []
    for x, y in batches:
        x, y = (t.chunk(world_size)[rank].to(compute_device()) for t in (x, y))
        optimizer.zero_grad()
        loss_sum = torch.zeros((), device=compute_device())
        for mx, my in zip(x.chunk(grad_accum), y.chunk(grad_accum)):
            loss = model(mx, my)
            model.backward(loss / grad_accum)
            loss_sum += loss.detach() / grad_accum
        # the global gradient norm (a collective with several ranks): catches a wrong average,
        # to which Adam's steps are nearly blind
        norms.append(optimizer._global_norm().item())
        optimizer.step()
        if world_size > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world_size
        losses.append(loss_sum.item())
    return losses, norms


# ---- scenarios: each runs in every rank (or in this process for one rank) ---------------------

def train(kind: str, cfg: dict, num_steps: int, grad_accum: int = 1, batch: int = 4) -> dict:
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=MAKERS[kind], config=cfg)
    initial = host_copy(model.state_dict())  # with several ranks: gathered from the shards
    losses, norms = train_steps(model, optimizer, global_batches(kind, num_steps, batch * grad_accum),
                                grad_accum)
    moments = {k: v["exp_avg_sq"].cpu().clone() for k, v in optimizer.state_dict()["state"].items()}
    return {"losses": losses, "norms": norms, "initial": initial, "state": host_copy(model.state_dict()),
            "moments": moments, "stats": model.chunk_stats(),
            "layout": [info.names[0] for info in model._rt.infos]}  # after re-packing


def resume(kind: str, cfg: dict) -> dict:
    """Train 3 steps, save both state dicts, train 3 more; then a fresh engine from another seed
    loads the saved state and trains the same 3 steps."""
    batches = list(global_batches(kind, 6))
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=MAKERS[kind], config=cfg)
    train_steps(model, optimizer, batches[:3])
    saved_model = host_copy(model.state_dict())
    saved_optim = optimizer.state_dict()
    straight, _ = train_steps(model, optimizer, batches[3:])
    torch.manual_seed(99)
    again_model, again_optim = initialize_engine(model_func=MAKERS[kind], config=cfg)
    again_model.load_state_dict(saved_model)
    again_optim.load_state_dict(saved_optim)
    again, _ = train_steps(again_model, again_optim, batches[3:])
    return {"straight": straight, "again": again, "state": host_copy(model.state_dict()),
            "again_state": host_copy(again_model.state_dict())}


def shard_resume(kind: str, cfg: dict) -> dict:
    """Train 3 steps (OddModel is re-packed after its warm-up), keep every rank's shard state,
    train 3 more; a fresh engine loads the shard states into its init layout, so its first step
    re-packs shards that already hold moments, then trains the same 3 steps."""
    batches = list(global_batches(kind, 6))
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=MAKERS[kind], config=cfg)
    train_steps(model, optimizer, batches[:3])
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, model.shard_state())
    straight, _ = train_steps(model, optimizer, batches[3:])
    torch.manual_seed(99)
    again_model, again_optim = initialize_engine(model_func=MAKERS[kind], config=cfg)
    init_layout = [info.names[0] for info in again_model._rt.infos]
    again_model.load_shard_state(states)
    again, _ = train_steps(again_model, again_optim, batches[3:])
    return {"straight": straight, "again": again, "state": host_copy(model.state_dict()),
            "again_state": host_copy(again_model.state_dict()), "init_layout": init_layout,
            "layout": [info.names[0] for info in again_model._rt.infos]}


def fp16_overflow(inject_steps: list[int]) -> dict:
    """fp16 with an infinite gradient injected on rank 0 alone into ln_f.bias, which lies in one
    rank's shard only: every rank must skip those steps, and leave its weights untouched."""
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 2,
            "hysteresis": 1, "min_loss_scale": 1}
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=engine_config(fp16=fp16))
    rank, _ = world()
    poison = {"on": False}
    if rank == 0:
        model.module.ln_f.bias.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    info = model._infos_by_param[id(model.module.ln_f.bias)]
    skipped, scales, unchanged = [], [], []
    for step, batch in enumerate(global_batches("gpt", 6)):
        before = host_copy(model.state_dict())
        poison["on"] = step in inject_steps
        train_steps(model, optimizer, [batch])
        after = host_copy(model.state_dict())
        skipped.append(optimizer.last_step_skipped)
        scales.append(optimizer.loss_scale)
        unchanged.append(all(torch.equal(before[k], after[k]) for k in before))
    return {"skipped": skipped, "scales": scales, "unchanged": unchanged,
            "owns_ln_f_bias": info.shard_piece()[2] > 0}


def cpu_embedding_refused() -> dict:
    try:
        initialize_engine(model_func=TinyGPT, config=engine_config(use_cpu_embedding=True))
    except EngineError as error:
        return {"error": str(error)}
    return {"error": None}


def collectives() -> dict:
    """The engine's all-gather and reduce-scatter, natively and through the equivalents used where
    a backend lacks them (made to report "not supported" here)."""
    import engine.distributed as engine_dist

    def missing(*args, **kwargs):
        raise RuntimeError("ProcessGroupGloo does not support this collective")

    dist.init_process_group("gloo")
    results = {}
    for name in ("native", "equivalent"):
        if name == "equivalent":
            engine_dist._ALL_GATHER = engine_dist._REDUCE_SCATTER = missing
        comm = engine_dist.Comm(torch.device("cpu"))
        gathered = comm.all_gather(torch.empty(6), torch.arange(3.0) + 10 * comm.rank)
        reduced = comm.reduce_scatter_sum(torch.empty(3), torch.arange(6.0) * (comm.rank + 1))
        results[name] = (gathered.tolist(), reduced.tolist())
    return results


def inject_reduction_bug(bug: str) -> None:
    """Break the engine's gradient reduction in this rank the way a sharding bug would."""
    import engine.distributed as engine_dist

    def reduce_gradients(self, full, shard_numel, writes):
        if bug == "averaged_twice":
            out = self.reduce_scatter_sum(torch.empty(shard_numel, dtype=full.dtype), full)
            out.mul_(1.0 / self.world_size).mul_(1.0 / self.world_size)
        elif bug == "wrong_rank":  # this rank gets the next rank's slice of the sum
            total = full.clone()
            dist.all_reduce(total)
            other = (self.rank + 1) % self.world_size
            out = total.narrow(0, other * shard_numel, shard_numel).mul_(1.0 / self.world_size)
        else:  # "missing_reduction": this rank's own gradient, never summed over the ranks
            out = full.narrow(0, self.rank * shard_numel, shard_numel).clone()
        for dest, begin, end, add in writes:
            self._write(dest.narrow(0, begin, end - begin), out.narrow(0, begin, end - begin), add)

    engine_dist.Comm.reduce_gradients = reduce_gradients


def train_with_bug(bug: str, **kwargs) -> dict:
    inject_reduction_bug(bug)
    return train(**kwargs)


SCENARIOS = {"train": train, "train_with_bug": train_with_bug, "resume": resume, "shard_resume": shard_resume, "fp16_overflow": fp16_overflow,
             "cpu_embedding_refused": cpu_embedding_refused, "collectives": collectives}


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, scenario: str, kwargs: dict) -> None:
    for key, value in MULTI_GPU_ENV.items():  # NVLink SHARP / multicast off, as the launcher does
        os.environ.setdefault(key, value)
    # What torchrun would set: the engine creates the process group itself from these.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        torch.save(SCENARIOS[scenario](**kwargs), Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def on_ranks(tmp_path: Path, world_size: int, scenario: str, **kwargs) -> list[dict]:
    """Run a scenario on `world_size` spawned ranks; each rank's result."""
    if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
        # each rank takes cuda:LOCAL_RANK; the one-process reference would run on the GPU too
        pytest.skip(f"{world_size} ranks need {world_size} GPUs here; run with CUDA_VISIBLE_DEVICES='' for CPU ranks")
    mp.spawn(_rank_main, args=(world_size, free_port(), str(tmp_path), scenario, kwargs), nprocs=world_size)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


# A gradient element is a sum over the batch's positions and a matmul's inner dimension: at most ~10^3
# float32 terms in these tests. Summed in another order (one rank, or two ranks' means averaged) it
# changes by at most ~n * 2^-24 of the terms' magnitude: 1e3 * 6e-8 = 6e-5 of the tensor's gradient
# scale. ROUNDING takes 1e-4 of it: a bound for any CPU's rounding, not a fit to one machine.
ROUNDING = 1e-4


def adam_tolerances(cfg: dict, num_steps: int, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, sqrt(exp_avg_sq)) tolerances per element from what the rounding of the gradient can do.

    The tensor's gradient scale is the largest bias-corrected RMS gradient sqrt(v_hat); its rounding
    noise is ROUNDING times that. Adam's step lr * m_hat / (sqrt(v_hat) + eps) changes by at most
    lr * 2 * noise / (sqrt(v_hat) + eps) for a gradient that changes by `noise` (the numerator and the
    denominator both move), and never by more than 2 lr (each step is at most lr in size when
    1 - beta1 <= sqrt(1 - beta2)). Over num_steps those add up. The RMS gradient's own root moves by
    at most the noise, widened by 1 / sqrt(1 - beta2) for the decayed history it holds.
    """
    params = cfg["optimizer"]["params"]
    lr, (beta1, beta2), eps = params["lr"], params["betas"], params["eps"]
    assert 1 - beta1 <= (1 - beta2) ** 0.5  # the 2 lr cap below holds for these betas
    rms = (moments.double() / (1 - beta2 ** num_steps)).sqrt()
    noise = ROUNDING * rms.max() if rms.numel() else torch.zeros((), dtype=torch.float64)
    per_step = torch.clamp(2 * noise / (rms + eps), max=2.0)
    weight = num_steps * lr * per_step
    root = moments.double().sqrt() * 1e-3 + noise * (1 - beta2 ** num_steps) ** 0.5 / (1 - beta2) ** 0.5
    return weight, root


def assert_within(actual: torch.Tensor, expected: torch.Tensor, atol: torch.Tensor, rtol: float, what: str) -> None:
    gap = (actual.double() - expected.double()).abs()
    allowed = atol + rtol * expected.double().abs()
    worst = int(torch.argmax(gap - allowed)) if gap.numel() else 0
    assert bool((gap <= allowed).all()), (
        f"{what}: {int((gap > allowed).sum())} of {gap.numel()} elements outside the rounding bound; "
        f"worst at flat index {worst}: |{actual.flatten()[worst].item():.9g} - {expected.flatten()[worst].item():.9g}| "
        f"= {gap.flatten()[worst].item():.3g} > {allowed.flatten()[worst].item():.3g}")


def assert_same_training(ours: dict, reference: dict, cfg: dict, num_steps: int) -> None:
    assert ours["layout"] == reference["layout"]
    for key in ("losses", "norms"):
        torch.testing.assert_close(torch.tensor(ours[key]), torch.tensor(reference[key]), rtol=1e-5, atol=0)
    for key, value in reference["initial"].items():
        assert torch.equal(ours["initial"][key], value), f"initial {key}"
    assert list(ours["state"]) == list(reference["state"])
    assert list(ours["moments"]) == list(reference["moments"])
    # the optimizer state's keys follow the model's parameters (tied ones once)
    tolerances = {key: adam_tolerances(cfg, num_steps, moments) for key, moments in reference["moments"].items()}
    for key, value in reference["state"].items():
        # a tied parameter's state is under its first name; one without state must not move at all
        owner = next((k for k in tolerances if k == key or (reference["state"][k].shape == value.shape
                                                             and torch.equal(reference["state"][k], value))), None)
        weight_atol = tolerances[owner][0] if owner else torch.zeros((), dtype=torch.float64)
        assert_within(ours["state"][key], value, weight_atol, 1e-5, key)
    for key, value in reference["moments"].items():
        assert_within(ours["moments"][key].sqrt(), value.sqrt(), tolerances[key][1], 0.0,
                      f"sqrt(exp_avg_sq) of {key}")


# ---- spawned ranks --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt", "odd"])
def test_two_ranks_train_like_one_rank_with_evictions(tmp_path, kind):
    """TinyGPT is built on meta (each rank keeps its slice of every init); OddModel (tied, frozen,
    unused parameters, one tensor larger than a chunk) on the CPU, and is re-packed after warm-up
    (its unused layer goes last), moving tensor pieces between the ranks' shards."""
    cfg = engine_config()
    reference = train(kind, cfg, num_steps=6)
    ranks = on_ranks(tmp_path, 2, "train", kind=kind, cfg=cfg, num_steps=6)
    for result in ranks:  # state_dict gathers the whole model on every rank
        assert_same_training(result, reference, cfg, num_steps=6)
    if kind == "odd":
        layout = ranks[0]["layout"]  # re-packed: unused after what runs; frozen chunks last
        assert layout.index("frozen.bias") < layout.index("unused.weight") and layout[-1] == "frozen.weight"
    stats = ranks[0]["stats"]
    assert stats["step_evictions"] > 0 and stats["step_h2d_moves"] > 0, stats
    assert stats["step_d2h_bytes"] > 0, stats  # reduced gradients went to host shards
    assert stats["step_gathers"] > 0 and reference["stats"]["step_gathers"] == 0, stats  # one rank: none
    # each rank holds half the model data (plus alignment padding)
    assert stats["model_data_bytes"] < 0.55 * reference["stats"]["model_data_bytes"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the injected reduction is the CPU (gloo) path")
@pytest.mark.parametrize("bug", ["averaged_twice", "wrong_rank", "missing_reduction"])
def test_the_weight_and_moment_bounds_catch_sharding_bugs(tmp_path, bug):
    """The rounding bounds of assert_same_training are tight enough to fail on real bugs: with the
    losses and norms taken from the reference (so only the weight and moment checks can fail), a
    gradient averaged twice, a slice reduced to the wrong rank and a missing reduction are caught."""
    cfg = engine_config()
    reference = train("gpt", cfg, num_steps=6)
    [ours, _] = on_ranks(tmp_path, 2, "train_with_bug", bug=bug, kind="gpt", cfg=cfg, num_steps=6)
    ours = dict(ours, losses=reference["losses"], norms=reference["norms"])
    with pytest.raises(AssertionError, match="outside the rounding bound"):
        assert_same_training(ours, reference, cfg, num_steps=6)


def test_gradient_accumulation_and_clipping_on_two_ranks(tmp_path):
    cfg = engine_config(gradient_accumulation_steps=2, gradient_clipping=0.05)
    reference = train("odd", cfg, num_steps=5, grad_accum=2)
    assert all(norm > 0.05 for norm in reference["norms"])  # clipping is active in every step
    [ours, _] = on_ranks(tmp_path, 2, "train", kind="odd", cfg=cfg, num_steps=5, grad_accum=2)
    assert_same_training(ours, reference, cfg, num_steps=5)
    assert ours["stats"]["grad_chunks_device"] + ours["stats"]["grad_chunks_host"] > 0


def test_fp16_clipping_and_accumulation_on_two_ranks(tmp_path):
    """fp16 (dynamic scale) with clipping, gradient accumulation and evictions: the unscale and
    clip multiplier comes from a norm over both ranks' shards. fp16 gradients round differently
    when averaged over ranks, so the tolerance is fp16's (~1e-4 of a weight); a wrong slice, a
    missing average or an unscaled shard moves weights by the lr (3e-3) or more."""
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 2,
            "hysteresis": 1, "min_loss_scale": 1}
    cfg = engine_config(fp16=fp16, gradient_clipping=0.05, gradient_accumulation_steps=2)
    reference = train("gpt", cfg, num_steps=3, grad_accum=2)
    [ours, _] = on_ranks(tmp_path, 2, "train", kind="gpt", cfg=cfg, num_steps=3, grad_accum=2)
    scales = [4096, 4096, 8192, 8192]  # no overflow: doubled after each 2 clean steps
    # the norms are of the scaled gradients; clipping is active in every step
    assert all(norm / scale > 0.05 for norm, scale in zip(reference["norms"], scales))
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(reference["losses"]), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(ours["norms"]), torch.tensor(reference["norms"]), rtol=1e-3, atol=0)
    for key, value in reference["state"].items():
        torch.testing.assert_close(ours["state"][key], value, rtol=0, atol=1e-3, msg=lambda m: f"{key}: {m}")
    assert ours["stats"]["step_evictions"] > 0


def test_optimizer_state_on_the_device_with_two_ranks(tmp_path):
    cfg = engine_config(device_memory_limit=64 * 1024 * 1024)
    reference = train("gpt", cfg, num_steps=4)
    [ours, _] = on_ranks(tmp_path, 2, "train", kind="gpt", cfg=cfg, num_steps=4)
    assert_same_training(ours, reference, cfg, num_steps=4)
    assert ours["stats"]["optim_chunks_device"] > 0 and ours["stats"]["optim_chunks_host"] == 0
    # a limit is each rank's; a share of the machine's host memory is split between its 2 ranks
    assert ours["stats"]["device_budget_bytes"] == 64 * 1024 * 1024
    assert ours["stats"]["host_budget_bytes"] == reference["stats"]["host_budget_bytes"] // 2


@pytest.mark.slow
def test_three_ranks_split_chunks_into_padded_shards(tmp_path):
    """An odd world size: shard boundaries cut through tensors anywhere, averaging divides by 3.
    (Slow: three processes; the split itself is checked without them below.)"""
    cfg = engine_config()
    reference = train("gpt", cfg, num_steps=3, batch=6)
    ranks = on_ranks(tmp_path, 3, "train", kind="gpt", cfg=cfg, num_steps=3, batch=6)
    assert_same_training(ranks[2], reference, cfg, num_steps=3)


def test_state_dicts_resume_a_sharded_run_exactly(tmp_path):
    for result in on_ranks(tmp_path, 2, "resume", kind="gpt", cfg=engine_config(gradient_clipping=1.0)):
        assert result["again"] == result["straight"]  # same ranks, same shards: bitwise
        for key, value in result["state"].items():
            assert torch.equal(result["again_state"][key], value), key


def test_shard_states_resume_a_repacked_sharded_run_exactly(tmp_path):
    cfg = engine_config(gradient_clipping=0.05)
    for result in on_ranks(tmp_path, 2, "shard_resume", kind="odd", cfg=cfg):
        assert result["init_layout"] != result["layout"]  # the resumed engine re-packed
        assert result["again"] == result["straight"]  # same ranks, same shards: bitwise
        for key, value in result["state"].items():
            assert torch.equal(result["again_state"][key], value), key


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    ranks = on_ranks(tmp_path, 2, "fp16_overflow", inject_steps=[2, 3])
    assert sum(r["owns_ln_f_bias"] for r in ranks) == 1  # the inf lands in one rank's shard
    for result in ranks:
        assert result["skipped"] == [False, False, True, True, False, False]
        assert result["unchanged"] == result["skipped"]  # skipped: bitwise unchanged; else updated
        # window 2, hysteresis 1: doubles after 2 clean steps, halves at each overflow
        assert result["scales"] == [256, 512, 256, 128, 128, 256]


def test_cpu_embedding_with_several_ranks_is_refused_clearly(tmp_path):
    for result in on_ranks(tmp_path, 2, "cpu_embedding_refused"):
        assert result["error"] == "use_cpu_embedding is not supported with several ranks: set it to false"


def test_collectives_and_their_equivalents_give_the_same_numbers(tmp_path):
    for rank, result in enumerate(on_ranks(tmp_path, 2, "collectives")):
        expected = ([0, 1, 2, 10, 11, 12], [3 * v for v in range(3 * rank, 3 * rank + 3)])
        assert result == {"native": expected, "equivalent": expected}


# ---- plain torchrun and the pstar launcher --------------------------------------------------

def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """A CPU (gloo) run in a subprocess, GPUs hidden."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_seed_api_in_a_script_started_by_plain_torchrun(tmp_path):
    """No process group and no local_rank in the script: the engine takes both from torchrun."""
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import torch.distributed as dist
        from tests.test_distributed import engine_config, train
        result = train("gpt", engine_config(), num_steps=3)
        if dist.get_rank() == 0:
            json.dump(result["losses"], open(sys.argv[1], "w"))
    """))
    out = tmp_path / "losses.json"
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  str(script), str(out)], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    # one CPU process, GPUs hidden as for the ranks (on a GPU the engine's init would draw on its
    # generator)
    single = tmp_path / "one_process.py"
    single.write_text(textwrap.dedent("""
        import json, sys
        from tests.test_distributed import engine_config, train
        json.dump(train("gpt", engine_config(), num_steps=3)["losses"], open(sys.argv[1], "w"))
    """))
    reference_out = tmp_path / "reference.json"
    result = run([sys.executable, str(single), str(reference_out)], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(json.loads(out.read_text())),
                               torch.tensor(json.loads(reference_out.read_text())), rtol=1e-5, atol=0)


# 16 MiB per rank: the CLI demo's chunks move between "device" and host in every step on 2 ranks too
CLI_OVERRIDES = ["train.steps=4", "train.log_interval=1", "engine.device_memory_limit=16777216"]


def pstar_train(output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pstar_cli", "train", str(TINY), *CLI_OVERRIDES, *overrides,
                "--output-dir", str(output_dir)], cwd=REPO)


def logged(output_dir: Path, key: str) -> list:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one_process")
    result = pstar_train(output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_pstar_train_on_two_processes_matches_one(one_process_run, tmp_path):
    """Each rank takes its contiguous share of the global batch; the logged loss is the mean over
    ranks. Rank 0 alone writes metrics.jsonl and prints; every rank's output is in logs/."""
    result = pstar_train(tmp_path, "distributed.nproc_per_node=2")
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(logged(tmp_path, "loss")),
                               torch.tensor(logged(one_process_run, "loss")), rtol=1e-5, atol=0)
    assert all(moves > 0 for moves in logged(tmp_path, "step_h2d_moves")[1:])
    assert logged(tmp_path, "step") == [1, 2, 3, 4]  # one record per step: rank 0's
    assert "step 4/4" in result.stdout and "2 ranks" in result.stdout  # rank 0's lines reach the console
    for local_rank in (0, 1):
        [stdout_log] = (tmp_path / "logs").glob(f"*/attempt_0/{local_rank}/stdout.log")
        assert "step 4/4" in stdout_log.read_text()


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_one_process(one_process_run, tmp_path):
    """Two `pstar train` processes, one worker each, meeting at a c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "pstar_cli", "train", str(TINY), *CLI_OVERRIDES,
                               "distributed.nnodes=2", f"distributed.node_rank={node}",
                               f"distributed.rdzv_endpoint={endpoint}", "--output-dir", str(tmp_path)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    torch.testing.assert_close(torch.tensor(logged(tmp_path, "loss")),
                               torch.tensor(logged(one_process_run, "loss")), rtol=1e-5, atol=0)


@pytest.mark.slow  # tests/test_launch.py checks a failing worker in the default run
def test_a_worker_failing_mid_training_stops_the_job(tmp_path):
    """Rank 1 raises in its third optimizer step while rank 0 waits for it in a collective: the job
    ends with a non-zero exit and rank 1's message instead of hanging (a sitecustomize module
    injects the failure into the workers)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1":
            import engine.optimizer
            original = engine.optimizer.HybridAdam.step
            calls = {"n": 0}
            def step(self, *args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("injected failure in step 3 on rank 1")
                return original(self, *args, **kwargs)
            engine.optimizer.HybridAdam.step = step
    """))
    env = {**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{REPO}", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "pstar_cli", "train", str(TINY), *CLI_OVERRIDES,
                             "train.steps=20", "distributed.nproc_per_node=2", "--output-dir", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "worker rank 1" in result.stderr and "injected failure in step 3 on rank 1" in result.stderr
    assert len(logged(tmp_path / "out", "step")) < 20


# ---- GPUs -----------------------------------------------------------------------------------

GPU_CASES = {
    # gathers and evictions every step; reduced gradients go down to host shards
    "evictions": (engine_config(), 1),
    # everything fits: optimizer state and shards on the GPU, reductions write device shards
    "resident": (engine_config(device_memory_limit=256 << 20), 1),
    # accumulation into host grad shards: reductions staged through pinned memory, added on the host
    "accumulation": (engine_config(gradient_accumulation_steps=2, gradient_clipping=0.05), 2),
}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("case", sorted(GPU_CASES))
@pytest.mark.parametrize("kind", ["gpt", "odd"])
def test_two_gpus_train_like_one_gpu(tmp_path, kind, case):
    """NCCL on 2 GPUs against 1 GPU: gathers and reductions on the side stream.

    cuBLAS picks its kernels (and so its rounding) by shape, and Adam turns rounding noise in tiny
    gradients into steps of ~lr; so the one-GPU reference accumulates the same micro-batches the
    ranks compute (each rank's share of the global batch), and the average of two gradients is
    exact. The CPU tests above compare with one plain global batch."""
    cfg, grad_accum = GPU_CASES[case]
    reference_cfg = {**cfg, "gradient_accumulation_steps": 2 * grad_accum}
    reference = train(kind, reference_cfg, num_steps=6, grad_accum=2 * grad_accum, batch=2)
    ranks = on_ranks(tmp_path, 2, "train", kind=kind, cfg=cfg, num_steps=6, grad_accum=grad_accum)
    for result in ranks:
        assert_same_training(result, reference, cfg, num_steps=6)
    stats = ranks[0]["stats"]
    if case == "resident":
        assert stats["optim_chunks_device"] > 0 and stats["optim_chunks_host"] == 0, stats
    else:
        assert stats["step_evictions"] > 0, stats


# ---- the pieces -----------------------------------------------------------------------------

def infos_at(offsets_and_sizes: list[tuple[int, int]]) -> list[TensorInfo]:
    return [TensorInfo(param=torch.nn.Parameter(torch.zeros(n)), names=[f"t{i}"], offset=offset, numel=n,
                       shape=torch.Size([n]), requires_grad=True)
            for i, (offset, n) in enumerate(offsets_and_sizes)]


def test_shards_split_padded_chunks_and_tensors_across_ranks():
    assert padded_capacity(320, 2, 64) == 384  # 2 shards of 192 elements
    assert padded_capacity(384, 2, 64) == 384
    assert padded_capacity(100, 3, 64) == 192
    layout = [(0, 100), (128, 150), (320, 10)]  # a 384-element chunk on 2 ranks: shards of 192
    pieces = {}
    for rank in (0, 1):
        infos = infos_at(layout)
        new_chunk_group(0, 384, infos, torch.float32, False, False, 0, (rank, 2))
        pieces[rank] = [info.shard_piece() for info in infos]
    # (start in the shard, start in the tensor, length)
    assert pieces[0] == [(0, 0, 100), (128, 0, 64), (0, 0, 0)]
    assert pieces[1] == [(0, 0, 0), (0, 64, 86), (128, 0, 10)]


def test_reduced_gradients_go_to_runs_of_neighbouring_tensors():
    infos = infos_at([(0, 64), (64, 64), (128, 64), (192, 64)])
    group = new_chunk_group(0, 512, infos, torch.float32, False, False, 0, (0, 2))  # shard: 0..256
    dest = torch.zeros(256)
    infos[3].has_grad = True  # accumulation: this one adds to an earlier micro-batch's gradient
    writes = gradient_writes(group, [infos[0], infos[1], infos[3]], dest)
    assert [(begin, end, add) for _, begin, end, add in writes] == [(0, 128, False), (192, 256, True)]
