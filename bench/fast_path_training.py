"""Does the fast path train to the same accuracy? Short runs with it off and on, same data, same seed.

    PYTHONPATH=$PWD python bench/fast_path_training.py --out DIR [--epochs 4] [--no-plot] [override ...]

Runs `python -m fastlocal.train`'s code path three times (MLAAN ResNet-32 K=15 on the bundled CIFAR-10
subset by default; any `section.key=value` after the options overrides every run):

- `off`:       fp32, eager, PyTorch batch norm, one stream (the plain path: every switch false);
- `fp32-fast`: fp32 with the step replayed from a CUDA graph and the side stream (the same math as `off`;
               bitwise identity under deterministic convolutions is a unit test, tests/test_fast_path.py);
- `on`:        bf16 autocast + channels_last + CUDA graph + fused batch norm + streams.

Writes DIR/<variant>/ (each run's metrics.jsonl, summary.json), DIR/fast_path_training.json (per-epoch
train loss and test accuracy of every run, wall seconds) and DIR/fast_path_training.png when matplotlib is
there; prints the table. On a CPU the CUDA-only options fall back with their warnings (a plumbing check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

VARIANTS = {
    "off": ["system.cuda_graphs=false", "system.cuda_streams=false", "system.fused_batch_norm=false"],
    "fp32-fast": ["system.cuda_graphs=true", "system.cuda_streams=true", "system.fused_batch_norm=false"],
    "on": [
        "system.precision=bf16",
        "system.channels_last=true",
        "system.cuda_graphs=true",
        "system.fused_batch_norm=true",
        "system.cuda_streams=true",
    ],
}
DEFAULTS = [
    "data.source=bundled",
    "model.arch=resnet32",
    "method.name=mlaan",
    "method.num_modules=15",
    "train.batch_size=128",
    "log.progress=false",
]


def main(argv: list[str] | None = None) -> int:
    from fastlocal.config import build_config
    from fastlocal.methods import METHODS
    from fastlocal.train import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--no-plot",
        action="store_true",
        help="skip the PNG (matplotlib's first import on a fresh machine can take a minute)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = parser.parse_args(argv)
    results = {}
    for name, items in VARIANTS.items():
        cfg = build_config(None, [*DEFAULTS, f"train.epochs={args.epochs}", *args.overrides, *items], METHODS)
        out = args.out / name
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(cfg, out, log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[name] = {
            "overrides": items,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "train_loss": [row["train_loss"] for row in history],
            "test_acc": [row["test_acc"] for row in history],
            "warnings": sorted({str(w.message) for w in caught}),
        }
    (args.out / "fast_path_training.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    if not args.no_plot:
        plot(results, args.out / "fast_path_training.png")
    return 0


def print_table(results: dict) -> None:
    from fastlocal.bench.report import markdown_table

    names = list(results)
    header = ["epoch", *(f"{n} {what}" for n in names for what in ("loss", "acc %"))]
    cells = [
        [
            epoch + 1,
            *(
                cell
                for n in names
                for cell in (f"{results[n]['train_loss'][epoch]:.4f}", f"{results[n]['test_acc'][epoch]:.2f}")
            ),
        ]
        for epoch in range(len(results[names[0]]["train_loss"]))
    ]
    print("\n".join(markdown_table(header, cells)))
    print("wall seconds: " + ", ".join(f"{n} {results[n]['wall_seconds']}" for n in names))


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, r in results.items():
        epochs = range(1, len(r["train_loss"]) + 1)
        left.plot(epochs, r["train_loss"], marker="o", label=name)
        right.plot(epochs, r["test_acc"], marker="o", label=name)
    left.set(xlabel="epoch", ylabel="mean train loss (last module)", title="training loss")
    right.set(xlabel="epoch", ylabel="test accuracy %", title="test accuracy")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
