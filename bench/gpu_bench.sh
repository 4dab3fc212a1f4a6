#!/usr/bin/env bash
# Run the benchmark suite at the paper's sizes on one CUDA GPU, then write the report.
#
#   bash bench/gpu_bench.sh [OUT_DIR]        (OUT_DIR default: $OUT, else bench-results/gpu)
#
# Writes OUT_DIR/bench.json (pytest-benchmark), OUT_DIR/bench.md, memory_vs_k.png, step_time.png,
# memory_vs_batch.png, OUT_DIR/pytest.log and OUT_DIR/nvidia-smi.txt.
#
# Sizes (--bench-mode=gpu, bench/common.py): batch 1024 at 32x32 for ResNet-32 / ResNet-110 (every
# method and K of the step grid, BP with per-block checkpointing, BP in bf16), ImageNet ResNet-34 at batch
# 32 and 224x224, the ResNet-110 K=54 memory sweep at batch 128/256/512/1024, and the kernel benchmarks.
# Designed for about 5 minutes on one H100: the step cases first, then the sweep, then the kernels; a soft
# budget (--bench-budget-s=$BENCH_BUDGET_S, default 250 s) skips the cases that would start later, so the
# run still ends normally and writes its JSON, and `timeout` ($BENCH_TIMEOUT_S, default 330 s) is the
# hard stop. BENCH_MODE (default gpu) is passed as --bench-mode. Pass extra pytest arguments after OUT_DIR,
# e.g. `-k "resnet110 and not infopro"`.
#
# Without a GPU the same script checks its own plumbing at tiny sizes:
#   BENCH_MODE=smoke bash bench/gpu_bench.sh /tmp/bench-smoke
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench-results/gpu}}"
shift || true
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BENCH_MODE="${BENCH_MODE:-gpu}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-250}"
TIMEOUT_S="${BENCH_TIMEOUT_S:-330}"
mkdir -p "$OUT_DIR"

"$PYTHON" - "$BENCH_MODE" <<'EOF'
import importlib.util, sys
import torch
mode = sys.argv[1]
if mode == "gpu" and not torch.cuda.is_available():
    sys.exit("gpu_bench.sh: no CUDA device visible; on a CPU machine run BENCH_MODE=smoke or cpu")
missing = [m for m in ("pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_bench.sh: missing {', '.join(missing)}; pip install -e '.[dev,analysis]'")
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(f"gpu_bench.sh: mode {mode}, device {device}, torch {torch.__version__}", flush=True)
EOF

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
fi

# The step grid first (the headline numbers), then the sweep, then the kernels (without the batch norm's
# launch-shape sweep, a tuning aid that bench/gpu_fast_path_check.sh runs); rc 1 (a failed case) still
# leaves a JSON worth reporting, so the report runs unless pytest wrote none.
start=$(date +%s)
set +e
timeout --signal=INT --kill-after=15 "$TIMEOUT_S" "$PYTHON" -m pytest \
    bench/test_bench_steps.py bench/test_bench_memory.py bench/test_bench_kernels.py \
    --bench-mode="$BENCH_MODE" --bench-budget-s="$BENCH_BUDGET_S" \
    --benchmark-only --benchmark-json="$OUT_DIR/bench.json" --benchmark-max-time=0.25 \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name -p no:cacheprovider -q -rs -k "not launch_shapes" "$@" \
    2>&1 | tee "$OUT_DIR/pytest.log"
rc=${PIPESTATUS[0]}
set -e
echo "gpu_bench.sh: pytest exited with $rc after $(( $(date +%s) - start )) s"

if [ ! -s "$OUT_DIR/bench.json" ]; then
    echo "gpu_bench.sh: no $OUT_DIR/bench.json was written; see $OUT_DIR/pytest.log" >&2
    exit 1
fi
plots=()
"$PYTHON" -c "import matplotlib" 2>/dev/null || plots=(--no-plots)  # the GPU machine has no matplotlib
"$PYTHON" -m fastlocal.bench.report "$OUT_DIR/bench.json" --out "$OUT_DIR" "${plots[@]}"
exit "$rc"
