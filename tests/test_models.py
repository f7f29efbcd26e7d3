"""Model families: counts against meta builds, the init contract, numerics against plain PyTorch."""

import math

import pytest
import torch
import torch.nn.functional as F

import models
from models.llama import apply_rotary

ALL_SIZES = list(models.GPT_SIZES) + list(models.LLAMA_SIZES)
TINY_CONFIGS = [
    {"size": "gpt-tiny"},
    {"size": "llama-tiny"},
    {"size": "llama-tiny", "tie_embeddings": True},
]


def build_on_meta(cfg: dict) -> torch.nn.Module:
    with torch.device("meta"):
        return models.build_model(cfg)


def materialise_like_an_engine(model: torch.nn.Module) -> None:
    """Give each module storage in modules() order, then init it, keeping shared params shared."""
    replaced = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in replaced:
                replaced[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="cpu"))
            setattr(module, name, replaced[id(param)])
        for name, buf in list(module.named_buffers(recurse=False)):
            setattr(module, name, torch.empty_like(buf, device="cpu"))
        model.init_module_(module)


@pytest.mark.parametrize("size", ALL_SIZES)
def test_num_params_matches_meta_build(size):
    model = build_on_meta({"size": size})
    assert sum(p.numel() for p in model.parameters()) == models.num_params({"size": size})
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("cfg", [
    {"family": "gpt", "hidden": 96, "layers": 3, "heads": 6, "vocab_size": 1000, "seq_len": 77},
    {"family": "llama", "hidden": 96, "layers": 3, "heads": 6, "kv_heads": 3, "vocab_size": 1000},
    {"family": "llama", "hidden": 96, "layers": 3, "heads": 6, "tie_embeddings": True},
    {"size": "gpt-1.3b", "layers": 2, "seq_len": 2048},
])
def test_num_params_of_explicit_shapes(cfg):
    model = build_on_meta(cfg)
    assert sum(p.numel() for p in model.parameters()) == models.num_params(cfg)


def test_gpt_count_is_benchmarks_formula_plus_positions_and_final_norm():
    for size in ("gpt-1.3b", "gpt-4b", "gpt-6.7b", "gpt-8b", "gpt-12b", "gpt-15b", "gpt-18b", "gpt-30b"):
        c = models.GPT_SIZES[size]
        h, num_layers = c["hidden"], c["layers"]
        benchmark_n = 50304 * h + num_layers * (12 * h * h + 13 * h)
        assert models.num_params({"size": size}) == benchmark_n + 1024 * h + 2 * h
        flops = 6 * benchmark_n + 12 * num_layers * h * 1024
        assert models.flops_per_token({"size": size}, 1024) == flops
        assert models.flops_per_token({"size": size}, 1024, recompute=True) == flops * 4 // 3


def test_size_names_are_close_to_their_counts():
    for name in models.GPT_SIZES:
        number = name.removeprefix("gpt-")
        if number[-1] in "bm" and number[:-1].replace(".", "").isdigit():
            scale = 1e9 if number[-1] == "b" else 1e6
            assert models.num_params({"size": name}) / (float(number[:-1]) * scale) == pytest.approx(1, abs=0.06)


def test_size_table_comments_give_the_counts():
    """models/sizes.py notes each benchmark size's count; the note must be num_params to 3 figures."""
    import re
    from pathlib import Path

    text = Path(models.__file__).with_name("sizes.py").read_text()
    notes = re.findall(r'"(gpt-[\w.]+)": \(.*\),  # ([\d.]+)e9', text)
    notes += [(name, count) for count, name in re.findall(r'# ([\d.]+)e9.*\n\s+"(llama-[\w.]+)"', text)]
    assert len(notes) == 21 + 5  # all but the three GPT-2 shapes
    for name, count in notes:
        assert float(f"{models.num_params({'size': name}) / 1e9:.3g}") == float(count), name


def test_llama_flops_count_head_but_not_input_lookup():
    cfg = {"size": "llama-1b"}
    c = models.resolve_model_config(cfg)
    matmul = models.num_params(cfg) - c["vocab_size"] * c["hidden"]
    assert models.flops_per_token(cfg, 512) == 6 * matmul + 12 * c["layers"] * c["hidden"] * 512


@pytest.mark.parametrize("cfg", TINY_CONFIGS)
def test_init_on_cpu_equals_meta_then_per_module_init(cfg):
    torch.manual_seed(1234)
    plain = models.build_model(cfg)
    torch.manual_seed(1234)
    staged = build_on_meta(cfg)
    materialise_like_an_engine(staged)
    plain_state, staged_state = plain.state_dict(), staged.state_dict()
    assert plain_state.keys() == staged_state.keys()
    for key in plain_state:
        assert torch.equal(plain_state[key], staged_state[key]), key
    for (name, a), (_, b) in zip(plain.named_buffers(), staged.named_buffers()):
        assert torch.equal(a, b), name


def test_init_weights_is_the_module_loop():
    torch.manual_seed(7)
    model = models.build_model({"size": "llama-tiny"})
    torch.manual_seed(8)
    model.init_weights()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(8)
    for module in model.modules():
        model.init_module_(module)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    model = models.build_model({"family": "gpt", "hidden": 256, "layers": 8, "heads": 4, "vocab_size": 512})
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert block.mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.ln_1.weight == 1)
    assert torch.all(block.ln_1.bias == 0)


def test_rope_tables_are_rebuilt_after_meta():
    torch.manual_seed(0)
    model = models.build_model({"size": "llama-tiny"})
    assert torch.equal(model.rope.cos[0], torch.ones_like(model.rope.cos[0]))
    assert "rope.cos" not in model.state_dict()  # non-persistent: computed, never saved


def test_building_under_meta_does_not_materialise():
    model = build_on_meta({"size": "gpt-tiny"})
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.wte.weight


def test_gpt_head_is_tied():
    model = models.build_model({"size": "gpt-tiny"})
    assert model.lm_head.weight is model.wte.weight
    assert {"wte.weight", "lm_head.weight"} <= model.state_dict().keys()


def reference_gpt_forward(model, idx):
    """The GPT computed step by step with explicit attention, no SDPA."""
    cfg = model.config
    batch, length = idx.shape
    x = model.wte.weight[idx] + model.wpe.weight[:length]
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    for block in model.blocks:
        h = F.layer_norm(x, (cfg.hidden,), block.ln_1.weight, block.ln_1.bias)
        q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(cfg.hidden, dim=2)
        q, k, v = (t.view(batch, length, cfg.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.hidden // cfg.heads)
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + block.attn.proj(att.transpose(1, 2).reshape(batch, length, cfg.hidden))
        h = F.layer_norm(x, (cfg.hidden,), block.ln_2.weight, block.ln_2.bias)
        x = x + block.mlp.proj(0.5 * block.mlp.fc(h) * (1 + torch.tanh(
            math.sqrt(2 / math.pi) * (block.mlp.fc(h) + 0.044715 * block.mlp.fc(h) ** 3))))
    x = F.layer_norm(x, (cfg.hidden,), model.ln_f.weight, model.ln_f.bias)
    return x @ model.wte.weight.T


def test_gpt_forward_matches_explicit_computation():
    torch.manual_seed(0)
    model = models.build_model({"size": "gpt-tiny"}).eval()
    idx = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference_gpt_forward(model, idx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", TINY_CONFIGS)
def test_loss_is_fp32_mean_cross_entropy(cfg):
    torch.manual_seed(0)
    model = models.build_model(cfg)
    idx, targets = torch.randint(0, 256, (2, 2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 256)
    expected = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
    torch.testing.assert_close(model(idx, targets), expected)
    assert model.to(torch.bfloat16)(idx, targets).dtype == torch.float32


@pytest.mark.parametrize("cfg", TINY_CONFIGS)
def test_causal(cfg):
    torch.manual_seed(0)
    model = models.build_model(cfg)
    idx = torch.randint(0, 256, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :8], model(changed)[:, :8])
        assert not torch.allclose(model(idx)[:, 8:], model(changed)[:, 8:])


@pytest.mark.parametrize("cfg", TINY_CONFIGS)
def test_activation_checkpointing_gives_identical_loss_and_grads(cfg):
    idx, targets = torch.randint(0, 256, (2, 2, 32), generator=torch.Generator().manual_seed(3))
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = models.build_model({**cfg, "activation_checkpointing": recompute})
        loss = model(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0, msg=name)


# four blocks, so that recompute_layers can fall strictly between none and all of them
FOUR_BLOCKS = [
    {"family": "gpt", "layers": 4, "hidden": 32, "heads": 4, "vocab_size": 64, "seq_len": 16},
    {"family": "llama", "layers": 4, "hidden": 32, "heads": 4, "kv_heads": 2, "vocab_size": 64, "seq_len": 16},
]


def loss_and_grads(cfg: dict, idx: torch.Tensor, targets: torch.Tensor):
    torch.manual_seed(0)
    model = models.build_model(cfg)
    torch.manual_seed(1)  # the same dropout masks in every build
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", FOUR_BLOCKS, ids=lambda c: c["family"])
@pytest.mark.parametrize("count", [0, 1, 3, 4])
def test_recomputing_some_blocks_gives_the_same_loss_and_grads(cfg, count):
    # with dropout, so that a recomputed block must also replay its random masks
    cfg = {**cfg, "dropout": 0.1}
    idx, targets = torch.randint(0, 64, (2, 2, 16), generator=torch.Generator().manual_seed(3))
    loss_a, grads_a = loss_and_grads(cfg, idx, targets)
    loss_b, grads_b = loss_and_grads({**cfg, "activation_checkpointing": True, "recompute_layers": count},
                                     idx, targets)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


def block_forward_calls(cfg: dict, grad: bool = True) -> list[int]:
    """How often each block's forward ran in one forward + backward (a recomputed one: twice)."""
    model = models.build_model(cfg)
    calls = [0] * len(model.blocks)
    for index, block in enumerate(model.blocks):
        # a pre-hook: checkpoint's recompute stops as soon as it has the saved tensors, before a
        # forward hook would run
        block.register_forward_pre_hook(lambda module, args, i=index: calls.__setitem__(i, calls[i] + 1))
    idx = torch.randint(0, 64, (2, 16))
    with torch.set_grad_enabled(grad):
        loss = model(idx, idx)
        if grad:
            loss.backward()
    return calls


@pytest.mark.parametrize("cfg", FOUR_BLOCKS, ids=lambda c: c["family"])
def test_only_the_first_recompute_layers_blocks_are_recomputed(cfg):
    on = {**cfg, "activation_checkpointing": True}
    assert block_forward_calls(cfg) == [1, 1, 1, 1]
    assert block_forward_calls(on) == [2, 2, 2, 2]  # null: every block
    assert block_forward_calls({**on, "recompute_layers": 0}) == [1, 1, 1, 1]
    assert block_forward_calls({**on, "recompute_layers": 3}) == [2, 2, 2, 1]
    assert block_forward_calls({**on, "recompute_layers": 4}) == [2, 2, 2, 2]
    assert block_forward_calls({**on, "recompute_layers": 3}, grad=False) == [1, 1, 1, 1]  # no backward


@pytest.mark.parametrize("cfg", [{"size": "gpt-12b"}, {"size": "llama-1b"}], ids=lambda c: c["size"])
def test_flops_count_the_recomputed_fraction_of_the_forward(cfg):
    on = {**cfg, "activation_checkpointing": True}
    layers = models.resolve_model_config(cfg)["layers"]
    plain = models.flops_per_token(cfg, 1024)
    full = models.flops_per_token(on, 1024, recompute=True)
    assert full == plain * 4 // 3
    counted = [models.flops_per_token({**on, "recompute_layers": k}, 1024, recompute=True)
               for k in range(layers + 1)]
    assert counted[0] == plain and counted[-1] == full
    forward = plain // 3
    assert counted == [plain + forward * k // layers for k in range(layers + 1)]
    assert all(a < b for a, b in zip(counted, counted[1:]))
    # model FLOPs give no credit for recomputing, whatever the count
    assert models.flops_per_token({**on, "recompute_layers": 5}, 1024) == plain


def test_grouped_query_attention_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa = models.build_model({"size": "llama-tiny"})  # 4 query heads share 2 kv heads
    mha = models.build_model({"size": "llama-tiny", "kv_heads": 4})
    state = gqa.state_dict()
    head_size = 64 // 4
    for key in list(state):
        if key.endswith(("attn.wk.weight", "attn.wv.weight")):
            heads = state[key].view(2, head_size, 64)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(4 * head_size, 64)
    mha.load_state_dict(state)
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx))


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    model = models.build_model({"size": "llama-tiny"})
    cos, sin = model.rope(64)
    q, k = torch.randn(2, 16)
    # the same q and k at every position: the score of (i, j) is a function of i - j
    q_rot = apply_rotary(q.expand(1, 1, 64, 16), cos, sin)[0, 0]
    k_rot = apply_rotary(k.expand(1, 1, 64, 16), cos, sin)[0, 0]
    scores = q_rot @ k_rot.T
    torch.testing.assert_close(scores[10, 3], scores[50, 43])
    torch.testing.assert_close(scores.diagonal(), torch.full((64,), float(q @ k)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm().expand(64))


@pytest.mark.parametrize("cfg", TINY_CONFIGS)
def test_a_few_steps_fit_one_batch(cfg):
    torch.manual_seed(0)
    model = models.build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx, targets = torch.randint(0, 256, (2, 4, 32))
    first = None
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 0.5


def test_sequence_longer_than_model_is_rejected():
    model = models.build_model({"size": "gpt-tiny"})
    with pytest.raises(ValueError, match="model.seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_explicit_keys_override_size_and_defaults_fill_in():
    cfg = models.resolve_model_config({"size": "gpt-1.3b", "layers": 2, "activation_checkpointing": True})
    assert (cfg["family"], cfg["hidden"], cfg["layers"], cfg["vocab_size"]) == ("gpt", 2048, 2, 50304)
    assert cfg["activation_checkpointing"] is True and cfg["dropout"] == 0.0
    llama = models.resolve_model_config({"family": "llama", "hidden": 64, "layers": 2, "heads": 4})
    assert llama["kv_heads"] == 4 and llama["ffn_hidden"] == 256 and llama["tie_embeddings"] is False


@pytest.mark.parametrize("cfg, fragment", [
    ({"family": "gpt", "size": "gpt-1.3b", "hiden": 1}, "model.hiden: unknown key"),
    ({"family": "gpt", "size": "gpt-1.3b", "kv_heads": 2}, "model.kv_heads: only used by family llama"),
    ({"family": "gpt", "size": "llama-1b"}, "is a llama size"),
    ({"family": "gpt", "size": "gpt-13b"}, "not a known gpt size"),
    ({"family": "bert", "size": "gpt-1.3b"}, "model.family: 'bert' is not one of gpt, llama"),
    ({"family": "gpt", "hidden": 64}, "model.layers: required"),
    ({}, "model.size: required (a size name such as gpt-124m or llama-1b), or set model.family"),
    ({"size": "llama-tiny", "rope_theta": float("nan")}, "model.rope_theta: expected a positive number"),
    ({"family": "gpt", "hidden": 64, "layers": 2, "heads": 5}, "not divisible by model.heads=5"),
    ({"size": "llama-tiny", "kv_heads": 3}, "not a multiple of model.kv_heads=3"),
    ({"size": "gpt-tiny", "layers": "2"}, "model.layers: expected a positive integer"),
    ({"size": "gpt-tiny", "dropout": 1.5}, "model.dropout"),
    ({"size": "gpt-tiny", "activation_checkpointing": "yes"}, "model.activation_checkpointing"),
    ({"size": "gpt-tiny", "recompute_layers": 1},
     "model.recompute_layers: only used with model.activation_checkpointing"),
    ({"size": "gpt-tiny", "activation_checkpointing": False, "recompute_layers": 0},
     "model.recompute_layers: only used with model.activation_checkpointing: true"),
    ({"size": "gpt-tiny", "activation_checkpointing": True, "recompute_layers": 3},
     "model.recompute_layers: 3 is more than the model's 2 blocks"),
    ({"size": "llama-tiny", "layers": 4, "activation_checkpointing": True, "recompute_layers": 5},
     "model.recompute_layers: 5 is more than the model's 4 blocks"),
    ({"size": "gpt-tiny", "activation_checkpointing": True, "recompute_layers": -1},
     "model.recompute_layers: expected 0 or more blocks"),
    ({"size": "gpt-tiny", "activation_checkpointing": True, "recompute_layers": True},
     "model.recompute_layers: expected 0 or more blocks"),
    ({"hf_path": "no/such/dir", "activation_checkpointing": True, "recompute_layers": 1},
     "model.recompute_layers: not supported with model.hf_path"),
])
def test_config_problems_name_the_key(cfg, fragment):
    problems = models.model_config_problems(cfg)
    assert any(fragment in p for p in problems), problems
    with pytest.raises(models.ModelConfigError, match=fragment.split(":")[0]):
        models.build_model(cfg)


def test_recompute_layers_within_the_layers_is_valid():
    on = {"size": "gpt-tiny", "activation_checkpointing": True}
    for count in (0, 1, 2, None):
        assert models.model_config_problems({**on, "recompute_layers": count}) == []
    assert models.resolve_model_config({**on, "recompute_layers": 1})["recompute_layers"] == 1
    assert models.resolve_model_config(on)["recompute_layers"] is None
    assert [models.recomputed_layers(models.resolve_model_config(c)) for c in (
        {"size": "gpt-tiny"}, on, {**on, "recompute_layers": 1})] == [0, 2, 1]


def test_all_problems_reported_at_once():
    problems = models.model_config_problems(
        {"family": "gpt", "size": "gpt-tiny", "hiden": 1, "layers": 0, "dropout": -1})
    assert len(problems) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", TINY_CONFIGS)
def test_cuda_build_matches_cpu_numerics(cfg):
    torch.manual_seed(0)
    cpu_model = models.build_model(cfg)
    with torch.device("cuda"):
        gpu_model = models.build_model(cfg)
    gpu_model.load_state_dict(cpu_model.state_dict())
    assert all(p.is_cuda for p in gpu_model.parameters())
    idx, targets = torch.randint(0, 256, (2, 2, 32))
    torch.testing.assert_close(gpu_model(idx.cuda(), targets.cuda()).cpu(), cpu_model(idx, targets),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("size", ["gpt-1.3b", "llama-1b"])
def test_benchmark_shapes_train_in_bf16_on_cuda(size):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = models.build_model({"size": size, "layers": 2, "activation_checkpointing": True})
    model.to(torch.bfloat16)
    idx = torch.randint(0, 1000, (2, 2, 1024), device="cuda")
    loss = model(idx[0], idx[1])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 1.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
