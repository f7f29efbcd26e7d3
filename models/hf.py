"""Hugging Face causal language models as pstar models: a local directory in, trained through the engine.

    from engine import initialize_engine
    from models.hf import hf_model_func
    model, optimizer = initialize_engine(model_func=hf_model_func("path/to/llama", pretrained=True),
                                         config=engine_config)
    loss = model(idx, targets)       # idx, targets: (B, T) int64 -> mean fp32 cross-entropy

A directory holds `config.json`, safetensors weights (one file, or shards and their index) and
usually a tokenizer. Nothing is downloaded. The model is built on `meta` from config.json; the
engine then materialises it module by module (engine/init.py) through `HFCausalLM.init_module_`:
- `pretrained=True`: each module's tensors are read from the safetensors files straight into its
  chunks (engine/pretrained.py, engine/safetensors_io.py); only tables the files do not hold (rotary frequencies) are
  computed by the model's own `_init_weights`.
- `pretrained=False`: the model's own `_init_weights`, module by module, with the random draws in
  the order `from_config` makes them (models/hf_init.py), so the same seed gives the same weights.

The wrapper's parameter names are the HF model's behind `hf.`; `hf_name` strips it for export.
transformers is imported only here and only when a model is built: it is the optional extra
`pstar[hf]`, and without it every entry point says one thing: `pip install 'pstar[hf]'`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

INSTALL_HINT = "pip install 'pstar[hf]'"
PREFIX = "hf."
CONFIG_NAME = "config.json"


class HFUnavailableError(ImportError):
    """transformers (or safetensors / tokenizers) is not installed."""

    def __init__(self, missing: str):
        super().__init__(f"Hugging Face models need the optional packages transformers, tokenizers and "
                         f"safetensors ({missing} is not installed): {INSTALL_HINT}")


def import_transformers():
    """The transformers module, or HFUnavailableError naming the install command."""
    try:
        import transformers
    except ImportError as error:
        raise HFUnavailableError(getattr(error, "name", None) or "transformers") from None
    return transformers


def hf_name(name: str) -> str | None:
    """A pstar parameter name as the HF model's own (None: not part of the HF model)."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


# ---- the directory ---------------------------------------------------------------------------

def read_config_json(path: str | Path) -> dict:
    return json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8"))


def hf_dir_problems(path: Any, pretrained: bool) -> list[str]:
    """What makes `model.hf_path` unusable, each naming the key; [] when the model can be built."""
    from engine.safetensors_io import INDEX_NAME, shard_files

    if not isinstance(path, str) or not path:
        return [f"model.hf_path: expected the path of a local Hugging Face model directory, got {path!r}"]
    directory = Path(path)
    if not directory.is_dir():
        return [f"model.hf_path: {path} is not a directory (a local Hugging Face model directory with "
                f"config.json; nothing is downloaded)"]
    if not (directory / CONFIG_NAME).is_file():
        return [f"model.hf_path: {path} has no {CONFIG_NAME}"]
    try:
        read_config_json(directory)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"model.hf_path: {path}/{CONFIG_NAME} cannot be read as JSON: {error}"]
    problems = []
    if pretrained:
        files = shard_files(directory)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            problems.append(f"model.hf_path: {INDEX_NAME} in {path} lists shards that are not there: "
                            f"{', '.join(missing[:5])}")
        elif not files:
            has_bin = any(directory.glob("*.bin"))
            problems.append(f"model.hf_path: {path} has no *.safetensors weights"
                            + (" (only .bin files: save the model with safe_serialization)" if has_bin else "")
                            + "; set model.pretrained: false for a random init from config.json")
    return problems + _build_problems(directory)


def _build_problems(directory: Path) -> list[str]:
    try:
        import_transformers()
    except HFUnavailableError as error:
        return [f"model.hf_path: {error}"]
    try:
        build_on_meta(directory)
    except Exception as error:  # transformers says why this config cannot be built
        return [f"model.hf_path: {directory}/{CONFIG_NAME} does not describe a causal language model "
                f"transformers can build: {type(error).__name__}: {error}"]
    return []


def load_config(directory: str | Path):
    transformers = import_transformers()
    return transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)


def build_on_meta(directory: str | Path, config=None) -> nn.Module:
    """The HF model of a directory's config.json on `meta` (fp32, no weights, no init run)."""
    transformers = import_transformers()
    config = config or load_config(directory)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# ---- the model -------------------------------------------------------------------------------

class HFCausalLM(nn.Module):
    """An HF causal LM with pstar's interface: `model(idx)` -> logits, `model(idx, targets)` -> loss."""

    def __init__(self, hf: nn.Module, initializer: Callable[[nn.Module], None], source: Path):
        super().__init__()
        self.hf = hf
        self.source = source
        self._initializer = initializer

    def init_module_(self, module: nn.Module) -> None:
        """engine/init.py calls this once per module, its tensors already in chunk storage."""
        self._initializer(module)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        logits = self.hf(input_ids=idx, use_cache=False, **kwargs).logits  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def hf_model_func(directory: str | Path, pretrained: bool = True,
                  activation_checkpointing: bool = False) -> Callable[[], HFCausalLM]:
    """A `model_func` for `initialize_engine`: the directory's model, built on meta now, so that a
    directory that cannot be used (weights missing from the shards) is reported here, before the
    engine takes any memory."""
    model = build_hf_model(directory, pretrained, activation_checkpointing)
    return lambda: model


def enable_activation_checkpointing(hf) -> None:
    """The model's own recompute of each decoder layer. transformers 5.24 calls it
    `activation_checkpointing_enable`; 5.17 (seen on the GPU machines) has only
    `gradient_checkpointing_enable`, with the same meaning."""
    enable = getattr(hf, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_hf_model(directory: str | Path, pretrained: bool = True,
                   activation_checkpointing: bool = False) -> HFCausalLM:
    from engine.pretrained import PretrainedInit, tensor_names
    from engine.safetensors_io import SafetensorsDir
    from models.hf_init import HFRandomInit, init_weights_of

    directory = Path(directory)
    hf = build_on_meta(directory)
    if activation_checkpointing:
        enable_activation_checkpointing(hf)
    if pretrained:
        buffers = set()  # buffers the files may lack (computed ones) are left to _init_weights
        for sub in hf.modules():
            buffers |= {(id(sub), n) for n, b in sub._buffers.items() if b is not None}
        initializer = PretrainedInit(SafetensorsDir(directory), tensor_names(hf), buffers, init_weights_of(hf))
    else:
        initializer = HFRandomInit(hf)
    return HFCausalLM(hf, initializer, directory)


# ---- numbers for estimates and FLOPs ---------------------------------------------------------

def resolve_hf_model_config(model_cfg: dict) -> dict:
    """The resolved model dict of an `hf_path` model section: shapes from config.json, parameters
    counted on the model built on meta."""
    directory = Path(model_cfg["hf_path"])
    config = load_config(directory)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hf = build_on_meta(directory, config)
    unique = {id(p): p for p in hf.parameters()}.values()
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1))
    embedding = hf.get_input_embeddings().weight
    tied = hf.get_output_embeddings() is not None and hf.get_output_embeddings().weight is embedding
    return {
        "family": "hf", "size": None, "hf_path": str(directory), "architecture": type(hf).__name__,
        "pretrained": bool(model_cfg.get("pretrained", True)),
        "activation_checkpointing": bool(model_cfg.get("activation_checkpointing", False)),
        "seq_len": model_cfg.get("seq_len"), "vocab_size": int(text.vocab_size), "hidden": hidden,
        "layers": int(text.num_hidden_layers), "heads": heads,
        "kv_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "ffn_hidden": int(getattr(text, "intermediate_size", None) or 4 * hidden),
        "tie_embeddings": bool(tied), "num_params": sum(p.numel() for p in unique),
        "input_lookup_params": 0 if tied else embedding.numel(),
        "max_positions": getattr(text, "max_position_embeddings", None),
    }


# ---- the model section of a config -----------------------------------------------------------

_HF_KEYS = ("hf_path", "pretrained", "activation_checkpointing", "seq_len", "dropout")
# transformers' gradient checkpointing is one switch for every decoder layer; pstar's own block loop
# (models/base.py), which can leave some blocks out, is not the one that runs
RECOMPUTE_LAYERS_PROBLEM = ("model.recompute_layers: not supported with model.hf_path (the Hugging Face "
                            "model recomputes every decoder layer); remove it")


def hf_model_problems(cfg: dict) -> list[str]:
    """Problems of a model section with `hf_path`: keys that config.json owns, the directory itself,
    the sequence length against the model's positions."""
    problems = [f"model.{key}: not allowed beside model.hf_path (the directory's config.json sets the "
                f"model); remove it" for key, value in cfg.items()
                if key not in _HF_KEYS and key != "recompute_layers" and value is not None]
    if cfg.get("recompute_layers") is not None:
        problems.append(RECOMPUTE_LAYERS_PROBLEM)
    if cfg.get("dropout"):
        problems.append("model.dropout: not allowed beside model.hf_path (config.json sets the model's "
                        "dropout); remove it")
    pretrained = cfg.get("pretrained", True)
    if not isinstance(pretrained, bool):
        problems.append(f"model.pretrained: expected true or false, got {pretrained!r}")
        pretrained = True
    directory_problems = hf_dir_problems(cfg["hf_path"], pretrained)
    if directory_problems:
        return problems + directory_problems
    config = read_config_json(cfg["hf_path"])
    max_positions = config.get("max_position_embeddings") or config.get("n_positions")
    seq_len = cfg.get("seq_len")
    if isinstance(max_positions, int) and isinstance(seq_len, int) and seq_len > max_positions:
        problems.append(f"train.seq_len: {seq_len} is longer than the model's max_position_embeddings "
                        f"({max_positions}, {cfg['hf_path']}/{CONFIG_NAME}); use a shorter train.seq_len")
    return problems


def flops_per_token(resolved: dict, seq_len: int, recompute: bool) -> int:
    """BENCHMARKS.md's model FLOPs: 6 per matmul weight per token plus attention's 12·L·h·s."""
    matmul_params = resolved["num_params"] - resolved["input_lookup_params"]
    forward = 2 * matmul_params + 4 * resolved["layers"] * resolved["hidden"] * seq_len
    return (4 if recompute else 3) * forward


# ---- writing a directory back ----------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def write_hf_metadata(out: Path, source: Path, dtype: torch.dtype, tokenizer: Path | None = None) -> list[str]:
    """config.json (with the weights' dtype), generation_config.json and the tokenizer's files
    from `source` (and `tokenizer`, when given) into `out`; returns the names written."""
    import shutil

    config = read_config_json(source)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)  # the older name of the same key
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    written = [CONFIG_NAME]
    for directory, names in ((source, ("generation_config.json",)), (tokenizer or source, TOKENIZER_FILES)):
        for name in names:
            if (directory / name).is_file():
                shutil.copyfile(directory / name, out / name)
                written.append(name)
    return written


def save_pretrained(model, out: str | Path, dtype: torch.dtype = torch.float32,
                    tokenizer: str | Path | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write an engine-trained HF model (`initialize_engine(hf_model_func(...))`) as a Hugging Face
    directory `from_pretrained` loads: weights one tensor at a time from the fp32 masters (each
    tied tensor once), config.json, generation config and tokenizer files of the source directory."""
    from engine.pretrained import save_pretrained_weights
    from engine.safetensors_io import DEFAULT_SHARD_BYTES

    if not isinstance(getattr(model, "module", None), HFCausalLM):
        raise TypeError("save_pretrained takes the model initialize_engine returned for hf_model_func(...)")
    out = Path(out)
    save_pretrained_weights(model, out, dtype, hf_name, max_shard_bytes or DEFAULT_SHARD_BYTES)
    write_hf_metadata(out, model.module.source, dtype, Path(tokenizer) if tokenizer else None)
    return out
