"""Init equals a plain build for tied weights, whatever the order of construction and tying.

Models written the common way (default inits in the constructors, no init_module_): in a plain
build a tied tensor keeps the init of the module that created it, and the other holder's init went
into a tensor the tie threw away (still drawing from the RNG). Every tensor must be bitwise equal to
the plain build with the same seed (same ops on the same RNG stream, so no tolerance).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import initialize_engine
from tests.engine_models import engine_config

VOCAB, HIDDEN = 64, 48


class TieAfterBoth(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.after = nn.Linear(HIDDEN, HIDDEN)  # drawn after the head's discarded init
        self.head.weight = self.wte.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.after(torch.tanh(self.mid(self.wte(idx))))))


class HeadBuiltFirst(nn.Module):
    """The head is constructed before the embedding but registered after it."""

    def __init__(self):
        super().__init__()
        head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.head = head
        self.head.weight = self.wte.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.wte(idx))))


class ReverseTie(nn.Module):
    """The embedding takes the head's tensor: the head's kaiming-uniform init is the one kept."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.wte.weight = self.head.weight

    def forward(self, idx):
        return self.head(self.wte(idx))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)
        self.out.weight = self.emb.weight  # tied inside the submodule


class TieInSubmodule(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(HIDDEN, HIDDEN)
        self.inner = Inner()
        self.post = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, idx):
        x = self.post(torch.tanh(self.pre(self.inner.emb(idx))))
        return self.inner.out(x)


class ModuleReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        shared = nn.Linear(HIDDEN, HIDDEN)
        self.first = shared
        self.blocks = nn.ModuleList([shared, nn.Linear(HIDDEN, HIDDEN), shared])
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(self.first(x))


MODELS = [TieAfterBoth, HeadBuiltFirst, ReverseTie, TieInSubmodule, ModuleReused]


@pytest.mark.parametrize("make", MODELS, ids=[m.__name__ for m in MODELS])
@pytest.mark.parametrize("through_temporaries", [False, True], ids=["in-chunks", "temporaries"])
def test_init_equals_a_plain_build(make, through_temporaries, monkeypatch):
    """Both init paths: straight in the host master chunks, and through a temporary per parameter
    (the path of init on a GPU and of several ranks)."""
    import engine.init
    if through_temporaries:
        monkeypatch.setattr(engine.init, "_stage_in_temporaries", lambda sharded, device: True)
    torch.manual_seed(5)
    plain = make()
    torch.manual_seed(5)
    model, _ = initialize_engine(model_func=make, config=engine_config(init_device="cpu"))
    ours = model.state_dict()
    theirs = plain.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key].cpu(), value), key


def test_the_tied_tensor_keeps_the_embeddings_init():
    """The symptom of the issue: the tied tensor had the head's kaiming-uniform values (std 0.036
    at this width) instead of the embedding's N(0, 1)."""
    torch.manual_seed(0)
    model, _ = initialize_engine(model_func=TieAfterBoth, config=engine_config())
    weight = model.state_dict()["head.weight"]
    assert 0.8 < weight.std().item() < 1.2
    assert model.module.head.weight is model.module.wte.weight


@pytest.mark.engine_on_cpu
@pytest.mark.parametrize("make", [TieAfterBoth, ModuleReused], ids=["tie", "reused"])
def test_tied_models_train_like_plain_pytorch(make):
    cfg = engine_config()
    torch.manual_seed(1)
    plain = make()
    torch.manual_seed(1)
    model, optimizer = initialize_engine(model_func=make, config=cfg)
    p = cfg["optimizer"]["params"]
    ref_opt = torch.optim.AdamW(plain.parameters(), lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                                weight_decay=p["weight_decay"], fused=True)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        idx = torch.randint(VOCAB, (4, 8), generator=gen)
        target = torch.randint(VOCAB, (4, 8), generator=gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(idx).view(-1, VOCAB).float(), target.view(-1))
        model.backward(loss)
        optimizer.step()
        ref_opt.zero_grad()
        ref_loss = F.cross_entropy(plain(idx).view(-1, VOCAB), target.view(-1))
        ref_loss.backward()
        ref_opt.step()
        # fp32, the same ops: rounding-order differences only (see tests/test_param_groups.py)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
