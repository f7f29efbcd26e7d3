"""How often gradient clipping fires: the measurement behind the host optimizer's schedule.

    python -m benchmarks.clip_rate --steps 300

Trains the CPU demo's model (configs/tiny.yaml: gpt-mini, bytes of the shipped corpus, batch 8 x
128, AdamW lr 3e-3 after 50 warm-up steps, cosine to 3e-4, clipping 1.0) with plain PyTorch and
prints, per block of steps, on how many steps clip_grad_norm_ scaled the gradients down. The engine
overlaps host Adam with the next forward instead of speculating on "no clip" during backward
(engine/optimizer.py): a speculated step would be redone on every step that clips.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from models import build_model

_CORPUS = Path(__file__).resolve().parent.parent / "pstar_cli" / "corpus" / "prose.txt"


def lr_at(step: int, steps: int, peak: float = 3e-3, floor: float = 3e-4, warmup: int = 50) -> float:
    """configs/tiny.yaml's schedule: linear warm-up, then half a cosine down to `floor`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def clip_counts(steps: int, block: int, max_norm: float = 1.0, batch: int = 8, seq: int = 128,
                seed: int = 0) -> list[tuple[int, int, float]]:
    """(first step of the block, steps that clipped in it, the block's median norm) per block."""
    torch.manual_seed(seed)
    model = build_model({"family": "gpt", "size": "gpt-mini", "vocab_size": 256, "seq_len": seq})
    data = torch.frombuffer(bytearray(_CORPUS.read_bytes()), dtype=torch.uint8).long()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr_at(0, steps), betas=(0.9, 0.95), eps=1e-8, fused=True)
    gen = torch.Generator().manual_seed(seed)
    results, norms = [], []
    for step in range(steps):
        starts = torch.randint(len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        opt.zero_grad()
        model(x, y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        if len(norms) == block or step == steps - 1:
            clipped = sum(n > max_norm for n in norms)
            results.append((step + 1 - len(norms), clipped, sorted(norms)[len(norms) // 2]))
            norms = []
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--block", type=int, default=50)
    args = parser.parse_args(argv)
    total = 0
    for first, clipped, median in clip_counts(args.steps, args.block):
        total += clipped
        print(f"steps {first:4d}-{first + args.block - 1:4d}: clipped on {clipped:3d} "
              f"(median norm {median:.3f})")
    print(f"clipped on {total} of {args.steps} steps")


if __name__ == "__main__":
    main()
