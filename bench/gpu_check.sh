#!/usr/bin/env bash
# Every GPU check of the project in one run on one CUDA machine (the device tool's H100), in about
# 7 minutes: the CUDA-only tests, then the benchmark suite at the paper's sizes with its report.
#
#   bash bench/gpu_check.sh [OUT_DIR]          (OUT_DIR default: $OUT, else bench-results/gpu)
#
# On the device machine (python3 3.12, torch 2.11, triton 3.6, pytest, pytest-benchmark there; no
# matplotlib: the PNGs are then skipped and the Markdown table still written):
#   run(command="PYTHONPATH=$PWD bash bench/gpu_check.sh $OUT", timeout_s=540)
# Steps and their limits:
#   1. tests that need CUDA (kernels on CUDA, CUDA-graph capture of the kernels, fused optimizer, the
#      Triton training run, the device loader on CUDA), ~1-2 min, hard stop 150 s;
#   2. bench/gpu_bench.sh: steps of every method vs BP at batch 1024, the memory sweep, the kernel
#      benchmarks, then the report (OUT_DIR/bench.md), soft budget 250 s, hard stop 330 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench-results/gpu}}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

timeout --signal=INT --kill-after=15 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/test_kernels.py tests/test_kernels_training.py tests/test_fast_path.py tests/test_data.py \
    tests/test_engine.py 2>&1 | tee "$OUT_DIR/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu_check.sh: GPU tests exited with $tests_rc"

bash bench/gpu_bench.sh "$OUT_DIR"
bench_rc=$?
echo "gpu_check.sh: tests rc $tests_rc, bench rc $bench_rc; results in $OUT_DIR"
[ -f "$OUT_DIR/bench.md" ] && sed -n '1,60p' "$OUT_DIR/bench.md"
exit $(( tests_rc != 0 || bench_rc != 0 ))
