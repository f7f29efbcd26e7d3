"""Checkpoint contents and files: the engine's shard states (any layout, any number of ranks), the
atomic directory write, the manifest check, keep-last-N, config differences, RNG states, export."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import models
from engine import initialize_engine
from engine.checkpoint import full_state_dict
from engine.errors import EngineError
from pstar_cli import checkpoint as ckpt
from pstar_cli.config import load_config
from pstar_cli.main import app
from pstar_cli.observe.metrics import read_metrics, trim_metrics
from pstar_cli.training.run import build_trainer
from pstar_cli.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
MODEL = {"family": "gpt", "size": "gpt-tiny", "seq_len": 32}
# small enough that chunks are evicted and uploaded every step
DEVICE_LIMIT = 2_000_000
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the engine computes


def tiny_config(*overrides: str):
    base = ["model.size=gpt-tiny", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=2",
            "train.log_interval=1", "train.steps=6", "engine.default_chunk_size=8192",
            f"engine.device_memory_limit={DEVICE_LIMIT}"]
    return load_config(TINY, [*base, *overrides])


def build_engine(chunk_size: int = 8192, **extra):
    torch.manual_seed(0)
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
              "default_chunk_size": chunk_size, "device_memory_limit": DEVICE_LIMIT,
              "gradient_clipping": 1.0, **extra}
    return initialize_engine(model_func=lambda: models.build_model(MODEL), config=config)


def batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(256, (4, 33), generator=generator) for _ in range(count)]


def train_steps(model, optimizer, data) -> list[float]:
    losses = []
    for batch in data:
        optimizer.zero_grad()
        batch = batch.to(DEVICE)
        loss = model(batch[:, :-1], batch[:, 1:])  # (4, 32) inputs and next-token targets
        model.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_same_losses(resumed: list[float], straight: list[float]) -> None:
    """Bitwise on the CPU. On CUDA the resumed engine's first step is its warm-up, which updates
    every optimizer group on the host (fused CPU Adam rounds unlike fused CUDA Adam)."""
    if DEVICE.type == "cpu":
        assert resumed == straight
    else:
        assert resumed == pytest.approx(straight, rel=1e-5)


def split_into_ranks(state: dict, world_size: int) -> list[dict]:
    """A one-rank shard state cut as `world_size` ranks would hold it: every group's flat
    tensors in equal shards (the last one padded), rank r keeping elements of shard r."""
    shards = []
    for rank in range(world_size):
        groups = []
        for group in state["groups"]:
            shard_numel = -(-group["numel"] // world_size)
            begin = rank * shard_numel

            def piece(flat):
                if flat is None:
                    return None
                padded = torch.cat([flat, flat.new_zeros(shard_numel * world_size - flat.numel())])
                return padded[begin:begin + shard_numel].clone()

            groups.append({**group, "shard_begin": begin, "shard_numel": shard_numel,
                           **{kind: piece(group[kind]) for kind in ("master", "exp_avg", "exp_avg_sq")}})
        shards.append({**state, "rank": rank, "world_size": world_size, "groups": groups})
    return shards


# ---- engine shard states ----


@pytest.mark.parametrize("chunk_size", [8192, 3000])
def test_shard_state_resumes_bitwise_in_any_chunk_layout(chunk_size):
    data = batches(7)
    model, optimizer = build_engine()
    train_steps(model, optimizer, data[:4])
    state = model.shard_state()
    straight = train_steps(model, optimizer, data[4:])

    resumed, resumed_optimizer = build_engine(chunk_size)  # another layout: pieces found by name
    resumed.load_shard_state(state)
    assert_same_losses(train_steps(resumed, resumed_optimizer, data[4:]), straight)
    if DEVICE.type == "cpu":
        for key, value in model.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value), key


def test_shard_state_of_a_repacked_layout_resumes_a_fresh_engine_bitwise():
    """OddModel is re-packed after its warm-up (its unused layer goes last); a fresh engine loads
    the state into the init layout, then re-packs at its own first step, moments and all."""
    from tests.engine_models import OddModel

    config = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
              "default_chunk_size": 2048, "device_memory_limit": 64 * 1024, "gradient_clipping": 0.5}
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(64, (4, 17), generator=generator) for _ in range(6)]

    def fresh(seed: int):
        torch.manual_seed(seed)
        return initialize_engine(model_func=OddModel, config=config)

    model, optimizer = fresh(0)
    train_steps(model, optimizer, data[:3])
    repacked = lambda names: names.index("frozen.bias") < names.index("unused.weight")  # noqa: E731
    assert repacked([info.names[0] for info in model._rt.infos])
    state = model.shard_state()
    straight = train_steps(model, optimizer, data[3:])
    resumed, resumed_optimizer = fresh(7)  # other weights, overwritten by the state
    assert not repacked([info.names[0] for info in resumed._rt.infos])
    resumed.load_shard_state(state)
    assert_same_losses(train_steps(resumed, resumed_optimizer, data[3:]), straight)
    assert repacked([info.names[0] for info in resumed._rt.infos])
    if DEVICE.type == "cpu":
        for key, value in model.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value), key


def test_a_state_saved_before_any_step_clears_the_moments_it_replaces():
    """A state saved before the first step has no moments; loading it into an engine that has
    stepped must leave that engine's moments at zero, as a fresh engine's are."""
    data = batches(4)
    fresh, fresh_optimizer = build_engine()
    state = fresh.shard_state()
    assert all(group["exp_avg"] is None for group in state["groups"])
    trained, trained_optimizer = build_engine()
    train_steps(trained, trained_optimizer, data[:2])
    trained.load_shard_state(state)
    assert_same_losses(train_steps(trained, trained_optimizer, data[2:]), train_steps(fresh, fresh_optimizer, data[2:]))
    if DEVICE.type == "cpu":
        for key, value in fresh.state_dict().items():
            assert torch.equal(trained.state_dict()[key], value), key


def test_shard_state_holds_masters_moments_and_step_counts():
    model, optimizer = build_engine()
    train_steps(model, optimizer, batches(3))
    state = model.shard_state()
    assert (state["rank"], state["world_size"]) == (0, 1)
    tensors = [t for group in state["groups"] for t in group["tensors"]]
    assert {t["name"] for t in tensors} == {k for k in model.state_dict() if k != "lm_head.weight"}
    assert {t["steps"] for t in tensors} == {3}
    tied = next(t for t in tensors if t["name"] == "wte.weight")
    assert tied["names"] == ["wte.weight", "lm_head.weight"]
    assert all(g["master"].dtype == torch.float32 and g["exp_avg_sq"].min() >= 0 for g in state["groups"])
    # a copy stays as it was when the training goes on; the live buffers do not
    live = model.shard_state(copy=False)
    before = state["groups"][0]["master"].clone()
    train_steps(model, optimizer, batches(1))
    model._rt.finish_host_updates()  # host groups' updates may run on after step() returns
    assert torch.equal(state["groups"][0]["master"], before)
    assert not torch.equal(live["groups"][0]["master"].cpu(), before)


@pytest.mark.parametrize("world_size", [2, 3])
def test_shard_states_of_several_ranks_load_into_one(world_size):
    """Resharding: the pieces of every saved rank are found and put together."""
    data = batches(6)
    model, optimizer = build_engine()
    train_steps(model, optimizer, data[:3])
    shards = split_into_ranks(model.shard_state(), world_size)
    straight = train_steps(model, optimizer, data[3:])
    resumed, resumed_optimizer = build_engine()
    resumed.load_shard_state(list(reversed(shards)))  # order does not matter
    assert_same_losses(train_steps(resumed, resumed_optimizer, data[3:]), straight)


def test_missing_rank_or_other_model_is_refused():
    model, optimizer = build_engine()
    train_steps(model, optimizer, batches(1))
    shards = split_into_ranks(model.shard_state(), 2)
    with pytest.raises(EngineError, match="every saved rank"):
        model.load_shard_state(shards[:1])
    other = {**MODEL, "size": "gpt-mini"}
    torch.manual_seed(0)
    bigger, _ = initialize_engine(model_func=lambda: models.build_model(other), config={})
    with pytest.raises(EngineError, match="different model"):
        bigger.load_shard_state(model.shard_state())


def test_full_state_dict_loads_strictly_and_gives_the_engines_loss():
    data = batches(4)
    model, optimizer = build_engine()
    train_steps(model, optimizer, data[:3])
    plain = models.build_model(MODEL)
    plain.load_state_dict(full_state_dict(split_into_ranks(model.shard_state(), 2)), strict=True)
    x, y = data[3][:, :-1], data[3][:, 1:]
    with torch.no_grad():
        assert plain(x, y).item() == pytest.approx(model(x.to(DEVICE), y.to(DEVICE)).item(), rel=1e-6)


# ---- files: atomic write, manifest, keep ----


def make_trainer(tmp_path: Path, *overrides: str) -> Trainer:
    return build_trainer(tiny_config(*overrides), tmp_path / "run")


def test_save_writes_a_complete_verified_checkpoint_and_keeps_the_last_n(tmp_path):
    trainer = make_trainer(tmp_path)
    root = tmp_path / "ckpt"
    checkpointer = ckpt.Checkpointer(root, interval=2, keep=2).attach(trainer)
    trainer.train()
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-00000004", "step-00000006"]
    assert checkpointer.latest == root / "step-00000006"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left behind
    latest = checkpointer.latest
    assert ckpt.verify_checkpoint(latest) == []
    manifest = json.loads((latest / ckpt.MANIFEST).read_text())
    assert {e["name"] for e in manifest["files"]} == {"rank-00000.pt", "metadata.json"}
    metadata = ckpt.read_metadata(latest)
    assert metadata["step"] == 6 and metadata["sequences_seen"] == 24 and metadata["world_size"] == 1
    assert metadata["lr_schedule"]["next_lr"] == trainer.schedule(6)
    assert metadata["loss_scaler"]["scale"] == 1.0 and len(metadata["rng"]) == 1
    assert metadata["config"] == trainer.cfg.to_dict()


def test_unfinished_writes_are_ignored_and_cleared(tmp_path):
    root = tmp_path / "ckpt"
    trainer = make_trainer(tmp_path, "train.steps=2")
    ckpt.Checkpointer(root, interval=1, keep=5).attach(trainer)
    trainer.train()
    (root / ".tmp-step-00000003").mkdir()  # a write killed half-way
    (root / ".tmp-step-00000003" / "rank-00000.pt").write_bytes(b"half")
    (root / "step-00000009").mkdir()  # no manifest: never completed
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-00000001", "step-00000002"]
    ckpt.save_checkpoint(trainer, root, keep=5)  # the next write clears the debris
    assert not (root / ".tmp-step-00000003").exists()


def test_verify_names_truncated_and_corrupted_files(tmp_path):
    root = tmp_path / "ckpt"
    trainer = make_trainer(tmp_path, "train.steps=2")
    ckpt.Checkpointer(root, interval=1, keep=5).attach(trainer)
    trainer.train()
    first, second = ckpt.complete_checkpoints(root)
    rank_file = second / "rank-00000.pt"
    data = rank_file.read_bytes()
    rank_file.write_bytes(data[: len(data) // 2])
    assert ckpt.verify_checkpoint(second) == [
        f"{rank_file}: {len(data) // 2:,} bytes, the manifest says {len(data):,} (truncated or overwritten)"]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    rank_file.write_bytes(bytes(flipped))
    [problem] = ckpt.verify_checkpoint(second)
    assert str(rank_file) in problem and "sha256" in problem
    error = ckpt.damaged_checkpoint_error(second, [problem])
    assert f"--resume {first}" in error.message_lines()[-1]


def test_config_differences_list_what_matters_only():
    saved = tiny_config().to_dict()
    assert ckpt.config_differences(saved, tiny_config().to_dict()) == []
    allowed = tiny_config("train.steps=50", "train.log_interval=7", "checkpoint.interval=3",
                          "engine.device_memory_limit=9000000", "distributed.nproc_per_node=2",
                          "train.grad_accum=2", "model.activation_checkpointing=true").to_dict()
    assert ckpt.config_differences(saved, allowed) == []
    assert ckpt.config_changes(saved, allowed) == ["train.steps: 6 in the checkpoint, 50 now"]
    # writing out a default, or the size's own numbers, changes nothing
    same = tiny_config("engine.fp16.min_loss_scale=1.0", "model.hidden=64").to_dict()
    assert ckpt.config_differences(saved, same) == []
    # getting a diverging run going again: allowed, and reported
    tuned = tiny_config("train.lr=0.001", "engine.gradient_clipping=0.5").to_dict()
    assert ckpt.config_differences(saved, tuned) == []
    assert ckpt.config_changes(saved, tuned) == ["engine.gradient_clipping: 1.0 in the checkpoint, 0.5 now",
                                                 "train.lr: 0.003 in the checkpoint, 0.001 now"]
    changed = tiny_config("train.batch_size=8", "engine.optimizer.params.weight_decay=0.0", "model.layers=3",
                          "train.seed=5", "engine.bf16.enabled=true").to_dict()
    assert ckpt.config_differences(saved, changed) == [
        "engine.bf16.enabled: false in the checkpoint, true now",
        "engine.optimizer.params.weight_decay: 0.1 in the checkpoint, 0.0 now",
        "model.layers: 2 in the checkpoint, 3 now",
        "train.batch_size: 4 in the checkpoint, 8 now",
        "train.seed: 0 in the checkpoint, 5 now",
    ]


def test_rng_states_round_trip_through_json():
    state = json.loads(json.dumps(ckpt.capture_rng_state(torch.device("cpu"))))
    expected = (torch.rand(3), random.random())
    torch.rand(7), random.random()
    ckpt.restore_rng_state(state, torch.device("cpu"))
    again = (torch.rand(3), random.random())
    assert torch.equal(again[0], expected[0]) and again[1] == expected[1]


def test_trim_metrics_drops_steps_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    trim_metrics(path, 5)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]


# ---- export ----


def test_export_round_trip_loads_strictly_and_gives_the_engines_loss(tmp_path):
    trainer = make_trainer(tmp_path, "train.steps=3")
    root = tmp_path / "ckpt"
    ckpt.Checkpointer(root, interval=3, keep=1).attach(trainer)
    trainer.train()
    out = tmp_path / "export" / "model.pt"
    result = CliRunner().invoke(app, ["export", str(root), str(out)])
    assert result.exit_code == 0, result.output
    assert "step 3" in result.output and "load_state_dict" in result.output
    plain = models.build_model(trainer.cfg.model_dict())
    plain.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x, y = trainer.data.get_batch(1000, 4)
    with torch.no_grad():
        assert plain(x, y).item() == pytest.approx(trainer.model(x.to(DEVICE), y.to(DEVICE)).item(), rel=1e-6)
    half = tmp_path / "half.pt"
    assert CliRunner().invoke(app, ["export", str(root), str(half), "--dtype", "bfloat16"]).exit_code == 0
    assert torch.load(half, weights_only=True)["wte.weight"].dtype == torch.bfloat16


def test_export_of_something_else_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path), str(tmp_path / "m.pt")])
    assert result.exit_code == 2
    assert "not a complete checkpoint" in result.output and "Traceback" not in result.output


@pytest.mark.gpu
def test_cuda_shard_state_streams_device_chunks_into_the_file():
    """copy=False hands torch.save the device buffers themselves (it copies them down one by one);
    the file holds the same weights as the engine, and a fresh engine resumes from it."""
    import io

    data = batches(6)
    # 4 GiB leaves room for all model data beside the CUDA context and the activations, so the
    # placement keeps optimizer groups on the GPU (the premise of this test, checked next)
    model, optimizer = build_engine(device_memory_limit=4 * 2**30)
    train_steps(model, optimizer, data[:3])
    live = model.shard_state(copy=False)
    assert any(g["master"].is_cuda for g in live["groups"])
    buffer = io.BytesIO()
    torch.save(live, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)
    for key, value in full_state_dict([saved]).items():
        assert torch.equal(value, model.state_dict()[key].cpu()), key
    straight = train_steps(model, optimizer, data[3:])
    resumed, resumed_optimizer = build_engine(device_memory_limit=4 * 2**30)
    resumed.load_shard_state(saved)
    assert_same_losses(train_steps(resumed, resumed_optimizer, data[3:]), straight)


# ---- no numpy ----


@pytest.mark.slow
def test_a_checkpoint_and_its_resume_need_no_numpy(tmp_path):
    """The RNG states go into the metadata as bytes taken from torch (`tolist`), not `.numpy()`.
    (Slow: the default tests/test_train.py::test_pstar_train_subprocess_loss_falls runs the README
    demo with a checkpoint and its resume in a process without numpy.)"""
    from tests.test_train import run_without_numpy

    out = tmp_path / "run"
    common = ["train", str(TINY), "model.size=gpt-tiny", "train.batch_size=2", "train.seq_len=32",
              "checkpoint.interval=2", "--output-dir", str(out)]
    result = run_without_numpy([*common, "train.steps=2"], [*common, "train.steps=4", "--resume"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pstar: command done") == 2 and "resumed from" in result.stdout
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step-00000002") == []
    assert [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000004"]
