"""Run the systems side by side on the same GPT and batch, one process per case; print a table last.

    python -m benchmarks.run --systems pytorch,fsdp2-offload,pstar --models gpt-1.3b,gpt-4b \\
        --batch 8 --seq 1024 --steps 6 --warmup 3 --out results.json --machine nvidia-h200

`--device cpu` is a smoke mode (defaults to gpt-tiny): it proves the harness, not any speed.
The method (warm-up, median, the FLOPs formula) is described in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import sys
import time
from pathlib import Path

from benchmarks.launch import CaseOutcome, run_case_process
from benchmarks.report import build_row, fill_ratios, format_table, read_rows, write_rows
from benchmarks.spec import SYSTEMS, CaseSpec

DEFAULT_CUDA_MODEL = "gpt-1.3b"
DEFAULT_CPU_MODEL = "gpt-tiny"
DEFAULT_CUDA_SEQ = 1024
MIN_CASE_S = 30  # below this much time left in the budget, a case is not started
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class UsageError(ValueError):
    """A command-line mistake: shown as one message, exit code 2."""


def parse_bytes(text: str) -> int:
    """'120GiB', '100GB', '1.5TiB' or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use bytes or e.g. 120GiB, 100GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--systems", type=comma_list, default=["pytorch", "fsdp2-offload", "pstar"],
        help=f"comma-separated, of: {', '.join(SYSTEMS)}")
    add("--models", type=comma_list, default=None,
        help=f"comma-separated GPT sizes (default {DEFAULT_CUDA_MODEL}; {DEFAULT_CPU_MODEL} with --device cpu)")
    add("--batch", type=comma_list, default=None,
        help="sequences per GPU per step; a comma list runs each (default 8, or the config's)")
    add("--seq", type=int, default=None, help=f"sequence length (default {DEFAULT_CUDA_SEQ}; the model's own on CPU)")
    add("--steps", type=int, default=6, help="timed steps; the step time is their median")
    add("--warmup", type=int, default=3, help="untimed steps first (pstar traces its schedule in the first)")
    add("--out", type=Path, default=Path("results.json"), help="JSON list the rows are appended to")
    add("--machine", default=None, help="machine name recorded in each row (default: the host name)")
    add("--gpus", type=int, default=1, help="GPUs (processes) per case; > 1 launches torch.distributed.run")
    add("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto = cuda when available")
    add("--activation-checkpointing", action="store_true",
        help="recompute activations (all systems; pstar with --config follows the config)")
    add("--recompute-layers", type=int, default=None, metavar="N",
        help="with --activation-checkpointing: recompute only the first N blocks (default: all)")
    add("--clip", type=float, default=1.0, help="global gradient-norm clipping in every system (0: off)")
    add("--config", type=Path, default=None,
        help="a shipped pstar config (e.g. configs/gpt-12b.yaml): pstar runs its engine and model settings, "
             "as `pstar train` would; --models, --batch and --seq default to its own")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a dotted override of the --config, as on the `pstar train` command line (repeatable)")
    add("--chunk-size", type=int, default=None, help="pstar default_chunk_size in elements (engine default if unset)")
    add("--device-memory-limit", type=parse_bytes, default=None, help="pstar device_memory_limit, e.g. 120GiB")
    add("--host-memory-limit", type=parse_bytes, default=None, help="pstar host_memory_limit, e.g. 100GiB")
    add("--case-timeout", type=float, default=480.0, help="seconds one case may take before it is stopped")
    add("--time-budget", type=float, default=None,
        help="seconds for the whole run; cases that would not fit are reported as skipped")
    add("--log-dir", type=Path, default=None,
        help="per-case logs and raw results (default: $OUT/bench-logs when $OUT is set, else outputs/benchmarks/<time>)")
    return parser


def resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this torch build or machine has no CUDA device; use --device cpu")
    return choice


def model_shapes(names: list[str], seq: int | None) -> dict[str, dict]:
    """hidden, layers, vocab_size and the default seq_len of each named GPT size."""
    import models

    unknown = [name for name in names if name not in models.GPT_SIZES]
    if unknown:
        raise UsageError(f"--models: unknown GPT size(s) {', '.join(unknown)}; known: {', '.join(models.GPT_SIZES)}")
    return {name: models.resolve_model_config({"family": "gpt", "size": name, **({"seq_len": seq} if seq else {})})
            for name in names}


def shipped_config(path: Path | None, gpus: int, overrides: list[str] = ()) -> dict | None:
    """What a pstar row takes from a shipped config: its engine section exactly as `pstar train` hands
    it to the engine, the recompute setting, and the size, per-GPU batch and sequence length."""
    if path is None:
        return None
    from pstar_cli.config import load_config
    from pstar_cli.errors import PstarError

    try:
        cfg = load_config(path, [*overrides, f"distributed.nproc_per_node={gpus}"])
    except (PstarError, OSError) as exc:
        raise UsageError(f"--config {path}: {exc}") from None
    if cfg.model.family not in (None, "gpt"):
        raise UsageError(f"--config {path}: the harness runs GPT sizes; this config's model is {cfg.model.family}")
    label = " ".join([str(path), *overrides])
    return {"path": label, "engine": cfg.engine_dict(), "weight_decay_on": cfg.train.weight_decay_on,
            "model": cfg.model.size,
            "activation_checkpointing": cfg.model.activation_checkpointing,
            "recompute_layers": cfg.model.recompute_layers,
            "batch": cfg.micro_batch_size, "seq": cfg.train.seq_len}


def build_specs(args: argparse.Namespace, device: str, shapes: dict[str, dict],
                shipped: dict | None = None) -> list[CaseSpec]:
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        raise UsageError(f"--systems: unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    try:
        batches = [int(b) for b in args.batch]
    except ValueError:
        raise UsageError(f"--batch: {','.join(args.batch)} is not a comma list of integers") from None
    for flag, value in (("--batch", min(batches, default=0)), ("--steps", args.steps), ("--gpus", args.gpus)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1")
    if args.warmup < 0:
        raise UsageError("--warmup must be 0 or more")
    if args.clip < 0:
        raise UsageError("--clip must be 0 (off) or more")
    if args.recompute_layers is not None:
        if not args.activation_checkpointing:
            raise UsageError("--recompute-layers needs --activation-checkpointing")
        for model, shape in shapes.items():
            if not 0 <= args.recompute_layers <= shape["layers"]:
                raise UsageError(f"--recompute-layers {args.recompute_layers}: {model} has {shape['layers']} blocks")
    specs = []
    for model in shapes:
        for batch in batches:
            for system in args.systems:
                from_config = shipped if system == "pstar" and shipped else None
                recompute = from_config["activation_checkpointing"] if from_config else args.activation_checkpointing
                recompute_layers = from_config["recompute_layers"] if from_config else args.recompute_layers
                specs.append(CaseSpec(
                    system=system, model=model, batch=batch, seq=args.seq or shapes[model]["seq_len"],
                    num_steps=args.steps, num_warmup=args.warmup, device=device, gpus=args.gpus,
                    activation_checkpointing=recompute, recompute_layers=recompute_layers,
                    chunk_size=args.chunk_size,
                    device_memory_limit=args.device_memory_limit, host_memory_limit=args.host_memory_limit,
                    clip=args.clip, config=from_config["path"] if from_config else None,
                    engine=from_config["engine"] if from_config else None,
                    weight_decay_on=from_config["weight_decay_on"] if from_config else "all"))
    return specs


def check_gpu_count(device: str, gpus: int) -> None:
    import torch

    if device == "cuda" and gpus > torch.cuda.device_count():
        raise UsageError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def default_log_dir() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.environ.get("OUT")  # the lent GPU machines bring back what is written under $OUT
    return Path(out) / "bench-logs" / stamp if out else Path("outputs") / "benchmarks" / stamp


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: stop the current case, keep the rows so far, print the table."""


def _raise_interrupted(signum, frame):
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the harness at once
    raise Interrupted(signal.Signals(signum).name)


def run_cases(specs: list[CaseSpec], shapes: dict, args: argparse.Namespace, machine: str,
              log_dir: Path, previous_rows: list[dict]) -> list[dict]:
    rows: list[dict] = []
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    stop_reason = None
    for index, spec in enumerate(specs, start=1):
        left_s = deadline - time.monotonic() if deadline else None
        if stop_reason is None and left_s is not None and left_s < MIN_CASE_S:
            stop_reason = "skipped: time budget spent"
        try:
            if stop_reason:
                outcome = CaseOutcome(status=stop_reason)
            else:
                print(f"[{index}/{len(specs)}] {spec.label()} ...", flush=True)
                timeout_s = min(args.case_timeout, left_s - 5) if left_s is not None else args.case_timeout
                prefix = log_dir / f"{index:02d}-{spec.system}-{spec.model}-b{spec.batch}"
                outcome = run_case_process(spec, prefix, timeout_s)
        except Interrupted as exc:
            outcome = CaseOutcome(status=f"interrupted ({exc})")
            stop_reason = f"skipped: harness interrupted ({exc})"
        rows.append(build_row(spec, shapes[spec.model], outcome, machine))
        fill_ratios(rows)
        write_rows(args.out, previous_rows + rows)  # after every case: a killed run keeps its rows
        if outcome.log_path:
            print(progress_line(rows[-1], outcome), flush=True)
    return rows


def progress_line(row: dict, outcome: CaseOutcome) -> str:
    if row["status"] == "ok":
        summary = (f"{row['step_s']:.4g} s/step, {row['model_tflops']:.4g} model TFLOPS "
                   f"({row['hardware_tflops']:.4g} hardware), init {row['init_s']:.1f} s")
        if row["ratio_to_best_pytorch"] is not None:
            summary += f", {row['ratio_to_best_pytorch']:.2f}x the best plain PyTorch ({row['best_pytorch']})"
    else:
        summary = row["status"]
    return f"    {summary}  (log: {outcome.log_path})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        check_gpu_count(device, args.gpus)
        if args.overrides and not args.config:
            raise UsageError("--set overrides a --config; give the config too")
        shipped = shipped_config(args.config, args.gpus, args.overrides)
        if shipped:
            args.models = args.models or [shipped["model"]]
            args.batch = args.batch or [str(shipped["batch"])]
            args.seq = args.seq or shipped["seq"]
        shapes = model_shapes(args.models or [DEFAULT_CUDA_MODEL if device == "cuda" else DEFAULT_CPU_MODEL],
                              args.seq or (DEFAULT_CUDA_SEQ if device == "cuda" else None))
        args.batch = args.batch or ["8"]
        specs = build_specs(args, device, shapes, shipped)
        previous_rows = read_rows(args.out)
    except (UsageError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    machine = args.machine or os.uname().nodename
    log_dir = args.log_dir or default_log_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    print(f"{len(specs)} case(s) on {machine} ({device}); logs in {log_dir}", flush=True)
    rows = run_cases(specs, shapes, args, machine, log_dir, previous_rows)
    device_name = next((r["device_name"] for r in rows if r.get("device_name")), device)
    print(f"\n{len(rows)} row(s) appended to {args.out}")
    print(f"torch {torch_version()}, {device_name}, machine {machine}")
    print(format_table(rows), flush=True)
    interrupted = any(r["status"].startswith("interrupted") for r in rows)
    return 130 if interrupted else 0


def torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
