"""Activation memory of one training step of library models at their native input size, per method (CPU).

    python scripts/any_model_memory.py [--batch 8] [--archs torchvision:resnet50 torchvision:vit_b_16]

Counts, with fastlocal.measure.SavedTensorAccountant, the peak bytes of tensors saved for backward during one
`LocalLearner.step` (parameters and buffers excluded): the activation memory local learning saves. Prints a
Markdown table (docs/any_model.md quotes it).
"""

from __future__ import annotations

import argparse

import torch

import fastlocal
from fastlocal.measure import step_saved_bytes

ROWS = [
    ("bp", 1, {}),
    ("dgl", 4, {}),
    ("dgl", 4, {"split": "balanced"}),
    ("infopro", 4, {}),
    ("mlaan", 4, {}),
    ("mlaan", 4, {"split": "balanced"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--archs", nargs="+", default=["torchvision:resnet50", "torchvision:vit_b_16"])
    args = parser.parse_args()
    print(f"CPU saved-tensor peak of one step, batch {args.batch}, {args.size}x{args.size}, torch {torch.__version__}")
    print("\n| model | method | K | split | peak MiB | vs BP |\n|---|---|---|---|---|---|")
    for arch in args.archs:
        torch.manual_seed(0)
        backbone = fastlocal.build_backbone(arch, 1000, args.size)
        x = torch.randn(args.batch, 3, args.size, args.size)
        y = torch.randint(0, 1000, (args.batch,))
        bp = None
        for method, k, options in ROWS:
            learner = fastlocal.LocalLearner(backbone, method, k, **options)
            peak = step_saved_bytes(learner, x, y)
            learner.zero_grad(set_to_none=True)
            bp = bp or peak
            print(
                f"| {arch.removeprefix('torchvision:')} | {method} | {k} | {options.get('split', 'uniform')} | "
                f"{peak / 2**20:.0f} | {peak / bp:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
