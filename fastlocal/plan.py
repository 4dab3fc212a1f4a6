"""`python -m fastlocal.plan`: what a run would build (modules, leap lists, parameter counts), as JSON,
without training and without reading the data set.

Check a config before a long run with it:

    python -m fastlocal.plan --config configs/mlaan_resnet110_k32_cifar10.toml

With `--memory [--batch N]` it adds a training step's memory by component (`fastlocal.memory`). With
`--profile --stages S` it measures every module's cost on this device instead and prints the predicted
pipeline step for S stages (docs/pipeline.md).

What it prints is built by `fastlocal.build` (`plan`, `profile_pipeline`), the same path a run takes.
"""

from __future__ import annotations

import argparse
import json
import sys

from fastlocal.build import data_shape, plan, profile_pipeline
from fastlocal.config import UserError, build_config, exits_2_on_user_error, parse_overrides


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fastlocal.plan",
        description="Print, as JSON, what a run with this config would build (modules, leap lists, parameter "
        "counts), without training or reading data. Any config field can be set as --section.key=value.",
    )
    parser.add_argument("--config", help="TOML config file (see configs/)")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=0,
        help="classes of an image folder the plan cannot count (default: from the config)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="image size of an image folder the config does not fix (default: from the config)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="measure every module's cost on this device (DGL and MLAAN with this config) and print "
        "the predicted pipeline step and speed-up on --stages devices (docs/pipeline.md)",
    )
    parser.add_argument("--stages", type=int, default=0, help="pipeline stages for --profile")
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=0.0,
        help="the link between stages in Gbit/s for --profile (default: not modelled)",
    )
    parser.add_argument("--micro-batches", type=int, default=4, help="pipelined BP's micro-batches for --profile")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure a training step's memory by component (activations, parameters, gradients, "
        "optimizer, frozen, total; bytes) on this device at two small batches and extrapolate it to --batch",
    )
    parser.add_argument("--batch", type=int, default=0, help="batch size for --memory (default: train.batch_size)")
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(rest)


@exits_2_on_user_error
def main(argv: list[str] | None = None) -> int:
    from fastlocal.methods import METHODS

    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    cfg = build_config(args.config, overrides, METHODS)
    num_classes, image_size = data_shape(cfg.data, cfg.model.arch, args.num_classes, args.image_size)
    if args.profile:
        if args.stages < 2 or args.micro_batches < 1 or args.link_gbps < 0:
            raise UserError("--profile needs --stages S with S >= 2 (and --micro-batches >= 1, --link-gbps >= 0)")
        result = profile_pipeline(cfg, num_classes, image_size, args.stages, args.link_gbps, args.micro_batches)
    else:
        result = plan(cfg, num_classes, image_size)  # warnings go to stderr: stdout holds only the JSON
        if args.memory:
            from fastlocal.memory import step_memory_plan

            if args.batch < 0:
                raise UserError(f"--batch {args.batch}: give a positive batch size (0: train.batch_size)")
            result.update(step_memory_plan(cfg, num_classes, image_size, args.batch or cfg.train.batch_size))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
