"""Host optimizer groups stepped on the device over streamed state (engine/streamed_adam.py).

On a CPU the "device" is the host too, so the pipeline runs its copies and kernels synchronously:
what these tests check is its arithmetic and its books — which groups it steps, the spans, step
counts, the state it writes back, the weights it leaves in the param chunk — against host Adam's
path, bit for bit (the same kernels on the same values). tests/test_settled.py's GPU test covers
the streams.
"""

from __future__ import annotations

import pytest
import torch

from engine import initialize_engine
from engine.streamed_adam import ring_bytes
from tests.engine_models import (TinyGPT, adam_weight_atol, engine_config, load_training_state, reference_adamw,
                                 reference_step, save_training_state)
from tests.test_engine import DEVICE, batches, engine_step, snapshot
from tests.test_distributed import adam_tolerances, assert_within
from tests.test_engine_speed import FP16, _assert_bitwise, _split_limit
from tests.test_engine_speed import _train as train_tiny_gpt
from tests.test_overlap import MAX_NORM

# Pieces far smaller than TinyGPT's chunk groups (2-4 Ki elements): spans cross piece ends, slots
# turn around many times a step, and the slots' device room stays below half the optimizer state.
PIECE = 512


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr("engine.optimizer_placement.STREAM_PIECE_ELEMENTS", PIECE)


ALL_HOST = [1e30, 1e-30]  # (host, stream) parameters per second: every group goes to host Adam
ALL_STREAMED = [1e-30, 1e30]  # every group the pipeline can take goes to it


def _limit(**overrides) -> int:
    """tests/test_engine_speed.py's split limit (host and device groups, nothing evicted) with room
    for the pipeline's slots, which placement keeps once host groups may stream."""
    return _split_limit(**overrides) + ring_bytes(PIECE)


def _why_not_streamed(optimizer) -> str:
    """What decided, for each host group, that the device did not step it (a failure's message)."""
    host = optimizer._host
    lines = [f"rates {host.rates}, in place {host.keep_resident}, measured {host.measured_rates}"]
    for group in optimizer._rt.groups:
        if group.trainable and not group.optimizer_on_device:
            pinned = None if group.exp_avg.host_flat is None else host.streamer.can_stream(group)
            lines.append(f"group {group.param.chunk_id}: chosen {id(group) in host._streamed}, state can stream {pinned}, "
                         f"grad chunk {group.grad is not None}, param {group.param.location}")
    return "\n".join(lines)


def _train(cfg: dict, num_steps: int, rates: list[float] | None, poison_steps=()):
    """TinyGPT from seed 0 with the streamed pipeline allowed on the CPU and the given starting
    rates (None: the engine's own); returns losses, snapshot, streamed groups per step, model."""
    streamed = []

    def prepare(optimizer):
        optimizer._host.stream_on_cpu = True
        if rates is not None:
            optimizer._host.rates = list(rates)

    def after_step(model, optimizer):
        streamed.append(model.chunk_stats()["step_host_groups_streamed"])
        if rates is not None:
            optimizer._host.rates[1] = rates[1]  # the forced split holds whatever was measured

    losses, state, model, _, _ = train_tiny_gpt(cfg, num_steps, overlap=True, poison_steps=poison_steps,
                                                prepare=prepare, after_step=after_step)
    return losses, state, streamed, model


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on CUDA the pipeline runs CUDA's Adam kernel and host "
                    "Adam the CPU's: the GPU test below compares it with torch within tolerance")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_streamed_host_groups_equal_host_adam_bit_for_bit(precision):
    """Clipping that fires on some steps (and fp16 overflow steps): stepping the host groups through
    the streamed pipeline gives host Adam's numbers exactly, and a split between the two does too."""
    extra = {"bf16": {"bf16": {"enabled": True}}, "fp16": {"fp16": FP16}}.get(precision, {})
    cfg = engine_config(device_memory_limit=_limit(**extra), gradient_clipping=MAX_NORM, **extra)
    poison = (2, 5) if precision == "fp16" else ()
    ref_losses, ref_state, ref_streamed, ref_model = _train(cfg, 8, ALL_HOST, poison)
    assert sum(ref_streamed) == 0
    stats = ref_model.chunk_stats()
    assert stats["optim_chunks_host"] > 0 and stats["optim_chunks_device"] > 0, stats
    for rates in (ALL_STREAMED, None):
        losses, state, streamed, model = _train(cfg, 8, rates, poison)
        assert losses == ref_losses
        _assert_bitwise(state, ref_state)
        assert max(streamed) > 0, streamed
        if rates is ALL_STREAMED:  # from the step after placement, every host group streams
            num_host = sum(1 for g in model._rt.groups if g.trainable and not g.optimizer_on_device)
            assert streamed[-1] == num_host, streamed


def test_streamed_host_groups_equal_torch_adamw_with_clipping():
    """Every host group streamed, clipping at 0.5: losses and weights as torch.optim.AdamW with
    clip_grad_norm_ (fp32; rtol 1e-5 / atol 1e-6 as in tests/test_param_groups.py)."""
    cfg = engine_config(device_memory_limit=_limit(), gradient_clipping=0.5)
    torch.manual_seed(0)
    initial = initialize_engine(model_func=TinyGPT, config=cfg)[0].state_dict()  # seed 0's init, as _train's
    losses, state, streamed, model = _train(cfg, 6, ALL_STREAMED)
    assert streamed[-1] > 0
    torch.manual_seed(0)
    reference = TinyGPT().to(DEVICE)
    reference.load_state_dict(initial)
    opt = reference_adamw(reference, cfg)
    ref_losses = [reference_step(reference, opt, x, y, max_norm=0.5) for x, y in batches("gpt", 6)]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    ours = model.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ours[name].float().cpu(), value.float().cpu(), rtol=1e-5,
                                   atol=adam_weight_atol(6, DEVICE))


def test_no_streaming_when_the_config_turns_it_off():
    cfg = engine_config(device_memory_limit=_limit(), stream_host_optimizer=False)
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
    assert optimizer._host.streamer is None
    optimizer._host.stream_on_cpu = True
    optimizer._host.rates = list(ALL_STREAMED)
    for x, y in batches("gpt", 4):
        optimizer.zero_grad()
        model.backward(model(x, y))
        optimizer.step()
        assert model.chunk_stats()["step_host_groups_streamed"] == 0


def test_a_streamed_group_is_not_downloaded_in_backward_and_zero_grad_discards_it():
    """A streamed group's gradients stay on the device; a backward discarded by zero_grad() leaves
    every weight as the run that skipped that batch."""
    cfg = engine_config(device_memory_limit=_limit())
    data = list(batches("gpt", 5))

    def run(skip: int | None):
        torch.manual_seed(0)
        model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
        optimizer._host.stream_on_cpu = True
        optimizer._host.rates = list(ALL_STREAMED)
        reports = []
        for step, (x, y) in enumerate(data):
            optimizer.zero_grad()
            model.backward(model(x, y))
            if step == skip:
                continue  # discarded: the next zero_grad() drops it
            optimizer.step()
            optimizer._host.rates[1] = ALL_STREAMED[1]
            stats = model.chunk_stats()
            reports.append((stats["step_host_groups_streamed"], stats["step_host_groups_downloaded_in_backward"]))
        return snapshot(model, optimizer), reports

    skipped, reports = run(skip=3)
    # Placement's step (the first) steps its host groups on the host; every later one streams them
    # all, and none of their gradients goes down in backward.
    assert reports[0] == (0, 0), reports
    assert all(streamed > 0 and downloaded == 0 for streamed, downloaded in reports[1:]), reports

    torch.manual_seed(0)
    ref, ref_opt = initialize_engine(model_func=TinyGPT, config=cfg)
    ref_opt._host.stream_on_cpu = True
    ref_opt._host.rates = list(ALL_STREAMED)
    for step, (x, y) in enumerate(data):
        if step == 3:
            continue
        ref_opt.zero_grad()
        ref.backward(ref(x, y))
        ref_opt.step()
        ref_opt._host.rates[1] = ALL_STREAMED[1]
    _assert_bitwise(skipped, snapshot(ref, ref_opt))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_streamed_groups_run_on_side_streams_and_equal_torch_adamw():
    """On a GPU the pipeline's copies and kernels run on their own streams while the next forward
    goes on: every host group streamed, clipping at 0.5, the result equals torch.optim.AdamW with
    clip_grad_norm_ on the same device (fp32: losses within 1e-5, weights within the rounding bound),
    waited for or not, bit for bit."""
    cfg = engine_config(device_memory_limit=_limit(), gradient_clipping=0.5)
    runs = {}
    for overlap in (True, False):
        torch.manual_seed(0)
        model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
        initial = {name: value.clone() for name, value in model.state_dict().items()}  # init ran on the GPU
        optimizer._host.rates = list(ALL_STREAMED)
        optimizer.overlap_backward = overlap
        losses = []
        for x, y in batches("gpt", 6):
            optimizer.zero_grad()
            loss = model(x, y)
            model.backward(loss)
            optimizer.step()
            optimizer._host.rates[1] = ALL_STREAMED[1]
            losses.append(loss.item())
        assert model.chunk_stats()["step_host_groups_streamed"] > 0, _why_not_streamed(optimizer)
        runs[overlap] = (losses, snapshot(model, optimizer), model)
    assert runs[True][0] == runs[False][0]
    _assert_bitwise(runs[True][1], runs[False][1])
    reference = TinyGPT().to(DEVICE)
    reference.load_state_dict(initial)  # the engine's init drew on the GPU's generator
    opt = reference_adamw(reference, cfg)
    ref_losses = [reference_step(reference, opt, x, y, max_norm=0.5) for x, y in batches("gpt", 6)]
    assert runs[True][0] == pytest.approx(ref_losses, rel=1e-5)
    # On the GPU the engine's and torch's kernels sum the gradients in other orders: each weight is
    # bounded by what that rounding can do to Adam's steps (tests/test_distributed.py's derivation).
    ours = runs[True][2].state_dict()
    for name, param in reference.named_parameters():
        weight_bound, _ = adam_tolerances(cfg, 6, opt.state[param]["exp_avg_sq"].cpu())
        assert_within(ours[name].float().cpu(), param.detach().float().cpu(), weight_bound, 1e-5, name)


@pytest.mark.parametrize("how", ["state dicts", "shard state"])
def test_a_streamed_run_resumes_exactly(how):
    """Saved right after a step whose host groups streamed (their state still on its way down on a
    GPU), loaded into a fresh engine that streams too: the same run, bit for bit."""
    cfg = engine_config(device_memory_limit=_limit(), gradient_clipping=MAX_NORM)
    data = list(batches("gpt", 7))

    def engine():
        model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
        optimizer._host.stream_on_cpu = True
        optimizer._host.rates = list(ALL_STREAMED)
        return model, optimizer

    def step(model, optimizer, x, y):
        loss = engine_step(model, optimizer, x, y)
        optimizer._host.rates[1] = ALL_STREAMED[1]
        return loss

    torch.manual_seed(0)
    model, optimizer = engine()
    for x, y in data[:4]:
        step(model, optimizer, x, y)
    assert model.chunk_stats()["step_host_groups_streamed"] > 0
    saved = save_training_state(model, optimizer, how)
    straight = [step(model, optimizer, x, y) for x, y in data[4:]]

    torch.manual_seed(99)  # another init, overwritten by the checkpoint
    resumed, resumed_opt = engine()
    for x, y in data[5:7]:
        step(resumed, resumed_opt, x, y)  # placed and streaming before the load
    load_training_state(resumed, resumed_opt, saved, how)
    again = [step(resumed, resumed_opt, x, y) for x, y in data[4:]]
    assert again == straight
    assert resumed.chunk_stats()["step_host_groups_streamed"] > 0
    _assert_bitwise(snapshot(resumed, resumed_opt), snapshot(model, optimizer))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="compares the pipeline with host Adam bit for bit: CPU only")
def test_a_group_whose_state_cannot_be_page_locked_stays_with_host_adam(monkeypatch):
    """Where the driver refuses to page-lock a group's host state (a low `ulimit -l`), that group is
    stepped by host Adam, every step, and the run is the one that never streamed, bit for bit."""
    refused = []

    def pin_all_but_the_first(copier, buf):
        if not refused:
            refused.append(buf.data_ptr())
        return buf.data_ptr() not in refused

    monkeypatch.setattr("engine.streamed_adam.pin_in_place", pin_all_but_the_first)
    cfg = engine_config(device_memory_limit=_limit(), gradient_clipping=MAX_NORM)
    ref_losses, ref_state, _, _ = _train(cfg, 6, ALL_HOST)
    refused.clear()
    losses, state, streamed, model = _train(cfg, 6, ALL_STREAMED)
    num_host = sum(1 for g in model._rt.groups if g.trainable and not g.optimizer_on_device)
    assert streamed[-1] == num_host - 1, streamed  # all but the group that could not be page-locked
    assert losses == ref_losses
    _assert_bitwise(state, ref_state)
