"""The training engine: the local backward schedule, evaluation, checkpoints, logging, timing.

The schedule (SPEC 3.5) runs one forward per module. Module i's loss is back-propagated into the
heads and into a cotangent at a_i at once; a cascaded part travels W-1 modules further down through
input-only vector-Jacobian products; once a module has every cotangent it will get, one weight VJP
restricted to its parameters runs and its graph is freed. With W = 1 (BP, DGL) a module's graph is
freed before the next module runs forward, so activation memory is that of the largest module.

On CUDA, `system.cuda_streams` moves each module's loss (heads, LAM, decoders: forward and backward) to
a side stream, where it runs while the main stream computes the next module's forward; see
`local_train_step`. The kernels and their order on each tensor are those of the one-stream schedule.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from fastlocal import distributed
from fastlocal.config import Config, UserError, to_dict, to_toml
from fastlocal.graphs import GraphedStep, cuda_option_on, set_learning_rate
from fastlocal.measure import SavedTensorAccountant, cuda_peak, parameter_storages, reset_peak
from fastlocal.methods import Batch, LocalMethod
from fastlocal.split import LocalModule

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = ("config", "backbone", "method", "optimizer", "state")
NONFINITE_CHECK_STEPS = 20
"""The loop reads the loss sum and the divergence flag from the device every this many steps (and at an
epoch's last step): a non-finite loss stops the run at most this many steps late, with one host sync per
check rather than per step."""


class NonFiniteLossError(UserError):
    pass


class RunInterrupted(Exception):
    """SIGINT or SIGTERM arrived: the run stopped between steps and saved nothing partial."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _accumulate(cotangents: list, index: int, value: torch.Tensor | None) -> None:
    if value is None:
        return
    cotangents[index] = value if cotangents[index] is None else cotangents[index] + value


def _module_input(batch: Batch, previous: torch.Tensor | None, window: int) -> torch.Tensor:
    """The batch for the first module; the previous module's output, detached, for the others."""
    if previous is None:
        return batch.x
    inputs = previous.detach()
    # An input gradient is needed only when a cascaded loss will travel through this module.
    return inputs.requires_grad_(window > 1)


class _Cotangents:
    """The module graphs kept for vector-Jacobian products, and the cotangents gathered at each module's
    output (SPEC 3.5); shared by the one-stream and the side-stream schedules."""

    def __init__(self, modules: list[LocalModule], window: int,
                 after_flush: Callable[[int], None] | None = None):
        self.modules, self.window = modules, window
        self.after_flush = after_flush
        self.graphs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(modules)  # (input leaf, output)
        self.sums: list[torch.Tensor | None] = [None] * len(modules)

    def add_loss_gradients(self, i: int, own_grad: torch.Tensor | None, cascade_grad: torch.Tensor | None) -> None:
        """Module i's loss gave these gradients at a_i: both train module i; the cascaded one also travels
        down to modules i-W+1 .. i-1 through input-only VJPs."""
        _accumulate(self.sums, i, own_grad)
        _accumulate(self.sums, i, cascade_grad)
        carried = cascade_grad
        for j in range(i, i - self.window + 1, -1):
            if carried is None or j == 0:
                break
            module_input, module_output = self.graphs[j]
            (carried,) = torch.autograd.grad(module_output, module_input, carried, retain_graph=True)
            _accumulate(self.sums, j - 1, carried)

    def flush(self, j: int) -> None:
        """Module j has received all its cotangents: one VJP w.r.t. its parameters only, then free it."""
        _, output = self.graphs[j]
        if self.sums[j] is not None:  # None only for a module whose loss weights are all 0 (warned at build)
            torch.autograd.backward(output, self.sums[j], inputs=self.modules[j].trainable_parameters)
        self.graphs[j] = None
        self.sums[j] = None
        if self.after_flush is not None:  # data parallel: module j's gradients are final, average them
            self.after_flush(j)


def local_train_step(modules: list[LocalModule], method: LocalMethod, batch: Batch,
                     forward_context: Callable[[], AbstractContextManager] = nullcontext, *,
                     side_stream: torch.cuda.Stream | None = None,
                     after_flush: Callable[[int], None] | None = None) -> torch.Tensor:
    """Forward and backward of one batch through the local schedule; fills `.grad` of the backbone
    and method parameters (no optimizer step). Returns the last module's loss, detached.

    `forward_context` wraps every forward and loss computation, never a backward (autocast for bf16).

    `side_stream` (CUDA only; `Trainer` makes one when `system.cuda_streams` is on): module i's loss,
    forward and backward, runs on this stream while the current ("main") stream runs module i+1's
    forward; the main stream waits for it (an event) before it reads the loss's cotangents at a_i, for
    the cascade VJPs and the weight VJPs. Same kernels on the same data in the same order per tensor, so
    the gradients are bitwise those of `side_stream=None`. Everything is joined back to the main stream
    before `method.before_optimizer_step()` (EMA) and before returning. Works eagerly and inside CUDA
    graph capture (the side stream first waits on the capturing stream, and is joined back to it).

    Memory bound with a side stream: the main stream waits for module i's loss before it queues module
    i+2's forward, so at most two losses are in flight (loss i, and loss i+1 queued behind it on the side
    stream). Their graphs (heads, LAM, decoders) are never both alive: they run in order on one stream,
    which reuses its own freed memory in stream order; the cotangents at a_i of both are. Module i-W+1's
    graph is freed after module i+1's forward instead of before it, since its last cotangent comes from
    loss i. So the peak is the one-stream peak plus at most one module graph, one loss graph and two
    cotangents the size of a module output (and the side stream's cached blocks are not shared with the
    main stream's).

    Modules and losses must not write their inputs in place (none do): with a side stream such a write
    would race with the loss still reading a_i.

    `after_flush(j)` (data parallel, `fastlocal.distributed.GradientAverager`) is called right after module j
    received its last cotangent and its weight VJP ran, on the main stream; module K-1 is flushed last."""
    if side_stream is not None:
        if batch.x.device.type != "cuda":
            raise ValueError(f"side_stream needs the batch on a CUDA device, but it is on {batch.x.device}; "
                             "pass side_stream=None")
        streams = _LossStream(side_stream, torch.cuda.current_stream(batch.x.device))
        return _overlapped_train_step(modules, method, batch, forward_context, streams, after_flush)
    num_modules, window = len(modules), method.window
    cotangents = _Cotangents(modules, window, after_flush)
    last_loss = None
    previous = None
    for i in range(num_modules):
        inputs = _module_input(batch, previous, window)
        with forward_context():
            output = modules[i](inputs)
        cotangents.graphs[i] = (inputs, output)
        own = output.detach().requires_grad_()
        cascade = output.detach().requires_grad_()
        with forward_context():
            loss = method.module_loss(i, own, cascade, batch)
        if loss is not None:
            loss.backward()  # heads, decoders and LAMs get their gradients; the graph above a_i is freed
            cotangents.add_loss_gradients(i, own.grad, cascade.grad)
            if i == num_modules - 1:
                last_loss = loss.detach()
        done = i - window + 1
        if done >= 0:
            cotangents.flush(done)
        previous = output
    for j in range(max(0, num_modules - window + 1), num_modules):
        cotangents.flush(j)
    method.before_optimizer_step()
    return last_loss


class _LossStream:
    """Fork and join of the loss work between the main stream and a side stream, by events only (no host
    synchronisation, so it is legal inside CUDA graph capture)."""

    def __init__(self, side: torch.cuda.Stream, main: torch.cuda.Stream):
        self.side, self.main = side, main

    @contextmanager
    def forked(self) -> Iterator[None]:
        """Run the body on the side stream, after all the work the main stream has queued so far. Under
        capture this wait is also what brings the side stream into the capture."""
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            yield

    def done(self) -> torch.cuda.Event:
        """An event on the side stream after the work queued so far (call inside `forked`)."""
        return self.side.record_event()

    def wait(self, done: torch.cuda.Event) -> None:
        self.main.wait_event(done)

    def join(self) -> None:
        self.main.wait_stream(self.side)


class _LossInFlight(NamedTuple):
    index: int
    own: torch.Tensor
    cascade: torch.Tensor
    loss: torch.Tensor | None
    done: object
    """What `_LossStream.done` returned after the loss's backward."""


def _overlapped_train_step(modules: list[LocalModule], method: LocalMethod, batch: Batch,
                           forward_context: Callable[[], AbstractContextManager],
                           streams: _LossStream,
                           after_flush: Callable[[int], None] | None = None) -> torch.Tensor:
    """`local_train_step` with each loss on the side stream of `streams` (see there). The operations are
    those of the one-stream schedule; only module i+1's forward moves ahead of the processing of loss i
    (accumulation, cascade VJPs, the flush it allows), which touches neither its inputs nor its outputs.

    Cross-stream memory, without `record_stream` (under capture it would keep every such block out of
    reuse until the capture ends): a_i (allocated on the main stream, read by loss i through
    `own`/`cascade`) stays referenced by `cotangents.graphs[i]` until module i is flushed, which is after the main
    stream waited for loss i. The cotangents at a_i (allocated on the side stream, read by the main
    stream) are dropped only by the main-stream code (`finish`, `flush`, the end of the step), and every
    later side-stream allocation follows a `forked()` wait on the main stream, so the side stream can
    reuse their memory only after the main stream's reads of them."""
    num_modules, window = len(modules), method.window
    cotangents = _Cotangents(modules, window, after_flush)
    last_loss = None

    def launch(i: int, output: torch.Tensor) -> _LossInFlight:
        # Queued on the side stream behind module i's forward (and behind the previous loss).
        with streams.forked():
            own = output.detach().requires_grad_()
            cascade = output.detach().requires_grad_()
            with forward_context():
                loss = method.module_loss(i, own, cascade, batch)
            if loss is not None:
                loss.backward()  # on the side stream: autograd runs each backward op on its forward's stream
            return _LossInFlight(i, own, cascade, loss, streams.done())

    def finish(pending: _LossInFlight) -> None:
        # The one-stream schedule's work after loss i's backward, on the main stream, in the same order.
        nonlocal last_loss
        i = pending.index
        if pending.loss is not None:
            streams.wait(pending.done)  # own.grad and cascade.grad are read from here on
            cotangents.add_loss_gradients(i, pending.own.grad, pending.cascade.grad)
            if i == num_modules - 1:
                last_loss = pending.loss.detach()
        done = i - window + 1
        if done >= 0:
            cotangents.flush(done)

    pending: _LossInFlight | None = None  # the loss the main stream has not waited for yet: one at most
    previous = None
    try:
        for i in range(num_modules):
            inputs = _module_input(batch, previous, window)
            with forward_context():
                output = modules[i](inputs)  # overlaps loss i-1 on the side stream
            cotangents.graphs[i] = (inputs, output)
            launched = launch(i, output)  # queued behind loss i-1: at most two losses in flight
            if pending is not None:
                finish(pending)  # waits for loss i-1 before module i+1's forward is queued
            pending, previous = launched, output
        finish(pending)
        for j in range(max(0, num_modules - window + 1), num_modules):
            cotangents.flush(j)
    finally:
        streams.join()  # also on an error, so a capture never ends with the side stream unjoined
    method.before_optimizer_step()
    return last_loss


def forward_context_for(device: torch.device, precision: str,
                        cache_casts: bool = True) -> Callable[[], AbstractContextManager]:
    """bf16: autocast the forwards (weights, gradients, optimizer and EMA stay fp32); fp32: nothing."""
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16,
                                 cache_enabled=cache_casts)
    return nullcontext


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config, device: torch.device | None = None,
                    lr_on_device: bool = False) -> torch.optim.SGD:
    """SGD with Nesterov momentum and weight decay on all parameters. One fused kernel for the whole
    update on CUDA, the multi-tensor (foreach) path elsewhere; `lr_on_device` keeps the LR in a device
    tensor (a CUDA graph reads it; `fastlocal.graphs.set_learning_rate` fills it)."""
    fused = device is not None and device.type == "cuda"
    lr = torch.tensor(cfg.optim.lr, device=device) if lr_on_device else cfg.optim.lr
    return torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
                           weight_decay=cfg.optim.weight_decay, fused=fused or None,
                           foreach=None if fused else True)


def learning_rate(cfg: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """The LR for a step. `ref`: the reference's CIFAR per-epoch rule (SPEC 5, e = epoch + 1);
    `cosine_epoch`: the ImageNet reference's per-epoch cosine (epoch from 0);
    `cosine`: per-iteration linear warmup then cosine decay to 0."""
    lr0, epochs = cfg.optim.lr, cfg.train.epochs
    if cfg.optim.schedule == "cosine_epoch":
        return 0.5 * lr0 * (1 + math.cos(math.pi * epoch / epochs))
    if cfg.optim.schedule == "ref":
        e = epoch + 1
        cosine = 0.5 * lr0 * (1 + math.cos(math.pi * e / epochs))
        return cosine * (e - 1) / 10 + 0.01 * (11 - e) / 10 if e <= 10 else cosine
    step = epoch * steps_per_epoch + step_in_epoch
    total = epochs * steps_per_epoch
    warmup = min(round(cfg.optim.warmup_epochs * steps_per_epoch), total - 1)
    if step < warmup:
        return lr0 * (step + 1) / warmup
    return 0.5 * lr0 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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
    correct, total = distributed.sum_across_ranks(counts)
    return 100.0 * correct.item() / total.item()


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
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
        raise UserError(f"cannot write {path}: {reason}; the previous {path.name}, if any, is unchanged. Free space "
                        "on that disk or make the directory writable, then run again (--resume continues a run "
                        "from its last checkpoint)") from None


def save_atomic(obj, path: Path) -> None:
    _write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(text: str, path: Path) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text))


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
        raise UserError(
            f"cannot read checkpoint {path}: {err}; it is corrupt or not a fastlocal checkpoint"
        ) from None
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


class Trainer:
    """Trains `backbone` with `method` on `data` and writes the run directory."""

    def __init__(self, cfg: Config, backbone, modules: list[LocalModule], method: LocalMethod, data,
                 device: torch.device, out_dir: Path, parallel: distributed.DataParallel | None = None):
        self.cfg, self.backbone, self.modules, self.method = cfg, backbone, modules, method
        self.data, self.device, self.out_dir = data, device, Path(out_dir)
        self.params = [p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad]
        # Data parallel (fastlocal.distributed): gradients averaged per module; rank 0 alone writes and logs.
        self.parallel = parallel
        self.grad_averager = distributed.GradientAverager(modules, method, backbone) if parallel is not None else None
        self.is_main = parallel is None or parallel.is_main
        self.world_size = 1 if parallel is None else parallel.world_size
        use_graphs = parallel is None and cuda_option_on("system.cuda_graphs", cfg.system.cuda_graphs, device,
                                                         "training eagerly")
        # Module i's loss runs on this stream while module i+1 runs forward (local_train_step).
        use_streams = cuda_option_on("system.cuda_streams", cfg.system.cuda_streams, device, "training on one stream")
        self.side_stream = torch.cuda.Stream(device) if use_streams else None
        self.lr_on_device = use_graphs
        self.optimizer = build_optimizer(self.params, cfg, device, lr_on_device=use_graphs)
        # Autocast's weight-cast cache must be off inside a CUDA graph (the casts are part of the replay).
        self.forward_context = forward_context_for(device, cfg.system.precision, cache_casts=not use_graphs)
        self.channels_last = cfg.system.channels_last
        self.run_step = GraphedStep(self.step_without_zero_grad, self.zero_grad) if use_graphs else self.eager_step
        self.state = RunState()
        self.stop_signal: int | None = None  # set by the SIGINT/SIGTERM handler that fit() installs

    # -- one step ---------------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step_without_zero_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Local forward/backward, EMA, optimizer step; what a CUDA graph captures."""
        averager = self.grad_averager
        loss = local_train_step(self.modules, self.method, Batch(x, y, self.data.info.mean, self.data.info.std),
                                self.forward_context, side_stream=self.side_stream,
                                after_flush=None if averager is None else averager.after_flush)
        if averager is not None:
            averager.finish()
        self.optimizer.step()
        return loss

    def eager_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.zero_grad()
        return self.step_without_zero_grad(x, y)

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {
            "config": to_dict(self.cfg),
            "backbone": self.backbone.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": self.state.__dict__,
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint, never one holding inf or nan: the previous one then stays the last good one."""
        ckpt = self.checkpoint()
        bad = non_finite_tensors(ckpt)
        if bad:
            raise self.diverged(f"after epoch {self.state.epoch}, {len(bad)} tensors of the model hold inf or nan "
                                f"(first: {bad[0]})", completed_epochs=self.state.epoch - 1)
        if self.is_main:  # data parallel: every rank checks (the models are equal, so they agree); rank 0 writes
            save_atomic(ckpt, self.out_dir / CHECKPOINT_NAME)

    def diverged(self, what: str, completed_epochs: int) -> NonFiniteLossError:
        last_good = (f"the checkpoint of epoch {completed_epochs} in {self.out_dir} is intact (every tensor in it "
                     "is finite)" if completed_epochs else "no checkpoint was written")
        return NonFiniteLossError(f"{what}; the run diverged. Lower optim.lr (now {self.cfg.optim.lr:g}) or lengthen "
                                  f"optim.warmup_epochs; {last_good}")

    def load_checkpoint(self, path: Path) -> None:
        self.restore(read_checkpoint(path, self.device))

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint (see `read_checkpoint`) written for this run's config."""
        try:
            self.backbone.load_state_dict(ckpt["backbone"])
            self.method.load_state_dict(ckpt["method"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(f"the checkpoint does not fit the model built from its config ({str(err)[:300]}); it "
                            "was written by another version of fastlocal or edited") from None
        for group in self.optimizer.param_groups:  # the LR's kind (float or device tensor) follows this run
            if self.lr_on_device and not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(group["lr"], device=self.device)
            elif not self.lr_on_device and isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].item()
        self.state = RunState(**ckpt["state"])

    # -- training ----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        cfg, loader = self.cfg, self.data.train
        loader.set_epoch(epoch)
        # Data parallel: shards of equal length give equal steps; otherwise no rank waits for a step another never runs.
        steps = distributed.min_across_ranks(len(loader), self.device)
        self.backbone.train()
        self.method.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        progress = None
        if cfg.log.progress and self.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, unit="batch")
        # The first step whose loss is inf or nan, tracked on the device (no host sync); -1 while none is.
        diverged_at = torch.full((), -1, dtype=torch.int64, device=self.device)
        start = time.perf_counter()
        lr = cfg.optim.lr
        for step, (x, y) in enumerate(loader):
            if step == steps:
                break
            lr = learning_rate(cfg, epoch, step, steps)
            set_learning_rate(self.optimizer, lr)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.state.peak_memory is None and cfg.log.measure_memory and self.device.type == "cpu":
                with SavedTensorAccountant(ignore=parameter_storages(self.backbone, self.method)) as acct:
                    loss = self.eager_step(x, y)
                self.state.peak_memory = {"kind": "cpu_saved_tensors", "batch_size": int(x.shape[0]),
                                          "peak_saved_bytes": acct.peak_bytes}
            else:
                loss = self.run_step(x, y)
            loss_sum += loss
            diverged_at = torch.where((diverged_at < 0) & ~torch.isfinite(loss), step, diverged_at)
            if step % NONFINITE_CHECK_STEPS == 0 or step == steps - 1:
                # One host sync; data parallel: summed over ranks, so every rank takes the same decision.
                total, ranks_diverged = distributed.sum_across_ranks(
                    torch.stack([loss_sum, (diverged_at >= 0).double()])).tolist()
                if ranks_diverged:
                    first_bad = int(diverged_at.item())
                    where = f"at step {first_bad + 1}/{steps}" if first_bad >= 0 else "on another rank"
                    raise self.diverged(f"the training loss became inf or nan {where} of epoch {epoch + 1} (seen at "
                                        f"step {step + 1})", completed_epochs=epoch)
                if progress is not None:
                    progress.set_postfix(loss=f"{total / (step + 1) / self.world_size:.3f}", lr=f"{lr:.3g}")
            if progress is not None:
                progress.update(1)
            if self.stop_signal is not None:  # the step is finished; the partial epoch is discarded
                raise RunInterrupted(self.stop_signal)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if progress is not None:
            progress.close()
        train_loss = distributed.sum_across_ranks(loss_sum).item() / max(1, steps) / self.world_size
        images = loader.num_images * self.world_size if not cfg.train.drop_last else steps * cfg.train.batch_size
        return {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "epoch_seconds": seconds,
                "images_per_second": images / seconds}

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
        with self.stop_on_signals():
            return self._fit(log)

    def _fit(self, log) -> dict:
        cfg = self.cfg
        if not self.is_main:
            log = distributed.silent_log
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
            if self.parallel is not None:  # the stated rule: running statistics are the mean over ranks
                distributed.average_buffers(self.backbone, self.method)
            with self.forward_context():
                row["test_acc"] = evaluate(self.backbone, self.data.test, self.channels_last)
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
                    raise UserError(f"cannot write {metrics_path}: {err.strerror}; the checkpoint of epoch "
                                    f"{epoch + 1} is saved; free space or make the directory writable, then continue "
                                    f"with --resume {self.out_dir}") from None
            log(f"epoch {row['epoch']}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  "
                f"test acc {row['test_acc']:.2f}%  {row['images_per_second']:.0f} img/s  lr {row['lr']:.4g}")
        summary = self.summary()
        if self.is_main:
            write_json_atomic(summary, self.out_dir / "summary.json")
        return summary

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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
