"""RNG states of a process as JSON-friendly text, and back.

torch's generator states are uint8 tensors: their bytes are taken with `tolist()` and restored
with `torch.frombuffer`, so no numpy is needed (it is not one of pstar's dependencies).
"""

from __future__ import annotations

import base64
import random

import torch


def _state_text(state: torch.Tensor) -> str:
    """A uint8 generator state as base64 text."""
    return base64.b64encode(bytes(state.tolist())).decode()


def capture_rng_state(device: torch.device) -> dict:
    """This process's torch CPU, CUDA (of its device) and Python `random` states, JSON-friendly."""
    cuda = None
    if device.type == "cuda":
        cuda = _state_text(torch.cuda.get_rng_state(device))
    version, internal, gauss = random.getstate()
    return {
        "torch": _state_text(torch.get_rng_state()),
        "cuda": cuda,
        "python": [version, list(internal), gauss],
    }


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]), device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

