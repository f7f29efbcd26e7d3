"""Size tables for the model families.

Each entry gives the shape numbers of one named size; `models.config.resolve_model_config`
fills them in and lets explicit keys override them. Parameter counts in the comments are
`models.num_params` of the entry (positions and the final norm included).
"""

# (hidden, layers, heads). Benchmark sizes use the vocab 50304 of benchmarks/README.md and 1024 positions.
_GPT_SHAPES = {
    "gpt-124m": (768, 12, 12),  # GPT-2 small shape
    "gpt-350m": (1024, 24, 16),  # GPT-2 medium shape
    "gpt-774m": (1280, 36, 20),  # GPT-2 large shape
    "gpt-1b": (2048, 18, 16),  # 1.01e9
    "gpt-1.3b": (2048, 24, 16),  # 1.31e9
    "gpt-2b": (2560, 24, 20),  # 2.02e9
    "gpt-4b": (3072, 36, 24),  # 4.24e9
    "gpt-6b": (4096, 28, 32),  # 5.85e9
    "gpt-6.7b": (4096, 32, 32),  # 6.65e9
    "gpt-8b": (4096, 40, 32),  # 8.27e9
    "gpt-10b": (4096, 48, 32),  # 9.88e9
    "gpt-12b": (5120, 38, 40),  # 12.2e9
    "gpt-15b": (5120, 48, 40),  # 15.4e9
    "gpt-18b": (6144, 40, 48),  # 18.4e9
    "gpt-20b": (6144, 44, 48),  # 20.3e9
    "gpt-30b": (7168, 48, 56),  # 30.0e9
    "gpt-40b": (8192, 48, 64),  # 39.1e9
    "gpt-50b": (8192, 62, 64),  # 50.4e9
    "gpt-60b": (8192, 74, 64),  # 60.0e9
    "gpt-68b": (9216, 66, 72),  # 67.7e9
    "gpt-80b": (10240, 64, 80),  # 81.1e9
    "gpt-100b": (10240, 80, 80),  # 101e9
    "gpt-120b": (11264, 78, 88),  # 119e9
    "gpt-175b": (12288, 96, 96),  # 175e9, GPT-3's shape
}

GPT_SIZES: dict[str, dict] = {
    name: {"hidden": h, "layers": n_layers, "heads": n_heads, "vocab_size": 50304, "seq_len": 1024}
    for name, (h, n_layers, n_heads) in _GPT_SHAPES.items()
}
# Byte-level sizes for tests and the CPU demo (vocab 256 = one token per byte).
GPT_SIZES["gpt-tiny"] = {"hidden": 64, "layers": 2, "heads": 4, "vocab_size": 256, "seq_len": 64}
GPT_SIZES["gpt-mini"] = {"hidden": 128, "layers": 4, "heads": 4, "vocab_size": 256, "seq_len": 256}

LLAMA_SIZES: dict[str, dict] = {
    "llama-tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn_hidden": 176,
                   "vocab_size": 256, "seq_len": 64, "rope_theta": 10000.0},
    "llama-mini": {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "ffn_hidden": 352,
                   "vocab_size": 256, "seq_len": 256, "rope_theta": 10000.0},
    # 1.10e9
    "llama-1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "ffn_hidden": 8192,
                 "vocab_size": 32000, "seq_len": 2048, "rope_theta": 10000.0},
    # 3.02e9
    "llama-3b": {"hidden": 3072, "layers": 28, "heads": 24, "kv_heads": 8, "ffn_hidden": 8192,
                 "vocab_size": 32000, "seq_len": 2048, "rope_theta": 10000.0},
    # 8.03e9
    "llama-8b": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "ffn_hidden": 14336,
                 "vocab_size": 128256, "seq_len": 8192, "rope_theta": 500000.0},
    # 13.0e9 (full multi-head attention, like Llama 2 13B)
    "llama-13b": {"hidden": 5120, "layers": 40, "heads": 40, "kv_heads": 40, "ffn_hidden": 13824,
                  "vocab_size": 32000, "seq_len": 4096, "rope_theta": 10000.0},
    # 70.6e9
    "llama-70b": {"hidden": 8192, "layers": 80, "heads": 64, "kv_heads": 8, "ffn_hidden": 28672,
                  "vocab_size": 128256, "seq_len": 8192, "rope_theta": 500000.0},
}

SIZES_BY_FAMILY: dict[str, dict[str, dict]] = {"gpt": GPT_SIZES, "llama": LLAMA_SIZES}
