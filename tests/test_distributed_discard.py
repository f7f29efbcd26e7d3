"""zero_grad() discards a backward with several ranks (gloo on CPU), plain and with fp16 + clipping:
on every rank the run equals the run that never saw that batch, bit for bit (both runs reduce the
same gradients in the same order)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import initialize_engine
from tests.engine_models import TinyGPT
from tests.test_distributed import MULTI_GPU_ENV, compute_device, engine_config, free_port, global_batches, world

FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 3,
        "hysteresis": 1, "min_loss_scale": 1}


def _run(cfg: dict, discard: bool) -> dict:
    """Six global batches; batch 3 either goes through backward and is discarded, or is never shown."""
    rank, world_size = world()
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
    for index, (x, y) in enumerate(global_batches("gpt", 6)):
        x, y = (t.chunk(world_size)[rank].to(compute_device()) for t in (x, y))
        optimizer.zero_grad()
        if index == 3:
            if discard:
                model.backward(model(x, y))
                optimizer.zero_grad()
            continue
        model.backward(model(x, y))
        optimizer.step()
    moments = [v["exp_avg_sq"].cpu().clone() for v in optimizer.state_dict()["state"].values()]
    return {"state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "moments": moments}


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, cfg: dict, discard: bool) -> None:
    for key, value in MULTI_GPU_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        torch.save(_run(cfg, discard), Path(out_dir) / f"rank{rank}-{discard}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("setting", [pytest.param("fp32", marks=pytest.mark.slow), "fp16-clipping"])
def test_two_ranks_discard_a_backward_like_the_run_that_skipped_it(tmp_path, setting):
    """Each run in fresh processes: two identical runs one after the other in the same rank
    processes were seen to differ by ~1e-7 (cause not pinned down), so the runs do not share one."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("2 ranks need 2 GPUs here")
    cfg = engine_config() if setting == "fp32" else engine_config(fp16=FP16, gradient_clipping=1.0)
    for discard in (True, False):
        mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path), cfg, discard), nprocs=2)
    for rank in range(2):
        discarded = torch.load(tmp_path / f"rank{rank}-True.pt")
        skipped = torch.load(tmp_path / f"rank{rank}-False.pt")
        for key, value in skipped["state"].items():
            assert torch.equal(discarded["state"][key], value), (rank, key)
        for a, b in zip(discarded["moments"], skipped["moments"]):
            assert torch.equal(a, b), rank
