"""Sharded training over torch.distributed (issue 5) against one rank, on the CPU with gloo.

Every comparison trains the same model from the same seed on the same global batches: once in this
process on one rank, once on several ranks spawned with torch.multiprocessing (each rank taking its
contiguous share of every batch). Chunks are small and the device budget tight, so every step
gathers, evicts and fetches chunks again, and gradients are reduced from partly evicted chunks.

With several ranks a gradient is the average of per-rank means instead of one mean over the batch,
which rounds differently in the last bits, so nothing is bitwise: losses and gradient norms agree to
1e-5 relative. Weights get atol 2e-6 on top of rtol 1e-5: Adam divides each step by the root of the
second moment, so the last-bit difference of a gradient whose terms nearly cancel becomes a visible
difference in that element's step, up to ~1.5e-6 after these few steps at lr 3e-3. A sharding mistake (a wrong slice,
a missing average) moves weights by ~lr or more, and the second moments (~gradient squared) would
be off by a factor, which their 1e-3 comparison catches.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import initialize_engine
from tests.engine_models import OddModel, TinyGPT

MAKERS = {"gpt": TinyGPT, "odd": OddModel}
VOCAB = {"gpt": 96, "odd": 64}
CHUNK = 2048  # elements: each model spans several chunks, OddModel.big gets its own


def engine_config(**overrides) -> dict:
    cfg = {
        "default_chunk_size": CHUNK,
        # eps 1e-6 rather than 1e-8: the attention key bias's gradient is pure rounding noise
        # (~1e-9), which eps 1e-8 would turn into steps of ~lr/10 that differ between any two
        # summation orders
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-6,
                                                  "weight_decay": 0.1}},
        # Room for a few chunks next to the activations: evictions in every step.
        "device_memory_limit": 64 * 1024,
        "client": {"mem_tracer": {"warmup_gpu_chunk_mem_ratio": 1.0}},
    }
    cfg.update(overrides)
    return cfg


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


def train(kind: str, cfg: dict, num_steps: int, rank: int = 0, world_size: int = 1,
          grad_accum: int = 1) -> dict:
    """Train on this rank's share of each global batch; the mean loss over ranks per step."""
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=MAKERS[kind], config=cfg)
    losses, norms, skipped = [], [], []
    for x, y in global_batches(kind, num_steps, batch=4 * grad_accum):
        x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        optimizer.zero_grad()
        loss_sum = torch.zeros(())
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
        skipped.append(optimizer.last_step_skipped)
    optim_state = optimizer.state_dict()["state"]
    return {"losses": losses, "norms": norms, "skipped": skipped,
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "moments": {k: v["exp_avg_sq"].cpu().clone() for k, v in optim_state.items()},
            "stats": model.chunk_stats()}


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, kind: str, cfg: dict,
               num_steps: int, grad_accum: int) -> None:
    # What torchrun would set: the engine creates the process group itself from these.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        result = train(kind, cfg, num_steps, rank, world_size, grad_accum)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_on_ranks(tmp_path: Path, world_size: int, kind: str, cfg: dict, num_steps: int,
                   grad_accum: int = 1) -> list[dict]:
    mp.spawn(_rank_main, args=(world_size, free_port(), str(tmp_path), kind, cfg, num_steps, grad_accum),
             nprocs=world_size)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


def assert_same_training(ours: dict, reference: dict) -> None:
    for key in ("losses", "norms"):
        torch.testing.assert_close(torch.tensor(ours[key]), torch.tensor(reference[key]), rtol=1e-5, atol=0)
    assert ours["skipped"] == reference["skipped"]
    assert list(ours["state"]) == list(reference["state"])
    for key, value in reference["state"].items():
        torch.testing.assert_close(ours["state"][key], value, rtol=1e-5, atol=2e-6,
                                   msg=lambda m: f"{key}: {m}")
    assert list(ours["moments"]) == list(reference["moments"])
    for key, value in reference["moments"].items():
        torch.testing.assert_close(ours["moments"][key], value, rtol=1e-3, atol=1e-12,
                                   msg=lambda m: f"exp_avg_sq of {key}: {m}")


@pytest.mark.parametrize("kind", ["gpt", "odd"])
def test_two_ranks_train_like_one_rank_with_evictions(tmp_path, kind):
    cfg = engine_config()
    reference = train(kind, cfg, num_steps=6)
    ranks = train_on_ranks(tmp_path, 2, kind, cfg, num_steps=6)
    for result in ranks:  # state_dict gathers the whole model on every rank
        assert_same_training(result, reference)
    stats = ranks[0]["stats"]
    assert stats["step_evictions"] > 0 and stats["step_h2d_moves"] > 0, stats
    # each rank holds half the model data (plus alignment padding)
    assert stats["model_data_bytes"] < 0.55 * reference["stats"]["model_data_bytes"]
