"""Parameter and FLOP counts as pure functions of a model config (no model is built).

`num_params` is the exact number of distinct parameters (`sum(p.numel() for p in
model.parameters())`), learned positions and final norm included, a tied embedding counted once.

`flops_per_token` follows benchmarks/README.md so pstar's TFLOPS compare with the recorded peers:
6·N + 12·L·h·s per trained token, where N counts the weights that take part in matrix multiplies
(for GPT exactly BENCHMARKS' N = V·h + L·(12h² + 13h): the tied output head, not the position
table, which is only a lookup). Recomputing activations adds one forward's worth, 2·N + 4·L·h·s
(benchmarks/README.md's convention, the output head included); recomputing only k of the L blocks
(`recompute_layers`) adds k/L of it, so the two ends are no recompute and the full one.
"""

from models.config import recomputed_layers, resolve_model_config


def num_params(model_cfg: dict) -> int:
    """Exact parameter count of the model that `build_model(model_cfg)` builds."""
    cfg = resolve_model_config(model_cfg)
    h, num_layers, vocab = cfg["hidden"], cfg["layers"], cfg["vocab_size"]
    if cfg["family"] == "hf":
        return cfg["num_params"]  # counted on the model built on meta (models/hf.py)
    if cfg["family"] == "gpt":
        # tied token embedding + learned positions + blocks + final LayerNorm (weight, bias)
        return vocab * h + cfg["seq_len"] * h + num_layers * _gpt_layer_params(h) + 2 * h
    num_embeddings = 1 if cfg["tie_embeddings"] else 2
    # token embedding (+ untied output head) + blocks + final RMSNorm weight
    return num_embeddings * vocab * h + num_layers * _llama_layer_params(cfg) + h


def flops_per_token(model_cfg: dict, seq_len: int, recompute: bool = False) -> int:
    """Training FLOPs (forward + backward) per token at sequence length seq_len; with `recompute`,
    plus the recomputed forward of the blocks the config's `recompute_layers` names (null: all)."""
    cfg = resolve_model_config(model_cfg)
    if cfg["family"] == "hf":
        from models import hf
        return hf.flops_per_token(cfg, seq_len, recompute)
    h, num_layers = cfg["hidden"], cfg["layers"]
    matmul_params = _matmul_params(cfg)
    # forward: 2 FLOPs per weight per token, plus QK^T and attention·V (2·2·s·h per layer);
    # backward costs twice the forward
    forward = 2 * matmul_params + 4 * num_layers * h * seq_len
    if not recompute:
        return 3 * forward
    recomputed = recomputed_layers({**cfg, "activation_checkpointing": True})
    return 3 * forward + forward * recomputed // num_layers


def _matmul_params(cfg: dict) -> int:
    h, vocab = cfg["hidden"], cfg["vocab_size"]
    if cfg["family"] == "gpt":
        return vocab * h + cfg["layers"] * _gpt_layer_params(h)
    input_lookup = 0 if cfg["tie_embeddings"] else vocab * h
    return num_params(cfg) - input_lookup


def _gpt_layer_params(h: int) -> int:
    # qkv 3h²+3h, attention out h²+h, MLP 4h²+4h and 4h²+h, two LayerNorms 4h
    return 12 * h * h + 13 * h


def _llama_layer_params(cfg: dict) -> int:
    h, ffn = cfg["hidden"], cfg["ffn_hidden"]
    kv_width = cfg["kv_heads"] * (h // cfg["heads"])
    attention = 2 * h * h + 2 * h * kv_width  # wq, wo and wk, wv (no biases)
    mlp = 3 * h * ffn  # gate, up, down
    return attention + mlp + 2 * h  # two RMSNorm weights
