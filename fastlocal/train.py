"""`python -m fastlocal.train`: parse config -> build -> run -> close.

With no arguments it runs the quick start: the bundled CIFAR-10 subset, offline, a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fastlocal.config import Config, UserError, build_config, parse_overrides, resume_config, to_toml

LOCK_NAME = "run.lock"

USAGE_EXAMPLES = """examples:
  python -m fastlocal.train                                   # the quick start
  python -m fastlocal.train --config configs/dgl_resnet32_k8_cifar10.toml --out runs/dgl
  python -m fastlocal.train --config FILE --method.num_modules=8 --train.epochs=2 --out runs/k8
  python -m fastlocal.train --resume runs/dgl                 # continue an interrupted run
  python -m fastlocal.train --resume runs/dgl --train.epochs=8  # train longer (the LR schedule changes)
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
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last checkpoint, with the config saved in it; only "
        "log.*, data.cache_dir and train.epochs may be overridden",
    )
    parser.add_argument(
        "--show-config",
        action="store_true",
        help="print the resolved config (every section and field) as TOML and exit",
    )
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(rest)


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


def run(cfg: Config, out_dir: Path, checkpoint: dict | None = None, log=print) -> dict:
    """Build everything from `cfg`, continue from `checkpoint` if given (see `fastlocal.engine.read_checkpoint`),
    train, and write `out_dir`. Returns the summary."""
    from fastlocal import distributed
    from fastlocal.data import build_data
    from fastlocal.engine import Trainer
    from fastlocal.models.cifar_resnet import use_fused_batch_norm
    from fastlocal.plan import build_model, describe_leaps
    from fastlocal.split import describe_split

    device = resolve_device(cfg.system.device)
    # Data parallel under torchrun (fastlocal.distributed): one process per device, train.batch_size is global.
    parallel, mesh, rank, world_size, batch_size = None, None, 0, 1, cfg.train.batch_size
    mode = distributed.resolve_parallel(cfg.system.parallel)
    if mode in ("modules", "hybrid"):  # pipeline (fastlocal.pipeline): every stage reads the data, stage 0 uses it
        from fastlocal.pipeline import check_pipeline, hybrid_mesh, hybrid_replicas

        check_pipeline(cfg)
        if mode == "hybrid":  # D = W/S replicas of the pipeline, each on its shard of every global batch
            replicas = hybrid_replicas(int(os.environ["WORLD_SIZE"]), cfg.system.pipeline_stages)
            batch_size = distributed.per_rank_batch(cfg.train.batch_size, replicas)
        parallel, device = distributed.init_data_parallel(device)
        if mode == "hybrid":
            mesh = hybrid_mesh(cfg.system.pipeline_stages, device)
            rank, world_size = mesh.replica, mesh.num_replicas
        if not parallel.is_main:
            log = distributed.silent_log
    elif mode == "data":
        batch_size = distributed.per_rank_batch(cfg.train.batch_size, int(os.environ["WORLD_SIZE"]))
        distributed.check_options(cfg, device)
        parallel, device = distributed.init_data_parallel(device)
        rank, world_size = parallel.rank, parallel.world_size
        if not parallel.is_main:
            log = distributed.silent_log
    elif cfg.system.sync_batch_norm:
        warnings.warn(
            "system.sync_batch_norm = true applies to data-parallel runs only; this run has one process", stacklevel=2
        )
    if cfg.system.num_threads:
        torch.set_num_threads(cfg.system.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.system.seed)
    data = build_data(
        cfg.data,
        batch_size=batch_size,
        eval_batch_size=cfg.train.eval_batch_size,
        device=device,
        seed=cfg.system.seed,
        drop_last=cfg.train.drop_last,
        progress=cfg.log.progress and (parallel is None or parallel.is_main),
        rank=rank,
        world_size=world_size,
    )
    learner = build_model(cfg, data.info.num_classes, data.info.image_size, data.info.mean, data.info.std)
    backbone, modules, method = learner.backbone, learner.local_modules, learner.method
    method.kernels = resolve_kernels(cfg.system.kernels, device)
    if cfg.system.fused_batch_norm == "true":
        enable_on_blocks(
            "system.fused_batch_norm",
            use_fused_batch_norm,
            backbone,
            method,
            method.kernels,
            cfg.model.arch,
            "the blocks run PyTorch's batch norm",
        )
    elif (
        cfg.system.fused_batch_norm == "auto"
        and device.type == "cuda"
        and method.kernels == "triton"
        and not (parallel is not None and cfg.system.sync_batch_norm)
    ):
        use_fused_batch_norm([backbone, method], "triton")  # nothing happens for backbones without CIFAR blocks
    memory_format = torch.channels_last if cfg.system.channels_last else torch.preserve_format
    backbone.to(device, memory_format=memory_format)
    method.to(device, memory_format=memory_format)
    if parallel is not None:
        if cfg.system.sync_batch_norm:
            distributed.use_sync_batch_norm(backbone, method)
        distributed.broadcast_from_rank0(backbone, method)
    if mode == "modules" and cfg.method.name == "bp":
        from fastlocal.pipelined_bp import PipelinedBackpropTrainer

        trainer = PipelinedBackpropTrainer(cfg, backbone, method, data, device, out_dir, parallel, log=log)
    elif mode in ("modules", "hybrid"):
        from fastlocal.pipeline import PipelineTrainer

        trainer = PipelineTrainer(cfg, backbone, modules, method, data, device, out_dir, parallel, log=log, mesh=mesh)
    else:
        trainer = Trainer(cfg, backbone, modules, method, data, device, out_dir, parallel)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        log(f"resuming {out_dir} after epoch {trainer.state.epoch}")
    log(
        f"{cfg.method.name} {cfg.model.arch} K={len(trainer.modules)} on {data.info.name} "
        f"({data.train.num_images} train / {data.test.num_images} test images) on {device}"
        + (f", rank 0 of {world_size} (data parallel; the image counts are per rank)" if mode == "data" else "")
        + (f", {parallel.world_size} pipeline stages" if mode == "modules" else "")
        + (
            f", {world_size} data replicas x {cfg.system.pipeline_stages} pipeline stages (the image counts are "
            "per replica)"
            if mode == "hybrid"
            else ""
        )
    )
    log(f"modules: {describe_split(backbone, [m.part_ids for m in trainer.modules])}")
    if getattr(method, "leaps_source", None):
        log(describe_leaps(cfg, method.leaps_source))
    summary = trainer.fit(log=log)
    log(
        f"final test accuracy {summary['final_test_acc']:.2f}% (best epoch, chosen on test: "
        f"{summary['best_test_acc']:.2f}%) in {summary['train_seconds']:.1f}s; run directory {out_dir}"
    )
    return summary


def enable_on_blocks(option: str, use, backbone, method, backend: str, arch: str, otherwise: str) -> None:
    """`option`=true, a Triton path of the CIFAR ResNet blocks (`use` sets it on them): set it, or say why
    it cannot be."""
    if backend != "triton":
        warnings.warn(
            f"{option}=true needs the Triton kernels (a CUDA device, or TRITON_INTERPRET=1 for the CPU "
            f"interpreter), but system.kernels resolved to {backend!r}: {otherwise}",
            stacklevel=2,
        )
    if use([backbone, method], backend) == 0:
        warnings.warn(
            f"{option}=true: model.arch={arch!r} has no CIFAR ResNet blocks; it applies to the CIFAR "
            "ResNets only, so nothing changes",
            stacklevel=2,
        )


@contextmanager
def locked_run_directory(out_dir: Path) -> Iterator[None]:
    """Create `out_dir` and hold an exclusive OS lock (flock on out_dir/run.lock) on it while the block runs,
    so one process at a time writes a run directory. The OS releases the lock when the process exits, however
    it exits (kill -9 included). Leftover .tmp files of a process killed mid-write are removed."""
    import fcntl

    if int(os.environ.get("RANK", "0")) != 0:  # data parallel under torchrun: rank 0 alone writes and locks
        yield
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock_file = (out_dir / LOCK_NAME).open("a+")
    except OSError as err:
        raise UserError(
            f"cannot use {out_dir} as the run directory ({err.strerror}: {err.filename}); choose an "
            "--out that is a writable directory or a path that does not exist yet"
        ) from None
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            raise UserError(
                f"{out_dir} is in use: fastlocal process {holder} is training in it; wait for it to end "
                "(or stop it), or choose another --out"
            ) from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        for stale in out_dir.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        yield


def main(argv: list[str] | None = None) -> int:
    from fastlocal.engine import CHECKPOINT_NAME, RunInterrupted, read_checkpoint
    from fastlocal.methods import METHODS

    argv = sys.argv[1:] if argv is None else argv
    out_dir = None
    try:
        args, overrides = parse_args(argv)
        if args.resume:
            if args.config or args.out:
                raise UserError(
                    "--resume DIR continues the run in DIR with the config saved in its checkpoint; "
                    "drop --config and --out (to start a new run from that config, pass "
                    "--config DIR/config.toml --out NEW_DIR)"
                )
            checkpoint_path = Path(args.resume) / CHECKPOINT_NAME
            if not checkpoint_path.is_file():
                raise UserError(
                    f"--resume {args.resume}: no {CHECKPOINT_NAME} there; pass the --out directory of "
                    "a run that finished at least one epoch"
                )
            if args.show_config:
                print(to_toml(resume_config(read_checkpoint(checkpoint_path)["config"], overrides, METHODS)))
                return 0
            out_dir = Path(args.resume)
        else:
            cfg = build_config(args.config, overrides, METHODS)
            if args.show_config:
                print(to_toml(cfg))
                return 0
            out_dir = Path(args.out or f"runs/{cfg.method.name}_{cfg.model.arch}_{time.strftime('%Y%m%d-%H%M%S')}")
        with locked_run_directory(out_dir):
            checkpoint = None
            if args.resume:  # read under the lock: no other process can replace the checkpoint meanwhile
                checkpoint = read_checkpoint(checkpoint_path)
                cfg = resume_config(checkpoint["config"], overrides, METHODS)
                check_resumed_epochs(checkpoint, cfg)
            elif (out_dir / CHECKPOINT_NAME).exists():
                raise UserError(
                    f"--out {out_dir} already holds a run; use --resume {out_dir} to continue it, "
                    "or choose another --out"
                )
            run(cfg, out_dir, checkpoint)
    except UserError as err:
        print(f"fastlocal: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RunInterrupted) as err:
        signum = err.signum if isinstance(err, RunInterrupted) else signal.SIGINT
        hint = f"python -m fastlocal.train --resume {out_dir}" if out_dir is not None else "--resume <run directory>"
        print(
            f"fastlocal: stopped by {signal.Signals(signum).name}; the last checkpoint holds the last finished "
            f"epoch (nothing partial was saved); continue with: {hint}",
            file=sys.stderr,
        )
        # 130 for both: a stop by the user or the scheduler is the same resumable interruption (the issue's
        # contract), and schedulers read any non-zero code as 'not finished'.
        return 130
    finally:
        from fastlocal.distributed import close

        close()  # data parallel: leave the process group (after an error too; torchrun ends the other ranks)
    return 0


def check_resumed_epochs(checkpoint: dict, cfg: Config) -> None:
    done, saved_epochs = checkpoint["state"]["epoch"], checkpoint["config"]["train"]["epochs"]
    if cfg.train.epochs < done:
        raise UserError(
            f"train.epochs = {cfg.train.epochs}, but the run has already finished {done} epochs; "
            f"pass --train.epochs={done} or more"
        )
    if cfg.train.epochs != saved_epochs:
        print(
            f"fastlocal: note: train.epochs changed from {saved_epochs} to {cfg.train.epochs}; the LR schedule of "
            f"the remaining epochs follows {cfg.train.epochs} epochs, so the weights will differ from a straight "
            f"{cfg.train.epochs}-epoch run",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
