"""How fast the host link moves optimizer state: `python -m benchmarks.host_link` (CUDA only).

Times, on the current GPU, copies between host memory and the device: one way at a time and both
ways at once (PCIe is full duplex), from pinned and from registered (`cudaHostRegister`) pageable
buffers, and the pipeline that steps a host optimizer group on the GPU over streamed state
(fp32 master and moments up, AdamW there, the same three back down). Prints one JSON line per
measurement, in GB/s of bytes moved and, for the pipeline, parameters per second.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch


def _seconds(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _registered(numel: int) -> torch.Tensor:
    """Page-locked pageable memory, as pstar's chunk buffers are; unregistered when the returned
    tensor goes (a view of it that outlives it would silently read pageable memory)."""
    buf = torch.zeros(numel, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    if cudart.cudaHostRegister(buf.data_ptr(), numel, 0) != cudart.cudaError.success:
        raise SystemExit(f"error: cudaHostRegister of {numel:,} bytes failed (ulimit -l?)")
    weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
    return buf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_link", description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0, help="bytes per copy, in GiB")
    parser.add_argument("--params", type=float, default=4e8, help="parameters the streamed pipeline steps")
    parser.add_argument("--piece", type=int, default=1 << 24, help="elements per streamed piece")
    parser.add_argument("--pipeline-only", action="store_true", help="skip the plain copies")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks.host_link measures a CUDA device's host link; none is visible")
    numel = int(args.gib * 2**30)
    dev = torch.empty(numel, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(numel, dtype=torch.uint8, device="cuda")
    up, down = torch.cuda.Stream(), torch.cuda.Stream()
    kinds = [] if args.pipeline_only else [("pinned", lambda: torch.zeros(numel, dtype=torch.uint8, pin_memory=True)),
                                           ("registered", lambda: _registered(numel))]
    for kind, make in kinds:
        a, b = make(), make()

        def h2d():
            with torch.cuda.stream(up):
                dev.copy_(a, non_blocking=True)

        def d2h():
            with torch.cuda.stream(down):
                b.copy_(dev2, non_blocking=True)

        def both():
            h2d()
            d2h()

        for name, fn, moved in (("h2d", h2d, numel), ("d2h", d2h, numel), ("both", both, 2 * numel)):
            s = _seconds(fn, 5)
            print(json.dumps({"memory": kind, "copy": name, "gb_per_s": round(moved / s / 1e9, 1)}), flush=True)
        del a, b
    if kinds:
        pageable = torch.zeros(numel, dtype=torch.uint8)
        s = _seconds(lambda: dev.copy_(pageable, non_blocking=True), 3)
        print(json.dumps({"memory": "pageable", "copy": "h2d", "gb_per_s": round(numel / s / 1e9, 1)}), flush=True)
        del pageable
    del dev, dev2

    # The streamed step: three fp32 state buffers (registered host memory) through three device slots.
    n, piece = int(args.params), args.piece
    host = [_registered(4 * n) for _ in range(3)]
    host_fp32 = [buf.view(torch.float32) for buf in host]
    grad = torch.full((n,), 1e-3, dtype=torch.bfloat16, device="cuda")
    param = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    slots = [[torch.empty(piece, device="cuda") for _ in range(4)] for _ in range(3)]
    work = torch.cuda.Stream()
    step = torch.ones((), device="cuda")
    freed = [None, None, None]

    def streamed():
        for i, lo in enumerate(range(0, n, piece)):
            hi = min(lo + piece, n)
            k = i % 3
            master, m, v, g = (t[:hi - lo] for t in slots[k])
            with torch.cuda.stream(up):
                if freed[k] is not None:
                    up.wait_event(freed[k])
                for dst, src in zip((master, m, v), host_fp32):
                    dst.copy_(src[lo:hi], non_blocking=True)
                loaded = torch.cuda.Event()
                loaded.record(up)
            with torch.cuda.stream(work):
                work.wait_event(loaded)
                g.copy_(grad[lo:hi])
                torch._fused_adamw_([master], [g], [m], [v], [], [step], lr=1e-4, beta1=0.9, beta2=0.95,
                                    weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
                param[lo:hi].copy_(master)
                computed = torch.cuda.Event()
                computed.record(work)
            with torch.cuda.stream(down):
                down.wait_event(computed)
                for dst, src in zip(host_fp32, (master, m, v)):
                    dst[lo:hi].copy_(src, non_blocking=True)
                freed[k] = torch.cuda.Event()
                freed[k].record(down)

    s = _seconds(streamed, 3)
    print(json.dumps({"pipeline": "streamed AdamW", "params": n, "piece": piece, "step_s": round(s, 4),
                      "gparams_per_s": round(n / s / 1e9, 2), "gb_per_s_each_way": round(12 * n / s / 1e9, 1)}),
          flush=True)

    # Both at once: the host's own AdamW (all cores but one) beside the streamed pipeline, as a step
    # that splits its host groups between them would run them.
    threads = max(1, (os.cpu_count() or 2) - 1)
    cpu = [torch.zeros(n) for _ in range(4)]
    cpu_step = [torch.zeros(())]

    def host_adam():
        torch.set_num_threads(threads)
        start = time.perf_counter()
        torch._fused_adamw_([cpu[0]], [cpu[1]], [cpu[2]], [cpu[3]], [], cpu_step, lr=1e-4, beta1=0.9,
                            beta2=0.95, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
        return time.perf_counter() - start

    alone = min(host_adam() for _ in range(3))
    with ThreadPoolExecutor(1) as pool:
        torch.cuda.synchronize()
        start = time.perf_counter()
        future = pool.submit(host_adam)
        streamed()
        torch.cuda.synchronize()
        gpu_s = time.perf_counter() - start
        cpu_s = future.result()
    print(json.dumps({"host_adam_threads": threads, "host_adam_alone_gparams_per_s": round(n / alone / 1e9, 2),
                      "together_host_gparams_per_s": round(n / cpu_s / 1e9, 2),
                      "together_streamed_gparams_per_s": round(n / gpu_s / 1e9, 2)}), flush=True)


if __name__ == "__main__":
    main()
