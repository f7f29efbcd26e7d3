"""Small models the engine tests train side by side with plain PyTorch."""

from __future__ import annotations

import contextlib
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TinyBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.out = nn.Linear(4 * hidden, hidden)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A pre-LayerNorm GPT with a tied head, following pstar's init contract (init_module_)."""

    def __init__(self, vocab: int = 96, hidden: int = 32, layers: int = 2, heads: int = 4, seq: int = 16):
        super().__init__()
        self.num_layers = layers
        with torch.device("meta"):  # the init contract: build on meta, then materialise + init
            self.wte = nn.Embedding(vocab, hidden)
            self.wpe = nn.Embedding(seq, hidden)
            self.blocks = nn.ModuleList(TinyBlock(hidden, heads) for _ in range(layers))
            self.ln_f = nn.LayerNorm(hidden)
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        device = torch.get_default_device()
        if device.type != "meta":
            self.to_empty(device=device)
            self.lm_head.weight = self.wte.weight  # to_empty makes new tensors: tie again
            self.init_weights()

    def init_weights(self):
        for m in self.modules():
            self.init_module_(m)

    def init_module_(self, m: nn.Module):
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.num_layers) if m.out_features == m.in_features else 0.02
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class Scale(nn.Module):
    """A parameter-free module."""

    def forward(self, x):
        return x * 0.5


class OddModel(nn.Module):
    """Everything the engine must cope with besides a GPT: a tied embedding/head, a module called
    twice in one forward, a parameter that never gets a gradient, a frozen parameter, a buffer,
    a module without parameters, and one tensor larger than the test's chunk size."""

    def __init__(self, vocab: int = 64, hidden: int = 24):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.shared = nn.Linear(hidden, hidden)  # called twice
        self.big = nn.Linear(hidden, 8 * hidden)  # 4608 + 192 elements: larger than a test chunk
        self.down = nn.Linear(8 * hidden, hidden)
        self.unused = nn.Linear(hidden, hidden)  # never called: grads stay None
        self.frozen = nn.Linear(hidden, hidden)
        self.frozen.weight.requires_grad_(False)
        self.scale = Scale()
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("gain", torch.linspace(0.5, 1.5, hidden))

    def forward(self, idx, targets=None):
        x = self.embed(idx) * self.gain
        x = torch.tanh(self.shared(x))
        x = x + self.down(F.gelu(self.big(x)))
        x = self.scale(torch.tanh(self.shared(x)) + self.frozen(x))
        logits = self.head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


CHUNK = 2048  # elements: TinyGPT spans many chunks; OddModel.big (4800 elements) gets its own
VOCAB = {"gpt": 96, "odd": 64}
MAKERS = {"gpt": TinyGPT, "odd": OddModel}


def engine_config(eps: float = 1e-8, **overrides) -> dict:
    """The engine settings the numerics tests share: several chunks per model and a device budget
    with room for only a few chunks next to the activations, so chunks are evicted in every step."""
    cfg = {
        "default_chunk_size": CHUNK,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": eps,
                                                  "weight_decay": 0.1}},
        "device_memory_limit": 64 * 1024,
        "client": {"mem_tracer": {"warmup_gpu_chunk_mem_ratio": 1.0}},
    }
    cfg.update(overrides)
    return cfg


def adam_weight_atol(num_steps: int, device: torch.device) -> float:
    """atol for weights after `num_steps` AdamW steps (lr 3e-3) compared with torch.optim's run.

    On the CPU the engine steps with torch's own fused kernel: 1e-6 (tests/test_param_groups.py).
    On a GPU its host groups step with torch's CPU kernel while torch.optim steps with the CUDA one,
    and the two round differently: fed the same TinyGPT gradients, plain torch's CUDA and CPU fused
    AdamW put the weights 0.9e-6 apart after two steps and 6.2e-6 after eight (measured on the H200
    machine), so 1e-6 a step there."""
    return 1e-6 if device.type == "cpu" else 1e-6 * num_steps


def reference_adamw(module: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """torch's fused AdamW with an engine config's optimizer settings: what the engine must equal."""
    p = cfg["optimizer"]["params"]
    return torch.optim.AdamW(module.parameters(), lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                             weight_decay=p["weight_decay"], fused=True)


def reference_step(reference: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor,
                   max_norm: float = 0.0) -> float:
    """One plain-PyTorch training step (clipping at `max_norm` if given); returns the loss."""
    optimizer.zero_grad()
    loss = reference(x, y)
    loss.backward()
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    optimizer.step()
    return loss.item()


def save_training_state(model, optimizer, how: str):
    """What a checkpoint keeps, copied off the engine: `model.shard_state()` ("shard state"), or the
    model's and the optimizer's state dicts on the host ("state dicts")."""
    if how == "shard state":
        return model.shard_state()
    saved_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    saved_opt = optimizer.state_dict()
    saved_opt["state"] = {name: {k: (v.cpu().clone() if torch.is_tensor(v) else v) for k, v in entry.items()}
                          for name, entry in saved_opt["state"].items()}
    return saved_model, saved_opt


def load_training_state(model, optimizer, saved, how: str) -> None:
    """Load what `save_training_state` kept into another engine."""
    if how == "shard state":
        model.load_shard_state(saved)
        return
    saved_model, saved_opt = saved
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_opt)


@contextlib.contextmanager
def engine_on_cpu():
    """The engine and the shared test batches on the CPU, even where CUDA is present.

    For tests that compare two engine runs bit for bit: on a GPU two such runs may take different
    kernels for the same numbers by design (host Adam on the CPU for an evicting run, CUDA's once
    settled; a gradient norm's partial sum taken where its chunk happens to be; host groups that
    the GPU steps over streamed state, split by measured rates), so their last bits differ there.
    On the CPU every path runs the same kernels and the claim is exact."""
    import engine.api
    import tests.test_engine

    cpu = torch.device("cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.api, "pick_compute_device", lambda local_rank, setting="auto": cpu)
        # pytest imports the file as `test_engine` for its own tests, the other test files as
        # `tests.test_engine`: the batches' device is set in both
        for name in ("tests.test_engine", "test_engine"):
            module = sys.modules.get(name)
            if module is not None:
                patch.setattr(module, "DEVICE", cpu)
        yield cpu
