"""A training step's whole memory at the paper's batch sizes, by component, beside the paper's Table 3.

    python bench/memory_totals.py --out docs/bench/memory_totals       # writes .json (after every case) and .md
    python bench/memory_totals.py --out OUT/check --archs resnet32 --tiny  # a quick check of the script

For each backbone (ResNet-32 and ResNet-110 on CIFAR at batch 1024, ImageNet ResNet-34/101/152 at batch 128,
224x224, fp32 unless the row says bf16) and each method row (BP, per-block checkpointed BP, the same in bf16,
DGL, InfoPro, MLAAN as it trains by default and MLAAN with the lowest-memory exact options:
system.recompute=all and system.fused_optimizer_step=true): `fastlocal.memory.step_memory_plan`, i.e. one step
measured on this machine's device at two small batches and extrapolated to the paper's batch (on CPU the
activations are the saved-tensor accounting; parameters, gradients, optimizer state and frozen EMA copies are
the tensors' own bytes). K follows the paper's labels (docs/method.md#splits-and-leap-tables): ResNet-32
"K=16" is DGL/InfoPro K=16 with the stem separate and MLAAN K=15; ResNet-110 "K=55" is K=55 / K=54; ImageNet
"K=17", "K=34", "K=51" are K=16, 33, 50 (MLAAN with the ImageNet reference's window 3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from fastlocal.config import build_config
from fastlocal.memory import COMPONENTS, step_memory_plan
from fastlocal.methods import METHODS

# arch -> (batch, image size, classes, DGL/InfoPro K and stem_separate, MLAAN K, the paper's Table 3 GB (BP, MLAAN))
BACKBONES = {
    "resnet32": (1024, 32, 10, (16, True), 15, (3.37, 2.62)),
    "resnet110": (1024, 32, 10, (55, True), 54, (9.26, 2.76)),
    "resnet34": (128, 224, 1000, (16, False), 16, (10.74, 9.09)),
    "resnet101": (128, 224, 1000, (33, False), 33, (20.64, 17.93)),
    "resnet152": (128, 224, 1000, (50, False), 50, (26.29, 23.01)),
}
LOWEST = ["system.recompute=all", "system.fused_optimizer_step=true"]


def rows_for(arch: str) -> list[tuple[str, list[str]]]:
    _, _, _, (local_k, stem_separate), mlaan_k, _ = BACKBONES[arch]
    imagenet = arch in ("resnet34", "resnet101", "resnet152")
    local = [f"method.num_modules={local_k}", f"method.stem_separate={str(stem_separate).lower()}"]
    mlaan = [f"method.num_modules={mlaan_k}"]
    if imagenet:
        mlaan += ["mlaan.window=3", "mlaan.final_weights=1.0,0.999"]
    return [
        ("bp", ["method.name=bp"]),
        ("bp checkpointed", ["method.name=bp", "system.recompute=modules"]),
        ("bp checkpointed bf16", ["method.name=bp", "system.recompute=modules", "system.precision=bf16"]),
        (f"dgl K={local_k}", ["method.name=dgl", *local]),
        (f"infopro K={local_k}", ["method.name=infopro", *local]),
        (f"mlaan K={mlaan_k}", ["method.name=mlaan", *mlaan]),
        (f"mlaan K={mlaan_k} lowest", ["method.name=mlaan", *mlaan, *LOWEST]),
    ]


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def markdown(result: dict) -> str:
    lines = [
        "# A training step's memory by component, at the paper's batch sizes",
        "",
        f"Made by `{result['command']}` on {result['device']} (torch {result['torch']}), {result['date']}.",
        "",
        "GiB per component. Measured at two small batches (CIFAR 2 and 4, ImageNet 1 and 2) and "
        "extrapolated linearly to the batch shown (`fastlocal.memory`). On CPU the activations are the bytes "
        "saved for backward at the step's peak (the inputs recomputation keeps included), not an allocator "
        "reading, so workspaces, the cotangents in flight and the allocator's rounding are not in them (with "
        "--device cuda they are the allocator's peak during the step less the memory before it and the "
        "gradients); parameters, "
        "gradients (the most alive at once), optimizer state (SGD momentum) and frozen EMA copies are the "
        "tensors' bytes. total = their sum. `lowest` = system.recompute=all + "
        "system.fused_optimizer_step=true; `checkpointed` = system.recompute=modules (per-block "
        "checkpointing). The paper's Table 3 (GB, a whole-process reading on a GPU, CUDA context included) "
        "stands beside BP and MLAAN; compare the ratios, not the absolute numbers.",
        "",
    ]
    for arch, entry in result["backbones"].items():
        batch, size = entry["batch"], entry["image_size"]
        paper_bp, paper_mlaan = entry["paper_table3_gb"]
        lines += [
            f"## {arch}, batch {batch}, {size}x{size}",
            "",
            "| method | " + " | ".join(COMPONENTS) + " | total / BP | paper's Table 3 |",
            "|---|" + "---|" * (len(COMPONENTS) + 2),
        ]
        bp_total = entry["rows"].get("bp", {}).get("memory", {}).get("total")
        for label, row in entry["rows"].items():
            if "error" in row:
                lines.append(f"| {label} | " + " | ".join("-" for _ in COMPONENTS) + f" | - | error: {row['error']} |")
                continue
            memory = row["memory"]
            paper = (
                f"{paper_bp} GB"
                if label == "bp"
                else f"{paper_mlaan} GB"
                if label.startswith("mlaan") and "lowest" not in label
                else ""
            )
            share = f"{memory['total'] / bp_total:.2f}" if bp_total else "-"
            lines.append(f"| {label} | " + " | ".join(gib(memory[c]) for c in COMPONENTS) + f" | {share} | {paper} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json (after every case) and OUT.md")
    parser.add_argument("--archs", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--tiny", action="store_true", help="ResNet-20 at 16 px / ResNet-18 at 64 px (a check)")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out the rows whose label starts with these")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where to measure (cuda: the caching allocator's peak of each step, fastlocal.memory)",
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    command = "python bench/memory_totals.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "command": command,
        "device": args.device,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "backbones": {},
    }
    for arch in args.archs:
        batch, size, classes, _, _, paper = BACKBONES[arch]
        imagenet = size == 224
        small = (1, 2) if imagenet else (2, 4)
        run_arch = arch
        if args.tiny:
            run_arch, size = ("resnet18", 64) if imagenet else ("resnet20", 16)
        entry = {"batch": batch, "image_size": size, "paper_table3_gb": paper, "small_batches": small, "rows": {}}
        result["backbones"][arch] = entry
        for label, items in rows_for(arch):
            if any(label.startswith(prefix) for prefix in args.skip):
                continue
            if args.tiny and items[0] != "method.name=bp":
                items = [i for i in items if not i.startswith("method.num_modules")] + ["method.num_modules=4"]
            cfg = build_config(None, [f"model.arch={run_arch}", f"system.device={args.device}", *items], METHODS)
            start = time.perf_counter()
            try:
                plan = step_memory_plan(cfg, classes, size, batch, small_batches=small)
                entry["rows"][label] = {"config": items, **plan, "seconds": round(time.perf_counter() - start, 1)}
            except Exception as err:  # one case broken: record it, measure the others
                entry["rows"][label] = {"config": items, "error": repr(err)}
            total = entry["rows"][label].get("memory", {}).get("total")
            print(f"{arch} {label}: total {None if total is None else gib(total)} GiB", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, args.out.with_suffix(".json"))
            args.out.with_suffix(".md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
