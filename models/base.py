"""What both model families share: meta-device construction, per-module init, blocks, the loss."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

INIT_STD = 0.02


class MetaInitModel(nn.Module):
    """A model whose constructor builds its modules on `meta` and then calls `materialise_()`.

    Init contract: `init_weights()` is exactly `for m in self.modules(): self.init_module_(m)`,
    and `init_module_(m)` initialises only m's own parameters and buffers from the global torch
    RNG. So an engine can build the model on `meta`, give each module real storage in
    `modules()` order and call `init_module_` on it, and get the same weights as a plain build
    with the same seed.
    """

    def materialise_(self) -> None:
        """Give every tensor storage on the default device and initialise it (not on meta)."""
        device = torch.get_default_device()
        if device.type == "meta":
            return
        self.to_empty(device=device)
        self.tie_weights()  # to_empty gives each registration of a shared parameter its own tensor
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.modules():
            self.init_module_(module)

    def init_module_(self, module: nn.Module) -> None:
        raise NotImplementedError

    def tie_weights(self) -> None:
        """Re-share tied parameters (after anything that replaced them); no-op when untied."""

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, *args) -> torch.Tensor:
        # with activation checkpointing a block keeps only its input; its activations are
        # recomputed in backward. With recompute_layers only the first blocks are: backward reaches
        # them last, when the activations the later blocks kept are already freed
        recomputed = 0
        if self.activation_checkpointing and torch.is_grad_enabled():
            recomputed = len(blocks) if self.recompute_layers is None else self.recompute_layers
        for index, block in enumerate(blocks):
            if index < recomputed:
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return x


def init_linear_(module: nn.Linear) -> None:
    """Normal(0, module.init_std or 0.02) weight, zero bias; residual projections set init_std."""
    nn.init.normal_(module.weight, mean=0.0, std=getattr(module, "init_std", INIT_STD))
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def residual_linear(in_features: int, out_features: int, bias: bool, num_layers: int) -> nn.Linear:
    """A projection that writes into the residual stream; its init shrinks with depth (GPT-2)."""
    linear = nn.Linear(in_features, out_features, bias=bias)
    linear.init_std = INIT_STD / (2 * num_layers) ** 0.5
    return linear


def check_length(idx: torch.Tensor, max_len: int) -> None:
    if idx.dim() != 2:
        raise ValueError(f"expected token ids of shape (batch, seq_len), got {tuple(idx.shape)}")
    if idx.shape[1] > max_len:
        raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's seq_len {max_len}; "
                         f"raise model.seq_len")


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy, computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
