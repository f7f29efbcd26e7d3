"""Joining and leaving a job's process group: the one place pstar's workers and the benchmark cases
set it up (a script of the user's own gets one from the engine, engine/distributed.py)."""

from __future__ import annotations

import contextlib
import gc
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=30)


def resolve_backend(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(backend: str, device: torch.device) -> Iterator[None]:
    """Join the job's process group (env:// rendezvous from torchrun's variables) for the block.

    Only a block that succeeds tears the group down: after an error the worker leaves at once
    (pstar_cli/launch/worker.py), as a teardown could wait for peers that are stuck in a collective."""
    if device.type == "cuda":
        # before any CUDA work, so every allocation and NCCL communicator lands on this rank's GPU
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    yield
    dist.destroy_process_group()
    # Collect now what still refers to the group's communication objects: left to interpreter
    # shutdown, their destruction sometimes aborts the process (SIGABRT, "terminate called
    # without an active exception"), seen with gloo in about 1 run in 6.
    gc.collect()


