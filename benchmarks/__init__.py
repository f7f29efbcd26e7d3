"""Side-by-side training benchmarks: plain PyTorch, PyTorch FSDP2 (with and without CPU offload) and pstar.

`python -m benchmarks.run --help`; the method is in benchmarks/NOTES.md.
"""
