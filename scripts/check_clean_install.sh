#!/usr/bin/env bash
# Installs pstar as a user would, into a virtualenv that cannot see the system's packages, and trains
# the CPU demo for a few steps with a checkpoint, then resumes from it. A module that imports a
# package pyproject.toml does not declare fails here, whatever the machine has installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m venv "$work/venv"            # no --system-site-packages: only what pip installs
venv="$work/venv/bin"
"$venv/python" -m pip install -q "$TORCH_SPEC"
"$venv/python" -m pip install -q .         # a regular install from a copy, not the source tree
cd "$work"                                 # imports come from the installed package alone

config="$OLDPWD/configs/tiny.yaml"
"$venv/pstar" train "$config" train.steps=6 train.log_interval=2 checkpoint.interval=3 --output-dir run
"$venv/pstar" train "$config" train.steps=9 train.log_interval=2 checkpoint.interval=3 --output-dir run --resume
steps="$(grep -c '"step"' run/metrics.jsonl)"
if [ "$steps" -ne 9 ]; then
    echo "clean install: expected 9 logged steps after resuming, found $steps" >&2
    exit 1
fi
echo "clean install: trained 6 steps, checkpointed, resumed to step 9"
