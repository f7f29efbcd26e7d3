"""A run whose chunks all stay on the device settles after its first step: the module and
saved-tensor hooks go, and each gradient hook is bound to its place, or no gradient hook is left:
autograd keeps gradients in `.grad`, and step() casts them into fp32 grad chunks or, with fp32
weights, steps the parameters (their param chunks made the masters) with them as torch.optim does
(engine/hooks.py). Settling must change no number, keep torch's semantics (a discarded backward;
a forward over unconsumed gradients refused where they overwrite the weights, allowed where they do
not) and never happen while chunks can still move."""

from __future__ import annotations

import math

import pytest
import torch

from engine import initialize_engine
from engine.errors import EngineError
from engine.hooks import SETTLED_GRAD_CHUNKS, SETTLED_IN_PLACE, SETTLED_PARAMS_AS_MASTERS
from engine.optimizer import HybridAdam
from engine.param_groups import weight_decay_groups
from tests.engine_models import TinyGPT, load_training_state, reference_step, save_training_state
from tests.test_engine import (DEVICE, assert_state_close, batches, build_pair, engine_config, engine_step,
                               plain_optimizer, snapshot)

ROOMY = 256 << 20  # holds the whole TinyGPT, its optimizer state and activations


def _engine_hooks_left(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.module.modules())


SETTLED_MODES = [SETTLED_PARAMS_AS_MASTERS, SETTLED_GRAD_CHUNKS, SETTLED_IN_PLACE]


def _force_mode(monkeypatch, mode: str) -> None:
    monkeypatch.setattr(HybridAdam, "_settled_mode", lambda self: mode)


@pytest.fixture(params=SETTLED_MODES, ids=["params-as-masters", "grad-chunks", "grads-in-place"])
def settled_mode(request, monkeypatch) -> str:
    """Settled with the parameters as masters (what fp32 weights get), with a grad chunk per group
    (room for it), or with gradients over the weights."""
    _force_mode(monkeypatch, request.param)
    return request.param


@pytest.fixture(params=[SETTLED_PARAMS_AS_MASTERS, SETTLED_GRAD_CHUNKS], ids=["params-as-masters", "grad-chunks"])
def grads_left(request, monkeypatch) -> str:
    """The two settled ways that leave the gradients in `.grad`."""
    _force_mode(monkeypatch, request.param)
    return request.param


def test_a_run_that_fits_settles_and_still_equals_plain_pytorch(settled_mode):
    max_norm = 0.05
    cfg = engine_config(device_memory_limit=ROOMY, gradient_clipping=max_norm)
    model, optimizer, reference = build_pair("gpt", cfg)
    ref_opt = plain_optimizer(reference.parameters(), cfg, model)
    settled_after = []
    for x, y in batches("gpt", 6):
        loss = engine_step(model, optimizer, x, y)
        settled_after.append(model.chunk_stats()["settled"])
        ref_loss = reference_step(reference, ref_opt, x, y, max_norm)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert settled_after == [1] * 6  # placed and settled by the first step
    assert _engine_hooks_left(model) == 0
    stats = model.chunk_stats()
    assert stats["step_evictions"] == 0
    assert (stats["grad_chunks_device"] > 0) == (settled_mode == SETTLED_GRAD_CHUNKS)
    trainable = [g for g in model._rt.groups if g.trainable]
    masters_freed = settled_mode == SETTLED_PARAMS_AS_MASTERS
    assert all((g.master is g.param) == masters_freed for g in trainable)
    moments = sum(g.exp_avg.nbytes + g.exp_avg_sq.nbytes for g in trainable)
    assert stats["optim_bytes_device"] == moments if masters_freed else moments * 3 // 2
    assert_state_close(model, reference, rtol=1e-5, atol=1e-6)


def test_settled_discarded_backward_and_a_forward_before_step_keep_torchs_semantics(settled_mode):
    cfg = engine_config(device_memory_limit=ROOMY)
    model, optimizer, reference = build_pair("gpt", cfg)
    ref_opt = plain_optimizer(reference.parameters(), cfg, model)
    data = list(batches("gpt", 5))
    for step, (x, y) in enumerate(data):
        if step == 3:  # a backward the loop throws away; the plain run never sees this batch
            model.backward(model(x, y))
            assert model.chunk_stats()["settled"] == 1
            if settled_mode != SETTLED_IN_PLACE:  # the weights are intact: a forward before step() is fine, as in torch
                with torch.no_grad():
                    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
            else:
                with pytest.raises(EngineError, match="optimizer.step"):
                    model(x, y)  # the gradients sit where the weights belong
            optimizer.zero_grad()
            continue
        engine_step(model, optimizer, x, y)
        reference_step(reference, ref_opt, x, y)
    with torch.no_grad():
        torch.testing.assert_close(model(data[0][0]), reference(data[0][0]), rtol=1e-5, atol=1e-6)
    assert_state_close(model, reference, rtol=1e-5, atol=1e-6)


def test_grads_left_in_grad_accumulate_like_torch_and_survive_a_module_zero_grad(grads_left):
    """Gradients left in `.grad`: two backward passes before a step sum their gradients, and
    nn.Module.zero_grad() (which sets every .grad to None) before a backward drops nothing that
    counts, as in torch."""
    cfg = engine_config(device_memory_limit=ROOMY)
    model, optimizer, reference = build_pair("gpt", cfg)
    ref_opt = plain_optimizer(reference.parameters(), cfg, model)
    data = list(batches("gpt", 8))
    for step in range(4):
        (x1, y1), (x2, y2) = data[2 * step], data[2 * step + 1]
        model.zero_grad()  # the module's own: .grad set to None
        model.backward(model(x1, y1))
        if step >= 1:  # settled: a second backward accumulates
            model.backward(model(x2, y2))
        optimizer.step()
        optimizer.zero_grad()
        ref_opt.zero_grad()
        reference(x1, y1).backward()
        if step >= 1:
            reference(x2, y2).backward()
        ref_opt.step()
    assert model._rt.hooks.settled_mode == grads_left
    assert_state_close(model, reference, rtol=1e-5, atol=1e-6)


def test_with_grads_left_in_grad_backward_runs_no_engine_code_and_grads_are_torchs(grads_left):
    """No hook of the engine is left on a parameter; after backward `.grad` holds torch's gradient,
    and what the caller does to it (here: halved, one parameter's dropped) is what step() uses,
    as with torch.optim."""
    cfg = engine_config(device_memory_limit=ROOMY)
    model, optimizer, reference = build_pair("gpt", cfg)
    ref_opt = plain_optimizer(reference.parameters(), cfg, model)
    engine_params, ref_params = list(model.module.parameters()), list(reference.parameters())
    for step, (x, y) in enumerate(batches("gpt", 4)):
        model.backward(model(x, y))
        ref_opt.zero_grad()
        reference(x, y).backward()
        if step >= 1:  # settled
            assert not any(p._post_accumulate_grad_hooks for p in engine_params)
            for mine, theirs in zip(engine_params, ref_params):
                torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)
            for p in engine_params + ref_params:
                p.grad.mul_(0.5)
            engine_params[step].grad = None
            ref_params[step].grad = None
        optimizer.step()
        optimizer.zero_grad()
        ref_opt.step()
        assert all(p.grad is None for p in engine_params)
    assert_state_close(model, reference, rtol=1e-5, atol=1e-6)


def test_with_grads_left_in_grad_step_leaves_them_there_as_torch_does(grads_left):
    """torch.optim's step() leaves `.grad` as it is: read after the step it holds the step's
    gradients, a backward before zero_grad() adds to them and the next step uses the sum, and
    zero_grad() drops them. (Dropping them in step() instead freed them just before the next
    forward, and on a CPU every backward then faulted its gradients' memory in afresh.) Without
    clipping here: with it, the grad chunks' way clips the fp32 copy and leaves `.grad` as autograd
    made it, where torch's clip_grad_norm_ scales `.grad` itself."""
    cfg = engine_config(device_memory_limit=ROOMY)
    model, optimizer, reference = build_pair("gpt", cfg)
    ref_opt = plain_optimizer(reference.parameters(), cfg, model)
    engine_params, ref_params = list(model.module.parameters()), list(reference.parameters())
    for step, (x, y) in enumerate(batches("gpt", 7)):
        skip_zero_grad = step in (4, 6)  # settled by then: the gradients add up, as in torch
        if skip_zero_grad:
            assert model._rt.hooks.settled_mode == grads_left
        else:
            optimizer.zero_grad()
            ref_opt.zero_grad()
        model.backward(model(x, y))
        optimizer.step()
        reference(x, y).backward()
        ref_opt.step()
        if step >= 3:
            for mine, theirs in zip(engine_params, ref_params):
                torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    assert_state_close(model, reference, rtol=1e-5, atol=1e-6)
    optimizer.zero_grad()
    assert all(p.grad is None for p in engine_params)


def test_grad_chunks_only_where_the_device_has_room_for_them(monkeypatch):
    """bf16 weights (fp32 ones are their own masters and need no grad chunk)."""
    monkeypatch.setattr(HybridAdam, "_use_grad_chunks", lambda self: self._room_for_grad_chunks())
    bf16 = {"bf16": {"enabled": True}}
    probe, probe_opt = initialize_engine(model_func=TinyGPT,
                                         config=engine_config(device_memory_limit=ROOMY, **bf16))
    for x, y in batches("gpt", 2):
        engine_step(probe, probe_opt, x, y)
    stats = probe.chunk_stats()
    assert stats["grad_chunks_device"] > 0  # roomy: there is room for them
    grad_bytes = stats["grad_bytes_device"]
    resident = stats["param_bytes_device"] + stats["optim_bytes_device"]
    peak = max(moment["non_model_bytes"] for moment in probe.memory_timeline())
    scratch = max(g.numel for g in probe._rt.groups) * 4
    tight = resident + math.ceil(1.2 * peak) + scratch + grad_bytes // 2
    model, optimizer = initialize_engine(model_func=TinyGPT, config=engine_config(device_memory_limit=tight, **bf16))
    for x, y in batches("gpt", 2):
        engine_step(model, optimizer, x, y)
    stats = model.chunk_stats()
    assert stats["settled"] == 1 and stats["step_evictions"] == 0
    assert stats["grad_chunks_device"] == 0


def test_frozen_parameters_settle_with_the_rest():
    def frozen_embedding():
        net = TinyGPT()
        net.wte.weight.requires_grad_(False)
        return net

    cfg = engine_config(device_memory_limit=ROOMY)
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=frozen_embedding, config=cfg)
    reference = frozen_embedding().to(DEVICE)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=3e-3,
                                betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    for x, y in batches("gpt", 4):
        engine_step(model, optimizer, x, y)
        reference_step(reference, ref_opt, x, y)
    assert model.chunk_stats()["settled"] == 1
    assert_state_close(model, reference, rtol=1e-5, atol=1e-6)


def test_a_run_whose_chunks_move_never_settles():
    model, optimizer = initialize_engine(model_func=TinyGPT, config=engine_config())  # evicts every step
    for x, y in batches("gpt", 4):
        engine_step(model, optimizer, x, y)
        assert model.chunk_stats()["step_evictions"] > 0
        assert model.chunk_stats()["settled"] == 0
    assert _engine_hooks_left(model) > 0


def test_gradient_accumulation_never_settles():
    cfg = engine_config(device_memory_limit=ROOMY, gradient_accumulation_steps=2)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
    data = list(batches("gpt", 4))
    for step in range(2):
        for x, y in data[2 * step: 2 * step + 2]:
            model.backward(model(x, y))
        optimizer.step()
        optimizer.zero_grad()
    assert model.chunk_stats()["settled"] == 0


def test_compile_blocks_compiles_each_block_whole_once_settled(monkeypatch, caplog):
    import engine.hooks as hooks_module

    # aot_eager traces forward and backward as torch.compile does but needs no C++ compiler;
    # fullgraph=True fails on any graph break (an engine hook inside a block would be one).
    monkeypatch.setattr(hooks_module, "COMPILE_OPTIONS", {"fullgraph": True, "backend": "aot_eager"})
    torch._dynamo.reset()
    losses = {}
    for compiled in (False, True):
        cfg = engine_config(device_memory_limit=ROOMY, gradient_clipping=0.05, compile_blocks=compiled)
        model, optimizer, _ = build_pair("gpt", cfg)
        with caplog.at_level("INFO", logger="pstar.engine"):
            losses[compiled] = [engine_step(model, optimizer, x, y) for x, y in batches("gpt", 5)]
        if compiled:
            blocks = model.module.blocks
            assert model._hooks.compiled_blocks == len(blocks) > 0
            assert all(block._compiled_call_impl is not None for block in blocks)
            assert "blocks compiled" in caplog.text
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    torch._dynamo.reset()


def test_compile_blocks_on_a_run_that_moves_says_why_it_is_not_applied(caplog):
    model, optimizer = initialize_engine(model_func=TinyGPT, config=engine_config(compile_blocks=True))
    with caplog.at_level("WARNING", logger="pstar.engine"):
        for x, y in batches("gpt", 2):
            engine_step(model, optimizer, x, y)
    assert caplog.text.count("compile_blocks is not applied") == 1
    assert model._hooks.compiled_blocks == 0


@pytest.mark.engine_on_cpu
def test_settling_changes_no_bit_with_fp16_overflows_and_clipping(monkeypatch):
    """The same fp16 run (overflows on two steps, clipping firing) evicting chunks every step,
    settled with gradients over the weights, and settled with grad chunks: bitwise one run."""
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 3,
            "hysteresis": 1, "min_loss_scale": 1}
    overflow_at = {2, 3}
    runs = []
    for limit, chunks in ((None, False), (ROOMY, False), (ROOMY, True)):
        monkeypatch.setattr(HybridAdam, "_use_grad_chunks", lambda self, chunks=chunks: chunks)
        overrides = {"fp16": fp16, "gradient_clipping": 0.05}
        if limit is not None:
            overrides["device_memory_limit"] = limit
        torch.manual_seed(0)
        model, optimizer = initialize_engine(model_func=TinyGPT, config=engine_config(**overrides))
        poison = {"on": False}

        def overflow(module, args, output, poison=poison):
            if poison["on"]:
                output.register_hook(lambda g: g * float("inf"))

        model.module.blocks[0].register_forward_hook(overflow)
        losses, skipped = [], []
        for step, (x, y) in enumerate(batches("gpt", 7)):
            poison["on"] = step in overflow_at
            losses.append(engine_step(model, optimizer, x, y))
            skipped.append(optimizer.last_step_skipped)
        stats = model.chunk_stats()
        assert stats["settled"] == (limit is not None)
        assert (stats["grad_chunks_device"] > 0) == chunks
        runs.append((losses, skipped, [t.clone() for t in snapshot(model, optimizer)]))
    (losses, skipped, state), *others = runs
    assert skipped == [step in overflow_at for step in range(7)]
    for other_losses, other_skipped, other_state in others:
        assert other_losses == losses and other_skipped == skipped
        assert all(torch.equal(a, b) for a, b in zip(state, other_state))


@pytest.mark.parametrize("how", ["state dicts", "shard state"])
def test_a_settled_run_resumes_exactly(settled_mode, how):
    """Saved while settled (a backward's gradients pending in the grad chunks, then discarded),
    loaded into a fresh engine that settles again: the same run, bit for bit."""
    cfg = engine_config(device_memory_limit=ROOMY, gradient_clipping=0.05)
    data = list(batches("gpt", 8))
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
    for x, y in data[:4]:
        engine_step(model, optimizer, x, y)
    model.backward(model(*data[4]))  # pending gradients while the state is saved: not part of it
    saved = save_training_state(model, optimizer, how)
    straight = [engine_step(model, optimizer, x, y) for x, y in data[4:]]  # zero_grad drops the pending ones

    torch.manual_seed(99)  # a different init, overwritten by the checkpoint
    resumed, resumed_opt = initialize_engine(model_func=TinyGPT, config=cfg)
    engine_step(resumed, resumed_opt, *data[7])  # settled before the load, with gradients of its own
    resumed.backward(resumed(*data[6]))
    load_training_state(resumed, resumed_opt, saved, how)
    again = [engine_step(resumed, resumed_opt, x, y) for x, y in data[4:]]
    assert resumed.chunk_stats()["settled"] == 1
    assert again == straight
    assert_state_close(resumed, model, rtol=0, atol=0)


@pytest.mark.engine_on_cpu
def test_settling_changes_no_bit_in_bf16_with_clipping(monkeypatch):
    """bf16 (the GPU's default): evicting every step, settled with gradients over the weights, and
    settled with grad chunks (all device groups cast, clipped and stepped in a few calls) are one
    run, bit for bit, with clipping firing."""
    runs = []
    for limit, chunks in ((None, False), (ROOMY, False), (ROOMY, True)):
        monkeypatch.setattr(HybridAdam, "_use_grad_chunks", lambda self, chunks=chunks: chunks)
        model, *run = _train_tiny({"bf16": {"enabled": True}, "gradient_clipping": 0.05}, limit)
        assert model.chunk_stats()["settled"] == (limit is not None)
        assert bool(model._rt.hooks.grad_places) == chunks
        runs.append(run)
    _assert_one_run(runs)


def _train_tiny(overrides: dict, limit: int | None) -> tuple:
    """TinyGPT from seed 0, six steps (evicting every step without a `limit`): the model, its
    losses and a snapshot of its state."""
    if limit is not None:
        overrides = {**overrides, "device_memory_limit": limit}
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=engine_config(**overrides))
    losses = [engine_step(model, optimizer, x, y) for x, y in batches("gpt", 6)]
    return model, losses, [t.clone() for t in snapshot(model, optimizer)]


def _assert_one_run(runs: list) -> None:
    """(losses, state) of several runs: all the first one, bit for bit."""
    (losses, state), *others = runs
    for other_losses, other_state in others:
        assert other_losses == losses
        assert all(torch.equal(a, b) for a, b in zip(state, other_state))


def test_device_adams_kept_lists_change_no_bit_and_follow_the_spans(monkeypatch):
    """Settled with grad chunks, device Adam's lists are built once (DeviceAdamPlan) and built
    again when the spans change (a step where one parameter got no gradient): with two weight-decay
    groups, clipping firing and an lr changed in param_groups, bitwise the run whose lists are
    built at every step."""
    monkeypatch.setattr(HybridAdam, "_use_grad_chunks", lambda self: True)
    runs = []
    for kept in (True, False):
        if not kept:
            monkeypatch.setattr(HybridAdam, "_device_plan_for", lambda self, groups: None)
        torch.manual_seed(0)
        cfg = engine_config(bf16={"enabled": True}, gradient_clipping=0.05, device_memory_limit=ROOMY)
        model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg,
                                             param_groups=lambda m: weight_decay_groups(m, 0.1))
        params = list(model.module.parameters())
        losses, plans = [], []
        for step, (x, y) in enumerate(batches("gpt", 7)):
            if step == 3:
                optimizer.param_groups[1]["lr"] *= 0.5
            loss = model(x, y)
            model.backward(loss)
            if step == 4:
                params[3].grad = None  # this step is not dense: its spans differ
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            plans.append(optimizer._device_plan)
        if kept:
            assert plans[0] is None and plans[1] is not None  # settled by step 0, kept from step 1
            assert plans[1] is plans[2] is plans[3] is plans[4]  # (step 4 built its own lists)
            assert plans[5] is not plans[4] and plans[5] is plans[6]
            assert len(plans[1].calls) >= 2  # the two weight-decay groups
        runs.append((losses, [t.clone() for t in snapshot(model, optimizer)]))
    (losses, state), (other_losses, other_state) = runs
    assert losses == other_losses
    assert all(torch.equal(a, b) for a, b in zip(state, other_state))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_settled_gpu_run_takes_grad_chunks_and_changes_no_bit(monkeypatch):
    """On CUDA, as users get it (not forced): a roomy bf16 run settles with grad chunks and the
    all-groups device Adam, and trains bit for bit like the same run settled without them (both
    step on the GPU; a run evicting to host Adam would round in the CPU kernel's way)."""
    runs = []
    for forced_off in (False, True):
        if forced_off:
            monkeypatch.setattr(HybridAdam, "_use_grad_chunks", lambda self: False)
        torch.manual_seed(0)
        cfg = engine_config(bf16={"enabled": True}, gradient_clipping=0.05, device_memory_limit=ROOMY)
        model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
        losses = [engine_step(model, optimizer, x, y) for x, y in batches("gpt", 6)]
        stats = model.chunk_stats()
        assert stats["settled"] == 1
        assert (stats["grad_chunks_device"] > 0) is not forced_off
        runs.append((losses, [t.clone() for t in snapshot(model, optimizer)]))
    (with_chunks, with_state), (without, without_state) = runs
    assert with_chunks == without
    assert all(torch.equal(a, b) for a, b in zip(with_state, without_state))


@pytest.mark.engine_on_cpu
def test_settling_changes_no_bit_in_fp32_with_clipping(monkeypatch):
    """fp32 (the CPU's default): evicting every step, and settled in each of the three ways — the
    parameters as masters (what fp32 gets), grad chunks, gradients over the weights — are one run,
    bit for bit, with clipping firing: Adam is elementwise, so per-tensor lists and whole spans
    give the same numbers."""
    runs = []
    for limit, mode in ((None, None), *((ROOMY, mode) for mode in SETTLED_MODES)):
        if mode is not None:
            _force_mode(monkeypatch, mode)
        model, *run = _train_tiny({"gradient_clipping": 0.05}, limit)
        assert model._rt.hooks.settled_mode == mode
        runs.append(run)
    _assert_one_run(runs)


def test_params_as_masters_keep_one_plan_while_the_same_parameters_step(monkeypatch):
    """fp32, settled, two weight-decay groups: the masters plan's lists are kept while every
    parameter steps, built again for a step where one got no gradient and after it, and the run is
    torch.optim.AdamW's with the same gradients changed the same way (an lr changed in
    param_groups, one .grad dropped)."""
    cfg = engine_config(gradient_clipping=0.05, device_memory_limit=ROOMY)
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg,
                                         param_groups=lambda m: weight_decay_groups(m, 0.1))
    reference = TinyGPT().to(DEVICE)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(weight_decay_groups(reference, 0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                                fused=True)
    params, ref_params = list(model.module.parameters()), list(reference.parameters())
    plans = []
    for step, (x, y) in enumerate(batches("gpt", 7)):
        if step == 3:
            for opt in (optimizer, ref_opt):
                opt.param_groups[1]["lr"] *= 0.5
        model.backward(model(x, y))
        ref_opt.zero_grad()
        reference(x, y).backward()
        if step == 4:
            params[3].grad = ref_params[3].grad = None  # not dense: other lists for this step
        optimizer.step()
        optimizer.zero_grad()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        ref_opt.step()
        plans.append(optimizer._masters_plan)
    assert model._rt.hooks.settled_mode == SETTLED_PARAMS_AS_MASTERS
    assert plans[0] is None and plans[1] is plans[2] is plans[3]  # settled by step 0
    assert plans[4] is not plans[3] and plans[5] is not plans[4] and plans[5] is plans[6]
    assert len(plans[6].calls) == 3  # two groups, and parameter 3 a step behind in its own
    assert_state_close(model, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_settled_fp32_gpu_run_steps_its_params_as_masters_like_torch():
    """On CUDA, as users get it: a roomy fp32 run settles with its param chunks as the masters (the
    master chunks' device memory given back), leaves torch's gradients in `.grad`, and trains like
    torch.optim.AdamW with clip_grad_norm_ on the same device."""
    cfg = engine_config(gradient_clipping=0.05, device_memory_limit=ROOMY)
    model, optimizer, reference = build_pair("gpt", cfg)
    ref_opt = plain_optimizer(reference.parameters(), cfg, model)
    for x, y in batches("gpt", 6):
        loss = engine_step(model, optimizer, x, y)
        assert loss == pytest.approx(reference_step(reference, ref_opt, x, y, 0.05), rel=1e-5)
    assert model._rt.hooks.settled_mode == SETTLED_PARAMS_AS_MASTERS
    trainable = [g for g in model._rt.groups if g.trainable]
    assert model.chunk_stats()["optim_bytes_device"] == sum(g.exp_avg.nbytes + g.exp_avg_sq.nbytes for g in trainable)
    assert_state_close(model, reference, rtol=1e-5, atol=1e-6)
