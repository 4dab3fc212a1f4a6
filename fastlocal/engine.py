"""The trainer: epochs, evaluation, checkpoints, logging, timing, the LR and the optimizer.

One step's forward and backward through the local schedule is `fastlocal.schedule.local_train_step`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from fastlocal.config import Config, UserError, cuda_option_on, to_dict, to_toml
from fastlocal.graphs import GraphedStep
from fastlocal.measure import SavedTensorAccountant, cuda_peak, device_name, parameter_storages, reset_peak
from fastlocal.methods import Batch, LocalMethod
from fastlocal.optim import build_optimizer, learning_rate, set_learning_rate, step_parameters
from fastlocal.parallel.data import GradientAverager, average_buffers, gather_buffers, load_buffers
from fastlocal.parallel.group import DataParallel, barrier, min_across_ranks, set_progress, silent_log, sum_across_ranks
from fastlocal.schedule import forward_context_for, local_train_step
from fastlocal.split import LocalModule
from fastlocal.tensorboard import ModuleLosses, TensorBoardLog

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = ("config", "backbone", "method", "optimizer", "state")
NONFINITE_CHECK_STEPS = 20
"""The loop reads the loss sum and the divergence flag from the device every this many steps (and at an
epoch's last step): a non-finite loss stops the run at most this many steps late, with one host sync per
check rather than per step."""


class NonFiniteLossError(UserError):
    pass


class RunInterrupted(Exception):
    """SIGINT or SIGTERM arrived: the run stopped between steps; the steps since the last checkpoint are lost."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@torch.no_grad()
def evaluate(backbone: torch.nn.Module, loader, channels_last: bool = False) -> float:
    """Top-1 accuracy (%) of the backbone's final head on `loader` (data parallel: on every rank's shard,
    the counts summed over ranks)."""
    was_training = backbone.training
    backbone.eval()
    correct = torch.zeros((), dtype=torch.int64, device=next(backbone.parameters()).device)
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += (backbone(x).argmax(1) == y).sum()
    backbone.train(was_training)
    counts = torch.stack([correct, torch.tensor(loader.num_images, device=correct.device)])
    correct, total = sum_across_ranks(counts)
    return 100.0 * correct.item() / total.item()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write` to path.tmp, then rename it over `path`, so a crash mid-write never corrupts the previous file.
    A failed write (a full disk, a read-only directory) removes the .tmp and becomes a UserError."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"cannot write {path}: {reason}; the previous {path.name}, if any, is unchanged. Free space "
            "on that disk or make the directory writable, then run again (--resume continues a run "
            "from its last checkpoint)"
        ) from None


def save_atomic(obj, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(text: str, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(obj, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2) + "\n", path)


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint without running code: `weights_only=True` unpickles tensors and plain containers,
    numbers and strings only, so a file carrying a pickled payload is refused, not executed."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise UserError(
                f"refusing to load {path}: besides tensors and plain values it names {found.group(1)}, which "
                "loading would call (code could run); use only checkpoints written by fastlocal"
            ) from None
        raise UserError(f"cannot read checkpoint {path}: it is corrupt or not a fastlocal checkpoint") from None
    except Exception as err:  # noqa: BLE001 -- a truncated or foreign file: say so, do not crash
        raise UserError(f"cannot read checkpoint {path}: {err}; it is corrupt or not a fastlocal checkpoint") from None
    if not isinstance(ckpt, dict) or not set(CHECKPOINT_KEYS) <= ckpt.keys():
        raise UserError(f"{path} is not a fastlocal checkpoint (it needs the entries {', '.join(CHECKPOINT_KEYS)})")
    return ckpt


def non_finite_tensors(obj, name: str = "") -> list[str]:
    """The dotted names of the floating-point tensors in a nested checkpoint that hold inf or nan."""
    if isinstance(obj, torch.Tensor):
        return [name] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    return [bad for key, value in items for bad in non_finite_tensors(value, f"{name}.{key}" if name else str(key))]


@dataclass
class RunState:
    """What a checkpoint restores besides the weights."""

    epoch: int = 0
    """Epochs completed."""
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    peak_memory: dict | None = None
    num_classes: int = 0
    input_size: int = 0
    """The backbone's classes and input size (what `fastlocal.export` rebuilds it with; 0: unknown, an older
    checkpoint)."""
    mid_epoch: dict | None = None
    """A step checkpoint's position in epoch `epoch` (train.checkpoint_every): {"step": steps taken,
    "loss_sum": their losses summed over ranks, "seconds": their time, "data_shards": the processes the data
    order was sharded over}; data parallel adds "rank_buffers", every rank's floating-point buffers (batch-norm
    running statistics differ between ranks until the epoch's end averages them). None at an epoch's end."""


class Trainer:
    """Trains `backbone` with `method` on `data` and writes the run directory."""

    def __init__(
        self,
        cfg: Config,
        backbone,
        modules: list[LocalModule],
        method: LocalMethod,
        data,
        device: torch.device,
        out_dir: Path,
        parallel: DataParallel | None = None,
    ):
        self.cfg, self.backbone, self.modules, self.method = cfg, backbone, modules, method
        self.data, self.device, self.out_dir = data, device, Path(out_dir)
        self.params = [p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad]
        # Data parallel (fastlocal.parallel.data): gradients averaged per module; rank 0 alone writes and logs.
        self.parallel = parallel
        self.grad_averager = GradientAverager(modules, method, backbone) if parallel is not None else None
        self.is_main = parallel is None or parallel.is_main
        self.world_size = 1 if parallel is None else parallel.world_size
        use_graphs = (
            parallel is None
            and not cfg.system.fused_optimizer_step
            and cuda_option_on("system.cuda_graphs", cfg.system.cuda_graphs, device, "training eagerly")
        )
        # Module i's loss runs on this stream while module i+1 runs forward (local_train_step).
        use_streams = cuda_option_on("system.cuda_streams", cfg.system.cuda_streams, device, "training on one stream")
        self.side_stream = torch.cuda.Stream(device) if use_streams else None
        self.lr_on_device = use_graphs
        self.optimizer = build_optimizer(self.params, cfg, device, lr_on_device=use_graphs)
        if cfg.system.fused_optimizer_step and parallel is not None:
            raise UserError("system.fused_optimizer_step = true runs in one process; set it false under torchrun")
        # The schedule steps each module's parameters as soon as their gradients are final (local_train_step).
        self.fused_step = partial(step_parameters, self.optimizer) if cfg.system.fused_optimizer_step else None
        # Autocast's weight-cast cache must be off inside a CUDA graph (the casts are part of the replay).
        self.forward_context = forward_context_for(device, cfg.system.precision, cache_casts=not use_graphs)
        self.channels_last = cfg.system.channels_last
        self.run_step = GraphedStep(self.step_without_zero_grad, self.zero_grad) if use_graphs else self.eager_step
        self.state = RunState(**self.model_shape())
        self.nonfinite_check_steps = NONFINITE_CHECK_STEPS  # 0: at the epoch's last step only
        self.measure_cpu_memory = cfg.log.measure_memory
        self.stop_signal: int | None = None  # set by the SIGINT/SIGTERM handler that fit() installs
        # log.tensorboard: the step sums each module's loss on the device; rank 0 writes the events (in fit()).
        self.module_losses = ModuleLosses(method, device) if cfg.log.tensorboard else None
        self.tensorboard: TensorBoardLog | None = None
        self.data_shards = data.train.world_size  # the data order's shards (a mid-epoch resume needs as many)

    # -- one step ---------------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step_without_zero_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Local forward/backward, EMA, optimizer step; what a CUDA graph captures."""
        averager = self.grad_averager
        loss = local_train_step(
            self.modules,
            self.method if self.module_losses is None else self.module_losses,
            Batch(x, y, self.data.info.mean, self.data.info.std),
            self.forward_context,
            side_stream=self.side_stream,
            after_flush=None if averager is None else averager.after_flush,
            step_parameters=self.fused_step,
        )
        if averager is not None:
            averager.finish()
        if self.fused_step is None:
            self.optimizer.step()
        return loss

    def eager_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.zero_grad()
        return self.step_without_zero_grad(x, y)

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        state = self.state.__dict__
        if self.state.mid_epoch is not None and self.parallel is not None:  # data parallel, mid-epoch
            rank_buffers = gather_buffers(self.backbone, self.method)  # a collective: every rank takes part
            state = {**state, "mid_epoch": {**self.state.mid_epoch, "rank_buffers": rank_buffers}}
        return {
            "config": to_dict(self.cfg),
            "backbone": self.backbone.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": state,
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint, never one holding inf or nan: the previous one then stays the last good one."""
        ckpt = self.checkpoint()
        bad = non_finite_tensors(ckpt)
        if bad:
            raise self.diverged(
                f"after epoch {self.state.epoch}, {len(bad)} tensors of the model hold inf or nan (first: {bad[0]})",
                completed_epochs=self.state.epoch - 1,
            )
        if self.is_main:  # data parallel: every rank checks (the models are equal, so they agree); rank 0 writes
            save_atomic(ckpt, self.out_dir / CHECKPOINT_NAME)
        barrier()

    def diverged(self, what: str, completed_epochs: int) -> NonFiniteLossError:
        last_good = (
            f"the checkpoint of epoch {completed_epochs} in {self.out_dir} is intact (every tensor in it is finite)"
            if completed_epochs
            else "no checkpoint was written"
        )
        return NonFiniteLossError(
            f"{what}; the run diverged. Lower optim.lr (now {self.cfg.optim.lr:g}) or lengthen "
            f"optim.warmup_epochs; {last_good}"
        )

    def load_checkpoint(self, path: Path) -> None:
        self.restore(read_checkpoint(path, self.device))

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint (see `read_checkpoint`) written for this run's config."""
        try:
            self.backbone.load_state_dict(ckpt["backbone"])
            self.method.load_state_dict(ckpt["method"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(
                f"the checkpoint does not fit the model built from its config ({str(err)[:300]}); it "
                "was written by another version of fastlocal or edited"
            ) from None
        for group in self.optimizer.param_groups:  # the LR's kind (float or device tensor) follows this run
            if self.lr_on_device and not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(group["lr"], device=self.device)
            elif not self.lr_on_device and isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].item()
        self.state = RunState(**{**ckpt["state"], **self.model_shape()})
        mid_epoch = self.state.mid_epoch
        if mid_epoch is not None:
            if mid_epoch["data_shards"] != self.data_shards:
                raise UserError(
                    f"the checkpoint was written at step {mid_epoch['step']} of epoch {self.state.epoch + 1}, with "
                    f"the data order sharded over {mid_epoch['data_shards']} processes; this run shards it over "
                    f"{self.data_shards}: resume with {mid_epoch['data_shards']} (torchrun --nproc_per_node) "
                    "data-parallel processes"
                )
            self.state.mid_epoch = {k: v for k, v in mid_epoch.items() if k != "rank_buffers"}
            if mid_epoch.get("rank_buffers") is not None and self.parallel is not None:
                load_buffers(mid_epoch["rank_buffers"][self.parallel.rank], self.backbone, self.method)

    def save_step_checkpoint(self, steps_done: int, loss_sum: torch.Tensor, seconds: float) -> None:
        """The checkpoint after `steps_done` steps of epoch state.epoch + 1 (train.checkpoint_every)."""
        self.state.mid_epoch = {
            "step": steps_done,
            "loss_sum": sum_across_ranks(loss_sum).item(),
            "seconds": seconds,
            "data_shards": self.data_shards,
        }
        try:
            self.save_checkpoint()
        finally:
            self.state.mid_epoch = None

    def model_shape(self) -> dict:
        return {
            "num_classes": getattr(self.backbone, "num_classes", 0),
            "input_size": getattr(self.backbone, "input_size", 0),
        }

    # -- training ----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        cfg, loader = self.cfg, self.data.train
        # A step checkpoint's position (train.checkpoint_every): the epoch goes on from there, as it would have.
        resumed, self.state.mid_epoch = self.state.mid_epoch, None
        first_step = resumed["step"] if resumed else 0
        loader.set_epoch(epoch, start_step=first_step)
        # Data parallel: shards of equal length give equal steps; otherwise no rank waits for a step another never runs.
        steps = min_across_ranks(len(loader), self.device)
        self.backbone.train()
        self.method.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        earlier_seconds = 0.0
        if resumed:  # the loss sum over ranks of the steps before: counted once, on rank 0
            loss_sum += resumed["loss_sum"] if self.is_main else 0.0
            earlier_seconds = resumed["seconds"]
        progress = None
        if cfg.log.progress and self.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(
                total=steps, initial=first_step, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, unit="batch"
            )
        # The first step whose loss is inf or nan, tracked on the device (no host sync); -1 while none is.
        diverged_at = torch.full((), -1, dtype=torch.int64, device=self.device)
        start = time.perf_counter()
        lr = cfg.optim.lr
        checkpoint_every = cfg.train.checkpoint_every
        for step, (x, y) in enumerate(loader, first_step):
            if step == steps:
                break
            set_progress(f"step {step + 1}/{steps} of epoch {epoch + 1}")
            lr = learning_rate(cfg, epoch, step, steps)
            set_learning_rate(self.optimizer, lr)
            if self.tensorboard is not None:
                self.tensorboard.step(epoch * steps + step, lr)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.state.peak_memory is None and self.measure_cpu_memory and self.device.type == "cpu":
                with SavedTensorAccountant(ignore=parameter_storages(self.backbone, self.method)) as acct:
                    loss = self.eager_step(x, y)
                self.state.peak_memory = {
                    "kind": "cpu_saved_tensors",
                    "batch_size": int(x.shape[0]),
                    "peak_saved_bytes": acct.peak_bytes,
                }
            else:
                loss = self.run_step(x, y)
            loss_sum += loss
            diverged_at = torch.where((diverged_at < 0) & ~torch.isfinite(loss), step, diverged_at)
            every = self.nonfinite_check_steps
            if (every and step % every == 0) or step == steps - 1:
                # One host sync; data parallel: summed over ranks, so every rank takes the same decision.
                total, ranks_diverged = sum_across_ranks(torch.stack([loss_sum, (diverged_at >= 0).double()])).tolist()
                if ranks_diverged:
                    first_bad = int(diverged_at.item())
                    where = f"at step {first_bad + 1}/{steps}" if first_bad >= 0 else "on another rank"
                    raise self.diverged(
                        f"the training loss became inf or nan {where} of epoch {epoch + 1} (seen at step {step + 1})",
                        completed_epochs=epoch,
                    )
                if progress is not None:
                    progress.set_postfix(loss=f"{total / (step + 1) / self.world_size:.3f}", lr=f"{lr:.3g}")
            if progress is not None:
                progress.update(1)
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                self.save_step_checkpoint(step + 1, loss_sum, earlier_seconds + time.perf_counter() - start)
            if self.stop_signal is not None:  # the step is finished; the steps since the last checkpoint are lost
                raise RunInterrupted(self.stop_signal)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = earlier_seconds + time.perf_counter() - start
        if progress is not None:
            progress.close()
        train_loss = sum_across_ranks(loss_sum).item() / max(1, steps) / self.world_size
        images = loader.num_images * self.world_size if not cfg.train.drop_last else steps * cfg.train.batch_size
        self.steps_per_epoch = steps
        return {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train_loss,
            "epoch_seconds": seconds,
            "images_per_second": images / seconds,
        }

    @contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends) set `stop_signal`, which the loop reads
        after each step: no exception lands inside a step or a destructor, where it could be swallowed. A second
        Ctrl-C interrupts at once (KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return

        def request_stop(signum, frame):
            self.stop_signal = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def fit(self, log=print) -> dict:
        if self.cfg.log.tensorboard and self.is_main:
            resumed_at = self.state.epoch * len(self.data.train)  # drop what an interrupted run wrote after it
            self.tensorboard = TensorBoardLog(self.out_dir, purge_step=resumed_at or None)
        try:
            with self.stop_on_signals():
                return self._fit(log)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _fit(self, log) -> dict:
        cfg = self.cfg
        if not self.is_main:
            log = silent_log
        metrics_path = self.out_dir / "metrics.jsonl"
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(to_toml(cfg), self.out_dir / "config.toml")
            # The metrics file always mirrors the checkpoint: rewrite it from the restored history.
            write_text_atomic("".join(json.dumps(row) + "\n" for row in self.state.history), metrics_path)
        if self.device.type == "cuda":
            reset_peak(self.device)
        for epoch in range(self.state.epoch, cfg.train.epochs):
            if self.stop_signal is not None:  # arrived during the last evaluation or save: that epoch is kept
                raise RunInterrupted(self.stop_signal)
            row = self.train_epoch(epoch)
            if self.grad_averager is not None:  # data parallel, the stated rule: running statistics are the mean
                average_buffers(self.backbone, self.method, group=self.grad_averager.group)
            set_progress(f"the evaluation after epoch {epoch + 1}")
            row["test_acc"] = self.test_accuracy()
            self.state.epoch = epoch + 1
            self.state.history.append(row)
            self.state.train_seconds += row["epoch_seconds"]
            if self.device.type == "cuda":
                self.state.peak_memory = cuda_peak(self.device)
            self.save_checkpoint()
            if self.is_main:
                try:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                except OSError as err:
                    raise UserError(
                        f"cannot write {metrics_path}: {err.strerror}; the checkpoint of epoch "
                        f"{epoch + 1} is saved; free space or make the directory writable, then continue "
                        f"with --resume {self.out_dir}"
                    ) from None
            if self.module_losses is not None:  # every rank: the sums are reduced across ranks
                module_losses = self.module_losses.take()
                if self.tensorboard is not None:
                    global_step = (epoch + 1) * self.steps_per_epoch - 1
                    self.tensorboard.epoch(global_step, row, module_losses, self.state.peak_memory)
            log(
                f"epoch {row['epoch']}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  "
                f"test acc {row['test_acc']:.2f}%  {row['images_per_second']:.0f} img/s  lr {row['lr']:.4g}"
            )
        summary = self.summary()
        if self.is_main:
            write_json_atomic(summary, self.out_dir / "summary.json")
        return summary

    def test_accuracy(self) -> float:
        """Top-1 accuracy (%) on the test set (fastlocal.parallel.pipeline evaluates through its stages instead)."""
        with self.forward_context():
            return evaluate(self.backbone, self.data.test, self.channels_last)

    def summary(self) -> dict:
        history = self.state.history
        cfg = self.cfg
        images = len(history) * self.data.train.num_images * self.world_size
        return {
            "method": cfg.method.name,
            "arch": cfg.model.arch,
            "dataset": self.data.info.name,
            "num_modules": len(self.modules),
            "epochs": len(history),
            "final_test_acc": history[-1]["test_acc"] if history else None,
            # The best test epoch is model selection on the test set: reported, labelled, never the headline.
            "best_test_acc": max(r["test_acc"] for r in history) if history else None,
            "best_test_acc_note": "best epoch chosen on the test set (the paper's convention); not a fair estimate",
            "num_parameters": sum(p.numel() for p in self.params),
            "num_backbone_parameters": sum(p.numel() for p in self.backbone.parameters()),
            "train_seconds": self.state.train_seconds,
            "images_per_second": images / self.state.train_seconds if self.state.train_seconds else None,
            "peak_memory": self.state.peak_memory,
            "device": device_name(self.device),
            "world_size": self.world_size,
            "parallel": "none" if self.parallel is None else "data",
            "torch_version": torch.__version__,
            **self.method.extra_state_summary(),  # MLAAN: "leaps": "preset" or "generated"
        }
