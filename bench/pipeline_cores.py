"""Local modules on different CPU cores, measured: each pipeline stage one process pinned to its own core (one
thread), against the same method and model in one process on one core.

    PYTHONPATH=$PWD python bench/pipeline_cores.py --out DIR [--quick] [--repeats 3] [--cases dgl,...] [--resume]

Cases (2 stages): dgl, infopro, mlaan-exact, mlaan-stale (pipeline.cascade), pipelined-bp (1F1B, against plain
backprop on one core). For every case the same data, seed, batch size, split and stage cut go to both runs:
the cut is the planner's partition of this machine's own measured module costs (fastlocal.parallel.cost,
measured in a process pinned to core 0), and the planner's predicted speed-up from the same costs is written
beside the measurement. Runs alternate (one core, two cores, one core, ...) and are repeated; the measured
speed-up is the ratio of the median training throughputs (images per second over the training epochs,
evaluation excluded, from each run's summary.json). DIR/pipeline_cores.json holds a list of cases, each with
`case`, `measured_speedup`, `predicted_speedup` (one core = 1), the stage cut, every run's throughput and the
median two-core run's per-stage timeline (fastlocal.parallel.timeline: compute, waits, sends); it is written
after every case, and --resume goes on in the same DIR, keeping its profile and finished runs.
DIR/pipeline_timeline.png draws the timelines (matplotlib).

Read the numbers only from an otherwise idle machine with at least 2 cores: a busy core slows one stage and
the whole pipeline with it. --quick is a smoke size (ResNet-20, K=4, a few hundred images) that checks the
harness end to end in a few minutes; the default size is ResNet-32, K=16 (stem separate), 1,280 images, batch
64, 2 epochs: about 55 minutes for every case on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "full": [
        "--model.arch=resnet32",
        "--method.num_modules=16",
        "--method.stem_separate=true",  # K = 16 on ResNet-32 (15 blocks): the stem is a module of its own
        "--data.max_train=1280",
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
def run(command: list[str], out: Path, resume: bool = False) -> dict:
    """Run one training command; its summary.json (images_per_second; a pipeline's stage_timeline). With
    `resume`, a run that finished before (its summary.json is there) is read, not run again."""
    if resume and (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    if out.exists():  # a run that a failure interrupted: start it again from nothing
        shutil.rmtree(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"$ {' '.join(command)}\n{result.stderr[-3000:]}\nthe run failed")
    return json.loads((out / "summary.json").read_text())


def median_run(summaries: list[dict]) -> dict:
    """The run whose throughput is the median (the upper one of an even count)."""
    ranked = sorted(summaries, key=lambda s: s["images_per_second"])
    return ranked[len(ranked) // 2]


def timeline_line(timeline: list[dict]) -> str:
    """'stage 0: compute 91%, send 2% | stage 1: ...' from a run's stage_timeline."""
    return " | ".join(
        f"stage {r['stage']}: "
        + ", ".join(f"{k.replace('_', ' ')} {100 * f:.0f}%" for k, f in r["fractions"].items() if f >= 0.005)
        for r in timeline
    )


def draw_timelines(cases: list[dict], path: Path) -> None:
    """One panel per case: each stage a lane, its kept steps as compute bars with the waits and sends drawn over
    them, on the clock both processes share (the median run of the case)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "step": "#4c72b0",
        "forward": "#55a868",
        "wait_input": "#dd8452",
        "wait_cotangent": "#c44e52",
        "wait_weights": "#8172b3",
        "send": "#937860",
    }
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 1.5 + 1.1 * len(cases)), squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        timeline = case["timeline"]
        spans = [s for r in timeline for s in r["spans"]]
        if not spans:
            continue
        # Show the steps every lane kept: from the latest first kept step to the earliest last one.
        start = max(min(s[1] for s in r["spans"]) for r in timeline if r["spans"])
        stop = min(max(s[2] for s in r["spans"]) for r in timeline if r["spans"])
        for r in timeline:
            lane = r["stage"]
            # Steps first: the waits and sends inside them are drawn over them.
            for kind, a, b in sorted(r["spans"], key=lambda span: span[0] != "step"):
                if b < start or a > stop:
                    continue
                height, base = (0.8, lane - 0.4) if kind == "step" else (0.5, lane - 0.25)
                colour = "#d0d0d0" if kind == "step" and case["case"] == "pipelined-bp" else colours[kind]
                ax.broken_barh([(1000 * (a - start), 1000 * (b - a))], (base, height), color=colour)
        ax.set_yticks([r["stage"] for r in timeline], [f"stage {r['stage']}" for r in timeline])
        ax.set_ylim(-0.6, len(timeline) - 0.4)
        ax.invert_yaxis()
        ax.set_xlim(0, 1000 * (stop - start))
        ax.set_title(f"{case['case']}: measured {case['measured_speedup']:.2f}x one core", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("milliseconds")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    labels = ["step (compute; pipelined BP: backward and waits)", *[k.replace("_", " ") for k in list(colours)[1:]]]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="a new directory for the runs and pipeline_cores.json")
    parser.add_argument("--quick", action="store_true", help="a smoke size: checks the harness, proves nothing")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind per case (the median is used)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument(
        "--resume", action="store_true", help="go on in an existing --out: keep its profile and its finished runs"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        print(f"pipeline_cores: unknown case {', '.join(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    if len(os.sched_getaffinity(0)) < 2:
        print("pipeline_cores: this process may use fewer than 2 cores; nothing to measure", file=sys.stderr)
        return 1
    if args.out.exists() and not args.resume:
        print(f"pipeline_cores: {args.out} exists; give a new --out, or --resume to go on there", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    script = str(Path(__file__).resolve())
    base = [*COMMON, *SIZES["quick" if args.quick else "full"]]
    profile_file = args.out / "profile.json"
    if not (args.resume and profile_file.exists()):
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
        singles, pipelines = [], []
        for rep in range(args.repeats):
            out = args.out / name / f"one-core-{rep}"
            single = [sys.executable, script, "--worker", *base, *both, *single_only, "--out", str(out)]
            singles.append(run(single, out, args.resume))
            out = args.out / name / f"two-cores-{rep}"
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            staged = [*torchrun, script, "--worker", *base, *both, "--system.parallel=modules", cut, "--out", str(out)]
            pipelines.append(run(staged, out, args.resume))
        single_ips = [s["images_per_second"] for s in singles]
        pipeline_ips = [s["images_per_second"] for s in pipelines]
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
                "one_core_train_seconds": [s["train_seconds"] for s in singles],
                "timeline": median_run(pipelines).get("stage_timeline", []),
            }
        )
        print(
            f"{name:<13} measured {measured:5.2f}x  predicted {prediction['speedup']:5.2f}x  "
            f"(one core {statistics.median(single_ips):.1f} img/s, two cores {statistics.median(pipeline_ips):.1f} "
            f"img/s, cut {prediction['stage_sizes']})",
            flush=True,
        )
        print(f"{'':<13} {timeline_line(cases[-1]['timeline'])}", flush=True)
        # After every case: a later case that fails leaves the earlier ones on disk (and --resume skips them).
        (args.out / "pipeline_cores.json").write_text(json.dumps(cases, indent=2) + "\n")
    byname = {c["case"]: c for c in cases}
    if "dgl" in byname and "pipelined-bp" in byname:
        dgl, bp = byname["dgl"], byname["pipelined-bp"]
        ratio = statistics.median(dgl["two_cores_images_per_second"]) / statistics.median(
            bp["two_cores_images_per_second"]
        )
        print(f"dgl / pipelined-bp on the same two cores: {ratio:.2f}x")
    (args.out / "pipeline_cores.json").write_text(json.dumps(cases, indent=2) + "\n")
    try:
        draw_timelines(cases, args.out / "pipeline_timeline.png")
    except ImportError:
        print("pipeline_cores: no matplotlib, so no pipeline_timeline.png (pip install fastlocal[analysis])")
    meta = {
        "command": " ".join(["python bench/pipeline_cores.py", *(argv if argv is not None else sys.argv[1:])]),
        "size": base,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "resumed": args.resume,  # runs read back from an earlier invocation ran under its load, not this one's
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
