"""Compute dtypes, the fp16 loss scaler, and the gradient-clipping coefficient.

The loss scaler keeps PatrickStar's keys and meaning: `loss_scale` 0 means dynamic scaling starting at
2**initial_scale_power; the scale halves once `hysteresis` consecutive steps overflowed (and on every
further consecutive overflow), never below `min_loss_scale`, and doubles after `loss_scale_window`
clean steps in a row. A static scale (`loss_scale` > 0) never changes; overflowing steps are skipped
either way.
"""

from __future__ import annotations

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


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What clip_grad_norm_ multiplies the gradients by: min(1, max_norm / (norm + 1e-6)), as the
    same fp32 tensor operations, so clipped steps match plain PyTorch bit for bit."""
    return torch.clamp(max_norm / (total_norm + _CLIP_EPS), max=1.0)
