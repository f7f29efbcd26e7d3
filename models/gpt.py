"""GPT-2 style decoder: pre-LayerNorm blocks, learned positions, tied input/output embedding."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (INIT_STD, MetaInitModel, check_length, init_linear_, mean_cross_entropy,
                         residual_linear)


@dataclass(frozen=True)
class GPTConfig:
    hidden: int
    layers: int
    heads: int
    vocab_size: int = 50304
    seq_len: int = 1024
    activation_checkpointing: bool = False
    recompute_layers: int | None = None  # with activation_checkpointing: the first that many blocks; None: all
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_heads = cfg.heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = residual_linear(cfg.hidden, cfg.hidden, bias=True, num_layers=cfg.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, nh, T, hs)
                   for t in self.qkv(x).split(hidden, dim=2))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, hidden))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, 4 * cfg.hidden)
        self.proj = residual_linear(4 * cfg.hidden, cfg.hidden, bias=True, num_layers=cfg.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(MetaInitModel):
    """`model(idx)` -> logits (B, T, V); `model(idx, targets)` -> mean fp32 cross-entropy.

    The output head's weight is the token embedding's: one Parameter registered as both
    `wte.weight` and `lm_head.weight` (`parameters()` yields it once; `state_dict()` has both keys).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = cfg.activation_checkpointing
        self.recompute_layers = cfg.recompute_layers
        with torch.device("meta"):
            self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
            self.wpe = nn.Embedding(cfg.seq_len, cfg.hidden)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
            self.ln_f = nn.LayerNorm(cfg.hidden)
            self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.materialise_()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.wte.weight

    def init_module_(self, module: nn.Module) -> None:
        if module is self.lm_head:
            return  # its weight is wte's, initialised with wte
        if isinstance(module, nn.Linear):
            init_linear_(module)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        check_length(idx, self.config.seq_len)
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, h)
        x = self.ln_f(self.run_blocks(self.blocks, x))
        logits = self.lm_head(x)  # (B, T, V)
        return logits if targets is None else mean_cross_entropy(logits, targets)
