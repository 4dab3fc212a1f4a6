#!/usr/bin/env bash
# Every GPU check of the project in one run on one CUDA machine (the device tool's H100 or H200), in about
# 8 minutes: the CUDA-only tests, the benchmark suite at the paper's sizes with its report, then the fast
# path (bf16, channels_last, CUDA graphs, fused batch norm, streams) against the fastest BP.
# (bench/gpu_fast_path_check.sh is the shorter run of the fast path alone, with its training comparison.)
#
#   bash bench/gpu_check.sh [OUT_DIR]          (OUT_DIR default: $OUT, else bench-results/gpu)
#
# On the device machine (python3 3.12, torch 2.11, triton 3.6, pytest, pytest-benchmark there; no
# matplotlib: the PNGs are then skipped and the Markdown table still written):
#   run(command="PYTHONPATH=$PWD bash bench/gpu_check.sh $OUT", timeout_s=600)
# Steps and their limits:
#   1. tests that need CUDA (kernels on CUDA, CUDA-graph capture of the kernels and of the training step,
#      fused optimizer, the Triton training run, the fused batch norm, streams, the
#      device loader on CUDA), hard stop 130 s;
#   2. bench/gpu_bench.sh: steps of every method vs BP at batch 1024, the memory sweep, the kernel
#      benchmarks, then the report (OUT_DIR/bench.md), soft budget 180 s, hard stop 220 s;
#   3. bench/test_bench_fast_path.py: BP and MLAAN (ResNet-32 K=15, ResNet-110 K=54) in every variant,
#      soft budget 120 s, hard stop 150 s.  At most 8 min 20 s in all (on an H200: about 7 min).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench-results/gpu}}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

timeout --signal=INT --kill-after=10 130 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/test_kernels.py tests/test_kernels_training.py tests/test_fast_path.py tests/test_batch_norm_kernel.py \
    tests/test_data.py \
    tests/test_engine.py 2>&1 | tee "$OUT_DIR/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu_check.sh: GPU tests exited with $tests_rc"

# A tighter budget than gpu_bench.sh's own, so the whole script stays under the device's 10-minute call.
BENCH_BUDGET_S="${BENCH_BUDGET_S:-180}" BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-220}" bash bench/gpu_bench.sh "$OUT_DIR"
bench_rc=$?

# The fast path against the fastest BP and the authors' step times.
timeout --signal=INT --kill-after=10 150 "$PYTHON" -m pytest bench/test_bench_fast_path.py --bench-budget-s=120 \
    --benchmark-only --benchmark-json="$OUT_DIR/fast_path.json" -q -p no:cacheprovider 2>&1 | tee "$OUT_DIR/fast-path.log"
"$PYTHON" -m fastlocal.bench.report "$OUT_DIR/fast_path.json" --out "$OUT_DIR/fast_path" --no-plots >/dev/null \
    && cat "$OUT_DIR/fast_path/bench.md" || true
echo "gpu_check.sh: tests rc $tests_rc, bench rc $bench_rc; results in $OUT_DIR"
[ -f "$OUT_DIR/bench.md" ] && sed -n '1,60p' "$OUT_DIR/bench.md"
exit $(( tests_rc != 0 || bench_rc != 0 ))
