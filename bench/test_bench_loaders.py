"""Loader throughput: images per second decoded, augmented and delivered as normalised float32 batches on
the device, for the torch (PIL worker) loader and DALI with the CPU and the GPU (``mixed``) JPEG decoder.

One round is one epoch of a loader (training: RandomResizedCrop + flip; evaluation: resize + center crop),
ending with a device synchronisation; the first epoch is an untimed warm-up (PIL worker start-up, nvJPEG
allocations). Rates are whole epochs, so they include DALI's per-epoch pipeline build (reported apart as
the time to the first batch; on a 1.28M-image ImageNet epoch it is negligible, on a few thousand images
it is not: use epochs of several thousand images when comparing).

On a GPU machine (see bench/gpu_dali_check.sh, which installs DALI from carried wheels):

    python -m pytest bench/test_bench_loaders.py --benchmark-columns=median,iqr,rounds
    python bench/test_bench_loaders.py --synthetic 4000 --crop 224 --resize 256 --json out.json

The second form prints a table (and writes JSON) for any image folder or archive (``--root``). Without
CUDA the pytest file is a smoke check of the harness on a few tiny JPEGs (the ``mixed`` cases skip):

    python -m pytest bench/test_bench_loaders.py --benchmark-disable
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from fastlocal.config import DataConfig  # noqa: E402
from fastlocal.data import build_data  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
SMOKE = not HAS_CUDA  # tiny sizes: only the harness is being checked
CASES = {  # name -> (data.loader, data.dali_decoder)
    "torch": ("torch", "auto"),
    "dali-cpu": ("dali", "cpu"),
    "dali-mixed": ("dali", "mixed"),
}
SPLITS = ("train", "eval")


# --------------------------------------------------------------------------------------------------
# Data


def _write_jpeg(path: Path, seed: int, width: int, height: int, quality: int, grain: np.ndarray) -> int:
    """A photo-like JPEG: smooth colour fields plus grain, so entropy decoding costs what a photo's does
    (about 90 KB at 500x375, quality 90; ImageNet's files average about 110 KB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    top = int(rng.integers(0, grain.shape[0] - height + 1))
    left = int(rng.integers(0, grain.shape[1] - width + 1))
    pixels = np.asarray(base, dtype=np.int16) + grain[top : top + height, left : left + width]
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=quality)
    return path.stat().st_size


def make_jpeg_folder(
    root: Path, num_train: int, num_test: int, size=(500, 375), num_classes: int = 10, quality: int = 90
) -> Path:
    """train/<class>/*.jpg and test/<class>/*.jpg of synthetic photo-like JPEGs (written once; reused)."""
    root = Path(root)
    marker = root / f".complete-{num_train}-{num_test}-{size[0]}x{size[1]}-{num_classes}"
    if marker.is_file():
        return root
    jobs = []
    for split, count in (("train", num_train), ("test", num_test)):
        for k in range(num_classes):
            (root / split / f"class{k:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            # Alternate landscape and portrait, as ImageNet has both.
            width, height = size if i % 4 else (size[1], size[0])
            jobs.append((root / split / f"class{i % num_classes:03d}" / f"{i:06d}.jpg", len(jobs), width, height))
    # One grain tile, cropped at random per image: drawing normals per image would hold the GIL.
    side = max(size) + 64
    grain = np.random.default_rng(0).normal(0, 18, (side, side, 3)).round().astype(np.int16)
    # PIL releases the GIL while resizing and encoding, so threads use every core.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(lambda job: _write_jpeg(*job, quality, grain), jobs))
    marker.write_text("")
    return root


def bench_config(root, case: str, *, crop: int, resize: int, workers: int, max_train=0, max_test=0, cache_dir=""):
    loader, decoder = CASES[case]
    return DataConfig(source="imagefolder", root=str(root), max_train=max_train, max_test=max_test, cache_dir=cache_dir,
                      loader=loader, dali_decoder=decoder, crop_size=crop, resize_size=resize, num_workers=workers)


# --------------------------------------------------------------------------------------------------
# Timing


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def run_epoch(loader) -> dict:
    """One epoch: images, seconds, and the seconds until the first batch (DALI builds its pipeline then)."""
    _synchronize()
    start = time.perf_counter()
    first = None
    images = 0
    for x, _ in loader:
        if first is None:
            _synchronize()
            first = time.perf_counter() - start
        images += x.shape[0]
    _synchronize()
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "first_batch_s": first}


def measure(loader, epochs: int, warmup: int = 1) -> dict:
    """Median images/s over `epochs` timed epochs after `warmup` untimed ones."""
    for epoch in range(warmup):
        loader.set_epoch(epoch)
        run_epoch(loader)
    runs = []
    for epoch in range(warmup, warmup + epochs):
        loader.set_epoch(epoch)
        runs.append(run_epoch(loader))
    rates = [r["images_per_s"] for r in runs]
    return {
        "images_per_epoch": runs[0]["images"],
        "epochs": epochs,
        "images_per_s_median": statistics.median(rates),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "first_batch_s_median": statistics.median(r["first_batch_s"] for r in runs),
        "epoch_seconds": [round(r["seconds"], 4) for r in runs],
    }


def environment() -> dict:
    import PIL

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    return {
        "device": torch.cuda.get_device_name() if HAS_CUDA else f"cpu ({platform.machine()})",
        "cpu_count": os.cpu_count(),
        "smoke": SMOKE,
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "dali": dali_version,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------
# pytest-benchmark


BENCH = dict(
    crop=32 if SMOKE else 224,
    resize=36 if SMOKE else 256,
    batch=8 if SMOKE else 256,
    workers=0 if SMOKE else (os.cpu_count() or 4),
    rounds=1 if SMOKE else 3,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    if os.environ.get("FASTLOCAL_BENCH_ROOT"):
        return Path(os.environ["FASTLOCAL_BENCH_ROOT"])
    if SMOKE:
        return make_jpeg_folder(tmp_path_factory.mktemp("bench") / "jpegs", 16, 8, size=(64, 48), num_classes=2)
    return make_jpeg_folder(tmp_path_factory.mktemp("bench") / "jpegs", 2048, 512)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", list(CASES))
def test_loader_throughput(benchmark, dataset, tmp_path_factory, case, split):
    if case.startswith("dali") and not HAS_DALI:
        pytest.skip("nvidia.dali is not installed (pip install 'fastlocal[dali]')")
    if case == "dali-mixed" and not HAS_CUDA:
        pytest.skip("the mixed decoder needs CUDA")
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
    benchmark.extra_info.update(environment())
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


# --------------------------------------------------------------------------------------------------
# Table script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Images/s of the streaming loaders on one dataset.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", help="image folder or .tar/.tar.gz archive (train/<class>/*, test/<class>/*)")
    source.add_argument("--synthetic", type=int, metavar="N", help="generate N training JPEGs (N/4 test)")
    parser.add_argument("--synthetic-size", default="500x375", help="WxH of the synthetic JPEGs")
    parser.add_argument("--synthetic-dir", default=".data/synthetic-jpegs")
    parser.add_argument("--name", default=None, help="label of the dataset in the table")
    parser.add_argument("--cases", default="torch,dali-cpu,dali-mixed")
    parser.add_argument("--splits", default="train,eval")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 4, help="PIL workers / DALI threads")
    parser.add_argument("--max-train", type=int, default=0)
    parser.add_argument("--max-test", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--cache-dir", default="", help="data.cache_dir (archive extraction, image checks)")
    parser.add_argument("--json", help="write the results here (a list of rows, appended to an existing file)")
    args = parser.parse_args(argv)

    if args.synthetic:
        width, height = (int(v) for v in args.synthetic_size.lower().split("x"))
        start = time.perf_counter()
        root = make_jpeg_folder(Path(args.synthetic_dir), args.synthetic, max(1, args.synthetic // 4), (width, height))
        print(f"synthetic JPEGs in {root} ({time.perf_counter() - start:.1f}s)", flush=True)
        name = args.name or f"synthetic {width}x{height}"
    else:
        root = Path(args.root)
        name = args.name or root.name
    env = environment()
    rows = []
    for case in args.cases.split(","):
        if case.startswith("dali") and not HAS_DALI:
            print(f"{case}: skipped, nvidia.dali is not importable", flush=True)
            continue
        if case == "dali-mixed" and not HAS_CUDA:
            print(f"{case}: skipped, no CUDA device", flush=True)
            continue
        cfg = bench_config(
            root,
            case,
            crop=args.crop,
            resize=args.resize,
            workers=args.workers,
            max_train=args.max_train,
            max_test=args.max_test,
            cache_dir=args.cache_dir,
        )
        start = time.perf_counter()
        bundle = build_data(
            cfg, batch_size=args.batch_size, eval_batch_size=args.batch_size, device=DEVICE, seed=0, progress=False
        )
        setup = time.perf_counter() - start
        for split in args.splits.split(","):
            loader = bundle.train if split == "train" else bundle.test
            row = {
                "dataset": name,
                "case": case,
                "split": split,
                "crop": args.crop,
                "resize": args.resize,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "setup_seconds": round(setup, 2),
            }
            row.update(measure(loader, args.epochs))
            row.update(env)
            rows.append(row)
            print(
                f"{name:>24} {case:>11} {split:>5}: {row['images_per_s_median']:9.0f} img/s, first batch after "
                f"{row['first_batch_s_median']:.2f}s ({row['images_per_epoch']} images/epoch, {args.workers} "
                f"workers, {env['device']})",
                flush=True,
            )
        del bundle
    if args.json:
        path = Path(args.json)
        previous = json.loads(path.read_text()) if path.is_file() else []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(previous + rows, indent=2) + "\n")
    return 0


def print_table(paths: list[str]) -> None:
    """The short table of one or more JSON files written by main()."""
    rows = [row for p in paths for row in json.loads(Path(p).read_text())]
    print(
        f"{'dataset':>24} {'loader':>11} {'split':>5} {'crop':>5} {'images':>7} {'img/s':>8} {'min':>8} {'max':>8} "
        f"{'1st batch s':>11}"
    )
    for r in rows:
        print(
            f"{r['dataset']:>24} {r['case']:>11} {r['split']:>5} {r['crop']:>5} {r['images_per_epoch']:>7} "
            f"{r['images_per_s_median']:>8.0f} {r['images_per_s_min']:>8.0f} {r['images_per_s_max']:>8.0f} "
            f"{r['first_batch_s_median']:>11.2f}"
        )
    if rows:
        print(
            f"device: {rows[0]['device']}, {rows[0]['cpu_count']} CPUs, torch {rows[0]['torch']}, "
            f"DALI {rows[0]['dali']}, workers {rows[0]['workers']}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "table":
        print_table(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
