"""Measured throughput of DGL's local pipeline against pipelined backprop on the same stages, side by side.

    PYTHONPATH=$PWD python bench/pipeline_throughput.py --out DIR [--stages 2] [--stage-sizes 2,2] [override ...]

Runs `torchrun --nproc_per_node=S -m fastlocal.train` twice with the same data, model, seed, batch size, K and
stage partition (any `--section.key=value` after the options goes to both runs):

- `dgl`: method.name=dgl, system.parallel=modules (fastlocal.parallel.pipeline: no stage waits for later ones);
- `pipelined_bp`: method.name=bp, system.parallel=modules (fastlocal.parallel.pipelined_bp: Schedule1F1B over
                  pipeline.micro_batches micro-batches, the stages cut at the same local-module boundaries).

and prints, from each run's summary.json, the measured training images per second (all epochs, evaluation
excluded) and the final test accuracy; DIR/pipeline_throughput.json keeps them. One run per method: on a
shared machine repeat it before reading much into a small gap. Nothing here is modelled
(`python -m fastlocal.plan --profile` is the model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULTS = [
    "--data.source=bundled",
    "--data.max_train=2560",
    "--data.max_test=500",
    "--model.arch=resnet20",
    "--method.num_modules=4",
    "--train.batch_size=64",
    "--train.epochs=2",
    "--system.device=cpu",
    "--system.num_threads=1",
    "--log.progress=false",
]
METHODS = {"dgl": ["--method.name=dgl"], "pipelined_bp": ["--method.name=bp"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="a directory for the two runs (must not hold them)")
    parser.add_argument("--stages", type=int, default=2, help="S: processes, one stage each")
    parser.add_argument(
        "--stage-sizes", default="2,2", help="modules per stage, both runs (empty: each partitioned by its own costs)"
    )
    parser.add_argument("--micro-batches", type=int, default=4, help="pipelined BP's pipeline.micro_batches")
    args, overrides = parser.parse_known_args(argv)
    common = [*DEFAULTS, f"--pipeline.micro_batches={args.micro_batches}", "--system.parallel=modules", *overrides]
    if args.stage_sizes:
        common.append(f"--pipeline.stage_sizes={args.stage_sizes}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = {}
    for name, method in METHODS.items():
        out = args.out / name
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.stages}"),
            *("-m", "fastlocal.train", *common, *method, "--out", str(out)),
        ]
        print("$", " ".join(command[1:]), flush=True)
        if subprocess.run(command, env=env).returncode != 0:
            print(f"{name}: the run failed (see its output above)", file=sys.stderr)
            return 1
        summary = json.loads((out / "summary.json").read_text())
        results[name] = {
            "images_per_second": summary["images_per_second"],
            "final_test_acc": summary["final_test_acc"],
            "pipeline_stages": summary["pipeline_stages"],
            "epochs": summary["epochs"],
            "device": summary["device"],
        }
    (args.out / "pipeline_throughput.json").write_text(json.dumps({"command": common, **results}, indent=2) + "\n")
    print(f"\n{'run':<14} {'stages (modules)':<22} {'img/s':>8} {'final test acc':>15}")
    for name, r in results.items():
        stages = " | ".join(f"{a}-{b}" for a, b in r["pipeline_stages"])
        print(f"{name:<14} {stages:<22} {r['images_per_second']:>8.1f} {r['final_test_acc']:>14.2f}%")
    dgl, bp = results["dgl"]["images_per_second"], results["pipelined_bp"]["images_per_second"]
    print(f"dgl / pipelined_bp throughput: {dgl / bp:.2f}x (measured, {results['dgl']['device']} per stage)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
