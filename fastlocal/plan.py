"""`python -m fastlocal.plan`: what a run would build (modules, leap lists, parameter counts), as JSON,
without training and without reading the data set.

Check a config before a long run with it:

    python -m fastlocal.plan --config configs/mlaan_resnet110_k32_cifar10.toml

With `--profile --stages S` it measures every module's cost on this device instead and prints the predicted
pipeline step for S stages (docs/pipeline.md).

`build_model` is the one place a run's model, split and method are built (`fastlocal.train` uses it too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastlocal.config import (
    IMAGENET_ARCHS,
    Config,
    DataConfig,
    UserError,
    build_config,
    parse_overrides,
    resolve_num_modules,
)

# (number of classes, image size) of the data sources whose shape is fixed: the plan needs both (the
# heads' widths, the feature-map sizes) but must not read the images to learn them.
SOURCE_SHAPES: dict[str, tuple[int, int]] = {
    "bundled": (10, 32),
    "cifar10": (10, 32),
    "svhn": (10, 32),
    "stl10": (10, 96),
}


def build_model(cfg: Config, num_classes: int, image_size: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
    """The `fastlocal.LocalLearner` (backbone, local modules, method) of a run with `cfg` on images of
    `image_size` pixels normalised with `mean`/`std`: the Python API's learner is what the CLI trains."""
    from fastlocal.learner import LocalLearner
    from fastlocal.models import build_backbone

    backbone = build_backbone(cfg.model.arch, num_classes, image_size, cfg.model.zero_init_residual)
    return LocalLearner.from_config(cfg, backbone, mean, std)


def describe_leaps(cfg: Config, source: str) -> str:
    """The run log's line on where the LAM leap lists came from."""
    if source == "preset":
        return (
            f"leap lists: preset (the authors' table for {cfg.model.arch} K={resolve_num_modules(cfg.method)}, "
            "written for this split)"
        )
    return (
        "leap lists: generated (fastlocal's rule; the authors wrote no table for this arch, K and split, "
        "see docs/method.md#splits-and-leap-tables)"
    )


def data_shape(data: DataConfig, arch: str, num_classes: int = 0, image_size: int = 0) -> tuple[int, int]:
    """(number of classes, image size) a run on `data` will see, from the config alone.

    A fixed-shape source answers from SOURCE_SHAPES. An image folder: the classes are its train/
    subfolders (counted, not read), the size is data.crop_size for the streaming loaders (torch, dali) or
    data.image_size; `num_classes` / `image_size` (> 0) answer where the config cannot."""
    if data.source in SOURCE_SHAPES:
        known_classes, known_size = SOURCE_SHAPES[data.source]
        return num_classes or known_classes, image_size or known_size
    if not image_size:
        streams = data.loader in ("torch", "dali") or (
            data.loader == "auto" and arch in IMAGENET_ARCHS and data.image_size == 0
        )
        image_size = data.crop_size if streams else data.image_size
    if not image_size:
        raise UserError(
            "the image size of this image folder is known only from its images; set data.image_size, "
            "data.loader=torch (which crops to data.crop_size), or pass --image-size N"
        )
    if not num_classes:
        train = Path(data.root).expanduser() / "train"
        if not train.is_dir():
            raise UserError(
                f"cannot count the classes of data.root = {data.root!r} without reading it (no folder "
                f"{train}); pass --num-classes N"
            )
        num_classes = sum(1 for p in train.iterdir() if p.is_dir())
    return num_classes, image_size


def plan(cfg: Config, num_classes: int, image_size: int) -> dict:
    """What a run with `cfg` builds: the modules' part names, the LAM leap lists by module, where they
    came from, and the trainable and frozen parameter counts (backbone, heads, LAM copies)."""
    torch.manual_seed(cfg.system.seed)
    learner = build_model(cfg, num_classes, image_size)
    backbone, modules, method = learner.backbone, learner.local_modules, learner.method
    names = [info.name for info in backbone.part_info]
    params = [*backbone.parameters(), *method.parameters()]
    return {
        "modules": [[names[p] for p in m.part_ids] for m in modules],
        "leaps": {str(i): [names[p] for p in parts] for i, parts in getattr(method, "leap_parts", {}).items()},
        "leaps_source": getattr(method, "leaps_source", None),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "frozen_parameters": sum(p.numel() for p in params if not p.requires_grad),
    }


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
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(rest)


def main(argv: list[str] | None = None) -> int:
    from fastlocal.methods import METHODS

    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        cfg = build_config(args.config, overrides, METHODS)
        num_classes, image_size = data_shape(cfg.data, cfg.model.arch, args.num_classes, args.image_size)
        if args.profile:
            from fastlocal.pipeline import profile

            if args.stages < 2 or args.micro_batches < 1 or args.link_gbps < 0:
                raise UserError("--profile needs --stages S with S >= 2 (and --micro-batches >= 1, --link-gbps >= 0)")
            result = profile(cfg, num_classes, image_size, args.stages, args.link_gbps, args.micro_batches)
        else:
            result = plan(cfg, num_classes, image_size)  # warnings go to stderr: stdout holds only the JSON
    except UserError as err:
        print(f"fastlocal: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
