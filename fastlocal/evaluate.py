"""`python -m fastlocal.evaluate RUN`: a trained run's network on its own test set or on another dataset's.

    python -m fastlocal.evaluate runs/bp                                    # = summary.json's final accuracy
    python -m fastlocal.evaluate runs/bp --data.source=stl10 --data.root=/data/stl10   # the paper's Table 6

Prints the accuracy and per-class accuracy and writes evaluation.json and confusion.png to --out (default
RUN/evaluation-<source>). How classes are matched and images resized: fastlocal/evaluation.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastlocal.config import UserError, build_config, exits_2_on_user_error, parse_overrides

USAGE_EXAMPLES = """examples:
  python -m fastlocal.evaluate runs/bp                      # its own test set (the accuracy of summary.json)
  python -m fastlocal.evaluate runs/bp --data.source=stl10 --data.root=/data/stl10      # CIFAR-10 -> STL-10
  python -m fastlocal.evaluate runs/bp --data.source=imagefolder --data.root=my.tar.gz --out eval/bp
"""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fastlocal.evaluate",
        description="Test a trained run's network (its checkpoint) on its own test set, or, with --data.* options, "
        "on another dataset's test split: classes matched by name, images resized to the run's input size.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="a run directory written by fastlocal.train (with checkpoint.pt)")
    parser.add_argument(
        "--out", help="directory for evaluation.json and confusion.png (default RUN/evaluation-<source>)"
    )
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward (default 500)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto (default), cuda, cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars while reading images")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    for item in overrides:
        if not item.startswith("data."):
            raise UserError(
                f"--{item.split('=')[0]}: only data.* options choose what to evaluate on (the model is the run's); "
                "drop it"
            )
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    return args, overrides


@exits_2_on_user_error
def main(argv: list[str] | None = None) -> int:
    from fastlocal.evaluation import describe, draw_confusion, evaluate_run
    from fastlocal.methods import METHODS

    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available; use --device auto or cpu")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    # Another dataset: the default data config with the given data.* options (none of the run's own).
    data = build_config(None, overrides, METHODS).data if overrides else None
    result = evaluate_run(args.run, data, device, batch_size=args.batch_size, progress=not args.no_progress)
    source = result["dataset"]["source"]
    out = Path(args.out or Path(args.run) / f"evaluation-{source}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    print(describe(result))
    try:
        draw_confusion(result, out / "confusion.png")
        result["figure"] = "confusion.png"
    except ImportError:
        missing = "matplotlib is not installed, so no confusion.png; pip install 'fastlocal[analysis]'"
        print(f"fastlocal.evaluate: {missing}")
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'evaluation.json'}" + (f", {out / 'confusion.png'}" if "figure" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
