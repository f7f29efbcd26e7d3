"""The engine's speed features, checked for what a CPU can check: they must not change a number.

- Host Adam overlapped with backward (a host group starts stepping as soon as its gradients are
  final) gives bitwise the same training as stepping every host group in `step()`; the fp16 skip
  and gradient clipping stay exact with it.
- Host Adam runs torch's fused kernel over whole chunk spans in pieces, never per parameter.
- Placement gives the optimizer what the device really has left beside the param chunks and the
  measured activation peak (plus its margin).
- Host memory limits (memory cgroup, ulimit -l) produce a clear message when too low.

On a CPU-only machine the "device" buffers are separate allocations, so every transfer of the
overlapped path (download in place, re-upload, pins) runs here as it does on CUDA. Where CUDA is
present the engine still computes on the CPU here (`engine_on_cpu`), except in the tests marked
`gpu`: the bitwise claims hold for one device's kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

import engine.device as device_module
from engine import initialize_engine
from engine.device import Copier, HostMemoryLimits, cgroup_problem, host_adam_threads, memlock_problem
from engine.errors import EngineError
from engine.host_adam import (AdamHyper, GroupFlats, HostScratch, adam_on_device_groups, adam_on_device_spans,
                              adam_on_spans)
from engine.optimizer_placement import plan_placement
from tests.engine_models import TinyGPT, engine_on_cpu
from tests.test_engine import (assert_state_close, batches, build_pair, engine_config, engine_step,
                               plain_optimizer, snapshot)

pytestmark = pytest.mark.engine_on_cpu
DEVICE = torch.device("cpu")  # where this module's engines compute, GPU tests aside

FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 3,
        "hysteresis": 1, "min_loss_scale": 1}


def _split_limit(**overrides) -> int:
    """A device limit that holds every param chunk and the activations (with the placement margin)
    but only about half of the optimizer state: host and device groups both, nothing evicted.
    Measured where the engine computes now (test_overlap.py's engines are on the GPU if there is one)."""
    x, y = next(batches("gpt", 1))
    if x.is_cuda:  # cuBLAS takes its workspace at the first matmul: not in the probe
        TinyGPT().to(x.device)(x, y).backward()
    torch.manual_seed(0)
    probe, probe_opt = initialize_engine(
        model_func=TinyGPT, config=engine_config(**{**overrides, "device_memory_limit": 64 << 20}))
    engine_step(probe, probe_opt, *next(batches("gpt", 1)))
    stats = probe.chunk_stats()
    peak = max(moment["non_model_bytes"] for moment in probe.memory_timeline())
    scratch = max(group.numel for group in probe._rt.groups) * 4
    params = stats["param_bytes_device"] + stats["param_bytes_host"]
    optim = stats["optim_bytes_device"] + stats["optim_bytes_host"]
    return params + _with_margin(peak) + scratch + optim // 2


def _with_margin(peak: int, margin_use_ratio: float = 0.8) -> int:
    return peak + math.ceil((1 - margin_use_ratio) * peak)


@pytest.fixture(scope="module")
def split_limit() -> int:
    with engine_on_cpu():  # (before the per-test pin: a module's fixture comes first)
        return _split_limit()


def _train(cfg: dict, num_steps: int, overlap: bool, poison_steps=(), lr_after_backward=None,
           prepare=None, after_step=None):
    """Train TinyGPT from seed 0; returns (losses, the final snapshot, the model, the optimizer,
    host groups started during backward per step). `prepare(optimizer)` runs before the first step,
    `after_step(model, optimizer)` after each."""
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
    optimizer.overlap_backward = overlap
    if prepare is not None:
        prepare(optimizer)
    inject = _install_poison(model)
    losses, started = [], []
    for step, (x, y) in enumerate(batches("gpt", num_steps)):
        inject["on"] = step in poison_steps
        optimizer.zero_grad()
        loss = model(x, y)
        model.backward(loss)
        if lr_after_backward is not None:
            optimizer.param_groups[0]["lr"] = lr_after_backward(step)
        optimizer.step()
        losses.append(loss.item())
        started.append(optimizer.last_step_overlapped_groups)
        if after_step is not None:
            after_step(model, optimizer)
    return losses, snapshot(model, optimizer), model, optimizer, started


def _install_poison(model) -> dict:
    """A switch that makes the next backward's gradients infinite (an fp16 overflow)."""
    inject = {"on": False}

    def poison(module, args, output):
        if inject["on"]:
            output.register_hook(lambda g: g * float("inf"))

    model.module.blocks[0].register_forward_hook(poison)
    return inject


def _assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for index, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {index} differs"


# ---- overlap with backward -------------------------------------------------------------------

def test_host_adam_overlapped_with_backward_equals_stepping_in_step(split_limit):
    cfg = engine_config(device_memory_limit=split_limit)
    losses, state, model, optimizer, started = _train(cfg, 8, overlap=True)
    ref_losses, ref_state, _, _, ref_started = _train(cfg, 8, overlap=False)
    assert losses == ref_losses
    _assert_bitwise(state, ref_state)
    stats = model.chunk_stats()
    assert stats["optim_chunks_device"] > 0 and stats["optim_chunks_host"] > 0, stats
    assert stats["param_chunks_host"] == 0 and stats["step_evictions"] == 0, stats
    # After the warm-up step placed the optimizer, host groups start during every backward; their
    # gradients go down and their new weights come back up in place of the param chunks.
    assert all(n > 0 for n in started[2:]), started
    assert not any(ref_started)
    assert stats["step_d2h_bytes"] > 0 and stats["step_h2d_bytes"] == stats["step_d2h_bytes"]
    # Param chunks of device groups never move again: their host copies are gone.
    groups = model._rt.groups
    assert all(g.param.host_flat is None for g in groups if g.optimizer_on_device)
    assert all(g.param.host_flat is not None for g in groups if not g.optimizer_on_device)
    timings = model.step_timings()
    assert timings["optimizer_host"] > 0 and timings["optimizer_device"] > 0


def test_shard_state_round_trip_with_overlapped_host_groups(split_limit):
    """Loading a shard state into an engine whose device groups' param chunks live on the device
    for good (no host copy) and whose host groups update in place: the same steps again."""
    cfg = engine_config(device_memory_limit=split_limit, gradient_clipping=0.1)
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
    data = list(batches("gpt", 6))
    for x, y in data[:3]:
        engine_step(model, optimizer, x, y)
    assert any(g.param.host_flat is None for g in model._rt.groups)  # device-only param chunks
    state = model.shard_state()
    straight = [engine_step(model, optimizer, x, y) for x, y in data[3:]]
    after = snapshot(model, optimizer)
    model.load_shard_state(state)
    again = [engine_step(model, optimizer, x, y) for x, y in data[3:]]
    assert again == straight
    _assert_bitwise(snapshot(model, optimizer), after)


def test_overlapped_training_matches_plain_pytorch(split_limit):
    cfg = engine_config(device_memory_limit=split_limit)
    losses, _, model, _, _ = _train(cfg, 10, overlap=True)
    torch.manual_seed(0)
    reference = TinyGPT().to(DEVICE)
    ref_opt = plain_optimizer(reference.parameters(), cfg)
    for (x, y), loss in zip(batches("gpt", 10), losses):
        ref_opt.zero_grad()
        ref_loss = reference(x, y)
        ref_loss.backward()
        ref_opt.step()
        assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    ours = model.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours[key].float().cpu(), value.float().cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("evict_every_step", [False, True])
def test_fp16_overflow_still_skips_bitwise(split_limit, evict_every_step):
    """Downloads start during backward (resident case) or chunks are evicted (tight budget); an
    overflowing step leaves weights, masters and moments bitwise unchanged either way, and the
    run equals the one without overlap."""
    limit = 64 * 1024 if evict_every_step else _split_limit(fp16=FP16)
    cfg = engine_config(fp16=FP16, device_memory_limit=limit)
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
    inject = _install_poison(model)
    for step, (x, y) in enumerate(batches("gpt", 6)):
        poisoned = inject["on"] = step in (3, 4)
        before = snapshot(model, optimizer)
        engine_step(model, optimizer, x, y)
        assert optimizer.last_step_skipped is poisoned
        if poisoned:
            _assert_bitwise(snapshot(model, optimizer), before)
        if not evict_every_step and step >= 2:  # gradients started down during backward
            assert optimizer.last_step_overlapped_groups > 0 or poisoned
    losses, state, *_ = _train(cfg, 7, overlap=True, poison_steps=(3, 4))
    ref_losses, ref_state, *_ = _train(cfg, 7, overlap=False, poison_steps=(3, 4))
    assert losses == ref_losses
    _assert_bitwise(state, ref_state)


def test_gradient_clipping_with_overlap_equals_clip_grad_norm(split_limit):
    cfg = engine_config(device_memory_limit=split_limit, gradient_clipping=0.05)
    losses, state, model, _, started = _train(cfg, 8, overlap=True)
    ref_losses, ref_state, *_ = _train(cfg, 8, overlap=False)
    assert losses == ref_losses
    _assert_bitwise(state, ref_state)
    assert all(n > 0 for n in started[2:])  # downloads began in backward; Adam waited for the norm
    torch.manual_seed(0)
    reference = TinyGPT().to(DEVICE)
    ref_opt = plain_optimizer(reference.parameters(), cfg)
    for (x, y), loss in zip(batches("gpt", 8), losses):
        ref_opt.zero_grad()
        reference(x, y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        ref_opt.step()
    ours = model.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours[key].float().cpu(), value.float().cpu(), rtol=1e-5, atol=1e-6)


def test_lr_set_between_backward_and_step_keeps_the_overlap(split_limit):
    """Hyper-parameters are read in step(), as torch does: a value set after backward applies to
    this step, host groups still overlap (their gradients went down in backward), bitwise equal."""
    cfg = engine_config(device_memory_limit=split_limit)
    schedule = lambda step: 1e-3 * (step + 1)  # noqa: E731
    losses, state, _, _, started = _train(cfg, 6, overlap=True, lr_after_backward=schedule)
    assert all(n > 0 for n in started[2:]), started
    ref_losses, ref_state, *_ = _train(cfg, 6, overlap=False, lr_after_backward=schedule)
    assert losses == ref_losses
    _assert_bitwise(state, ref_state)


def test_zero_grad_after_an_overlapped_backward_discards_it(split_limit):
    """Host groups' gradients went down during backward; zero_grad() discards the backward as torch
    does: the run equals the one that never saw that batch."""
    cfg = engine_config(device_memory_limit=split_limit)
    data = list(batches("gpt", 5))
    runs = []
    for discard in (True, False):
        torch.manual_seed(0)
        model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
        for x, y in data[:3]:
            engine_step(model, optimizer, x, y)
        if discard:
            x, y = data[3]
            model.backward(model(x, y))
            assert optimizer._host.num_started_in_backward > 0  # the premise: downloads began
            optimizer.zero_grad()
        engine_step(model, optimizer, *data[4])
        runs.append(snapshot(model, optimizer))
    _assert_bitwise(runs[0], runs[1])


# ---- host Adam kernel use --------------------------------------------------------------------

def test_host_adam_in_pieces_equals_torch_fused_adamw():
    gen = torch.Generator().manual_seed(0)
    numel = 10_000
    master = torch.randn(numel, generator=gen)
    grad = torch.randn(numel, generator=gen).to(torch.bfloat16)
    exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel)
    param = torch.empty(numel, dtype=torch.bfloat16)
    multiplier = torch.tensor(0.37)
    reference = master.clone().requires_grad_()
    opt = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=True)
    hyper = AdamHyper(decoupled=True, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    scratch = HostScratch(1536)  # not a divisor of the span: the last piece is short
    for step in (1, 2, 3):
        adam_on_spans(GroupFlats(grad, param, master, exp_avg, exp_avg_sq), [(0, numel, step)], hyper,
                      multiplier, scratch)
        reference.grad = grad.float() * multiplier
        opt.step()
    assert torch.equal(master, reference.detach())
    assert torch.equal(param, reference.detach().to(torch.bfloat16))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_device_adam_in_few_calls_equals_it_span_by_span(grad_dtype, monkeypatch):
    """Spans of two parameter groups and two step numbers, with a tensor without a gradient
    between them (its weights sit in the gradient chunk's range and must stay untouched):
    grouped multi-tensor calls give bitwise what one call per span gives."""
    gen = torch.Generator().manual_seed(0)
    numel = 4096
    decay = AdamHyper(decoupled=True, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    no_decay = AdamHyper(decoupled=True, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
    with_hole = [(0, 1000, 3, decay), (1000, 1500, 3, no_decay), (2000, 3000, 2, decay),
                 (3000, 4096, 3, no_decay)]  # 1500..2000: a tensor without a gradient
    dense = [(0, 1000, 3, decay), (1000, 2000, 3, no_decay), (2000, 4096, 2, decay)]
    multiplier = torch.tensor(0.37)
    for spans, is_dense in ((with_hole, False), (dense, True)):
        start = [torch.randn(numel, generator=gen) for _ in range(3)]
        grad = torch.randn(numel, generator=gen).to(grad_dtype)
        grad[1500:2000] = 7.0  # the hole: weights in place, never read as a gradient
        runs = []
        for grouped in (False, True, "all groups"):
            master, exp_avg, exp_avg_sq = (t.clone() for t in start)
            exp_avg_sq.abs_()
            flats = GroupFlats(grad.clone(), torch.zeros(numel, dtype=torch.bfloat16), master, exp_avg,
                               exp_avg_sq)
            calls = []
            real = torch._fused_adamw_
            monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(1), real(*a, **k)))
            if grouped == "all groups":  # this group twice over: as two groups of one call
                half = [span for span in spans if span[1] <= 2000], [span for span in spans if span[0] >= 2000]
                adam_on_device_groups([(flats, half[0], is_dense), (flats, half[1], True)], multiplier,
                                      torch.empty(numel), {})
            elif grouped:
                adam_on_device_spans(flats, spans, multiplier, dense=is_dense)
            else:
                adam_on_spans(flats, spans, None, multiplier)
            monkeypatch.setattr(torch, "_fused_adamw_", real)
            runs.append((flats, len(calls)))
        (plain, plain_calls), (grouped_flats, grouped_calls), (all_flats, all_calls) = runs
        for a, b, c in zip(plain, grouped_flats, all_flats):
            assert torch.equal(a, b) and torch.equal(a, c)
        if not is_dense:
            assert torch.equal(grouped_flats.grad[1500:2000], torch.full((500,), 7.0, dtype=grad_dtype))
        keys = len({(s[2], s[3]) for s in spans})
        assert plain_calls == len(spans) and grouped_calls == keys and all_calls == keys


def test_host_adam_calls_the_kernel_per_chunk_span_not_per_parameter(monkeypatch):
    calls = []
    real = torch._fused_adamw_

    def counting(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=engine_config())
    for x, y in batches("gpt", 2):
        model._rt.finish_host_updates()  # the last step's host updates run after step() returns
        calls.clear()
        engine_step(model, optimizer, x, y)
        model._rt.finish_host_updates()
    num_params = sum(1 for info in model._rt.infos if info.requires_grad)
    assert 0 < len(calls) <= len(model._rt.groups) < num_params


def test_host_adam_threads_are_the_cores_left_beside_each_ranks_compute(monkeypatch):
    monkeypatch.setattr(device_module.psutil, "cpu_count", lambda logical=True: 16)
    monkeypatch.setattr(device_module.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.setattr(device_module, "_cgroup_cpu_quota", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert host_adam_threads(cuda) == 15  # one core drives the GPU
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert host_adam_threads(cpu) == 12  # a CPU compute keeps its own intra-op threads
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert host_adam_threads(cuda) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert host_adam_threads(cuda) == 1 and host_adam_threads(cpu) == 1  # never none


# ---- placement ---------------------------------------------------------------------------------

def test_placement_uses_what_remains_beside_params_and_activations():
    model, _ = initialize_engine(model_func=TinyGPT, config=engine_config(device_memory_limit=64 << 20))
    groups = model._rt.groups
    params = sum(g.param.nbytes for g in groups)
    per_group = [sum(c.nbytes for c in g.optimizer_chunks) for g in groups]
    peak, scratch = 100_000, 16_384
    needed = params + _with_margin(peak) + scratch
    exact = plan_placement(groups, needed + sum(per_group[:3]), peak, 0.8, True, scratch)
    assert exact.num_device_groups == 3 and exact.params_fit
    assert plan_placement(groups, needed + sum(per_group[:3]) - 1, peak, 0.8, True, scratch
                          ).num_device_groups == 2
    # The device's real free memory bounds a budget set too high.
    capped = plan_placement(groups, 1 << 40, peak, 0.8, True, scratch,
                            device_capacity=needed + sum(per_group[:2]))
    assert capped.num_device_groups == 2
    # Activations (with the margin) and params not fitting: nothing stays, nothing placed.
    tight = plan_placement(groups, params + peak, peak, 0.8, True, scratch)
    assert tight.num_device_groups == 0 and not tight.params_fit
    assert plan_placement(groups, 1 << 40, peak, 0.8, False, scratch).num_device_groups == 0


def test_placement_never_holds_device_groups_host_copies_beside_new_host_moments(monkeypatch):
    """The host's peak over the placement step is that of init or of the steady state: the host
    groups' moments are allocated only once the device groups' masters and param chunks (which
    stay on the device for good) have left the host."""
    from engine.chunk_manager import ChunkManager
    peak = {"bytes": 0}
    register = ChunkManager._register_host

    def counting(self, chunk):
        register(self, chunk)
        peak["bytes"] = max(peak["bytes"], self.host_allocated_bytes)

    monkeypatch.setattr(ChunkManager, "_register_host", counting)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=engine_config(device_memory_limit=700_000))
    for x, y in batches("gpt", 3):
        engine_step(model, optimizer, x, y)
    rt = model._rt
    on_device = sum(g.optimizer_on_device for g in rt.groups)
    assert 0 < on_device < len(rt.groups) and optimizer._host.keep_resident  # both kinds of groups
    assert peak["bytes"] == max(rt.manager.init_host_bytes, rt.manager.host_allocated_bytes), peak


def test_sharded_placement_keeps_a_window_of_gathered_chunks_when_not_all_fit():
    """With several ranks the gathered chunks can be dropped and gathered again: when keeping all of
    them would push optimizer state to the host, they get a window of GATHER_WINDOW chunks."""
    from engine.chunk import TensorInfo, new_chunk_group
    from engine.optimizer_placement import GATHER_WINDOW

    def group(index):
        info = TensorInfo(param=torch.nn.Parameter(torch.zeros(1024)), names=[f"t{index}"], offset=0,
                          numel=1024, shape=torch.Size([1024]), requires_grad=True)
        return new_chunk_group(index, 1024, [info], torch.bfloat16, False, False, index * 6, (0, 2))

    groups = [group(i) for i in range(10)]
    shards = sum(g.param.nbytes for g in groups)
    gathered = groups[0].gathered.nbytes  # 2 KiB: the whole chunk in bf16
    optim = sum(c.nbytes for c in groups[0].optimizer_chunks)  # 6 KiB: this rank's fp32 shards
    peak, scratch = 10_000, 4_096
    base = shards + _with_margin(peak) + scratch
    roomy = plan_placement(groups, base + 10 * gathered + 10 * optim, peak, 0.8, True, scratch)
    assert roomy.num_device_groups == 10 and roomy.params_fit  # everything stays, nothing regathered
    # Room for 7 groups beside all gathered chunks; dropping all but the window frees 2 more.
    short = plan_placement(groups, base + 10 * gathered + 7 * optim, peak, 0.8, True, scratch)
    assert (10 - GATHER_WINDOW) * gathered == 2 * optim
    assert short.num_device_groups == 9


# ---- host memory limits --------------------------------------------------------------------------

def test_a_tiny_locked_memory_limit_gets_a_clear_message():
    limits = HostMemoryLimits(memlock_bytes=64 * 1024, cgroup_bytes=None)
    message = memlock_problem(3 * 2**30, limits)
    assert "ulimit -l" in message and "65,536 bytes" in message and "3,221,225,472" in message
    assert memlock_problem(32 * 1024, limits) is None
    assert memlock_problem(3 * 2**30, HostMemoryLimits(memlock_bytes=None, cgroup_bytes=None)) is None


def test_a_page_locking_failure_names_the_limits(monkeypatch):
    """What the user reads if the driver refuses to page-lock a chunk buffer."""
    monkeypatch.setattr(device_module, "read_host_memory_limits",
                        lambda: HostMemoryLimits(memlock_bytes=64 * 1024, cgroup_bytes=None))
    message = Copier(torch.device("cpu"))._pinning_failure(2**20, RuntimeError("out of memory"))
    assert "could not page-lock 1,048,576 more bytes" in message and "out of memory" in message
    assert "ulimit -l" in message and "65,536 bytes" in message
    monkeypatch.setattr(device_module, "read_host_memory_limits",
                        lambda: HostMemoryLimits(memlock_bytes=None, cgroup_bytes=8 * 2**30))
    message = Copier(torch.device("cpu"))._pinning_failure(2**20, RuntimeError("out of memory"))
    assert "memory cgroup limit is 8,589,934,592 bytes" in message and "unlimited" in message


def test_a_tiny_memory_cgroup_is_refused_before_anything_is_allocated(monkeypatch):
    limits = HostMemoryLimits(memlock_bytes=None, cgroup_bytes=200_000, cgroup_used_bytes=50_000)
    message = cgroup_problem(300_000, 100_000, limits)
    assert "memory cgroup allows 200,000 bytes" in message and "50,000 are in use" in message
    with pytest.raises(EngineError, match="memory cgroup"):
        Copier(torch.device("cpu")).check_host_plan(300_000, 0, limits)
    monkeypatch.setattr(device_module, "read_host_memory_limits", lambda: limits)
    assert device_module.host_total_bytes() == 200_000
    with pytest.raises(EngineError, match="memory cgroup"):
        initialize_engine(model_func=TinyGPT, config=engine_config(host_memory_limit=1 << 30))


def test_placement_checks_only_the_host_memory_it_adds(monkeypatch):
    """At the first step the host groups' moments are allocated: the cgroup must have room for
    them, not for everything the host holds already (that is in the cgroup's usage)."""
    cfg = engine_config()  # a tiny device: every optimizer group stays on the host
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)  # the real limits
    moments = sum(g.exp_avg.nbytes + g.exp_avg_sq.nbytes for g in model._rt.groups)
    room = {"bytes": moments + 1}
    monkeypatch.setattr(device_module, "read_host_memory_limits", lambda: HostMemoryLimits(
        memlock_bytes=None, cgroup_bytes=10**9, cgroup_used_bytes=10**9 - room["bytes"]))
    x, y = next(batches("gpt", 1))
    engine_step(model, optimizer, x, y)  # placement: the moments fit exactly
    assert model.chunk_stats()["optim_chunks_host"] > 0

    room["bytes"] = 10**8  # init itself is not what this test is about
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=TinyGPT, config=cfg)
    room["bytes"] = moments - 1
    with pytest.raises(EngineError, match="memory cgroup"):
        engine_step(model, optimizer, x, y)


@pytest.mark.gpu
def test_pinned_host_memory_is_exactly_the_planned_param_chunks():
    """Every moving param chunk's host copy is page-locked at its exact size, nothing else."""
    model, _ = initialize_engine(model_func=TinyGPT, config=engine_config())
    groups = model._rt.groups
    planned = sum(g.param.nbytes for g in groups if not g.host_only)
    assert model._rt.copier.pinned_bytes == planned
    assert all(g.param.host_flat.is_pinned() for g in groups if not g.host_only)
    assert not any(g.master.host_flat.is_pinned() for g in groups)


@pytest.mark.gpu
def test_host_results_reach_the_device_without_a_stream_sync():
    """The norms of host-resident gradients go to the GPU inside a step: a plain copy from pageable
    memory would wait for the whole compute stream."""
    from engine.device import to_device_without_sync

    host = torch.arange(1000, dtype=torch.float32)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            host.to("cuda")  # the debug mode does catch a syncing copy
        moved = to_device_without_sync(host, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(moved.cpu(), host)


def test_eviction_drops_gathered_chunks_before_shards_then_farthest_first():
    """Belady within each kind; a gathered chunk (re-gathered over NVLink) goes before any shard
    (a copy down and back up over PCIe), even one whose next use is farther away."""
    from engine.chunk import Chunk, ChunkKind
    from engine.schedule import AccessSchedule

    schedule = AccessSchedule()
    schedule.start_recording()
    for chunk_id in (0, 1, 2, 3, 1, 0):
        schedule.on_access(chunk_id)
    schedule.finish_recording()
    schedule.restart()
    schedule.on_access(0)  # at moment 0, moments to the next use: chunk 1: 1, 2: 2, 3: 3, 0: 5
    shard_far = Chunk(0, ChunkKind.PARAM, 8, torch.bfloat16)
    gathered_near, gathered_far = (Chunk(i, ChunkKind.GATHERED, 16, torch.bfloat16) for i in (1, 2))
    shard_mid = Chunk(3, ChunkKind.PARAM, 8, torch.bfloat16)
    order = schedule.eviction_order([shard_far, gathered_near, shard_mid, gathered_far])
    assert order == [gathered_far, gathered_near, shard_far, shard_mid]


class _SometimesBranch(torch.nn.Module):
    """Three layers in one chunk; the middle one runs only when asked, so on the other steps it
    gets no gradient and its Adam step count falls behind its neighbours'."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 16)
        self.branch = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x, use_branch: bool):
        h = torch.tanh(self.first(x))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h).pow(2).mean()


@pytest.mark.parametrize("limit", [None, 64 * 1024], ids=["settles", "evicts"])
def test_a_tensor_skipped_on_some_steps_keeps_its_own_step_count(limit):
    """A group whose spans were kept while every tensor had a gradient gets them again after a step
    that skipped one tensor: that tensor's step count is behind, so it is a span of its own, as
    torch.optim.AdamW counts it (fp32, rtol 1e-5 / atol 1e-6 as in tests/test_param_groups.py)."""
    cfg = engine_config(**({} if limit is None else {"device_memory_limit": limit}))
    uses = [True, True, False, True, True, False, False, True]
    torch.manual_seed(0)
    model, optimizer = initialize_engine(model_func=_SometimesBranch, config=cfg)
    reference = _SometimesBranch().to(DEVICE)
    reference.load_state_dict(model.state_dict())
    plain = torch.optim.AdamW(reference.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                              fused=True)
    gen = torch.Generator().manual_seed(1)
    for use in uses:
        x = torch.randn(8, 16, generator=gen).to(DEVICE)
        optimizer.zero_grad()
        loss = model(x, use)
        model.backward(loss)
        optimizer.step()
        plain.zero_grad()
        ref_loss = reference(x, use)
        ref_loss.backward()
        plain.step()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert len({id(info.group) for info in model._rt.infos}) == 1  # one chunk: one group's spans
    ours = model.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ours[name].float().cpu(), value.float().cpu(), rtol=1e-5, atol=1e-6)


def test_a_cpu_device_buffer_let_go_is_reused_unless_something_still_holds_it():
    """On a CPU compute device an evicted chunk's buffer serves the next upload of its size (as
    CUDA's caching allocator would), but not while a view of it is alive (that view keeps its
    numbers), nor beyond the room the device budget leaves."""
    copier = Copier(torch.device("cpu"))
    nbytes = 1000 * 4
    first = copier.alloc_device(1000, torch.float32)
    address = first.data_ptr()
    copier.release_device(first, room_bytes=nbytes)
    del first
    assert copier.kept_bytes == nbytes
    again = copier.alloc_device(1000, torch.float32)
    assert again.data_ptr() == address and copier.kept_bytes == 0
    # the same bytes in another dtype share the kept buffer too
    copier.release_device(again, room_bytes=nbytes)
    del again
    halves = copier.alloc_device(2000, torch.bfloat16)
    assert halves.data_ptr() == address and halves.numel() == 2000
    # a view still alive: not kept, and the view's numbers stay
    halves.fill_(3.0)
    view = halves[10:20]
    copier.release_device(halves, room_bytes=nbytes)
    del halves
    assert copier.kept_bytes == 0
    copier.alloc_device(2000, torch.bfloat16).fill_(-1.0)
    assert torch.equal(view, torch.full((10,), 3.0, dtype=torch.bfloat16))
    # no room left beside the resident chunks: not kept
    buf = copier.alloc_device(1000, torch.float32)
    copier.release_device(buf, room_bytes=nbytes - 1)
    assert copier.kept_bytes == 0


def test_moving_chunks_on_a_cpu_reuses_device_buffers_within_the_budget():
    """Training with evictions every step on a CPU compute device: after the first steps the uploads
    land in a few buffers allocated once, the buffers kept and the resident chunks stay within the
    device budget, and the numbers are plain PyTorch's (fp32, rtol 1e-5 / atol 1e-6 as in
    tests/test_param_groups.py)."""
    cfg = engine_config()
    model, optimizer, reference = build_pair("gpt", cfg)
    plain = plain_optimizer(reference.parameters(), cfg, model)
    copier, manager = model._rt.copier, model._rt.manager
    addresses: set[int] = set()
    upload = copier.upload

    def upload_noting_where(chunk):
        upload(chunk)
        addresses.add(chunk.device_flat.data_ptr())

    copier.upload = upload_noting_where
    uploads_before = 0
    for index, (x, y) in enumerate(batches("gpt", 6)):
        if index == 2:
            addresses.clear()
            uploads_before = model.chunk_stats()["total_h2d_moves"]
        engine_step(model, optimizer, x, y)
        plain.zero_grad()
        reference(x, y).backward()
        plain.step()
        assert copier.kept_bytes + manager.device_bytes <= manager.device_budget_bytes
    uploads = model.chunk_stats()["total_h2d_moves"] - uploads_before
    smallest = min(chunk.nbytes for chunk in manager.chunks if chunk.nbytes)
    assert uploads > 2 * len(addresses) > 0
    assert len(addresses) <= manager.device_budget_bytes // smallest + 1
    assert_state_close(model, reference, rtol=1e-5, atol=1e-6)
