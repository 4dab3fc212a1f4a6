"""Local modules on different CPU cores, measured: each pipeline stage one process pinned to its own core (one
thread), against the same method and model in one process on one core.

    PYTHONPATH=$PWD python bench/pipeline_cores.py --out DIR [--quick] [--repeats 3]

Cases (2 stages): dgl, infopro, mlaan-exact, mlaan-stale (pipeline.cascade), pipelined-bp (1F1B, against plain
backprop on one core). For every case the same data, seed, batch size, split and stage cut go to both runs:
the cut is the planner's partition of this machine's own measured module costs (fastlocal.parallel.cost,
measured in a process pinned to core 0), and the planner's predicted speed-up from the same costs is written
beside the measurement. Runs alternate (one core, two cores, one core, ...) and are repeated; the measured
speed-up is the ratio of the median training throughputs (images per second over the training epochs,
evaluation excluded, from each run's summary.json). DIR/pipeline_cores.json holds a list of cases, each with
`case`, `measured_speedup`, `predicted_speedup` (one core = 1), the stage cut and every run's throughput.

Read the numbers only from an otherwise idle machine with at least 2 cores: a busy core slows one stage and
the whole pipeline with it. --quick is a smoke size (ResNet-20, K=4, a few hundred images) that checks the
harness end to end in a few minutes; the default size is ResNet-32, K=16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "full": [
        "--model.arch=resnet32",
        "--method.num_modules=16",
        "--data.max_train=2560",
        "--train.batch_size=64",
        "--train.epochs=2",
    ],
    "quick": [
        "--model.arch=resnet20",
        "--method.num_modules=4",
        "--data.max_train=384",
        "--train.batch_size=32",
        "--train.epochs=1",
    ],
}
COMMON = [
    "--data.source=bundled",
    "--data.max_test=64",
    "--train.drop_last=true",  # pipelined BP's equal micro-batches; the same batches for every case
    "--system.device=cpu",
    "--system.num_threads=1",
    "--log.progress=false",
    "--log.measure_memory=false",
    "--pipeline.micro_batches=4",
]
# case -> (overrides of both runs, the one-core run's extra overrides, the profile entry that predicts it)
CASES = {
    "dgl": (["--method.name=dgl"], [], "dgl"),
    "infopro": (["--method.name=infopro"], [], "infopro"),
    "mlaan-exact": (["--method.name=mlaan", "--pipeline.cascade=exact"], [], "mlaan_exact"),
    "mlaan-stale": (["--method.name=mlaan", "--pipeline.cascade=stale"], [], "mlaan_stale"),
    "pipelined-bp": (["--method.name=bp"], ["--method.num_modules=1"], "pipelined_bp"),
}


# -- inside a run: pin, then train or profile ------------------------------------------------------------------
def pin_to_core() -> int:
    """Pin this process to core LOCAL_RANK (0 outside torchrun) of the ones it may use, with one torch thread."""
    import torch

    cores = sorted(os.sched_getaffinity(0))
    core = cores[int(os.environ.get("LOCAL_RANK", "0")) % len(cores)]
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    return core


def profile_costs(overrides: list[str], out: Path) -> None:
    """The planner's costs and predictions for 2 stages (DGL, MLAAN exact and stale, pipelined BP; InfoPro from its
    own module costs), measured on this pinned core; written to `out` as JSON."""
    import torch

    from fastlocal.build import build_learner, profile_pipeline
    from fastlocal.config import build_config
    from fastlocal.methods import METHODS
    from fastlocal.parallel.cost import measure_module_costs, predict_step
    from fastlocal.parallel.mesh import partition
    from fastlocal.schedule import forward_context_for

    cfg = build_config(None, [o.removeprefix("--") for o in overrides], METHODS)
    result = profile_pipeline(cfg, 10, 32, num_stages=2, micro_batches=cfg.pipeline.micro_batches)
    infopro = build_config(None, [o.removeprefix("--") for o in [*overrides, "--method.name=infopro"]], METHODS)
    torch.manual_seed(infopro.system.seed)
    learner = build_learner(infopro, 10, 32, (0.5,) * 3, (0.5,) * 3)
    info = type("Info", (), {"image_size": 32, "num_classes": 10, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    costs = measure_module_costs(
        learner.local_modules, learner.method, infopro, info, torch.device("cpu"), forward_context_for("cpu", "fp32")
    )
    sizes = partition([c["total"] for c in costs], 2)
    result["predicted"]["infopro"] = {"stage_sizes": sizes, **predict_step(costs, sizes, 1, "exact")}
    out.write_text(json.dumps({name: p for name, p in result["predicted"].items()}, indent=2) + "\n")


def worker(argv: list[str]) -> int:
    pin_to_core()
    if argv[0] == "--profile":
        profile_costs(argv[2:], Path(argv[1]))
        return 0
    from fastlocal.train import main

    return main(argv)


# -- the conductor -------------------------------------------------------------------------------------------
def run(command: list[str], out: Path) -> float:
    """Run one training command; its training images per second."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"$ {' '.join(command)}\n{result.stderr[-3000:]}\nthe run failed")
    return json.loads((out / "summary.json").read_text())["images_per_second"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="a new directory for the runs and pipeline_cores.json")
    parser.add_argument("--quick", action="store_true", help="a smoke size: checks the harness, proves nothing")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind per case (the median is used)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("pipeline_cores: this process may use fewer than 2 cores; nothing to measure", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=False)
    script = str(Path(__file__).resolve())
    base = [*COMMON, *SIZES["quick" if args.quick else "full"]]
    profile_file = args.out / "profile.json"
    subprocess.run(
        [sys.executable, script, "--worker", "--profile", str(profile_file), *base],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(script).parents[1])},
        check=True,
        timeout=3600,
    )
    predicted = json.loads(profile_file.read_text())
    load_before = os.getloadavg()
    cases = []
    for name in args.cases.split(","):
        both, single_only, entry = CASES[name]
        prediction = predicted[entry]
        cut = "--pipeline.stage_sizes=" + ",".join(map(str, prediction["stage_sizes"]))
        single_ips, pipeline_ips = [], []
        for rep in range(args.repeats):
            out = args.out / name / f"one-core-{rep}"
            single = [sys.executable, script, "--worker", *base, *both, *single_only, "--out", str(out)]
            single_ips.append(run(single, out))
            out = args.out / name / f"two-cores-{rep}"
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            staged = [*torchrun, script, "--worker", *base, *both, "--system.parallel=modules", cut, "--out", str(out)]
            pipeline_ips.append(run(staged, out))
        measured = statistics.median(pipeline_ips) / statistics.median(single_ips)
        cases.append(
            {
                "case": name,
                "measured_speedup": measured,
                "predicted_speedup": prediction["speedup"],
                "prediction_error": prediction["speedup"] / measured - 1,
                "stage_sizes": prediction["stage_sizes"],
                "one_core_images_per_second": single_ips,
                "two_cores_images_per_second": pipeline_ips,
            }
        )
        print(
            f"{name:<13} measured {measured:5.2f}x  predicted {prediction['speedup']:5.2f}x  "
            f"(one core {statistics.median(single_ips):.1f} img/s, two cores {statistics.median(pipeline_ips):.1f} "
            f"img/s, cut {prediction['stage_sizes']})",
            flush=True,
        )
    byname = {c["case"]: c for c in cases}
    if "dgl" in byname and "pipelined-bp" in byname:
        dgl, bp = byname["dgl"], byname["pipelined-bp"]
        ratio = statistics.median(dgl["two_cores_images_per_second"]) / statistics.median(
            bp["two_cores_images_per_second"]
        )
        print(f"dgl / pipelined-bp on the same two cores: {ratio:.2f}x")
    (args.out / "pipeline_cores.json").write_text(json.dumps(cases, indent=2) + "\n")
    meta = {
        "command": " ".join(["python bench/pipeline_cores.py", *(argv if argv is not None else sys.argv[1:])]),
        "size": base,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (args.out / "pipeline_cores_run.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"load average before {load_before[0]:.2f}, after {meta['load_average_after'][0]:.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    sys.exit(main())
