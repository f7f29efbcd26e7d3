#!/bin/bash
export PYTHONPATH=.
( timeout 200 python3 gpu_diag/adam_cpu_vs_cuda.py > $OUT/diag.txt 2>&1 ) &
set1="tests/test_benchmarks.py tests/test_overhead_bench.py tests/test_hf_memory.py"
set2="tests/test_overlap.py tests/test_streamed.py"
set3="tests/test_hf.py tests/test_packaging.py tests/test_tied_init.py tests/test_patrickstar_config.py"
set4="tests/test_param_groups.py tests/test_train.py tests/test_engine_config.py"
set5="tests/test_distributed.py::test_seed_api_in_a_script_started_by_plain_torchrun tests/test_engine.py tests/test_settled.py tests/test_engine_speed.py"
i=0
for s in "$set1" "$set2" "$set3" "$set4" "$set5"; do
  ( timeout 260 python3 -m pytest -q -rf -p no:cacheprovider $s > $OUT/set$i.txt 2>&1; echo "rc $?" >> $OUT/set$i.txt ) &
  i=$((i+1))
done
wait
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu > $OUT/gpu.txt 2>&1; echo "rc $?" >> $OUT/gpu.txt
for f in $OUT/set*.txt $OUT/gpu.txt; do echo "== $f"; grep -E "^(FAILED|ERROR)|passed|failed|^rc" $f | tail -12; done
echo "== diag"; tail -12 $OUT/diag.txt
