"""`python -m fastlocal.export RUN --out FILE`: a run's trained backbone as a weights file of its model class.

The file holds the backbone without the auxiliary heads, LAMs or EMA copies, under the keys of the class the
run's model.arch builds (fastlocal's CIFAR ResNets, torchvision's or timm's models), so that class loads it
with no missing or unexpected key:

    python -m fastlocal.export runs/mlaan --out resnet18.safetensors      # pip install 'fastlocal[safetensors]'
    python -m fastlocal.export runs/mlaan --out resnet18.pt --format state_dict
    torchvision.models.resnet18(num_classes=10).load_state_dict(safetensors.torch.load_file("resnet18.safetensors"))

Data-parallel and pipeline runs write the one-device checkpoint, so they export the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastlocal.config import UserError, exits_2_on_user_error

FORMATS = ("safetensors", "state_dict")


def export_run(run: Path, num_classes: int = 0, input_size: int = 0) -> tuple[dict, str]:
    """(the exported state dict, model.arch) of the run directory or checkpoint file `run`."""
    from fastlocal.engine import CHECKPOINT_NAME, read_checkpoint
    from fastlocal.models.export import exported_state_dict

    path = run / CHECKPOINT_NAME if run.is_dir() else run
    if not path.is_file():
        raise UserError(f"{run}: no {CHECKPOINT_NAME} there; pass the --out directory of a run or its checkpoint file")
    checkpoint = read_checkpoint(path)
    arch = checkpoint["config"]["model"]["arch"]
    num_classes = num_classes or checkpoint["state"].get("num_classes", 0)
    input_size = input_size or checkpoint["state"].get("input_size", 0)
    if not num_classes or not input_size:
        raise UserError(
            f"{path} does not record the model's classes and input size (an older checkpoint); pass "
            "--num-classes N and --image-size N"
        )
    return exported_state_dict(arch, checkpoint["backbone"], num_classes, input_size), arch


def write_weights(state: dict, out: Path, fmt: str) -> None:
    from fastlocal.engine import save_atomic

    if fmt == "state_dict":
        save_atomic(state, out)
        return
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError(
            "--format safetensors needs safetensors, which is not installed: pip install 'fastlocal[safetensors]' "
            "(or write a torch state dict: --format state_dict)"
        ) from None
    from fastlocal.engine import write_atomic

    write_atomic(out, lambda tmp: save_file(state, str(tmp)))


@exits_2_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastlocal.export",
        description="Write a run's trained backbone (no auxiliary heads, LAMs or EMA copies) under the keys of "
        "its model class (fastlocal's CIFAR ResNets, torchvision or timm models).",
    )
    parser.add_argument("run", type=Path, help="a run directory (--out of fastlocal.train) or its checkpoint.pt")
    parser.add_argument("--out", type=Path, required=True, help="the weights file to write")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="safetensors, or a torch state dict (torch.load); default: safetensors for a .safetensors --out, "
        "else state_dict",
    )
    parser.add_argument("--num-classes", type=int, default=0, help="only for checkpoints that do not record it")
    parser.add_argument("--image-size", type=int, default=0, help="only for checkpoints that do not record it")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    fmt = args.format or ("safetensors" if args.out.suffix == ".safetensors" else "state_dict")
    state, arch = export_run(args.run, args.num_classes, args.image_size)
    write_weights(state, args.out, fmt)
    print(f"{args.out}: {len(state)} tensors of {arch} ({fmt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
