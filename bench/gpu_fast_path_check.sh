#!/usr/bin/env bash
# The GPU fast path's checks in one run on one CUDA machine, in under 8 minutes (the hard stops below add
# up to 7 min 5 s, plus at most 5 s of kill grace per step):
#   1. its CUDA tests (fused batch norm on CUDA, streams bitwise equal to no streams, CUDA-graph training
#      equal to eager, the Triton training run), hard stop 75 s;
#   2. bench/test_bench_fast_path.py: BP and MLAAN (ResNet-32 K=15, ResNet-110 K=54) in every variant,
#      soft budget 140 s, hard stop 175 s, then its table (OUT_DIR/fast_path/bench.md);
#   3. kernel benchmarks, graph-timed: the fused batch norm (eager vs Triton at the three stage shapes, and
#      the Triton kernels under each launch shape of BN_LAUNCH_SHAPES), hard stop 70 s, then their report
#      with what it says to ship (fastlocal.bench.report: OUT_DIR/kernels/bench.md);
#   4. bench/fast_path_training.py: MLAAN ResNet-32 K=15, 3 epochs of the bundled CIFAR-10 subset with the
#      fast path off, fp32-fast and on (acceptance: the same accuracy), hard stop 105 s.
#
#   bash bench/gpu_fast_path_check.sh [OUT_DIR]     (OUT_DIR default: $OUT, else bench-results/fast-path)
# With the device tool:  run(command="bash bench/gpu_fast_path_check.sh /tmp/r; tar czf $OUT/r.tgz -C /tmp r",
#                            timeout_s=500)
# The limits can be lowered for a short lease: TESTS_S (75), BENCH_BUDGET_S (140), BENCH_S (175), KERNELS_S (70),
# TRAIN_S (105; 0 skips the training step), and TESTS_K, a pytest -k expression choosing among the tests.
# EXTRA_TESTS: more test files or node ids for step 1 (e.g. the CUDA test of the analysis tool);
# CONV_S (0: skipped): a hard stop for the experimental Triton convolution's benchmark against cuDNN
# (experimental/triton_conv/test_bench_conv.py, OUT_DIR/kernels/conv.json; the verdict in OUT_DIR/conv/bench.md).
# Issue 17's use of it: docs/gpu-evidence.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench-results/fast-path}}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
"$PYTHON" -c "import torch, triton; print('device', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"

timeout --signal=INT --kill-after=5 "${TESTS_S:-75}" "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/test_batch_norm_kernel.py tests/test_kernels_training.py \
    tests/test_fast_path.py ${EXTRA_TESTS:-} \
    ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT_DIR/gpu-tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

timeout --signal=INT --kill-after=5 "${BENCH_S:-175}" "$PYTHON" -m pytest \
    bench/test_bench_fast_path.py --bench-mode=gpu --bench-budget-s="${BENCH_BUDGET_S:-140}" \
    --benchmark-only --benchmark-json="$OUT_DIR/fast_path.json" -q -p no:cacheprovider \
    2>&1 | tee "$OUT_DIR/fast-path.log" | tail -5
bench_rc=${PIPESTATUS[0]}
"$PYTHON" -m fastlocal.bench.report "$OUT_DIR/fast_path.json" --out "$OUT_DIR/fast_path" --no-plots >/dev/null \
    && cat "$OUT_DIR/fast_path/bench.md"

mkdir -p "$OUT_DIR/kernels"
timeout --signal=INT --kill-after=5 "${KERNELS_S:-70}" "$PYTHON" -m pytest bench/test_bench_kernels.py \
    -k "batch_norm and not call" \
    --benchmark-only --benchmark-max-time=0.25 --benchmark-json="$OUT_DIR/kernels/kernels.json" -q -p no:cacheprovider \
    2>&1 | tee "$OUT_DIR/kernels.log" | tail -3
kernels_rc=${PIPESTATUS[0]}
"$PYTHON" -m fastlocal.bench.report "$OUT_DIR/kernels/kernels.json" --no-plots >/dev/null \
    && grep -A 20 "^## Kernel launch shapes" "$OUT_DIR/kernels/bench.md"

conv_rc=0
if [ "${CONV_S:-0}" != 0 ]; then
  timeout --signal=INT --kill-after=5 "$CONV_S" "$PYTHON" -m pytest experimental/triton_conv/test_bench_conv.py \
      --benchmark-only --benchmark-max-time=0.25 --benchmark-json="$OUT_DIR/kernels/conv.json" -q -p no:cacheprovider \
      2>&1 | tee "$OUT_DIR/conv.log" | tail -3
  conv_rc=${PIPESTATUS[0]}
  "$PYTHON" -m fastlocal.bench.report "$OUT_DIR/kernels/conv.json" --out "$OUT_DIR/conv" --no-plots >/dev/null \
      && grep -A 12 "^## Triton convolution against cuDNN" "$OUT_DIR/conv/bench.md"
fi

train_rc=0
if [ "${TRAIN_S:-105}" != 0 ]; then  # `timeout 0` would mean no limit at all
  timeout --signal=INT --kill-after=5 "${TRAIN_S:-105}" "$PYTHON" bench/fast_path_training.py --out "$OUT_DIR/training" \
      --epochs 3 --no-plot 2>&1 | tee "$OUT_DIR/training.log" | grep -v "^\["
  train_rc=${PIPESTATUS[0]}
fi
rm -f "$OUT_DIR"/training/*/checkpoint.pt  # tens of MB each; the metrics and summaries stay
echo "gpu_fast_path_check.sh: tests rc $tests_rc, bench rc $bench_rc, kernels rc $kernels_rc, conv rc $conv_rc," \
    "training rc $train_rc; results in $OUT_DIR"
exit $(( tests_rc != 0 || bench_rc != 0 || kernels_rc != 0 || conv_rc != 0 || train_rc != 0 ))
