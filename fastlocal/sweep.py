"""`python -m fastlocal.sweep CONFIG... --seeds 0,1,2 --out DIR`: every config x seed as a run directory.

    python -m fastlocal.sweep configs/ablation_*.toml --seeds 0,1,2 --out runs/table4
    python -m fastlocal.sweep configs/ablation_*.toml --seeds 0,1,2 --out runs/table4 --list   # what it would do

Run DIR/<config name>/seed<S> is trained by `python -m fastlocal.train` with system.seed = S; finished runs are
skipped, interrupted ones resumed, so the same command completes a sweep. One run per local GPU at a time, or
one at a time on the CPU. `--task I` runs the I-th run only: one cluster array task (docs/reproduce.md).
"""

from __future__ import annotations

import argparse
import sys

from fastlocal.config import UserError, exits_2_on_user_error, parse_overrides

USAGE_EXAMPLES = """examples:
  python -m fastlocal.sweep configs/ablation_*.toml --seeds 0,1,2 --out runs/table4
  python -m fastlocal.sweep configs/bp_resnet32_cifar10.toml --seeds 0-2 --out runs/t1 --data.root=/data/cifar10
  python -m fastlocal.sweep CONFIG... --seeds 0,1,2 --out runs/x --list              # runs, states, commands
  python -m fastlocal.sweep CONFIG... --seeds 0,1,2 --out runs/x --task $SLURM_ARRAY_TASK_ID   # one array task
"""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fastlocal.sweep",
        description="Train every config with every seed, each as an ordinary fastlocal.train run directory "
        "OUT/<config name>/seed<S>; finished runs are skipped, interrupted ones resumed. Any config field can be "
        "set for every run as --section.key=value.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="TOML config files (see configs/)")
    parser.add_argument("--seeds", default="0", help="system.seed values: 0,1,2 or 0-2 (default 0)")
    parser.add_argument("--out", required=True, help="folder of the sweep's run directories")
    parser.add_argument(
        "--gpus",
        default="auto",
        help="auto (default: the GPUs CUDA_VISIBLE_DEVICES shows, else all), none (CPU), or ids such as 0,1; "
        "one run per GPU at a time",
    )
    parser.add_argument("--list", action="store_true", help="print the runs (number, state, directory, command)")
    parser.add_argument("--task", type=int, metavar="I", help="run only the I-th run of --list (1-based)")
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(rest)


@exits_2_on_user_error
def main(argv: list[str] | None = None) -> int:
    from fastlocal.sweeps import describe_runs, local_gpus, parse_seeds, plan_sweep, run_sweep

    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        runs = plan_sweep(args.configs, parse_seeds(args.seeds), args.out, overrides)
        if args.list:
            print(describe_runs(runs))
            return 0
        if args.task is not None:
            if not 1 <= args.task <= len(runs):
                raise UserError(f"--task {args.task}: the sweep has runs 1 to {len(runs)} (see --list)")
            runs = [runs[args.task - 1]]
        gpus = local_gpus(args.gpus)
        print(
            f"sweep: {len(runs)} runs in {args.out} ("
            + ", ".join(
                f"{n} {s}" for s in ("finished", "interrupted", "new") if (n := sum(r.state() == s for r in runs))
            )
            + "), "
            + (f"one per GPU at a time on GPUs {', '.join(gpus)}" if gpus else "one at a time")
        )
        outcomes = run_sweep(runs, gpus)
    except KeyboardInterrupt:
        print(
            "fastlocal: sweep stopped; every run keeps its last checkpoint. Run the same command again to "
            "continue (finished runs are skipped, interrupted ones resumed)",
            file=sys.stderr,
        )
        return 130
    failed = [o for o in outcomes if o.code != 0]
    if failed:
        print(
            f"fastlocal: {len(failed)} of {len(outcomes)} runs failed: "
            + "; ".join(f"{o.run.name} (exit {o.code}, log {o.run.out}/train.log)" for o in failed)
            + ". Fix the cause and run the same command again: finished runs are skipped",
            file=sys.stderr,
        )
        return 1
    print(f"sweep: all {len(runs)} runs finished in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
