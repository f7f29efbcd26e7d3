#!/usr/bin/env bash
# Everything pstar measures on a lent GPU machine, in one call per machine kind, so that one lease answers
# all questions at once. Run from the repository root; results and logs go to $OUT (or outputs/gpu).
#
#   bash benchmarks/gpu_session.sh one     # nvidia-h200: GPU tests; gpt-1.3b b8/b1 and gpt-4b b8 against
#                                          # the plain-PyTorch recipes, gpt-1.3b with compile_blocks too
#   bash benchmarks/gpu_session.sh twelve  # nvidia-h200: configs/gpt-12b.yaml, clipping 1 and 0
#   bash benchmarks/gpu_session.sh recompute  # nvidia-h200: GPU tests; gpt-1.3b b1 (30 steps) and b8
#                                          # against pytorch-bf16; configs/gpt-12b.yaml recomputing
#                                          # all of its 38 blocks, then fewer (RECOMPUTE="30 24")
#   bash benchmarks/gpu_session.sh large   # nvidia-h200: configs/gpt-15b.yaml, gpt-18b on one GPU, and a
#                                          # >= 14B Hugging Face Llama loaded from safetensors
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
    timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -8 | tee "$out/gpu-tests.log"
    recipes=pytorch,pytorch-bf16,pytorch-compile
    bench 100 --systems $recipes,pstar --models gpt-1.3b --batch 8 --steps 5 --warmup 2 --config configs/gpt-1.3b.yaml
    # batch 1 steps are 40-60 ms and vary by 15 % within a run on either system: 30 of them
    bench 90 --systems $recipes,pstar --models gpt-1.3b --batch 1 --steps 30 --warmup 5 --config configs/gpt-1.3b.yaml
    # the same run settled with its blocks compiled (the first steps trace, settle, then compile)
    bench 110 --systems pstar --models gpt-1.3b --batch 8,1 --steps 5 --warmup 3 --config configs/gpt-1.3b.yaml \
        --set engine.compile_blocks=true
    bench 90 --systems pytorch-bf16,pytorch-compile,pstar --models gpt-4b --batch 8 --steps 4 --warmup 2 \
        --config configs/gpt-4b.yaml
    ;;
twelve)
    machine=nvidia-h200
    bench 230 --systems pstar --config configs/gpt-12b.yaml --steps 4 --warmup 2
    bench 230 --systems pstar --config configs/gpt-12b.yaml --steps 4 --warmup 2 --clip 0
    ;;
recompute)
    machine=nvidia-h200
    timeout 100 python -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -8 | tee "$out/gpu-tests.log"
    bench 60 --systems pytorch-bf16,pstar --models gpt-1.3b --batch 1 --steps 30 --warmup 5 \
        --config configs/gpt-1.3b.yaml
    bench 50 --systems pytorch-bf16,pstar --models gpt-1.3b --batch 8 --steps 5 --warmup 2 \
        --config configs/gpt-1.3b.yaml
    bench 120 --systems pstar --config configs/gpt-12b.yaml --steps 4 --warmup 2
    for n in ${RECOMPUTE:-30 24}; do
        bench 120 --systems pstar --config configs/gpt-12b.yaml --steps 4 --warmup 2 --set model.recompute_layers=$n
    done
    ;;
large)
    machine=nvidia-h200
    bench 220 --systems pstar --config configs/gpt-15b.yaml --steps 3 --warmup 2
    bench 260 --systems pstar --config configs/gpt-18b.yaml --set model.activation_checkpointing=true \
        --gpus 1 --batch 8 --steps 3 --warmup 2
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
    bench 60 --systems pstar --models gpt-4b --batch 8 --steps 5 --warmup 2 --config configs/gpt-4b.yaml
    bench 150 --systems pstar,fsdp2,fsdp2-bf16 --models gpt-4b --batch 8 --steps 5 --warmup 2 --gpus "$gpus" \
        --config configs/gpt-4b.yaml
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh one|twelve|recompute|large|multi" >&2
    exit 2
    ;;
esac
