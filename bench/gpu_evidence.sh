#!/usr/bin/env bash
# Issue 17's GPU evidence in two parts, one device call each, every hard stop inside a 520 s deadline
# (8 min 40 s; the device allows 10 min a call, the session 15 min in all: run one part per session).
#
#   bash bench/gpu_evidence.sh short [OUT_DIR]   point 1: the short recipe on all of CIFAR-10, BP, DGL K=16
#                                                (stem separate), MLAAN K=15 on ResNet-32, fast path and plain
#                                                fp32 path (six runs); issue 16's pipeline profile
#                                                (`fastlocal.plan --profile`, ResNet-110 K=54, 4 stages, ~60 s)
#   bash bench/gpu_evidence.sh long [OUT_DIR]    point 2: the paper's Table 1 recipe (batch 1024, LR 0.8,
#                                                schedule ref) for LONG_EPOCHS (100) epochs, MLAAN K=15 and BP
#                                                with the fast path; point 5: paper Table 3's ImageNet rows on
#                                                shapes (bench/imagenet_memory.py, batch 128, 224x224)
#   bash bench/gpu_evidence.sh memory [OUT_DIR]  issue 28 point 4: every component of a step's memory on CUDA
#                                                (bench/memory_totals.py --device cuda: BP, checkpointed BP fp32
#                                                and bf16, DGL, InfoPro, MLAAN default and lowest-memory, CIFAR
#                                                ResNet-32/110 at batch 1024, ImageNet ResNet-34/101/152 at 128)
#   TINY=1 bash bench/gpu_evidence.sh short|long|memory /tmp/ev   the same steps on the CPU at tiny sizes (256
#                                                training and 128 test images, 1 epoch; 2 for `long`)
#
# OUT_DIR (default $OUT, else .data/evidence-out) receives at most 5 files, as the device tool brings back at
# most 8: evidence-<part>.tgz (a folder per run: command.txt, config.toml, metrics.jsonl, summary.json,
# run.json with exit status and wall seconds, train.log; no checkpoints), evidence-<part>.md (the table,
# also printed last), evidence-<part>.json, evidence-<part>.log (everything printed) and nvidia-smi.txt.
# Here: `python scripts/collect_gpu_evidence.py unpack OUT_DIR/evidence-<part>.tgz` makes docs/results/<run>/.
#
# The data: ../shared/data/cifar10-jpeg.tar.gz copied to .data/ and carried (docs/gpu-evidence.md); the
# 60,000 JPEGs are decoded once into .data/cache (uint8) before the runs.
#
# Budget, from the H200 measurements in docs/bench/gpu/bench.md and docs/bench/gpu/fast-path-h200.md (batch
# 1024 steps: fp32 eager BP 47.7 ms, DGL K=16 57.1 ms, MLAAN K=15 137.8 ms; fast path BP 10.0 ms, MLAAN K=15
# 29.4 ms; bf16 eager MLAAN 130 ms for the partial last batch, which runs eagerly). A batch-512 step is
# taken as half a batch-1024 step (eager MLAAN is host-bound near 60 ms a step at batch 128, so at least
# that); an epoch adds evaluation of 10,000 images (~0.2 s) and a checkpoint; a process adds ~10 s of start,
# the first fast one ~30 s of Triton compilation (later ones read Triton's cache). Decoding: the archive
# took 30 s of one CPU core here (extraction 60 %), about 25 s with 8 decoding threads there.
#
#   part  step                                              estimate   hard stop
#   both  decode the archive into the uint8 cache               25 s        60 s
#   short fast BP       15 ep x (98 x 6 ms) + Triton compile    35 s        60 s
#   short fast DGL K=16 15 ep x (98 x 8 ms)                     35 s        60 s
#   short fast MLAAN    15 ep x (98 x 15 ms)                    50 s        90 s
#   short fp32 BP       15 ep x (98 x 24 ms)                    50 s        75 s
#   short fp32 DGL K=16 15 ep x (98 x 29 ms)                    57 s        80 s
#   short fp32 MLAAN    15 ep x (98 x 70 ms) = 7.2 s an epoch  120 s       180 s
#   short pipeline profile (plan --profile, K=54, batch 128)     60 s        90 s
#   short                                                     ~430 s       695 s, cut to the 520 s deadline
#   long  fast MLAAN  E ep x (48 x 29.4 ms + 0.12 s eager + 0.3 s)  E=100: 215 s   30 s + 2.6 s x E
#   long  fast BP     E ep x (48 x 10 ms + 0.02 s eager + 0.2 s)    E=100:  90 s   30 s + 1.1 s x E
#   long  ImageNet memory, 6 cases x 6 steps, autotuning, Triton     60 s       120 s
#   long  (E=100)                                             ~390 s       610 s, cut to the 520 s deadline
#
# Each step's hard stop is also cut to what is left of the deadline, so the whole part ends by then
# (plus 5 s of kill grace and a few seconds of packing). A run stopped early keeps metrics.jsonl of its
# finished epochs but has no summary.json; the table marks it. Knobs: BUDGET_S (520), LONG_EPOCHS (100;
# the hard stops scale with it), DATA_S (60), PYTHON (python3), ONLY (comma-separated run names: rerun only
# those, e.g. ONLY=short-mlaan-resnet32-plain; the ImageNet step then runs only if ONLY names imagenet-memory).
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-}"
case "$PART" in
  short|long|memory) ;;
  *) echo "usage: bash bench/gpu_evidence.sh short|long|memory [OUT_DIR]   (TINY=1 for the CPU check)" >&2; exit 2 ;;
esac
OUT_DIR="${2:-${OUT:-.data/evidence-out}}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
TINY="${TINY:-0}"
BUDGET_S="${BUDGET_S:-520}"
LONG_EPOCHS="${LONG_EPOCHS:-100}"
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FASTLOCAL_CACHE="$PWD/.data/cache"
unset TRITON_INTERPRET
RUNS=".data/evidence/$PART"   # relative, so each command.txt reads the same on any machine
# A rerun of some runs (ONLY) on the still-warm machine keeps the others, so its table and archive hold all.
[ -z "${ONLY:-}" ] && rm -rf "$RUNS"
mkdir -p "$RUNS"
LOG="$OUT_DIR/evidence-$PART.log"
exec > >(tee "$LOG") 2>&1

ARCHIVE=.data/cifar10-jpeg.tar.gz
[ -f "$ARCHIVE" ] || ARCHIVE=../shared/data/cifar10-jpeg.tar.gz
if [ ! -f "$ARCHIVE" ] && [ "$PART" != memory ]; then
  echo "gpu_evidence.sh: no .data/cifar10-jpeg.tar.gz; copy ../shared/data/cifar10-jpeg.tar.gz there and carry .data" >&2
  exit 2
fi

DATA=(--data.source=imagefolder "--data.root=$ARCHIVE" --data.normalize=cifar10)
SIZE=()
if [ "$TINY" = 1 ]; then
  SIZE=(--system.device=cpu --data.max_train=256 --data.max_test=128 --train.batch_size=64 --train.eval_batch_size=128)
  if [ "$PART" = short ]; then SIZE+=(--train.epochs=1); else LONG_EPOCHS=2; fi
fi
# The plain path: fp32, PyTorch everywhere (no Triton), eager, one stream. The fast path: bf16 autocast,
# channels_last, the step replayed from a CUDA graph, the side stream, the fused batch norm (Triton).
PLAIN=(--system.precision=fp32 --system.kernels=reference --system.cuda_graphs=false --system.cuda_streams=false
       --system.fused_batch_norm=false --system.channels_last=false)
FAST=(--system.precision=bf16 --system.channels_last=true --system.cuda_graphs=true --system.cuda_streams=true
      --system.fused_batch_norm=true)

# The hard stop of a step: what it asks for, cut to what is left of the deadline (0: no time left; never pass
# 0 to `timeout`, for which it means no limit).
limit() {
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  (( left < 0 )) && left=0
  echo $(( $1 < left ? $1 : left ))
}

# run_train NAME WANT_S ARGS...: one `python -m fastlocal.train` run in $RUNS/NAME under a hard stop (SIGINT:
# the engine stops between steps), with its command line, exit status and wall seconds beside it.
run_train() {
  local name=$1 want=$2
  shift 2
  local dir="$RUNS/$name" lim
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  lim=$(limit "$want")
  rm -rf "$dir"
  mkdir -p "$dir"
  local cmd=("$PYTHON" -m fastlocal.train "$@" "${SIZE[@]}" --log.progress=false --out "$dir")
  printf '%q ' "${cmd[@]}" > "$dir/command.txt"
  echo
  echo "== $name (hard stop $lim s): $(cat "$dir/command.txt")"
  local t0 rc
  t0=$(date +%s%N)
  if (( lim > 0 )); then
    timeout --signal=INT --kill-after=5 "$lim" "${cmd[@]}" > "$dir/train.log" 2>&1
    rc=$?
  else
    echo "no time left before the deadline: not run" > "$dir/train.log"
    rc=-1  # the table reads -1 as "not run"
  fi
  local wall_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '{"name": "%s", "rc": %d, "wall_seconds": %d.%03d, "hard_stop_s": %d}\n' "$name" "$rc" \
    $(( wall_ms / 1000 )) $(( wall_ms % 1000 )) "$lim" > "$dir/run.json"
  rm -f "$dir/checkpoint.pt"
  grep -E "^epoch|final test|Error|error:" "$dir/train.log" | tail -n 4
  echo "== $name: exit $rc after $(( wall_ms / 1000 )) s"
}

echo "gpu_evidence.sh $PART: $(date -u +%FT%TZ), deadline ${BUDGET_S} s, TINY=$TINY, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'device', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'CPUs', __import__('os').cpu_count())" \
  || "$PYTHON" -c "import torch; print('torch', torch.__version__, 'no triton')"
if command -v nvidia-smi > /dev/null 2>&1; then nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true; fi

# Decode the archive once (every run then loads the uint8 cache): timed, so the note can say what it cost.
# The memory part reads no images (random batches of the paper's shapes).
SHORT_CONFIG=configs/short_bp_resnet32_cifar10jpeg.toml
if [ "$PART" != memory ]; then
mkdir -p "$RUNS/data"
printf '%q ' "$PYTHON" scripts/collect_gpu_evidence.py decode --config "$SHORT_CONFIG" "${DATA[@]}" "${SIZE[@]}" \
  > "$RUNS/data/command.txt"
lim=$(limit "${DATA_S:-60}")
(( lim > 0 )) && timeout --signal=INT --kill-after=5 "$lim" "$PYTHON" scripts/collect_gpu_evidence.py decode --config "$SHORT_CONFIG" \
  "${DATA[@]}" "${SIZE[@]}" --json "$RUNS/data/decode.json"
echo "decode: exit $?"
fi

if [ "$PART" = short ]; then
  for path in fast plain; do
    if [ "$path" = fast ]; then SWITCHES=("${FAST[@]}"); WANT=(60 60 90); else SWITCHES=("${PLAIN[@]}"); WANT=(75 80 180); fi
    i=0
    for method in bp dgl mlaan; do
      run_train "short-$method-resnet32-$path" "${WANT[$i]}" --config "configs/short_${method}_resnet32_cifar10jpeg.toml" \
        "${DATA[@]}" "${SWITCHES[@]}"
      i=$((i + 1))
    done
  done
  # Issue 16's H200 profile: the pipeline throughput model fed with this GPU's measured module costs (modelled
  # 4 stages on an NVLink-class link; NCCL refuses two ranks on one GPU, so this is not a measured pipeline).
  if [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",pipeline-profile,"* ]]; then
    mkdir -p "$RUNS/pipeline-profile"
    PROFILE=(--model.arch=resnet110 --method.num_modules=54 --train.batch_size=128 --system.device=cuda)
    [ "$TINY" = 1 ] && PROFILE=(--model.arch=resnet20 --method.num_modules=8 --train.batch_size=16 --system.device=cpu)
    cmd=("$PYTHON" -m fastlocal.plan "${PROFILE[@]}" --profile --stages 4 --link-gbps 3600)
    printf '%q ' "${cmd[@]}" > "$RUNS/pipeline-profile/command.txt"
    lim=$(limit 90)
    echo
    echo "== pipeline-profile (hard stop $lim s): $(cat "$RUNS/pipeline-profile/command.txt")"
    (( lim > 0 )) && timeout --signal=INT --kill-after=5 "$lim" "${cmd[@]}" > "$RUNS/pipeline-profile/pipeline_profile.json"
    echo "== pipeline-profile: exit $?"
    "$PYTHON" -c "import json, sys; d = json.load(open(sys.argv[1])); print(json.dumps(d['predicted'], indent=1))" \
      "$RUNS/pipeline-profile/pipeline_profile.json" || true
  fi
elif [ "$PART" = memory ]; then
  # Two small batches per case on the GPU, extrapolated to the paper's batch (fastlocal.memory); the JSON is
  # written after every case, so a hard stop keeps what was measured.
  mkdir -p "$RUNS/memory-totals"
  TOTALS=(--device cuda)
  [ "$TINY" = 1 ] && TOTALS=(--device cpu --tiny --archs resnet32)
  printf '%q ' "$PYTHON" bench/memory_totals.py "${TOTALS[@]}" --out "$RUNS/memory-totals/memory_totals" \
    > "$RUNS/memory-totals/command.txt"
  lim=$(limit 480)
  echo "== memory-totals (hard stop $lim s): $(cat "$RUNS/memory-totals/command.txt")"
  (( lim > 0 )) && timeout --signal=INT --kill-after=5 "$lim" "$PYTHON" bench/memory_totals.py "${TOTALS[@]}" \
    --out "$RUNS/memory-totals/memory_totals"
  echo "== memory-totals: exit $?"
  cat "$RUNS/memory-totals/memory_totals.md" || true
else
  EPOCHS=(--train.epochs="$LONG_EPOCHS")
  run_train "table1-mlaan-k15-resnet32-fast-${LONG_EPOCHS}ep" $(( 30 + LONG_EPOCHS * 26 / 10 )) \
    --config configs/mlaan_resnet32_k15_cifar10.toml "${DATA[@]}" "${FAST[@]}" "${EPOCHS[@]}"
  run_train "table1-bp-resnet32-fast-${LONG_EPOCHS}ep" $(( 30 + LONG_EPOCHS * 11 / 10 )) \
    --config configs/bp_resnet32_cifar10.toml "${DATA[@]}" "${FAST[@]}" "${EPOCHS[@]}"
  if [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",imagenet-memory,"* ]]; then
    mkdir -p "$RUNS/imagenet-memory"
    IMAGENET=()
    [ "$TINY" = 1 ] && IMAGENET=(--tiny)
    printf '%q ' "$PYTHON" bench/imagenet_memory.py "${IMAGENET[@]}" > "$RUNS/imagenet-memory/command.txt"
    lim=$(limit 120)
    echo
    echo "== imagenet-memory (hard stop $lim s): $(cat "$RUNS/imagenet-memory/command.txt")"
    (( lim > 0 )) && timeout --signal=INT --kill-after=5 "$lim" "$PYTHON" bench/imagenet_memory.py "${IMAGENET[@]}" \
      --json "$RUNS/imagenet-memory/imagenet_memory.json"
    echo "== imagenet-memory: exit $?"
  fi
fi

# Pack and report (the table is printed last; the device tool's output_tail keeps the end).
tar czf "$OUT_DIR/evidence-$PART.tgz" -C .data/evidence "$PART"
"$PYTHON" scripts/collect_gpu_evidence.py table "$RUNS" --json "$OUT_DIR/evidence-$PART.json" \
  | tee "$OUT_DIR/evidence-$PART.md"
echo "gpu_evidence.sh $PART: done after $(( $(date +%s) - START )) s; files in $OUT_DIR"
