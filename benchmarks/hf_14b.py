"""Fine-tune a >= 14B Llama-architecture Hugging Face checkpoint on one GPU (issue 14, item 8).

    PYTHONPATH=. python benchmarks/hf_14b.py --dir /local/disk/llama-14b          # make it, then train
    PYTHONPATH=. python benchmarks/hf_14b.py --dir /tmp/tiny --size tiny --steps 2  # the CPU path

1. `make`: writes a random bf16 checkpoint of the size's shapes (14b: Qwen2.5-14B's, as a Llama:
   hidden 5120, 48 layers, 40 heads, 8 KV heads, MLP 13824, vocab 152064 = 14.8B parameters, about
   30 GB) as safetensors shards with an index, one tensor at a time (drawn on the GPU when there is
   one), so the machine never holds the model. An existing directory with the same config is reused.
2. `train` (a fresh process, so its memory high-water mark is its own): `initialize_engine` with
   `hf_model_func(DIR, pretrained=True)` (the weights stream from the shards into chunks), then
   `--steps` steps on random tokens, activation checkpointing on, bf16 on a GPU.
Prints one JSON row last: init seconds, host RSS before / at the peak of init / growth over the
chunk bytes init built on the host (issue 14's bound: growth <= 1.10x), median step time after the
warm-up, tokens/s and model TFLOPS (BENCHMARKS.md: 6N + 12·L·h·s per token). Needs the extra
pstar[hf] (transformers, tokenizers, safetensors; bring their wheels to a machine without a registry).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {
    "14b": dict(hidden=5120, layers=48, heads=40, kv_heads=8, ffn=13824, vocab=152064),
    "1b": dict(hidden=2048, layers=16, heads=16, kv_heads=8, ffn=5632, vocab=32000),
    "300m": dict(hidden=1024, layers=18, heads=16, kv_heads=8, ffn=2816, vocab=32000),
    "50m": dict(hidden=512, layers=8, heads=8, kv_heads=4, ffn=1408, vocab=16000),
    "15m": dict(hidden=384, layers=6, heads=6, kv_heads=2, ffn=1024, vocab=8000),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=512),
}


def llama_config(shape: dict, max_positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], max_position_embeddings=max_positions,
                       tie_word_embeddings=False, dtype="bfloat16", rope_theta=1e6)


def make_checkpoint(directory: Path, shape: dict, max_shard_bytes: int = 5 << 30) -> bool:
    """Write a random bf16 checkpoint of `shape` unless one with that config is there; True if written."""
    from engine.safetensors_io import Entry, shard_files, write_safetensors
    from models.hf import build_on_meta

    config = llama_config(shape)
    wanted = config.to_dict()
    config_path = directory / "config.json"
    if config_path.is_file() and _same_config(json.loads(config_path.read_text()), wanted):
        if shard_files(directory) and all(f.is_file() for f in shard_files(directory)):
            return False
    directory.mkdir(parents=True, exist_ok=True)
    meta = build_on_meta(directory, config)
    entries = [Entry(name, tuple(p.shape), torch.bfloat16) for name, p in meta.named_parameters()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    shapes = {entry.name: entry.shape for entry in entries}

    def fetch(name: str) -> torch.Tensor:
        if len(shapes[name]) == 1:  # norm weights
            return torch.ones(shapes[name], dtype=torch.bfloat16)
        value = torch.randn(shapes[name], generator=generator, device=device, dtype=torch.bfloat16)
        return value.mul_(0.02).cpu()

    write_safetensors(directory, entries, fetch, max_shard_bytes)
    config.save_pretrained(directory)  # last: a directory with config.json is complete
    return True


def _same_config(saved: dict, wanted: dict) -> bool:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")
    return all(saved.get(k) == wanted.get(k) for k in keys)


def engine_config(on_gpu: bool, chunk_elements: int) -> dict:
    return {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.0}},
        "bf16": {"enabled": on_gpu}, "default_chunk_size": chunk_elements, "gradient_clipping": 1.0,
        "client": {"mem_tracer": {"overall_gpu_mem_ratio": 0.95, "overall_cpu_mem_ratio": 0.9}},
    }


def measure_train(directory: Path, batch: int, seq_len: int, steps: int, chunk_elements: int) -> dict:
    """Init and train in this process; the figures of the JSON row."""
    import psutil

    from benchmarks.memory import PeakSampler
    from engine import initialize_engine
    from models.hf import flops_per_token, hf_model_func, resolve_hf_model_config

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    config = engine_config(on_gpu, chunk_elements)
    initialize_engine(model_func=lambda: torch.nn.Linear(8, 8), config=config)  # one-time costs first
    resolved = resolve_hf_model_config({"hf_path": str(directory), "seq_len": seq_len})
    model_func = hf_model_func(directory, pretrained=True, activation_checkpointing=True)
    before = psutil.Process().memory_info().rss
    sampler = PeakSampler(device).start()
    start = time.perf_counter()
    model, optimizer = initialize_engine(model_func=model_func, config=config)
    init_s = time.perf_counter() - start
    print(f"init: {init_s:.1f} s", file=sys.stderr, flush=True)
    init_peak = sampler.mark("init")
    stats = model.chunk_stats()
    step_s = _train_steps(model, optimizer, resolved["vocab_size"], batch, seq_len, steps, device)
    sampler.stop()
    # --steps 0 measures the init alone
    steady = (statistics.median(step_s[1:]) if len(step_s) > 1 else step_s[0]) if step_s else float("nan")
    tokens = batch * seq_len
    flops = flops_per_token(resolved, seq_len, recompute=False) * tokens
    return {
        "case": "hf-llama-finetune", "hf_dir": str(directory), "num_params": resolved["num_params"],
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "batch": batch, "seq_len": seq_len,
        "init_s": round(init_s, 2), "host_rss_before_init_bytes": before, "host_peak_init_bytes": init_peak,
        "init_host_bytes": stats["init_host_bytes"],
        "init_growth_over_chunk_bytes": round((init_peak - before) / max(1, stats["init_host_bytes"]), 4),
        "host_peak_bytes": sampler.host_peak_bytes, "steps": len(step_s), "warmup_step_s": round(step_s[0], 3) if step_s else None,
        "step_s": round(steady, 4) if step_s else None,
        "tokens_per_s": round(tokens / steady, 1) if step_s else None,
        "model_tflops": round(flops / steady / 1e12, 2) if step_s else None,
        "param_bytes_device": stats["param_bytes_device"], "optim_bytes_device": stats["optim_bytes_device"],
        "optim_bytes_host": stats["optim_bytes_host"],
    }


def _train_steps(model, optimizer, vocab: int, batch: int, seq_len: int, steps: int, device) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        tokens = torch.randint(vocab, (batch, seq_len + 1), generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        model.backward(loss)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        print(f"step {len(times)}: {times[-1]:.2f} s, loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path, help="where the checkpoint is (or is made)")
    parser.add_argument("--size", choices=SIZES, default="14b")
    parser.add_argument("--phase", choices=("all", "make", "train"), default="all")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="including the traced warm-up step")
    parser.add_argument("--chunk-elements", type=int, default=64 << 20)
    parser.add_argument("--shard-mib", type=int, default=5120)
    args = parser.parse_args(argv)
    if args.phase in ("all", "make"):
        start = time.perf_counter()
        wrote = make_checkpoint(args.dir, SIZES[args.size], args.shard_mib << 20)
        print(f"checkpoint {args.dir}: {'written' if wrote else 'reused'} in {time.perf_counter() - start:.1f} s",
              flush=True)
    if args.phase == "all":  # train in a fresh process: its RSS high-water mark is the run's own
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--phase", "train"]
        raise SystemExit(subprocess.call(command))
    if args.phase == "train":
        row = measure_train(args.dir, args.batch, args.seq_len, args.steps, args.chunk_elements)
        print(json.dumps(row))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
