"""Config loading: every shipped config validates; every mistake is reported, all at once."""

from pathlib import Path

import pytest

from engine.config import resolve_engine_config
from pstar_cli.config import ConfigError, config_from_dict, config_hash, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
BASE = {"model": {"size": "gpt-tiny"}, "train": {"seq_len": 32, "batch_size": 4}}


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(raw=None, path=None, overrides=(), **kwargs):
    with pytest.raises(ConfigError) as info:
        if path is not None:
            load_config(path, overrides, bf16_supported=False)
        else:
            config_from_dict(raw, bf16_supported=False, **kwargs)
    return info.value.problems


def test_configs_directory_has_the_promised_files():
    names = {p.name for p in SHIPPED_CONFIGS}
    expected = {"tiny.yaml", "llama-1b.yaml"} | {
        f"gpt-{size}.yaml" for size in ("1.3b", "4b", "6.7b", "8b", "12b", "15b", "18b")}
    assert expected <= names


# hf-finetune.yaml names the directory `python -m models.make_tiny_hf` makes: tests/test_hf.py makes it
# and validates and trains that config
@pytest.mark.parametrize("path", [p for p in SHIPPED_CONFIGS if p.name != "hf-finetune.yaml"], ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path, bf16_supported=False)
    resolve_engine_config(cfg.engine_dict())  # the engine accepts what the config hands it


@pytest.mark.parametrize("path", [p for p in SHIPPED_CONFIGS if p.name.startswith("gpt-")],
                         ids=lambda p: p.name)
def test_gpu_configs_are_the_benchmark_workload(path):
    cfg = load_config(path, bf16_supported=False)
    assert cfg.precision == "bf16"
    assert cfg.data.kind == "synthetic"
    assert cfg.train.seq_len == 1024
    assert cfg.model.size == path.stem


def test_tiny_is_a_cpu_demo_on_the_shipped_text():
    cfg = load_config(REPO / "configs" / "tiny.yaml", bf16_supported=True)
    assert cfg.precision == "fp32"
    assert cfg.data.kind == "text" and cfg.data.path is None
    assert cfg.model_dict()["vocab_size"] == 256
    assert cfg.engine["device_memory_limit"] is not None


def test_precision_defaults_to_bf16_only_where_supported():
    assert config_from_dict(BASE, bf16_supported=True).precision == "bf16"
    assert config_from_dict(BASE, bf16_supported=False).precision == "fp32"
    fp16 = config_from_dict({**BASE, "engine": {"fp16": {"enabled": True}}}, bf16_supported=True)
    assert fp16.precision == "fp16" and "bf16" not in fp16.engine
    off = config_from_dict({**BASE, "engine": {"bf16": {"enabled": False}}}, bf16_supported=True)
    assert off.precision == "fp32"


def test_misspelt_section_is_named_with_a_suggestion():
    (problem,) = problems_of({**BASE, "trian": {"steps": 3}})
    assert problem.startswith("trian: unknown section (did you mean 'train'?)")
    assert "checkpoint, data, distributed, engine, model, train" in problem


def test_misspelt_key_is_named_with_a_suggestion():
    (problem,) = problems_of({**BASE, "data": {"knid": "text"}})
    assert problem.startswith("data.knid: unknown key (did you mean 'kind'?)")


def test_wrong_types_name_the_key_and_the_expected_type():
    problems = problems_of({"model": {"size": "gpt-tiny"},
                            "train": {"steps": "ten", "seq_len": 32, "batch_size": True}})
    assert problems == ["train.steps: must be an integer (got 'ten')",
                        "train.batch_size: must be an integer (got True)"]


def test_out_of_range_values_say_what_is_allowed():
    problems = problems_of({**BASE, "data": {"kind": "images"}, "checkpoint": {"keep": 0}})
    assert problems == ["data.kind: must be one of synthetic, text, tokens, jsonl (got 'images')",
                        "checkpoint.keep: must be >= 1 (got 0)"]


def test_numbers_in_exponent_form_and_ints_for_floats(tmp_path):
    path = write(tmp_path, "model: {size: gpt-tiny}\ntrain: {lr: 3e-4, min_lr: 0, seq_len: 32, batch_size: 4}\n")
    cfg = load_config(path, bf16_supported=False)
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.min_lr, float)


def test_missing_data_file(tmp_path):
    (problem,) = problems_of({**BASE, "data": {"kind": "text", "path": str(tmp_path / "nope.txt")}})
    assert problem == f"data.path: file not found: {tmp_path / 'nope.txt'}"


def test_empty_short_and_misaligned_data_files(tmp_path):
    empty = write(tmp_path, "", "empty.txt")
    assert problems_of({**BASE, "data": {"kind": "text", "path": str(empty)}}) == [
        f"data.path: file is empty: {empty}"]
    short = write(tmp_path, "abc", "short.txt")
    assert "fewer than train.seq_len + 1 = 33" in problems_of(
        {**BASE, "data": {"kind": "text", "path": str(short)}})[0]
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01" * 101)
    assert "not a whole number of uint16" in problems_of(
        {**BASE, "data": {"kind": "tokens", "path": str(odd)}})[0]


def test_checks_across_keys_do_not_report_the_defaults_of_bad_values():
    # batch_size 0 is replaced by its default 8, which 3 micro-batches do not split: not reported
    assert problems_of({**BASE, "train": {"batch_size": 0, "grad_accum": 3}}) == [
        "train.batch_size: must be >= 1 (got 0)"]
    assert problems_of({**BASE, "data": {"kind": "images", "path": "x.txt"}}) == [
        "data.kind: must be one of synthetic, text, tokens, jsonl (got 'images')"]
    assert problems_of({**BASE, "distributed": {"nnodes": 0, "node_rank": 1}}) == [
        "distributed.nnodes: must be >= 1 (got 0)"]


def test_text_data_that_is_not_utf8_is_found_at_load(tmp_path):
    binary = tmp_path / "ids.bin"
    binary.write_bytes(b"\xff\xfe" * 100)
    (problem,) = problems_of({**BASE, "data": {"kind": "text", "path": str(binary)}})
    assert problem.startswith(f"data.path: {binary} is not UTF-8 text (bad byte at offset 0)")


def test_tokens_need_a_path_and_synthetic_takes_none():
    assert problems_of({**BASE, "data": {"kind": "tokens"}})[0].startswith("data.path: required")
    assert problems_of({**BASE, "data": {"path": "x.txt"}})[0].startswith("data.path: only used")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert info.value.message_lines() == [f"{tmp_path / 'absent.yaml'}: config file not found"]


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n  lr: [1, 2\n")
    (problem,) = problems_of(path=path)
    assert problem.startswith("is not valid YAML at line")


def test_a_file_that_is_not_utf8_says_so(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {size: gpt-tiny}\n# caf\xe9\n".encode("latin-1"))
    (problem,) = problems_of(path=path)
    assert problem == "is not UTF-8 text (bad byte at offset 29); save it as UTF-8"


def test_not_a_number_is_not_a_learning_rate():
    problems = problems_of({**BASE, "train": {**BASE["train"], "lr": float("nan"), "min_lr": float("inf")}})
    assert problems == ["train.lr: must be a finite number (got nan)",
                        "train.min_lr: must be a finite number (got inf)"]


def test_all_problems_of_a_file_are_reported_at_once(tmp_path):
    path = write(tmp_path, """
trian: {steps: 3}
model: {size: gpt-tiny, seq_len: 64}
train: {seq_len: 32, batch_size: 4, lr: -1}
data: {kind: text, path: /no/such/file.txt}
engine:
  optimizer: {params: {lr: 0.1}}
  fp16: {enabld: true}
distributed: {nnodes: 2}
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, bf16_supported=False)
    keys = [p.split(":")[0] for p in info.value.problems]
    assert keys == ["trian", "model.seq_len", "train.lr", "engine.optimizer.params.lr",
                    "engine.fp16.enabld", "data.path", "distributed.rdzv_endpoint"]
    lines = info.value.message_lines()
    assert lines[0] == f"{path} has 7 problems:" and len(lines) == 8


def test_overrides_are_yaml_scalars_at_dotted_paths(tmp_path):
    path = write(tmp_path, "model: {size: gpt-tiny}\ntrain: {seq_len: 32, batch_size: 4}\n")
    cfg = load_config(path, ["train.steps=20", "engine.default_chunk_size=4194304",
                             "engine.fp16.enabled=true", "checkpoint.dir=/tmp/ckpt", "train.lr=1e-3"],
                      bf16_supported=True)
    assert cfg.train.steps == 20 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.engine["default_chunk_size"] == 4194304
    assert cfg.precision == "fp16"
    assert cfg.checkpoint.dir == "/tmp/ckpt"


def test_bad_overrides_are_problems_too(tmp_path):
    path = write(tmp_path, "model: {size: gpt-tiny}\ntrain: {seq_len: 32, batch_size: 4}\n")
    problems = problems_of(path=path, overrides=["train.steps", "train.seq_len.x=1", "trian.steps=2"])
    assert problems[0] == "override 'train.steps': must look like section.key=value, e.g. train.steps=20"
    assert problems[1] == "override 'train.seq_len.x=1': train.seq_len is a value, not a section"
    assert problems[2].startswith("trian: unknown section (did you mean 'train'?)")


def test_engine_dict_takes_lr_and_accumulation_from_train():
    cfg = config_from_dict({**BASE, "train": {**BASE["train"], "lr": 0.02, "grad_accum": 2}},
                           bf16_supported=False)
    engine = resolve_engine_config(cfg.engine_dict())
    assert engine.optimizer.lr == 0.02 and engine.gradient_accumulation_steps == 2
    assert "lr" not in cfg.engine.get("optimizer", {}).get("params", {})
    assert problems_of({**BASE, "engine": {"gradient_accumulation_steps": 2}}) == [
        "engine.gradient_accumulation_steps: set it with train.grad_accum"]


def test_batch_must_split_into_micro_batches_on_every_rank():
    raw = {**BASE, "train": {"seq_len": 32, "batch_size": 6, "grad_accum": 2},
           "distributed": {"nproc_per_node": 2}}
    (problem,) = problems_of(raw)
    assert problem.startswith("train.batch_size: 6 sequences do not split evenly")
    raw["train"]["batch_size"] = 8
    cfg = config_from_dict(raw, bf16_supported=False)
    assert cfg.world_size == 2 and cfg.micro_batch_size == 2


def test_model_section_uses_the_models_rules():
    cfg = config_from_dict({"model": {"size": "llama-tiny"}, "train": {"seq_len": 32}},
                           bf16_supported=False)
    assert cfg.model.family == "llama"  # inferred from the size
    assert cfg.model_dict() == {"family": "llama", "size": "llama-tiny", "activation_checkpointing": False,
                                "dropout": 0.0, "seq_len": 32}
    assert problems_of({"model": {"family": "gpt", "hidden": 30, "layers": 1, "heads": 4}}) == [
        "model.hidden: 30 is not divisible by model.heads=4"]
    assert problems_of({"model": {"size": "gpt-124m", "vocab_size": 100}, "data": {"kind": "text"}})[0] \
        .startswith("model.vocab_size: data.kind text needs at least 256")


def test_recompute_layers_is_a_model_key_checked_against_the_model():
    on = {"size": "gpt-mini", "activation_checkpointing": True}  # 4 layers
    cfg = config_from_dict({**BASE, "model": {**on, "recompute_layers": 3}}, bf16_supported=False)
    assert cfg.model.recompute_layers == 3 and cfg.model_spec["recompute_layers"] == 3
    assert config_from_dict({**BASE, "model": on}, bf16_supported=False).model_dict().get("recompute_layers") is None
    assert problems_of({**BASE, "model": {**on, "recompute_layers": 5}}) == [
        "model.recompute_layers: 5 is more than the model's 4 blocks (model.layers); use at most 4, "
        "or null to recompute every block"]
    assert problems_of({**BASE, "model": {"size": "gpt-mini", "recompute_layers": 2}})[0].startswith(
        "model.recompute_layers: only used with model.activation_checkpointing: true")
    assert problems_of({**BASE, "model": {**on, "recompute_layers": -1}}) == [
        "model.recompute_layers: must be >= 0 (got -1)"]
    assert problems_of({**BASE, "model": {**on, "recompute_layers": "half"}}) == [
        "model.recompute_layers: must be an integer or null (got 'half')"]
    overrides = ["model.activation_checkpointing=true", "model.recompute_layers=2"]
    shipped = load_config(REPO / "configs/tiny.yaml", overrides, bf16_supported=False)
    assert shipped.model_spec["recompute_layers"] == 2


def test_to_dict_round_trips_and_hash_ignores_length_and_logging():
    cfg = config_from_dict(BASE, bf16_supported=False)
    again = config_from_dict(cfg.to_dict(), bf16_supported=True)  # precision was fixed at first load
    assert again == cfg and config_hash(again) == config_hash(cfg)
    longer = config_from_dict({**BASE, "train": {**BASE["train"], "steps": 999, "log_interval": 7}},
                              bf16_supported=False)
    assert config_hash(longer) == config_hash(cfg)
    for changed in ({**BASE, "train": {**BASE["train"], "lr": 0.5}},
                    {**BASE, "distributed": {"nproc_per_node": 2}},
                    {**BASE, "engine": {"default_chunk_size": 1024}}):
        assert config_hash(config_from_dict(changed, bf16_supported=False)) != config_hash(cfg)


def test_each_setting_declares_what_changing_it_on_resume_does():
    from pstar_cli.config import ResumeEffect, resume_effect

    assert [resume_effect(k) for k in ("train.lr", "train.min_lr", "train.warmup_steps", "train.steps",
                                       "engine.gradient_clipping")] == [ResumeEffect.NUMBERS] * 5
    free = ("train.log_interval", "train.grad_accum", "model.activation_checkpointing", "model.recompute_layers",
            "checkpoint.interval", "distributed.nproc_per_node", "engine.device_memory_limit",
            "engine.default_chunk_size",
            "engine.client.mem_tracer.margin_use_ratio", "engine.client.opts.with_async_move",
            "engine.optimizer.params.use_hybrid_adam", "engine.use_fake_dist")
    assert all(resume_effect(k) is ResumeEffect.NONE for k in free)
    # what the saved state means, and any key nobody has declared yet, must match
    fixed = ("train.seed", "train.batch_size", "model.layers", "data.kind", "engine.bf16.enabled",
             "engine.optimizer.params.weight_decay", "engine.optimizer.type", "engine.some_new_key")
    assert all(resume_effect(k) is ResumeEffect.STATE for k in fixed)
