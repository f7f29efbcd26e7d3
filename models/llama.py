"""Llama-style decoder: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import (INIT_STD, MetaInitModel, check_length, init_linear_, mean_cross_entropy,
                         residual_linear)


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab_size: int = 32000
    seq_len: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    activation_checkpointing: bool = False
    recompute_layers: int | None = None  # with activation_checkpointing: the first that many blocks; None: all
    dropout: float = 0.0
    norm_eps: float = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: the mean of squares loses too much in bf16
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables (seq_len, head_size/2) in fp32; non-persistent, rebuilt by init_tables_()."""

    def __init__(self, head_size: int, seq_len: int, theta: float):
        super().__init__()
        self.head_size, self.seq_len, self.theta = head_size, seq_len, theta
        self.register_buffer("cos", torch.empty(seq_len, head_size // 2, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("sin", torch.empty(seq_len, head_size // 2, dtype=torch.float32),
                             persistent=False)

    @torch.no_grad()
    def init_tables_(self) -> None:
        device = self.cos.device
        exponents = torch.arange(0, self.head_size, 2, device=device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_size))  # (hs/2,)
        positions = torch.arange(self.seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # (S, hs/2)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:length], self.sin[:length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hs/2]) of x (B, nh, T, hs) by the position's angles."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.heads, cfg.kv_heads
        self.head_size = cfg.hidden // cfg.heads
        self.dropout = cfg.dropout
        kv_width = cfg.kv_heads * self.head_size
        self.wq = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.wk = nn.Linear(cfg.hidden, kv_width, bias=False)
        self.wv = nn.Linear(cfg.hidden, kv_width, bias=False)
        self.wo = residual_linear(cfg.hidden, cfg.hidden, bias=False, num_layers=cfg.layers)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q = self.wq(x).view(batch, length, self.num_heads, self.head_size).transpose(1, 2)
        k = self.wk(x).view(batch, length, self.num_kv_heads, self.head_size).transpose(1, 2)
        v = self.wv(x).view(batch, length, self.num_kv_heads, self.head_size).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = self._repeat_kv(k), self._repeat_kv(v)  # (B, nh, T, hs)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(batch, length, hidden))

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        # each kv head serves num_heads / num_kv_heads query heads; expand, then copy once so
        # every attention kernel sees plain multi-head shapes
        repeats = self.num_heads // self.num_kv_heads
        if repeats == 1:
            return t
        batch, num_kv, length, size = t.shape
        return t[:, :, None].expand(batch, num_kv, repeats, length, size).reshape(
            batch, num_kv * repeats, length, size)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.w_down = residual_linear(cfg.ffn_hidden, cfg.hidden, bias=False, num_layers=cfg.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class Llama(MetaInitModel):
    """`model(idx)` -> logits (B, T, V); `model(idx, targets)` -> mean fp32 cross-entropy.

    The output head is separate from the token embedding unless `tie_embeddings` is set (then
    one Parameter is registered as both `tok_emb.weight` and `output.weight`).
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = cfg.activation_checkpointing
        self.recompute_layers = cfg.recompute_layers
        with torch.device("meta"):
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)
            self.rope = RotaryEmbedding(cfg.hidden // cfg.heads, cfg.seq_len, cfg.rope_theta)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
            self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
            self.output = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.materialise_()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_emb.weight

    def init_module_(self, module: nn.Module) -> None:
        if module is self.output and self.config.tie_embeddings:
            return  # its weight is tok_emb's, initialised with tok_emb
        if isinstance(module, nn.Linear):
            init_linear_(module)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            module.init_tables_()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        check_length(idx, self.config.seq_len)
        cos, sin = self.rope(idx.shape[1])  # (T, hs/2) each
        x = self.drop(self.tok_emb(idx))  # (B, T, h)
        x = self.norm(self.run_blocks(self.blocks, x, cos, sin))
        logits = self.output(x)  # (B, T, V)
        return logits if targets is None else mean_cross_entropy(logits, targets)
