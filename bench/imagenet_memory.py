"""Paper Table 3's ImageNet rows on shapes alone: BP against MLAAN at batch 128, 224x224, random data.

    PYTHONPATH=$PWD python bench/imagenet_memory.py [--json FILE] [--tiny]

For ResNet-34 (MLAAN K=16, the paper's "K=17"), ResNet-101 (K=33, "K=34") and ResNet-152 (K=50, "K=51"):
one training step as bench/common.py builds it (fp32 with TF32, cudnn.benchmark, the ImageNet reference's
window 3 and final weights), two untimed warm-up steps, one step for memory (max_memory_allocated,
max_memory_reserved and the process total from NVML, after the cache was emptied), then the median of three
timed steps. The paper's Table 3 cells (GB, a whole-process reading) stand beside them. The JSON is
rewritten after every case, so a run stopped by its time limit keeps the finished ones. --tiny: ResNet-34 at
64x64, batch 2, one timed step (a CPU check of the script; memory is then the CPU's saved-tensor bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

import common  # noqa: E402

# (arch, MLAAN K, paper's BP GB, paper's MLAAN GB): the paper's Table 3.
PAPER_TABLE3 = (("resnet34", 16, 10.74, 9.09), ("resnet101", 33, 20.64, 17.93), ("resnet152", 50, 26.29, 23.01))
WARMUP_STEPS = 2


def measure(case: common.Case, device, rounds: int) -> dict:
    common.free_device_memory(device)
    built = common.build(case, device)
    step = common.make_step(built)
    start = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        step()
    warmup_s = time.perf_counter() - start
    memory = common.measure_memory(built, step)
    median_s = common.time_steps(step, rounds)
    row = {
        "case": case.id,
        "arch": case.arch,
        "method": case.label,
        "K": case.num_modules,
        "batch": case.batch,
        "input_size": case.input_size,
        "kernels": built.kernels,
        "num_parameters": built.num_parameters,
        "median_step_ms": round(median_s * 1e3, 2),
        "warmup_seconds": round(warmup_s, 2),
        "memory": memory,
    }
    del built, step
    common.free_device_memory(device)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every case)")
    parser.add_argument("--tiny", action="store_true", help="ResNet-34 only, 64x64, batch 2 (a CPU check)")
    args = parser.parse_args(argv)
    device = common.bench_device("gpu" if common.HAS_CUDA else "cpu")
    batch, size, rounds = (2, 64, 1) if args.tiny else (128, 224, 3)
    rows = PAPER_TABLE3[:1] if args.tiny else PAPER_TABLE3
    result = {
        "environment": common.environment(device, "imagenet-memory"),
        "batch": batch,
        "input_size": size,
        "paper_table3_gb": {arch: {"bp": bp, "mlaan": mlaan} for arch, _, bp, mlaan in PAPER_TABLE3},
        "cases": [],
    }
    print(f"imagenet_memory: {result['environment']['device']}, batch {batch}, {size}x{size}", flush=True)
    for arch, k, _, _ in rows:
        for label, num_modules in (("bp", 1), ("mlaan", k)):
            case = common.Case(label, arch, num_modules, batch, size, arch)
            try:
                row = measure(case, device, rounds)
            except Exception as err:  # one case out of memory or broken: record it, measure the others
                traceback.print_exc()
                row = {"case": case.id, "arch": arch, "method": label, "K": num_modules, "error": repr(err)}
                common.free_device_memory(device)
            result["cases"].append(row)
            mem = row.get("memory", {})
            print(
                f"{case.id}: step {row.get('median_step_ms')} ms, memory "
                f"{ {k: v for k, v in mem.items() if k.endswith('bytes')} }",
                flush=True,
            )
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.json.with_suffix(".tmp")
                tmp.write_text(json.dumps(result, indent=1))
                os.replace(tmp, args.json)
    return 0 if all("error" not in row for row in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
