#!/usr/bin/env bash
# GPU check of data parallelism (issue 15) on one CUDA machine, in about 3 minutes:
#   1. tests/test_distributed.py on CUDA: the CPU tests again, plus SyncBatchNorm's numbers (a data-parallel
#      step with system.sync_batch_norm equals the one-process step on the global batch; needs 2 GPUs, skipped
#      with one), hard stop 240 s;
#   2. a tiny torchrun training run on the bundled subset with one process per GPU (NCCL), which must write
#      summary.json with the world size, hard stop 180 s;
#   3. bench/test_bench_distributed.py under torchrun, one process per GPU: bytes all-reduced per step and per
#      module, and the exposed communication (last flush to optimizer step); one JSON per rank in OUT_DIR,
#      soft budget 90 s, hard stop 150 s.
#
#   bash bench/gpu_distributed_check.sh [OUT_DIR]      (OUT_DIR default: $OUT, else bench-results/gpu-dp)
#   run(command="PYTHONPATH=$PWD bash bench/gpu_distributed_check.sh $OUT", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench-results/gpu-dp}}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
echo "gpu_distributed_check.sh: $GPUS GPU(s)"

timeout --signal=INT --kill-after=10 240 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_distributed.py \
    2>&1 | tee "$OUT_DIR/dp-tests.log"
tests_rc=${PIPESTATUS[0]}

timeout --signal=INT --kill-after=10 180 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" \
    -m fastlocal.train --data.source=bundled --data.max_train=2000 --data.max_test=1000 --model.arch=resnet20 \
    --method.name=mlaan --method.num_modules=4 --train.epochs=2 --train.batch_size=$((128 * GPUS)) \
    --log.progress=false --out "$OUT_DIR/run" 2>&1 | tee "$OUT_DIR/dp-run.log"
run_rc=${PIPESTATUS[0]}
"$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1])); print('summary:', {k: s[k] for k in \
('world_size', 'parallel', 'final_test_acc', 'images_per_second', 'device')}); assert s['world_size'] == int(sys.argv[2])" \
    "$OUT_DIR/run/summary.json" "$GPUS" || run_rc=1

OUT_DIR="$OUT_DIR" timeout --signal=INT --kill-after=10 150 \
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" --no-python bash -c \
    "$PYTHON -m pytest -q -p no:cacheprovider bench/test_bench_distributed.py --bench-budget-s=${BENCH_BUDGET_S:-90} --benchmark-only \
     --benchmark-json=\$OUT_DIR/dp-bench-rank\$RANK.json" 2>&1 | tail -n 30 | tee "$OUT_DIR/dp-bench.log"
bench_rc=${PIPESTATUS[0]}
"$PYTHON" - "$OUT_DIR/dp-bench-rank0.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    exposed = e["exposed_communication_ms"]
    print(f"{e['case']:28s} world {e['world_size']}  step {1000 * b['stats']['median']:8.2f} ms  "
          f"all-reduced {e['allreduce_bytes_per_step'] / 2**20:8.2f} MiB/step  "
          f"exposed {'-' if exposed is None else f'{exposed:.3f} ms'}")
PY
echo "gpu_distributed_check.sh: tests $tests_rc, torchrun run $run_rc, bench $bench_rc"
exit $(( tests_rc || run_rc || bench_rc ))
