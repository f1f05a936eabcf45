#!/usr/bin/env bash
# One CIFAR-10 ResNet-20 training epoch for FP, LSQ and block replacement (prefix), eager,
# compiled and reduce-overhead (CUDA graphs), fp32 and bf16, on one CUDA GPU: one JSON.
# Under 8 minutes: no configuration starts after 450 s (scripts/gpu_bench.py --budget-s), and
# the JSON is rewritten after each one, so a cut run keeps what it measured.
#
#   scripts/gpu_bench.sh DATA_ROOT [OUT.json] [more gpu_bench.py options or bqat-train overrides]
#   scripts/gpu_bench.sh data.root=DATA_ROOT ...        (the bqat-train spelling works too)
#
# DATA_ROOT: CIFAR-10 as torchvision's python release or image folders (data.root). The data
# lives on the GPU (data.in_memory=true); the first run decodes image folders once and caches
# them under outputs/cache/data. Inductor's compile cache: outputs/cache/inductor (kept, so a
# rerun measures warm compiles; delete it for cold ones).
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:?usage: scripts/gpu_bench.sh DATA_ROOT [OUT.json] [options]}
root=${root#data.root=}
shift
out=outputs/bench/gpu_bench.json
if [[ $# -gt 0 && $1 == *.json ]]; then out=$1; shift; fi
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/outputs/cache/inductor}
# A hard stop at 470 s: the budget keeps it from firing, but a stuck compile cannot hold the machine.
exec timeout --signal=TERM 470 "$python" scripts/gpu_bench.py --data-root "$root" --out "$out" --budget-s 450 "$@"
