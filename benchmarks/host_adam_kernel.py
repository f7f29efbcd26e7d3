"""How fast the host's AdamW kernel is on its own: `python -m benchmarks.host_adam_kernel`.

pstar steps the optimizer groups that live on the host with torch's fused CPU AdamW. In a training
step that kernel shares the cores and the memory bandwidth with the thread that drives the GPU and
with the copies; this measures it alone, for several thread counts, over fp32 spans as large as
pstar's chunks, so a step's host-Adam time can be compared with what the kernel can do.
Prints one JSON line per thread count: parameters per second (median of the repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def time_adamw(num_params: int, num_threads: int, repeats: int, span: int) -> float:
    """Median seconds of one AdamW step over `num_params` fp32 parameters in spans of `span`."""
    torch.set_num_threads(num_threads)
    num_spans = max(1, num_params // span)
    params = [torch.zeros(span) for _ in range(num_spans)]
    grads = [torch.full((span,), 1e-3) for _ in range(num_spans)]
    exp_avgs = [torch.zeros(span) for _ in range(num_spans)]
    exp_avg_sqs = [torch.zeros(span) for _ in range(num_spans)]
    steps = [torch.zeros(()) for _ in range(num_spans)]
    times = []
    for _ in range(repeats + 1):  # the first touches the pages
        start = time.perf_counter()
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1e-4, beta1=0.9, beta2=0.95,
                            weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_adam_kernel", description=__doc__)
    parser.add_argument("--params", type=float, default=5e8, help="fp32 parameters stepped (default 5e8)")
    parser.add_argument("--threads", default=None,
                        help="comma list of thread counts (default: 1/4, 1/2, 3/4 and all of the cores)")
    parser.add_argument("--span", type=int, default=64 * 2**20, help="elements per span (pstar's chunk size)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    threads = ([int(t) for t in args.threads.split(",")] if args.threads
               else sorted({max(1, cores * k // 4) for k in (1, 2, 3, 4)}))
    for num_threads in threads:
        seconds = time_adamw(int(args.params), num_threads, args.repeats, min(args.span, int(args.params)))
        print(json.dumps({"threads": num_threads, "cores": cores, "params": int(args.params),
                          "step_s": round(seconds, 4), "gparams_per_s": round(args.params / seconds / 1e9, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
