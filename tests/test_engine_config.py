"""Validation of the engine's config dict (issue 2, item 7)."""

import pytest
import torch

from engine.config import (
    DEFAULT_CHUNK_SIZE,
    EngineConfigError,
    engine_config_problems,
    resolve_engine_config,
)


def test_empty_config_gets_patrickstar_defaults():
    cfg = resolve_engine_config({})
    assert cfg.default_chunk_size == DEFAULT_CHUNK_SIZE == 64 * 1024 * 1024
    assert (cfg.fp16.loss_scale, cfg.fp16.initial_scale_power) == (0, 16)
    assert (cfg.fp16.loss_scale_window, cfg.fp16.hysteresis, cfg.fp16.min_loss_scale) == (1000, 2, 1)
    assert cfg.mem_tracer.overall_gpu_mem_ratio == 0.8
    assert cfg.gradient_accumulation_steps == 1
    assert cfg.device_memory_limit is None
    assert cfg.compute_dtype_name == "float32"


def test_full_seed_config_resolves():
    seed = {
        "optimizer": {"type": "Adam", "params": {"lr": 0.01, "betas": [0.8, 0.9], "eps": 1e-6,
                                                  "weight_decay": 0.1, "use_hybrid_adam": False}},
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "loss_scale_window": 5,
                 "hysteresis": 1, "min_loss_scale": 2},
        "default_chunk_size": 1024,
        "release_after_init": True,
        "use_cpu_embedding": True,
        "client": {"mem_tracer": {"use_async_mem_monitor": False, "warmup_gpu_chunk_mem_ratio": 0.2,
                                  "overall_gpu_mem_ratio": 0.9, "overall_cpu_mem_ratio": 0.5,
                                  "margin_use_ratio": 0.7}},
        "gradient_clipping": 1.0,
        "device_memory_limit": 1 << 20,
        "host_memory_limit": None,
        "gradient_accumulation_steps": 4,
    }
    cfg = resolve_engine_config(seed)
    assert cfg.optimizer.type == "Adam" and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.optimizer.use_hybrid_adam is False
    assert cfg.fp16.initial_scale_power == 10 and cfg.compute_dtype_name == "float16"
    assert cfg.mem_tracer.margin_use_ratio == 0.7
    assert cfg.default_chunk_size == 1024 and cfg.gradient_accumulation_steps == 4


def test_misspelt_key_and_negative_chunk_size_in_one_error():
    bad = {"default_chunk_size": -5, "optimizer": {"params": {"lrr": 0.1}}}
    with pytest.raises(EngineConfigError) as err:
        resolve_engine_config(bad)
    text = str(err.value)
    assert "optimizer.params.lrr" in text and "did you mean 'lr'" in text
    assert "default_chunk_size" in text and "integer > 0" in text
    assert len(err.value.problems) == 2


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"fp16": {"enabled": "yes"}}, "fp16.enabled"),
        ({"optimizer": {"type": "SGD"}}, "optimizer.type"),
        ({"optimizer": {"params": {"betas": [0.9]}}}, "optimizer.params.betas"),
        ({"client": {"mem_tracer": {"margin_use_ratio": 1.5}}}, "client.mem_tracer.margin_use_ratio"),
        ({"device_memory_limit": -1}, "device_memory_limit"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"client": 3}, "client"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "bf16.enabled"),
        ({"compute_device": "gpu"}, "compute_device"),
    ],
)
def test_each_bad_value_names_its_key(cfg, key):
    problems = engine_config_problems(cfg)
    assert len(problems) == 1 and key in problems[0]


def test_compute_device_cpu_keeps_the_engine_and_the_run_on_the_cpu():
    """`compute_device: cpu` on any machine: the engine's weights and chunks stay on the CPU, and a
    run's precision default is fp32 there, not the GPU's bf16."""
    from engine import initialize_engine
    from pstar_cli.config.loader import build_engine_section
    from tests.engine_models import TinyGPT, engine_config

    model, _ = initialize_engine(model_func=TinyGPT, config=engine_config(compute_device="cpu"))
    assert model.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert resolve_engine_config({}).compute_device == "auto"
    problems = []
    assert build_engine_section({"compute_device": "cpu"}, True, problems)["bf16"]["enabled"] is False
    assert build_engine_section({}, True, problems)["bf16"]["enabled"] is True and not problems
