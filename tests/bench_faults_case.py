"""A benchmark case process with the failure PSTAR_BENCH_SIMULATE asks for (see tests/bench_faults.py)."""

from tests.bench_faults import run_case

if __name__ == "__main__":
    run_case()
