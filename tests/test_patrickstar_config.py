"""PatrickStar configs run unchanged: every key PatrickStar 0.4.6 reads is accepted by the engine's
schema (mapped where pstar has the same setting, else logged once as having no effect), a typo stays
an error, and the config of PatrickStar's `examples/train_simple_net.py` trains a simple net through
`initialize_engine` as PatrickStar's own loop would drive it."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import initialize_engine
from engine.config import (PATRICKSTAR_ONLY_KEYS, EngineConfigError, engine_config_problems,
                           resolve_engine_config)

VOCAB, HIDDEN, SEQ_LEN, BATCH = 64, 16, 8, 4


def train_simple_net_config() -> dict:
    """The settings of PatrickStar's examples/train_simple_net.py: Adam with its DeepSpeed-style
    params and hybrid Adam, dynamic fp16 loss scaling from 2**8, 1024-element chunks, and the
    top-level `use_fake_dist` and `use_cpu_embedding` flags."""
    return {
        "optimizer": {"type": "Adam", "params": {"lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-6,
                                                 "weight_decay": 0, "use_hybrid_adam": True}},
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 2**3, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "default_chunk_size": 1024,
        "use_fake_dist": False,
        "use_cpu_embedding": False,
    }


class SimpleNet(torch.nn.Module):
    """A small net of the example's kind: an embedding whose weight the output layer shares, two
    linear layers between them; returns the mean cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.fc1 = torch.nn.Linear(HIDDEN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # a shared parameter, as in the example

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # (batch, seq, hidden)
        h = self.fc2(torch.relu(self.fc1(h)))
        logits = self.head(h).float()  # (batch, seq, vocab)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=g),
            torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=g))


def test_the_examples_config_is_accepted_and_mapped():
    config = train_simple_net_config()
    assert engine_config_problems(config) == []
    cfg = resolve_engine_config(config)
    assert cfg.optimizer.type == "Adam" and cfg.optimizer.lr == 5e-5 and cfg.optimizer.eps == 1e-6
    assert cfg.optimizer.betas == (0.9, 0.999) and cfg.optimizer.use_hybrid_adam is True
    assert cfg.fp16.enabled and cfg.fp16.loss_scale == 0 and cfg.fp16.initial_scale_power == 8
    assert cfg.default_chunk_size == 1024 and cfg.use_cpu_embedding is False


def test_every_patrickstar_only_key_is_accepted_with_one_line_saying_why_it_has_no_effect(caplog):
    config = {"use_fake_dist": False, "release_after_init": True,
              "client": {"mem_tracer": {"use_fake_dist": False, "with_static_partition": False,
                                        "use_async_mem_monitor": True},
                         "opts": {"with_mem_saving_comm": False, "with_mem_cache": True, "with_async_move": False}}}
    with caplog.at_level(logging.INFO, logger="pstar.engine"):
        cfg = resolve_engine_config(config)
    assert cfg.release_after_init is True and cfg.mem_tracer.use_async_mem_monitor is True  # pstar's own
    notes = [r.getMessage() for r in caplog.records if "has no effect in pstar" in r.getMessage()]
    assert len(notes) == len(PATRICKSTAR_ONLY_KEYS) == 6
    for path in PATRICKSTAR_ONLY_KEYS:
        [note] = [n for n in notes if f"engine config: {'.'.join(path)} has no effect" in n]
        assert note.split(": ", 2)[2]  # and says why


def test_a_misspelt_patrickstar_key_stays_an_error():
    with pytest.raises(EngineConfigError) as error:
        resolve_engine_config({**train_simple_net_config(), "use_fake_dsit": False})
    assert "use_fake_dsit: unknown key (did you mean 'use_fake_dist'?)" in str(error.value)
    problems = engine_config_problems({"client": {"opts": {"with_async_move": "yes"}}})
    assert problems == ["client.opts.with_async_move: must be true or false (got 'yes')"]


@pytest.mark.engine_on_cpu
def test_the_examples_config_trains_a_simple_net_like_torch_adam(caplog):
    """PatrickStar's loop (zero_grad, forward, model.backward, step) on one fixed batch.

    Against torch.optim.Adam in fp32 from the engine's initial weights: the engine computes forward and
    backward in fp16 (11 significant bits, a relative rounding of 2**-11 per operation) with fp32
    master weights. The logits (of size about 1) then carry a rounding error of about 5e-4 each, and
    the loss averages their log-softmax: it moves by well under 1e-3 (about 2e-5 is seen), while an
    update that is wrong by one lr-sized step (5e-5 per weight, on a loss falling about 2e-4 a step)
    or a lost fp16 loss scale shows as a trajectory that does not fall. Both must fall at every step."""
    x, y = fixed_batch()
    with caplog.at_level(logging.INFO, logger="pstar.engine"):
        torch.manual_seed(0)
        model, optimizer = initialize_engine(model_func=SimpleNet, local_rank=0, config=train_simple_net_config())
    assert sum("use_fake_dist has no effect in pstar" in r.getMessage() for r in caplog.records) == 1
    assert optimizer.loss_scale == 2.0**8
    from engine.checkpoint import full_state_dict

    plain = SimpleNet()
    plain.load_state_dict(full_state_dict([model.shard_state()], torch.float32))  # the same start
    reference = torch.optim.Adam(plain.parameters(), lr=5e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=0)
    losses, expected = [], []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(x, y)
        model.backward(loss)
        optimizer.step()
        losses.append(loss.item())
        reference.zero_grad()
        plain_loss = plain(x, y)
        plain_loss.backward()
        reference.step()
        expected.append(plain_loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert all(later < earlier for earlier, later in zip(expected, expected[1:]))
    assert max(abs(a - b) for a, b in zip(losses, expected)) < 1e-3
