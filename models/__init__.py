"""Model families for pstar: a GPT-2 style family and a Llama-style family.

    from models import build_model
    model = build_model({"family": "gpt", "size": "gpt-1.3b", "activation_checkpointing": True})
    loss = model(idx, targets)          # idx, targets: (B, T) int64 -> scalar fp32 loss

Models are constructed on the `meta` device and materialised on the current default device
(skipped when that is `meta`) with `model.init_weights()`, which is exactly
`for m in model.modules(): model.init_module_(m)`.
"""

import dataclasses

from torch import nn

from models.config import (FAMILIES, ModelConfigError, default_ffn_hidden, model_config_problems,
                           recomputed_layers, resolve_model_config)
from models.counting import flops_per_token, num_params
from models.sizes import GPT_SIZES, LLAMA_SIZES

__all__ = [
    "FAMILIES", "GPT_SIZES", "LLAMA_SIZES", "ModelConfigError", "build_model", "default_ffn_hidden",
    "flops_per_token", "model_config_problems", "model_func", "num_params", "recomputed_layers",
    "resolve_model_config",
]


def build_model(model_cfg: dict) -> nn.Module:
    """Build the model a config describes (see the module docstring for the init contract).
    With `hf_path`: the Hugging Face model of that directory, on meta (models/hf.py)."""
    if model_cfg.get("hf_path") is not None:
        from models.hf import RECOMPUTE_LAYERS_PROBLEM, build_hf_model
        if model_cfg.get("recompute_layers") is not None:  # it would be ignored: say so
            raise ModelConfigError([RECOMPUTE_LAYERS_PROBLEM])
        return build_hf_model(model_cfg["hf_path"], model_cfg.get("pretrained", True),
                              bool(model_cfg.get("activation_checkpointing")))
    cfg = resolve_model_config(model_cfg)
    if cfg["family"] == "gpt":
        from models.gpt import GPT, GPTConfig
        return GPT(_dataclass_from(GPTConfig, cfg))
    from models.llama import Llama, LlamaConfig
    return Llama(_dataclass_from(LlamaConfig, cfg))


def model_func(model_cfg: dict):
    """A `model_func` for `initialize_engine`. A Hugging Face model is built (on meta) right here, so
    a directory that cannot be loaded fails with its own message, not inside the engine's build."""
    if model_cfg.get("hf_path") is not None:
        model = build_model(model_cfg)
        return lambda: model
    return lambda: build_model(model_cfg)


def _dataclass_from(cls: type, cfg: dict):
    """A family's config dataclass from a resolved model dict (keys it has no field for are left out)."""
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})
