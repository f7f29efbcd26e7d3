"""Where `initialize_engine` spends its time on one device: a cProfile of building a GPT into chunks.

    PYTHONPATH=. python -m benchmarks.profile_init gpt-4b [--top 25] [--init-device auto|cpu]

Prints the wall time of the init and the functions with the most time of their own (torch's
kernels and copies show up as the tensor methods that ran them).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from engine import initialize_engine
from models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GPT size name, e.g. gpt-4b")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--init-device", choices=("auto", "cpu"), default="auto")
    args = parser.parse_args()
    spec = {"family": "gpt", "size": args.model, "seq_len": 1024}
    config = {"bf16": {"enabled": torch.cuda.is_available()}, "init_device": args.init_device,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context is not the engine's time
    # One-time costs (torch's lazy imports, the first page-locked buffer) are not the model's:
    # a one-layer engine pays them first.
    initialize_engine(model_func=lambda: torch.nn.Linear(8, 8), config=config)
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    model, _ = initialize_engine(model_func=lambda: build_model(spec), config=config)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profile.disable()
    print(f"{args.model}: init {time.perf_counter() - start:.2f} s, init_device {args.init_device}, "
          f"host chunks {model.chunk_stats()['param_bytes_host'] / 2**30:.1f} GiB of params")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
