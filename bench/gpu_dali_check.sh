#!/usr/bin/env bash
# GPU check of issue #7 (DALI data path), for one H100 machine (docs/gpu-evidence.md):
#   1. installs DALI from wheels carried in .whl/ (no internet there) into .site/;
#   2. runs tests/test_streaming.py (the `mixed` decoder test runs only with CUDA and DALI);
#   3. measures images/s of the torch loader, DALI `cpu` and DALI `mixed` on the JPEG CIFAR-10 archive
#      (.data/cifar10-jpeg.tar.gz, 32x32, crop 32) and on synthetic 500x375 JPEGs (crop 224, ImageNet-like);
#   4. prints a short table last; JSON and logs go to $OUT.
#
# Preparation on a machine with internet (the wheels are for Python 3.12, manylinux x86_64; the versions are
# those tested on CPU with Python 3.11):
#
#   mkdir -p .whl .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       -d .whl \
#       nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 \
#       nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 \
#       nvtx==0.2.17 optree==0.20.0 libcst==1.9.0 pyyaml==6.0.4
#   python -m pip download --no-deps --only-binary=:all: -d .whl \
#       makefun==1.16.0 astunparse==1.6.3 gast==0.7.0 six==1.17.0 packaging==26.3
#   (cd .whl && sha256sum *.whl > SHA256SUMS)
#   mkdir -p .whl/parts && for f in .whl/*.whl; do split -b 55M "$f" ".whl/parts/$(basename "$f").part-"; done
#
# .whl/ and .data/ are ignored (.gitignore), so they travel only when named in `carry`. Carry the parts a few
# at a time (under 64 MiB per call, each call naming only its own parts, e.g. `true` as the command) in quick
# succession so the machine stays warm, then run this script carrying .whl/SHA256SUMS and
# .data/cifar10-jpeg.tar.gz (not all of .data/, which may hold caches from CPU runs):
#
#   bash bench/gpu_dali_check.sh            # about 4 minutes on an H100 machine with 16 CPU cores
#
# On a CPU machine it runs too (the `mixed` rows are skipped): SMOKE=1 uses tiny sizes to test the script.
# STEPS=install,tests,bench (the default) picks steps, e.g. STEPS=bench to rerun only the measurements.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.data/out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FASTLOCAL_CACHE="$PWD/.data/cache"
export FASTLOCAL_CIFAR10_JPEG="$PWD/.data/cifar10-jpeg.tar.gz"
SMOKE="${SMOKE:-0}"
STEPS=",${STEPS:-install,tests,bench},"

# -- 1. DALI ----------------------------------------------------------------------------------------------
if [[ "$STEPS" == *,install,* ]] && ! "$PYTHON" -c "import nvidia.dali" 2>/dev/null; then
  if [ -d .whl/parts ]; then
    for first in .whl/parts/*.part-aa; do
      wheel=".whl/$(basename "${first%.part-aa}")"
      [ -f "$wheel" ] || cat "${first%.part-aa}".part-* > "$wheel"
    done
  fi
  if [ -f .whl/SHA256SUMS ]; then
    (cd .whl && sha256sum --check --quiet SHA256SUMS) || { echo "a reassembled wheel is incomplete: carry its missing parts" >&2; exit 2; }
  fi
  ls .whl/*.whl > /dev/null 2>&1 || { echo "no DALI wheels in .whl/ (see the preparation steps at the top)" >&2; exit 2; }
  "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target .site .whl/*.whl
  # The nvimgcodec/nvjpeg2k/nvtiff wheels ship nvidia/__init__.py, which would hide torch's nvidia/
  # packages in site-packages: make `nvidia` span every nvidia/ folder on sys.path.
  if [ -f .site/nvidia/__init__.py ]; then
    echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" > .site/nvidia/__init__.py
  fi
fi
"$PYTHON" -c "import nvidia.dali as d; print('DALI', d.__version__, 'from', d.__file__)" | tee "$OUT/versions.txt"
[[ "$STEPS" == *,tests,* || "$STEPS" == *,bench,* ]] || exit 0
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" \
  | tee -a "$OUT/versions.txt"

# -- 2. Tests (the mixed decoder test needs CUDA; everything else runs as on CPU) ------------------------
if [[ "$STEPS" == *,tests,* ]]; then
  "$PYTHON" -m pytest tests/test_streaming.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/test_streaming.txt" | tail -n 15 || true
fi
[[ "$STEPS" == *,bench,* ]] || exit 0

# -- 3. Throughput ------------------------------------------------------------------------------------------
rm -f "$OUT/loaders.json"
WORKERS="$(nproc)"
if [ "$SMOKE" = 1 ]; then
  CIFAR_LIMITS=(--max-train 600 --max-test 200 --epochs 1 --batch-size 64)
  SYNTHETIC=(--synthetic 64 --epochs 1 --batch-size 16)
else
  CIFAR_LIMITS=(--max-train 25000 --max-test 5000 --epochs 3 --batch-size 256)
  SYNTHETIC=(--synthetic 8000 --epochs 3 --batch-size 256)
fi
if [ -f .data/cifar10-jpeg.tar.gz ]; then
  "$PYTHON" bench/loaders.py --root .data/cifar10-jpeg.tar.gz --name cifar10-jpeg --crop 32 --resize 36 \
    "${CIFAR_LIMITS[@]}" --workers "$WORKERS" --cache-dir .data/cache --json "$OUT/loaders.json" 2>&1 \
    | tee "$OUT/bench_cifar.txt" || echo "the CIFAR-10 measurement failed (see $OUT/bench_cifar.txt)"
else
  echo "no .data/cifar10-jpeg.tar.gz: copy ../shared/data/cifar10-jpeg.tar.gz there and carry .data" | tee "$OUT/bench_cifar.txt"
fi
"$PYTHON" bench/loaders.py "${SYNTHETIC[@]}" --synthetic-dir .data/synthetic-jpegs --crop 224 --resize 256 \
  --workers "$WORKERS" --cache-dir .data/cache --json "$OUT/loaders.json" 2>&1 \
  | tee "$OUT/bench_synthetic.txt" || echo "the synthetic measurement failed (see $OUT/bench_synthetic.txt)"

# -- 4. Table -----------------------------------------------------------------------------------------------
echo
if [ -f "$OUT/test_streaming.txt" ]; then grep -E "passed|failed|error" "$OUT/test_streaming.txt" | tail -n 1 || true; fi
if [ -f "$OUT/loaders.json" ]; then "$PYTHON" bench/loaders.py table "$OUT/loaders.json" | tee "$OUT/table.txt"; fi
