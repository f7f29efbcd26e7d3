"""Compute dtypes, the fp16 loss scaler, and the global gradient norm.

The loss scaler keeps PatrickStar's keys and meaning: `loss_scale` 0 means dynamic scaling starting at
2**initial_scale_power; the scale halves once `hysteresis` consecutive steps overflowed (and on every
further consecutive overflow), never below `min_loss_scale`, and doubles after `loss_scale_window`
clean steps in a row. A static scale (`loss_scale` > 0) never changes; overflowing steps are skipped
either way.
"""

from __future__ import annotations

import math

import torch

from engine.config import EngineConfig, Fp16Config

# Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
_CLIP_EPS = 1e-6


def compute_dtype(cfg: EngineConfig) -> torch.dtype:
    return getattr(torch, cfg.compute_dtype_name)


class LossScaler:
    def __init__(self, cfg: Fp16Config):
        self.enabled = cfg.enabled
        self.dynamic = cfg.enabled and cfg.loss_scale == 0
        if not cfg.enabled:
            self.scale = 1.0
        elif self.dynamic:
            self.scale = float(2 ** cfg.initial_scale_power)
        else:
            self.scale = float(cfg.loss_scale)
        self.window = cfg.loss_scale_window
        self.hysteresis = cfg.hysteresis
        self.min_scale = float(cfg.min_loss_scale)
        self._overflows_left = cfg.hysteresis
        self._clean_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self._clean_steps = 0
            if self._overflows_left <= 1:
                self.scale = max(self.scale / 2, self.min_scale)
            else:
                self._overflows_left -= 1
            return
        self._overflows_left = self.hysteresis  # "consecutive": a clean step resets the count
        self._clean_steps += 1
        if self._clean_steps >= self.window:
            self.scale *= 2
            self._clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "overflows_left": self._overflows_left,
                "clean_steps": self._clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._overflows_left = int(state["overflows_left"])
        self._clean_steps = int(state["clean_steps"])


def sum_of_squares(grads: list[torch.Tensor]) -> float:
    """Sum of squared elements over tensors on one device, accumulated in fp32.

    The `.item()` is the step's one host synchronisation for this device (per-tensor norms are
    combined on the device first, never read one by one).
    """
    if not grads:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g, 2, dtype=torch.float32) for g in grads])
    return norms.square().sum().item()


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """What clip_grad_norm_ multiplies the gradients by (1.0 when clipping is off)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + _CLIP_EPS))


def is_finite(value: float) -> bool:
    return math.isfinite(value)
