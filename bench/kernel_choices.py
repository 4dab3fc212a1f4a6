"""What a kernel benchmark run says to ship: the fastest launch shape of the fused batch norm per stage
shape against the default, and (from experimental/triton_conv/test_bench_conv.py) the Triton 3x3
convolution against cuDNN.

    python bench/kernel_choices.py kernels.json

Reads the JSON of `pytest bench/test_bench_kernels.py --benchmark-json=...` (bench/gpu_fast_path_check.sh
writes OUT_DIR/kernels/kernels.json) and prints one Markdown table per question; medians only, so run it
on a GPU run (on CPU the smoke sizes say nothing).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _median_us(bench: dict) -> float:
    return bench["stats"]["median"] * 1e6


def batch_norm_lines(benchmarks: list[dict]) -> list[str]:
    by_shape: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in benchmarks:
        info = bench.get("extra_info") or {}
        if "launch_shape" in info:
            by_shape[info["shape"]][info["launch_shape"]] = _median_us(bench)
    if not by_shape:
        return []
    lines = ["| batch norm shape | shipped default us | fastest launch shape | its us | default / fastest |",
             "|---|---|---|---|---|"]
    for shape, times in sorted(by_shape.items()):
        best, best_us = min(times.items(), key=lambda kv: kv[1])
        default = times.get("default")
        lines.append(f"| {shape} | {f'{default:.1f}' if default else '?'} | {best} | {best_us:.1f} | "
                     f"{f'{default / best_us:.2f}' if default else '?'} |")
    return lines


def conv_lines(benchmarks: list[dict]) -> list[str]:
    cells: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for bench in benchmarks:
        info = bench.get("extra_info") or {}
        if "conv_pixels" not in info:
            continue
        name = "cudnn" if info["implementation"] == "eager" else f"triton-{info['conv_pixels']}"
        cells[(info["shape"], info["timing"])][name] = _median_us(bench)
    if not cells:
        return []
    lines = ["| convolution shape | timing | cuDNN us | fastest Triton tile | its us | cuDNN / Triton |",
             "|---|---|---|---|---|---|"]
    for (shape, timing), times in sorted(cells.items()):
        triton_times = {k: v for k, v in times.items() if k.startswith("triton")}
        if "cudnn" not in times or not triton_times:
            continue
        tile, best_us = min(triton_times.items(), key=lambda kv: kv[1])
        lines.append(f"| {shape} | {timing} | {times['cudnn']:.1f} | {tile.removeprefix('triton-')} pixels | "
                     f"{best_us:.1f} | {times['cudnn'] / best_us:.2f} |")
    return lines


def main(path: str) -> None:
    benchmarks = json.load(open(path))["benchmarks"]
    for lines in (batch_norm_lines(benchmarks), conv_lines(benchmarks)):
        if lines:
            print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
