"""Loader throughput, measured: synthetic photo-like JPEGs, one timed epoch of a loader, and a command that
prints a table for any image folder or archive (the pytest benchmark is bench/test_bench_loaders.py).

    PYTHONPATH=$PWD python bench/loaders.py --synthetic 4000 --crop 224 --resize 256 --json out.json
    PYTHONPATH=$PWD python bench/loaders.py --root DATA.tar.gz --crop 32 --resize 36 --json out.json
    PYTHONPATH=$PWD python bench/loaders.py table out.json [more.json ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import environment

from fastlocal.bench.report import markdown_table
from fastlocal.config import DataConfig
from fastlocal.data import build_data

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
    return DataConfig(
        source="imagefolder",
        root=str(root),
        max_train=max_train,
        max_test=max_test,
        cache_dir=cache_dir,
        loader=loader,
        dali_decoder=decoder,
        crop_size=crop,
        resize_size=resize,
        num_workers=workers,
    )


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


def loader_environment() -> dict:
    """The suite's environment plus the decoders' versions."""
    import PIL

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    return {**environment(DEVICE), "smoke": SMOKE, "pillow": PIL.__version__, "dali": dali_version}


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
    env = loader_environment()
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
    header = ["dataset", "loader", "split", "crop", "images", "img/s", "min", "max", "1st batch s"]
    cells = [
        [
            r["dataset"],
            r["case"],
            r["split"],
            r["crop"],
            r["images_per_epoch"],
            f"{r['images_per_s_median']:.0f}",
            f"{r['images_per_s_min']:.0f}",
            f"{r['images_per_s_max']:.0f}",
            f"{r['first_batch_s_median']:.2f}",
        ]
        for r in rows
    ]
    print("\n".join(markdown_table(header, cells)))
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
