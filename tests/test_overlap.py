"""Host Adam overlapped with the next forward: exact with clipping and fp16, torch's zero_grad, and
no read of a buffer still being written.

The overlapped and the non-overlapped (`overlap_backward = False`) paths run the same operations on
the same values, only at other times, so they are compared bit for bit. Those comparisons turn
streamed host groups off (`NO_STREAMING`): on a GPU each step splits the host groups between host
Adam and the GPU by the rates measured in the steps before, so which kernel steps a group follows
timing, and two identical runs differ in their last bits (measured on the H200 machine; without
streaming they are bitwise equal). On a CPU nothing streams. Comparisons with plain
torch (fp32) use rtol 1e-5 / atol 1e-6, justified in tests/test_param_groups.py.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine.host_adam
from engine import initialize_engine
from tests.engine_models import TinyGPT, adam_weight_atol, engine_config, reference_adamw, reference_step
from tests.test_engine import DEVICE, batches, engine_step, snapshot
from tests.test_engine_speed import FP16, _assert_bitwise, _split_limit, _train


@pytest.fixture(scope="module")
def split_limit() -> int:
    return _split_limit()


def _norms_of_plain_run(max_norm: float, num_steps: int, cfg: dict) -> list[float]:
    """The pre-clip global norms of the plain PyTorch run with clipping at `max_norm`."""
    torch.manual_seed(0)
    reference = TinyGPT().to(DEVICE)
    opt = reference_adamw(reference, cfg)
    norms = []
    for x, y in batches("gpt", num_steps):
        opt.zero_grad()
        reference(x, y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)))
        opt.step()
    return norms


NO_STREAMING = {"stream_host_optimizer": False}
MAX_NORM = 1.0  # TinyGPT's norms on these batches fall from about 1.7 to below 1.0 within 8 steps


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_overlap_is_bitwise_the_non_overlapped_path_when_clipping_fires_on_some_steps(split_limit, precision):
    extra = {"bf16": {"enabled": True}} if precision == "bf16" else {}
    limit = split_limit if precision == "fp32" else _split_limit(**extra)
    cfg = engine_config(device_memory_limit=limit, gradient_clipping=MAX_NORM, **extra, **NO_STREAMING)
    norms = _norms_of_plain_run(MAX_NORM, 8, cfg)
    # The premise, from the plain fp32 run: clipping fires on some steps and not on others.
    assert any(n > MAX_NORM for n in norms) and any(n < MAX_NORM for n in norms), norms
    losses, state, model, _, downloaded = _train(cfg, 8, overlap=True)
    overlapped_stats = model.chunk_stats()
    ref_losses, ref_state, ref_model, _, _ = _train(cfg, 8, overlap=False)
    assert losses == ref_losses
    _assert_bitwise(state, ref_state)
    # Host groups' gradients went down during backward and their updates ran past step().
    assert all(n > 0 for n in downloaded[2:]), downloaded
    assert overlapped_stats["step_host_groups_after_step"] > 0, overlapped_stats
    assert overlapped_stats["step_host_groups_redone"] == 0
    assert ref_model.chunk_stats()["step_host_groups_after_step"] == 0


def test_overlap_is_bitwise_the_non_overlapped_path_with_fp16_overflow_steps():
    cfg = engine_config(fp16=FP16, device_memory_limit=_split_limit(fp16=FP16), **NO_STREAMING)
    poisoned = (3, 5)
    losses, state, model, optimizer, _ = _train(cfg, 8, overlap=True, poison_steps=poisoned)
    ref_losses, ref_state, *_ = _train(cfg, 8, overlap=False, poison_steps=poisoned)
    assert losses == ref_losses
    _assert_bitwise(state, ref_state)
    assert model.chunk_stats()["step_host_groups_after_step"] > 0
    assert optimizer.loss_scale < 2.0 ** 16  # the overflows were seen (dynamic scale went down)


@pytest.mark.parametrize("setting", ["fp32", "clipping", "fp16"])
def test_a_discarded_backward_leaves_the_run_of_the_skipped_batch(split_limit, setting):
    """zero_grad() after a backward whose host groups' gradients already went down: the run equals
    the one that never saw that batch, bit for bit."""
    cfg = {"fp32": engine_config(device_memory_limit=split_limit, **NO_STREAMING),
           "clipping": engine_config(device_memory_limit=split_limit, gradient_clipping=MAX_NORM, **NO_STREAMING),
           "fp16": engine_config(fp16=FP16, device_memory_limit=_split_limit(fp16=FP16), **NO_STREAMING)}[setting]
    data = list(batches("gpt", 6))
    runs = []
    for discard in (True, False):
        torch.manual_seed(0)
        model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
        for index, (x, y) in enumerate(data):
            if index == 3:
                if discard:
                    model.backward(model(x, y))
                    assert optimizer._host.num_started_in_backward > 0  # the premise
                    optimizer.zero_grad()
                continue
            engine_step(model, optimizer, x, y)
        runs.append(snapshot(model, optimizer))
    _assert_bitwise(runs[0], runs[1])


def test_a_discarded_backward_equals_plain_pytorch_skipping_the_batch(split_limit):
    cfg = engine_config(device_memory_limit=split_limit, gradient_clipping=MAX_NORM)
    data = list(batches("gpt", 6))
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
    reference = TinyGPT().to(DEVICE)
    reference.load_state_dict(model.state_dict())  # (on a GPU the engine's init draws on its generator)
    ref_opt = reference_adamw(reference, cfg)
    for index, (x, y) in enumerate(data):
        if index == 3:  # a bad batch: backward, then dropped
            model.backward(model(x, y))
            optimizer.zero_grad()
            ref_opt.zero_grad()
            reference(x, y).backward()
            ref_opt.zero_grad()
            continue
        engine_step(model, optimizer, x, y)
        ref_opt.zero_grad()
        reference(x, y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        ref_opt.step()
    ours = model.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours[key].float().cpu(), value.float().cpu(), rtol=1e-5,
                                   atol=adam_weight_atol(len(data), DEVICE))


# ---- reads outside the owning module's hooks ---------------------------------------------------

class ParentReadsTheTable(nn.Module):
    """A parent module computes the logits with `F.linear(x, self.head.weight, self.head.bias)`:
    the head's tensors are read outside any hook (the head module itself never runs)."""

    def __init__(self, vocab: int = 64, hidden: int = 32):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx, targets):
        x = torch.tanh(self.mid(self.wte(idx)))
        logits = F.linear(x, self.head.weight, self.head.bias)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def _slow_host_updates(monkeypatch, seconds: float) -> None:
    """Host Adam and its copy back made slow, so a read that does not wait sees old weights."""
    real = engine.host_adam.adam_on_spans

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.host_adam, "adam_on_spans", slow)
    real_upload = engine.host_adam.Copier.upload_into_place

    def slow_upload(self, chunk, after):
        time.sleep(seconds)
        return real_upload(self, chunk, after)

    monkeypatch.setattr(engine.host_adam.Copier, "upload_into_place", slow_upload)


@pytest.mark.parametrize("device_memory_limit", [1 << 30, 24 * 1024], ids=["resident", "evicting"])
def test_a_parameter_read_outside_its_hooks_waits_for_its_update(monkeypatch, device_memory_limit):
    _slow_host_updates(monkeypatch, 0.05)
    cfg = engine_config(device_memory_limit=device_memory_limit,
                        optimizer={"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                               "weight_decay": 0.1, "use_hybrid_adam": False}})
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=ParentReadsTheTable, config=cfg)
    reference = ParentReadsTheTable().to(DEVICE)
    reference.load_state_dict(model.state_dict())  # (on a GPU the engine's init draws on its generator)
    ref_opt = reference_adamw(reference, cfg)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        idx, target = (torch.randint(64, (4, 8), generator=gen).to(DEVICE) for _ in range(2))
        loss = engine_step(model, optimizer, idx, target)
        assert loss == pytest.approx(reference_step(reference, ref_opt, idx, target), rel=1e-5)
    assert model.chunk_stats()["step_host_groups_after_step"] > 0  # updates ran past step()
    assert [info.names[0] for info in model._hooks.read_outside] == ["head.weight", "head.bias"]


def _accumulating_run(cfg: dict, overlap: bool, num_steps: int = 6):
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
    optimizer.overlap_backward = overlap
    data = list(batches("gpt", 2 * num_steps))
    losses, downloaded = [], []
    for step in range(num_steps):
        optimizer.zero_grad()
        for micro, (x, y) in enumerate(data[2 * step:2 * step + 2]):
            loss = model(x, y)
            model.backward(loss / 2)
            losses.append(loss.item())
            if micro == 0:
                assert optimizer._host.num_started_in_backward == 0  # not final yet
        downloaded.append(optimizer._host.num_started_in_backward)
        optimizer.step()
    return losses, snapshot(model, optimizer), downloaded, model.chunk_stats()


def test_accumulation_sends_host_gradients_down_in_the_last_micro_batch(split_limit):
    """With gradient accumulation the host groups' fp32 grad chunks go down during the last
    micro-batch's backward (none during the first), and the run is bitwise the waited one."""
    cfg = engine_config(device_memory_limit=split_limit, gradient_accumulation_steps=2, gradient_clipping=MAX_NORM)
    losses, state, downloaded, stats = _accumulating_run(cfg, overlap=True)
    ref_losses, ref_state, ref_downloaded, _ = _accumulating_run(cfg, overlap=False)
    assert losses == ref_losses
    _assert_bitwise(state, ref_state)
    assert all(n > 0 for n in downloaded[2:]), downloaded
    assert not any(ref_downloaded)
    assert stats["optim_chunks_host"] > 0 and stats["step_host_groups_after_step"] > 0, stats
