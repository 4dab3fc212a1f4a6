"""`python -m fastlocal.train`: parse config -> build -> run -> close.

With no arguments it runs the quick start: the bundled CIFAR-10 subset, offline, a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from fastlocal.config import Config, UserError, build_config, to_toml

USAGE_EXAMPLES = """examples:
  python -m fastlocal.train                                   # the quick start
  python -m fastlocal.train --config configs/dgl_resnet32_k8_cifar10.toml --out runs/dgl
  python -m fastlocal.train --config FILE --method.num_modules=8 --train.epochs=2 --out runs/k8
  python -m fastlocal.train --resume runs/dgl                 # continue an interrupted run
  python -m fastlocal.train --config FILE --show-config       # every field, resolved, as TOML
"""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fastlocal.train",
        description="Train a network with end-to-end or supervised local learning. "
        "Any config field can be set as --section.key=value.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="TOML config file (see configs/); defaults give the quick start")
    parser.add_argument("--out", help="run directory (default: runs/<method>_<arch>_<time>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    parser.add_argument("--show-config", action="store_true",
                        help="print the resolved config (every section and field) as TOML and exit")
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or "." not in item.split("=")[0]:
            raise UserError(f"unexpected argument {item!r}; config overrides look like --section.key=value "
                            "(run with --help for the options)")
        if "=" in item:
            overrides.append(item[2:])
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            overrides.append(f"{item[2:]}={rest[i + 1]}")
            i += 2
        else:
            raise UserError(f"override {item!r} has no value; write {item}=VALUE")
    return args, overrides


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("system.device = cuda, but no CUDA device is available; use system.device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_kernels(name: str, device: torch.device) -> str:
    from fastlocal.kernels import resolve_backend

    try:
        return resolve_backend(name, device)
    except ValueError as err:
        raise UserError(f"system.kernels = {name}: {err}") from None


def run(cfg: Config, out_dir: Path, resume: bool = False, log=print) -> dict:
    """Build everything from `cfg`, train, and write `out_dir`. Returns the summary."""
    from fastlocal.data import build_data
    from fastlocal.engine import CHECKPOINT_NAME, Trainer
    from fastlocal.methods import build_method
    from fastlocal.models import build_backbone
    from fastlocal.models.cifar_resnet import use_fused_batch_norm
    from fastlocal.split import describe_split, split_backbone

    device = resolve_device(cfg.system.device)
    if cfg.system.num_threads:
        torch.set_num_threads(cfg.system.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.system.seed)
    data = build_data(cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                      device=device, seed=cfg.system.seed, drop_last=cfg.train.drop_last,
                      progress=cfg.log.progress)
    backbone = build_backbone(cfg.model.arch, data.info.num_classes, data.info.image_size,
                              cfg.model.zero_init_residual)
    modules = split_backbone(backbone, cfg.method.num_modules, cfg.method.stem_separate, cfg.method.split)
    method = build_method(cfg, backbone, modules)
    method.kernels = resolve_kernels(cfg.system.kernels, device)
    if cfg.system.fused_batch_norm == "true":
        enable_on_blocks("system.fused_batch_norm", use_fused_batch_norm, backbone, method, method.kernels,
                         cfg.model.arch, "the blocks run PyTorch's batch norm")
    elif cfg.system.fused_batch_norm == "auto" and device.type == "cuda" and method.kernels == "triton":
        use_fused_batch_norm([backbone, method], "triton")  # nothing happens for backbones without CIFAR blocks
    memory_format = torch.channels_last if cfg.system.channels_last else torch.preserve_format
    backbone.to(device, memory_format=memory_format)
    method.to(device, memory_format=memory_format)
    trainer = Trainer(cfg, backbone, modules, method, data, device, out_dir)
    if resume:
        trainer.load_checkpoint(out_dir / CHECKPOINT_NAME)
        log(f"resuming {out_dir} after epoch {trainer.state.epoch}")
    log(f"{cfg.method.name} {cfg.model.arch} K={len(modules)} on {data.info.name} "
        f"({data.train.num_images} train / {data.test.num_images} test images) on {device}")
    log(f"modules: {describe_split(backbone, [m.part_ids for m in modules])}")
    summary = trainer.fit(log=log)
    log(f"final test accuracy {summary['final_test_acc']:.2f}% (best epoch, chosen on test: "
        f"{summary['best_test_acc']:.2f}%) in {summary['train_seconds']:.1f}s; run directory {out_dir}")
    return summary


def enable_on_blocks(option: str, use, backbone, method, backend: str, arch: str, otherwise: str) -> None:
    """`option`=true, a Triton path of the CIFAR ResNet blocks (`use` sets it on them): set it, or say why
    it cannot be."""
    if backend != "triton":
        warnings.warn(f"{option}=true needs the Triton kernels (a CUDA device, or TRITON_INTERPRET=1 for the CPU "
                      f"interpreter), but system.kernels resolved to {backend!r}: {otherwise}", stacklevel=2)
    if use([backbone, method], backend) == 0:
        warnings.warn(f"{option}=true: model.arch={arch!r} has no CIFAR ResNet blocks; it applies to the CIFAR "
                      "ResNets only, so nothing changes", stacklevel=2)


def main(argv: list[str] | None = None) -> int:
    from fastlocal.methods import METHODS

    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        if args.resume:
            from fastlocal.engine import CHECKPOINT_NAME

            out_dir = Path(args.resume)
            if not (out_dir / CHECKPOINT_NAME).is_file():
                raise UserError(f"--resume {out_dir}: no {CHECKPOINT_NAME} there; pass the --out directory of "
                                "a run that finished at least one epoch")
            if args.config:
                raise UserError("--resume takes the config saved in the run directory; drop --config "
                                "(overrides such as --train.epochs=N still apply)")
            cfg = build_config(out_dir / "config.toml", overrides, METHODS)
        else:
            cfg = build_config(args.config, overrides, METHODS)
            if args.show_config:
                print(to_toml(cfg))
                return 0
            out_dir = Path(args.out or f"runs/{cfg.method.name}_{cfg.model.arch}_{time.strftime('%Y%m%d-%H%M%S')}")
            if (out_dir / "checkpoint.pt").exists():
                raise UserError(f"--out {out_dir} already holds a run; use --resume {out_dir} to continue it, "
                                "or choose another --out")
        run(cfg, out_dir, resume=bool(args.resume))
    except UserError as err:
        print(f"fastlocal: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastlocal: interrupted; continue with --resume <run directory>", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
