#!/usr/bin/env bash
# The GPU check, for a session that holds a GPU (under 8 minutes on one H200-class device): the CUDA
# tests, then `tlora init` on a Llama-2-7B-shaped checkpoint written on the spot, into
# benchmarks/RESULTS-gpu.md (gpu_check.py). --dry-run: on CPU, the CUDA tests only collected, a tiny
# shape, a scratch results file (--results FILE to keep it).
#   benchmarks/gpu_check.sh [--dry-run] [--results FILE] [--cache DIR]     (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CUDA_TESTS=(-m cuda tests)  # every test that needs CUDA (marked so; skipped elsewhere)
if [[ " $* " == *" --dry-run "* ]]; then
    "$PYTHON" -m pytest -q --collect-only "${CUDA_TESTS[@]}"
else
    "$PYTHON" -m pytest -q "${CUDA_TESTS[@]}"
fi
"$PYTHON" benchmarks/gpu_check.py "$@"
