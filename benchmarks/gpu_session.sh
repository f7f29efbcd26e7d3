#!/usr/bin/env bash
# Everything pstar measures on a lent GPU machine, in one call per machine kind, so that one lease answers
# all questions at once. Run from the repository root; results and logs go to $OUT (or outputs/gpu).
#
#   bash benchmarks/gpu_session.sh one     # nvidia-h200: GPU tests, then T1/T2 (pytorch, fsdp2-offload,
#                                          # pstar), then T3 (gpt-12b, gpt-15b with recompute)
#   bash benchmarks/gpu_session.sh multi   # nvidia-h200-x2/-x4: multi-GPU tests, then the largest GPT
#                                          # pstar trains there, then T5 (gpt-4b per GPU vs 1 GPU and FSDP2)
#                                          # (HOST_GIB=256: the host's memory when MemTotal reads low)
#
# Each block has its own time budget, so a slow one cannot starve the table of the next; the machine's
# per-call limit is 600 s, so `one` and `multi` each stay under about 560 s of work.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared multi-GPU hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

bench() {  # bench SECONDS ARGS...: one harness run appending to $out/results.json
    local budget=$1; shift
    runs=$((runs + 1))
    python -m benchmarks.run --machine "$machine" --out "$out/results.json" --time-budget "$budget" \
        --seq 1024 --log-dir "$logs/run$runs" "$@" 2>&1 | tee -a "$out/bench.log"
}
# Per-case logs live outside $OUT and come back as one archive (a lent machine returns few files).
logs=outputs/gpu-logs runs=0
mkdir -p "$logs"
trap 'tar czf "$out/case-logs.tgz" -C "$logs" . 2>/dev/null' EXIT

case "${1:-one}" in
one)
    machine=nvidia-h200
    timeout 90 python -m pytest -q -m gpu tests/test_engine.py tests/test_engine_speed.py \
        tests/test_checkpoint.py tests/test_train.py 2>&1 | tail -5 | tee "$out/gpu-tests.log"
    bench 170 --systems pytorch,pstar --models gpt-1.3b,gpt-4b --batch 8 --steps 5 --warmup 2
    bench 230 --systems pstar --models gpt-12b,gpt-15b --batch 8 --steps 3 --warmup 2 \
        --activation-checkpointing --device-memory-limit 132GiB
    bench 60 --systems fsdp2-offload --models gpt-1.3b --batch 8 --steps 3 --warmup 1
    ;;
multi)
    machine=$(python -c "import torch; print(f'nvidia-h200-x{torch.cuda.device_count()}')")
    gpus=$(python -c "import torch; print(torch.cuda.device_count())")
    # Host memory there grows as it is used (MemTotal reads low at first): the budget is given.
    host_per_rank=$(python -c "import psutil, torch; print(int(0.92 * max(psutil.virtual_memory().total, \
        ${HOST_GIB:-0} * 2**30) / torch.cuda.device_count()))")
    timeout 75 python -m pytest -q -m gpu tests/test_distributed.py 2>&1 | tail -5 | tee "$out/gpu-tests.log"
    # The largest GPT first (x2: gpt-30b, x4: gpt-60b), then the next size down; each prints its init
    # and every step as it ends, so a run stopped by the limit still shows how far it got.
    big=${BIG_MODELS:-$([ "$gpus" -ge 4 ] && echo gpt-60b,gpt-50b || echo gpt-30b,gpt-20b)}
    bench 300 --systems pstar --models "$big" --batch 8 --steps 3 --warmup 2 \
        --activation-checkpointing --device-memory-limit 132GiB --host-memory-limit "$host_per_rank" --gpus "$gpus"
    bench 60 --systems pstar --models gpt-4b --batch 8 --steps 5 --warmup 2
    bench 120 --systems pstar,fsdp2 --models gpt-4b --batch 8 --steps 5 --warmup 2 --gpus "$gpus"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh one|multi" >&2
    exit 2
    ;;
esac
