#!/bin/bash
# The default (non-GPU) test suite on the GPU machine, in 6 parallel shards by file.
export PYTHONPATH=.
files=$(ls tests/test_*.py)
for i in 0 1 2 3 4 5; do
  shard=$(echo "$files" | awk -v i=$i 'NR % 6 == i')
  ( timeout 420 python3 -m pytest -q -rf -p no:cacheprovider $shard > $OUT/shard$i.txt 2>&1; echo "rc $?" >> $OUT/shard$i.txt ) &
done
wait
for i in 0 1 2 3 4 5; do echo "== shard $i"; grep -E "^(FAILED|ERROR)|passed|failed|^rc" $OUT/shard$i.txt | tail -15; done
