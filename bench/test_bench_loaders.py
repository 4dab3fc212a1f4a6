"""Loader throughput: images per second decoded, augmented and delivered as normalised float32 batches on
the device, for the torch (PIL worker) loader and DALI with the CPU and the GPU (``mixed``) JPEG decoder.

One round is one epoch of a loader (training: RandomResizedCrop + flip; evaluation: resize + center crop),
ending with a device synchronisation; the first epoch is an untimed warm-up (PIL worker start-up, nvJPEG
allocations). Rates are whole epochs, so they include DALI's per-epoch pipeline build (reported apart as
the time to the first batch; on a 1.28M-image ImageNet epoch it is negligible, on a few thousand images
it is not: use epochs of several thousand images when comparing).

On a GPU machine (see bench/gpu_dali_check.sh, which installs DALI from carried wheels):

    python -m pytest bench/test_bench_loaders.py --benchmark-columns=median,iqr,rounds [--bench-data=DATA]
    PYTHONPATH=$PWD python bench/loaders.py --synthetic 4000 --crop 224 --resize 256 --json out.json

The second form (bench/loaders.py, which also holds the helpers used here) prints a table (and writes
JSON) for any image folder or archive (``--root``). Without CUDA the pytest file is a smoke check of the
harness on a few tiny JPEGs (the ``mixed`` cases skip):

    python -m pytest bench/test_bench_loaders.py --bench-mode=smoke --benchmark-disable
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from common import OPTIONS
from loaders import DEVICE, SMOKE, SPLITS, bench_config, loader_environment, make_jpeg_folder, run_epoch

from fastlocal.data import build_data

LOADER_CASES = [
    "torch",
    pytest.param("dali-cpu", marks=pytest.mark.dali),
    pytest.param("dali-mixed", marks=[pytest.mark.dali, pytest.mark.gpu]),
]

BENCH = dict(
    crop=32 if SMOKE else 224,
    resize=36 if SMOKE else 256,
    batch=8 if SMOKE else 256,
    workers=0 if SMOKE else (os.cpu_count() or 4),
    rounds=1 if SMOKE else 3,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    if OPTIONS.data:
        return Path(OPTIONS.data)
    if SMOKE:
        return make_jpeg_folder(tmp_path_factory.mktemp("bench") / "jpegs", 16, 8, size=(64, 48), num_classes=2)
    return make_jpeg_folder(tmp_path_factory.mktemp("bench") / "jpegs", 2048, 512)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", LOADER_CASES)
def test_loader_throughput(benchmark, dataset, tmp_path_factory, case, split):
    # DALI takes its CPU threads from num_workers; 0 (the smoke setting for torch) means 1 thread.
    cfg = bench_config(
        dataset,
        case,
        crop=BENCH["crop"],
        resize=BENCH["resize"],
        workers=BENCH["workers"],
        cache_dir=str(tmp_path_factory.getbasetemp() / "cache"),
    )
    bundle = build_data(
        cfg, batch_size=BENCH["batch"], eval_batch_size=BENCH["batch"], device=DEVICE, seed=0, progress=False
    )
    loader = bundle.train if split == "train" else bundle.test
    loader.set_epoch(0)
    run_epoch(loader)  # warm-up: workers, pipeline, decoder buffers
    epochs = iter(range(1, 1000))

    def one_epoch() -> dict:
        loader.set_epoch(next(epochs))
        return run_epoch(loader)

    result = benchmark.pedantic(one_epoch, rounds=BENCH["rounds"], iterations=1)
    assert result["images"] == loader.num_images
    benchmark.extra_info.update(loader_environment())
    benchmark.extra_info.update(
        case=case,
        split=split,
        images_per_epoch=loader.num_images,
        batch_size=BENCH["batch"],
        crop=BENCH["crop"],
        resize=BENCH["resize"],
        workers=BENCH["workers"],
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["images_per_s"] = round(loader.num_images / stats.stats.median, 1)
