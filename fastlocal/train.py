"""`python -m fastlocal.train`: parse config -> build -> run -> close.

With no arguments it runs the quick start: the bundled CIFAR-10 subset, offline, a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastlocal.config import (
    Config,
    UserError,
    build_config,
    exits_2_on_user_error,
    parse_overrides,
    resume_config,
    to_dict,
    to_toml,
)

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


def run(cfg: Config, out_dir: Path, checkpoint: dict | None = None, log=print) -> dict:
    """Build the run (fastlocal.build.build_run), continue from `checkpoint` if given (see
    `fastlocal.engine.read_checkpoint`), train, and write `out_dir`. Returns the summary."""
    from fastlocal.build import build_run
    from fastlocal.parallel.group import restart_count

    built = build_run(cfg, out_dir, log)
    trainer, log = built.trainer, built.log
    if checkpoint is not None:
        trainer.restore(checkpoint)
        if restart_count():
            log(f"torchrun restart {restart_count()}: the run continues from its last checkpoint")
        mid_epoch = trainer.state.mid_epoch
        at = (
            f"step {mid_epoch['step']} of epoch {trainer.state.epoch + 1}"
            if mid_epoch
            else f"epoch {trainer.state.epoch}"
        )
        log(f"resuming {out_dir} after {at}")
    for line in built.description:
        log(line)
    summary = trainer.fit(log=log)
    log(
        f"final test accuracy {summary['final_test_acc']:.2f}% (best epoch, chosen on test: "
        f"{summary['best_test_acc']:.2f}%) in {summary['train_seconds']:.1f}s; run directory {out_dir}"
    )
    return summary


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


@exits_2_on_user_error
def main(argv: list[str] | None = None) -> int:
    from fastlocal.engine import CHECKPOINT_NAME, RunInterrupted, read_checkpoint
    from fastlocal.methods import METHODS
    from fastlocal.parallel.group import PeerTimeout, restart_count

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
                if not restart_count():
                    raise UserError(
                        f"--out {out_dir} already holds a run; use --resume {out_dir} to continue it, "
                        "or choose another --out"
                    )
                # torchrun restarted the group after a process failed: this command wrote the checkpoint.
                checkpoint = read_checkpoint(out_dir / CHECKPOINT_NAME)
                if checkpoint["config"] != to_dict(cfg):
                    raise UserError(
                        f"torchrun restarted this command, but the checkpoint in --out {out_dir} was written with "
                        f"another config; continue that run with --resume {out_dir}, or choose another --out"
                    )
            run(cfg, out_dir, checkpoint)
    except PeerTimeout as err:  # not the user's input: a rank stopped answering
        print(f"fastlocal: error: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, RunInterrupted) as err:
        signum = err.signum if isinstance(err, RunInterrupted) else signal.SIGINT
        hint = f"python -m fastlocal.train --resume {out_dir}" if out_dir is not None else "--resume <run directory>"
        print(
            f"fastlocal: stopped by {signal.Signals(signum).name}; the last checkpoint holds the last finished "
            f"epoch (or step, with train.checkpoint_every); continue with: {hint}",
            file=sys.stderr,
        )
        # 130 for both: a stop by the user or the scheduler is the same resumable interruption (the issue's
        # contract), and schedulers read any non-zero code as 'not finished'.
        return 130
    finally:
        from fastlocal.parallel.group import close

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
