#!/usr/bin/env bash
# Evidence of learning: BP, DGL (paper "K=16") and MLAAN (K=15) on ResNet-32 with one short recipe,
# on the JPEG CIFAR-10 archive. The GPU version is the short recipe of docs/method.md#recipes as shipped in
# configs/short_*_resnet32_cifar10jpeg.toml (15 epochs, batch 512, LR 0.4, full data);
# `--cpu` runs a smaller version that fits a 2-core CPU in well under an hour (10,000 training
# images, 2,000 test images, 6 epochs, batch 128, LR 0.1 = 0.4 * 128/512).
# Usage: bash scripts/learning_evidence.sh [--cpu] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
extra=()
if [ "${1:-}" = "--cpu" ]; then
  extra=(--data.max_train=10000 --data.max_test=2000 --train.epochs=6 --train.batch_size=128 --optim.lr=0.1)
  shift
fi
out=${1:-runs/evidence}
archive=${ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}
python=${PYTHON:-python}
for method in bp dgl mlaan; do
  rm -rf "$out/$method"
  "$python" -m fastlocal.train --config "configs/short_${method}_resnet32_cifar10jpeg.toml" \
    --data.root="$archive" --log.progress=false "${extra[@]}" --out "$out/$method"
done
"$python" - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"| method | K | final test acc (%) | best epoch, chosen on test (%) | train s | img/s | params |")
print("|---|---|---|---|---|---|---|")
for m in ("bp", "dgl", "mlaan"):
    s = json.loads((out / m / "summary.json").read_text())
    print(f"| {m} | {s['num_modules']} | {s['final_test_acc']:.2f} | {s['best_test_acc']:.2f} | "
          f"{s['train_seconds']:.0f} | {s['images_per_second']:.0f} | {s['num_parameters']:,} |")
print(f"device: {s['device']}, torch {s['torch_version']}")
PY
