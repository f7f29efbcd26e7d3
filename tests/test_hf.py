"""Hugging Face models: a local directory built on meta and loaded into chunks, random init equal
to `from_config`, tokenized data, `pstar export --format hf` back to a directory `from_pretrained`
loads, and the messages for unusable directories. Needs the extra `pstar[hf]`; the tiny models are
made here (no downloads), once per module, because importing transformers takes seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers", reason="needs the optional extra pstar[hf]")
from typer.testing import CliRunner  # noqa: E402

from engine import initialize_engine  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from models.hf import hf_model_func, save_pretrained  # noqa: E402
from models.make_tiny_hf import make_tiny_hf  # noqa: E402
from pstar_cli.main import app  # noqa: E402

FP32 = {"bf16": {"enabled": False}, "default_chunk_size": 8192}
runner = CliRunner()


def tiny_llama_config(tie: bool):
    return transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The shipped maker's directory (tiny Llama, trained BPE tokenizer, corpus.jsonl), made once."""
    return make_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny", vocab_size=400, hidden=32, layers=2,
                        max_positions=128)


def engine_weights(model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("hf."): v for k, v in model.state_dict().items()}


# ---- init ----------------------------------------------------------------------------------


def small_config(kind: str):
    if kind.startswith("llama"):
        return tiny_llama_config(tie=kind == "llama-tied")
    if kind == "gpt2":  # learned positions, Conv1D layers, tied head, scaled residual init
        return transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    cls = {"qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[kind]
    return cls(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)


@pytest.mark.engine_on_cpu
@pytest.mark.parametrize("kind", ["llama", "llama-tied", "qwen2", "mistral", "gpt2"])
def test_random_init_through_the_engine_equals_from_config_with_the_same_seed(kind, tmp_path):
    # from_config draws torch's default init in every layer's constructor, runs the inner model's
    # post_init before the head exists, ties the head after drawing its init, and (GPT-2) lets the
    # attention and MLP re-draw their c_proj after it: pstar replays that order on meta, so the
    # weights are bitwise equal (same CPU generator, same kernels, same shapes)
    config = small_config(kind)
    config.save_pretrained(tmp_path)
    torch.manual_seed(3)
    reference = transformers.AutoModelForCausalLM.from_config(config).state_dict()
    torch.manual_seed(3)
    model, _ = initialize_engine(hf_model_func(tmp_path, pretrained=False), config=FP32)
    weights = engine_weights(model)
    assert set(weights) == set(reference)
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name
    if kind == "llama-tied":
        assert model.module.hf.lm_head.weight is model.module.hf.model.embed_tokens.weight


def test_pretrained_weights_from_shards_and_index_land_in_the_chunks(tmp_path, caplog):
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(tiny_llama_config(False)).to(torch.bfloat16)
    original.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with caplog.at_level("WARNING", logger="pstar.engine"):
        model, _ = initialize_engine(hf_model_func(tmp_path), config=FP32)
    assert not [r for r in caplog.records if "CPU first" in r.message]  # built on meta, no fallback
    weights = engine_weights(model)
    for name, value in original.state_dict().items():
        # fp32 masters of bf16 values: the conversion is exact
        assert torch.equal(weights[name], value.float()), name


def test_a_directory_lacking_weights_is_refused_before_the_engine_starts(tmp_path):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_llama_config(False)).save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EngineError, match="lack 1 of the model's parameters .model.norm.weight"):
        hf_model_func(tmp_path)


def test_activation_checkpointing_gives_the_same_loss_and_step(tiny_dir):
    batch = torch.randint(0, 400, (2, 17))
    losses = []
    for recompute in (False, True):
        model, optimizer = initialize_engine(hf_model_func(tiny_dir, activation_checkpointing=recompute),
                                             config={**FP32, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
        # read the flag transformers sets on each layer stack: the property over it was renamed
        # between releases (is_gradient_checkpointing, is_activation_checkpointing)
        flags = [m.gradient_checkpointing for m in model.module.hf.modules() if hasattr(m, "gradient_checkpointing")]
        assert flags and all(flag is recompute for flag in flags)
        for _ in range(2):
            optimizer.zero_grad()
            loss = model(batch[:, :-1], batch[:, 1:])
            model.backward(loss)
            optimizer.step()
            losses.append(loss.item())
    # recomputation runs the same kernels on the same inputs: equal up to summation order only
    assert losses[:2] == pytest.approx(losses[2:], rel=1e-5)


# ---- the Python API round trip -------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_writes_what_from_pretrained_loads_without_missing_keys(tie, tmp_path):
    source = tmp_path / "src"
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_llama_config(tie)).save_pretrained(source)
    model, optimizer = initialize_engine(hf_model_func(source), config={**FP32, "optimizer": {
        "type": "AdamW", "params": {"lr": 1e-2}}})
    optimizer.zero_grad()
    batch = torch.randint(0, 300, (2, 9))
    model.backward(model(batch[:, :-1], batch[:, 1:]))
    optimizer.step()
    save_pretrained(model, tmp_path / "out", max_shard_bytes=16 << 10)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    weights = engine_weights(model)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


# ---- config and validation -----------------------------------------------------------------


def write_config(tmp_path: Path, model: dict, data: dict | None = None, **train) -> str:
    cfg = {"model": model, "data": data or {"kind": "synthetic"},
           "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "warmup_steps": 0, "log_interval": 1, **train},
           "engine": {"bf16": {"enabled": False}, "default_chunk_size": 16384}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr


def test_validate_and_estimate_read_shapes_from_config_json(tiny_dir, tmp_path):
    path = write_config(tmp_path, {"hf_path": str(tiny_dir)}, {"kind": "jsonl", "path": str(tiny_dir / "corpus.jsonl")})
    result = runner.invoke(app, ["validate", path])
    assert result.exit_code == 0, result.output
    num_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert "hf LlamaForCausalLM in " in result.output and "2 layers x 32 hidden, its weights" in result.output
    assert "vocab 400" in result.output and f"tokenizer {tiny_dir}" in result.output
    result = runner.invoke(app, ["estimate-memory", path, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"]["num_params"] == num_params


@pytest.mark.parametrize("model, fragment", [
    ({"family": "llama"}, "model.family: not allowed beside model.hf_path"),
    ({"size": "llama-1b"}, "model.size: not allowed beside model.hf_path"),
    ({"hidden": 64}, "model.hidden: not allowed beside model.hf_path"),
])
def test_shape_keys_beside_hf_path_are_refused(tiny_dir, tmp_path, model, fragment):
    result = runner.invoke(app, ["validate", write_config(tmp_path, {"hf_path": str(tiny_dir), **model})])
    assert fragment in error_line(result)


def test_directory_problems_name_the_key_and_the_fix(tiny_dir, tmp_path):
    missing = runner.invoke(app, ["validate", write_config(tmp_path, {"hf_path": str(tmp_path / "nope")})])
    assert "model.hf_path" in error_line(missing) and "is not a directory" in missing.stderr
    sharded = tmp_path / "sharded"
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_llama_config(False)).save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[1].unlink()
    result = runner.invoke(app, ["validate", write_config(tmp_path, {"hf_path": str(sharded)})])
    assert f"lists shards that are not there: {shards[1].name}" in error_line(result)
    # random init from config.json needs no weights at all
    for shard in shards:
        shard.unlink(missing_ok=True)
    ok = runner.invoke(app, ["validate", write_config(tmp_path, {"hf_path": str(sharded), "pretrained": False})])
    assert ok.exit_code == 0, ok.output
    not_hf = runner.invoke(app, ["validate", write_config(tmp_path, {"size": "gpt-mini", "pretrained": True})])
    assert "model.pretrained: only used with model.hf_path" in error_line(not_hf)
    too_long = runner.invoke(app, ["validate", write_config(tmp_path, {"hf_path": str(tiny_dir)}, seq_len=512)])
    assert "train.seq_len: 512 is longer than the model's max_position_embeddings (128" in error_line(too_long)


def test_without_the_extra_an_hf_config_names_the_install_command(tiny_dir, tmp_path, monkeypatch):
    # a None entry in sys.modules makes `import transformers` raise ImportError, as if not installed
    for name in ("transformers", "tokenizers", "safetensors"):
        monkeypatch.setitem(sys.modules, name, None)
    path = write_config(tmp_path, {"hf_path": str(tiny_dir)}, {"kind": "jsonl", "path": str(tiny_dir / "corpus.jsonl")})
    for command in ("validate", "train"):
        result = runner.invoke(app, [command, path])
        lines = error_line(result).splitlines()
        assert len(lines) == 1 and "pip install 'pstar[hf]'" in lines[0] and "model.hf_path" in lines[0], lines


# ---- data through a tokenizer --------------------------------------------------------------


def test_jsonl_with_chinese_is_tokenized_once_joined_with_eos_and_cached(tiny_dir, tmp_path, monkeypatch):
    from pstar_cli.training import hf_data
    from tokenizers import Tokenizer

    docs = ["今天天气很好，我们去公园散步。", "The lantern was lit at dusk.", "小船在河上慢慢地漂。"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    cfg = {"kind": "jsonl", "path": str(data), "field": "body", "tokenizer": str(tiny_dir)}
    source = hf_data.build_tokenized(cfg, seq_len=8, vocab_size=400, seed=0, show_progress=False)
    tokenizer = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    eos = tokenizer.token_to_id("</s>")
    expected = []
    for doc in docs:
        expected += tokenizer.encode(doc, add_special_tokens=False).ids + [eos]
    assert source.tokens.tolist() == expected
    pieces = tokenizer.decode(source.tokens.tolist(), skip_special_tokens=False).split("</s>")
    assert pieces[:3] == docs  # byte-level BPE gives Chinese back exactly
    cached = list(tmp_path.glob("docs.jsonl.*.tokens"))
    assert len(cached) == 1
    monkeypatch.setattr(hf_data, "tokenize_file", lambda *a, **k: pytest.fail("tokenized again"))
    again = hf_data.build_tokenized(cfg, seq_len=8, vocab_size=400, seed=0, show_progress=False)
    assert torch.equal(again.tokens, source.tokens)
    x, y = again.get_batch(0, 2)
    assert x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(Exception, match="vocab_size 100"):
        hf_data.build_tokenized(cfg, seq_len=8, vocab_size=100, seed=0, show_progress=False)
    data.write_text(data.read_text(encoding="utf-8") + json.dumps({"body": "新的一行"}) + "\n", encoding="utf-8")
    monkeypatch.undo()
    hf_data.build_tokenized(cfg, seq_len=8, vocab_size=400, seed=0, show_progress=False)
    assert len(list(tmp_path.glob("docs.jsonl.*.tokens"))) == 2  # changed data: a new cache


def test_bad_jsonl_lines_name_the_line_and_the_key(tiny_dir, tmp_path):
    from pstar_cli.training import hf_data
    from pstar_cli.training.data import DataError

    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"content": "elsewhere"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 has no text under 'text'; set data.field"):
        hf_data.build_tokenized({"kind": "jsonl", "path": str(data), "tokenizer": str(tiny_dir)}, 4, 400, 0,
                                show_progress=False)


# ---- the round trip through the CLI --------------------------------------------------------


def train_and_export(tiny_dir: Path, tmp_path: Path, lr: float, steps: int) -> tuple[Path, Path]:
    out = tmp_path / f"run-{lr:g}"
    path = write_config(tmp_path, {"hf_path": str(tiny_dir)}, {"kind": "jsonl", "path": str(tiny_dir / "corpus.jsonl")},
                        steps=steps, lr=lr, min_lr=lr, batch_size=4, seq_len=32)
    cfg = yaml.safe_load(Path(path).read_text())
    cfg["checkpoint"] = {"interval": steps}
    cfg["engine"]["optimizer"] = {"type": "AdamW", "params": {"weight_decay": 0.0}}
    Path(path).write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["train", path, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    exported = tmp_path / f"hf-{lr:g}"
    result = runner.invoke(app, ["export", str(out / "checkpoints"), str(exported), "--format", "hf"])
    assert result.exit_code == 0, result.output
    return out, exported


def corpus_loss(model, tokens: torch.Tensor) -> float:
    batch = tokens[: 8 * 33].view(8, 33)
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()


def test_train_export_from_pretrained_round_trip(tiny_dir, tmp_path):
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    run, still = train_and_export(tiny_dir, tmp_path, lr=1e-12, steps=3)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(still, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    for name, value in original.state_dict().items():
        # Adam moves a weight by at most about lr per step (|m/sqrt(v)| is ~1): 3 steps of 1e-12 stay
        # far below 1e-10, while any real change of a weight of this model is above 1e-4
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=1e-10, msg=name)
    assert (still / "tokenizer.json").is_file() and (still / "generation_config.json").is_file()
    assert json.loads((still / "config.json").read_text())["dtype"] == "float32"
    again = runner.invoke(app, ["export", str(run / "checkpoints"), str(still), "--format", "hf"])
    assert "already exists and is not an empty directory" in error_line(again)  # nothing overwritten

    _, trained = train_and_export(tiny_dir, tmp_path, lr=3e-3, steps=12)
    moved = transformers.AutoModelForCausalLM.from_pretrained(trained)
    change = max((moved.state_dict()[k] - v).abs().max().item() for k, v in original.state_dict().items())
    assert change > 1e-3
    tokens = next(iter(tiny_dir.glob("corpus.jsonl.*.tokens")))
    stream = torch.from_file(str(tokens), size=tokens.stat().st_size // 4, dtype=torch.int32).long()
    assert corpus_loss(moved, stream) < corpus_loss(original, stream) - 0.1


def test_export_hf_of_a_pstar_model_checkpoint_says_use_pt(tmp_path):
    path = write_config(tmp_path, {"size": "gpt-mini", "vocab_size": 256}, steps=1)
    cfg = yaml.safe_load(Path(path).read_text())
    cfg["checkpoint"] = {"interval": 1}
    cfg["train"].update(seq_len=16)
    Path(path).write_text(yaml.safe_dump(cfg))
    assert runner.invoke(app, ["train", path, "--output-dir", str(tmp_path / "run")]).exit_code == 0
    result = runner.invoke(app, ["export", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "x"), "--format", "hf"])
    assert "export it with --format pt" in error_line(result)


def test_profile_runs_an_hf_config(tiny_dir, tmp_path):
    path = write_config(tmp_path, {"hf_path": str(tiny_dir)}, {"kind": "jsonl", "path": str(tiny_dir / "corpus.jsonl")})
    result = runner.invoke(app, ["profile", path, "engine.device_memory_limit=33554432", "--steps", "1",
                                 "--output-dir", str(tmp_path / "prof")])
    assert result.exit_code == 0, result.output
    checks = {row["what"]: row for row in json.loads((tmp_path / "prof" / "profile.json").read_text())["memory_check"]}
    # the estimate counts the parameters of config.json's shapes on meta; what the engine built
    # differs from it only by the alignment padding of chunk tails (here 2.5 KB of 780 KB)
    rows = [checks["model data on the device"], checks["model data on the host"]]
    measured, estimate = (sum(row[key] for row in rows) for key in ("measured_bytes", "estimate_bytes"))
    assert measured > 0 and estimate == pytest.approx(measured, rel=0.01)


# ---- the safetensors format ----------------------------------------------------------------


def test_written_shards_read_back_with_the_safetensors_library_and_ours(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from engine.safetensors_io import Entry, SafetensorsDir, write_safetensors

    torch.manual_seed(0)
    values = {"a.weight": torch.randn(33, 7), "b.bias": torch.randn(5), "c.table": torch.randn(300, 4),
              "d.empty": torch.zeros(0, 3)}
    dtypes = {"a.weight": torch.bfloat16, "b.bias": torch.float32, "c.table": torch.float16, "d.empty": torch.float32}
    entries = [Entry(name, tuple(v.shape), dtypes[name]) for name, v in values.items()]
    files = write_safetensors(tmp_path / "out", entries, values.__getitem__, max_shard_bytes=1024)
    assert len(files) == 3 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    read = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            read.update({name: f.get_tensor(name) for name in f.keys()})
    ours = SafetensorsDir(tmp_path / "out")
    for name, value in values.items():
        assert read[name].dtype == dtypes[name] and torch.equal(read[name], value.to(dtypes[name]))
        target = torch.empty(value.shape)
        ours.copy_into(name, target)
        assert torch.equal(target, value.to(dtypes[name]).float())
    save_file({"x": torch.arange(10, dtype=torch.int64)}, str(tmp_path / "lib.safetensors"))
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib.safetensors").rename(tmp_path / "lib" / "model.safetensors")
    target = torch.empty(10, dtype=torch.int64)
    SafetensorsDir(tmp_path / "lib").copy_into("x", target)
    assert target.tolist() == list(range(10))


def test_a_truncated_shard_is_named(tmp_path):
    from engine.safetensors_io import Entry, SafetensorsDir, write_safetensors

    (file,) = write_safetensors(tmp_path, [Entry("w", (64,), torch.float32)], lambda name: torch.ones(64))
    file.write_bytes(file.read_bytes()[:-8])
    with pytest.raises(EngineError, match="ends inside tensor 'w': the file is truncated"):
        SafetensorsDir(tmp_path).copy_into("w", torch.empty(64))


def test_the_benchmark_writes_a_sharded_bf16_llama_that_from_pretrained_loads(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.hf_14b import SIZES, make_checkpoint

    assert make_checkpoint(tmp_path, SIZES["tiny"], max_shard_bytes=64 << 10)
    assert not make_checkpoint(tmp_path, SIZES["tiny"], max_shard_bytes=64 << 10)  # reused
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert sum(p.numel() for p in model.parameters()) > 100_000
    from engine.safetensors_io import SafetensorsDir

    assert {t.dtype for t in SafetensorsDir(tmp_path).tensors.values()} == {torch.bfloat16}


def test_text_with_the_model_tokenizer_defaults_to_the_shipped_corpus_cached_outside_the_package(
        tiny_dir, tmp_path, monkeypatch):
    from pstar_cli.config import load_config
    from pstar_cli.training.data import build_data, default_corpus_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = load_config(write_config(tmp_path, {"hf_path": str(tiny_dir)}, {"kind": "text"}))
    assert cfg.data.tokenizer == str(tiny_dir)  # the model's own tokenizer by default
    source = build_data(cfg.to_dict()["data"], 16, 400, 0)
    assert source.tokens.numel() > 10_000 and int(source.tokens.max()) < 400
    assert list((tmp_path / "cache" / "pstar" / "tokens").glob("prose.txt.*.tokens"))
    assert not list(default_corpus_path().parent.glob("*.tokens"))


def test_a_config_json_that_is_not_a_causal_lm_or_not_json_is_named(tmp_path):
    t5 = tmp_path / "t5"
    transformers.T5Config(vocab_size=64, d_model=16, num_layers=1).save_pretrained(t5)
    result = runner.invoke(app, ["validate", write_config(tmp_path, {"hf_path": str(t5), "pretrained": False})])
    assert "does not describe a causal language model transformers can build" in error_line(result)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", ')
    result = runner.invoke(app, ["validate", write_config(tmp_path, {"hf_path": str(broken), "pretrained": False})])
    assert "config.json cannot be read as JSON" in error_line(result)


def test_the_shipped_config_validates_beside_the_directory_the_script_makes(tiny_dir, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "outputs" / "tiny-hf-llama")  # where the script writes by default
    monkeypatch.chdir(tmp_path)  # the config's paths are relative to where pstar runs
    result = runner.invoke(app, ["validate", str(Path(__file__).resolve().parents[1] / "configs" / "hf-finetune.yaml")])
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM in outputs/tiny-hf-llama" in result.output


@pytest.mark.slow
def test_the_shipped_recipe_runs_as_the_readme_says(tmp_path, monkeypatch):
    # README: `python -m models.make_tiny_hf`, then `pstar train configs/hf-finetune.yaml`, then export
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    made = subprocess.run([sys.executable, "-m", "models.make_tiny_hf"], cwd=tmp_path, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert made.returncode == 0, made.stderr[-2000:]
    assert (tmp_path / "outputs" / "tiny-hf-llama" / "model.safetensors").is_file()
    monkeypatch.chdir(tmp_path)  # the config's paths are relative to where pstar runs
    config = str(repo / "configs" / "hf-finetune.yaml")
    assert runner.invoke(app, ["validate", config]).exit_code == 0
    result = runner.invoke(app, ["train", config, "train.steps=4", "train.log_interval=2", "checkpoint.interval=4"])
    assert result.exit_code == 0, result.output
    exported = runner.invoke(app, ["export", "outputs/hf-finetune/checkpoints", "my-model", "--format", "hf"])
    assert exported.exit_code == 0, exported.output
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "my-model", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def test_activation_checkpointing_uses_the_name_the_installed_transformers_has():
    from models.hf import enable_activation_checkpointing

    class Older:  # a transformers 5 release before activation_checkpointing_enable
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.called = ("gradient", gradient_checkpointing_kwargs)

    class Newer(Older):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            self.called = ("activation", activation_checkpointing_kwargs)

    for model, name in ((Older(), "gradient"), (Newer(), "activation")):
        enable_activation_checkpointing(model)
        assert model.called == (name, {"use_reentrant": False})
