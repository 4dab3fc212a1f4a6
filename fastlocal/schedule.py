"""One training step through the local backward schedule (docs/method.md#the-single-forward-schedule).

One forward per module. Module i's loss is back-propagated into the heads and into a cotangent at a_i
at once; a cascaded part travels W-1 modules further down through input-only vector-Jacobian products;
once a module has every cotangent it will get, one weight VJP restricted to its parameters runs and its
graph is freed. With W = 1 (BP, DGL) a module's graph is freed before the next module runs forward, so
activation memory is that of the largest module.

Where each loss runs is a fork/join object (`LossFork`): without a side stream it is a no-op and each
loss is processed as soon as it has run; with one (CUDA, `system.cuda_streams`) module i's loss, forward
and backward, runs on the side stream while the main stream computes module i+1's forward. The kernels
and their order on each tensor are the same either way.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import NamedTuple

import torch

from fastlocal.methods import Batch, LocalMethod
from fastlocal.recompute import vjp_of
from fastlocal.split import LocalModule


def forward_context_for(
    device: torch.device, precision: str, cache_casts: bool = True
) -> Callable[[], AbstractContextManager]:
    """bf16: autocast the forwards (weights, gradients, optimizer and EMA stay fp32); fp32: nothing."""
    if precision == "bf16":
        return functools.partial(
            torch.autocast, device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache_casts
        )
    return nullcontext


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
    output (docs/method.md#the-single-forward-schedule)."""

    def __init__(self, modules: list[LocalModule], window: int, after_flush: Callable[[int], None] | None = None):
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
            with vjp_of("inputs"):
                (carried,) = torch.autograd.grad(module_output, module_input, carried, retain_graph=True)
            _accumulate(self.sums, j - 1, carried)

    def flush(self, j: int) -> None:
        """Module j has received all its cotangents: one VJP w.r.t. its parameters only, then free it."""
        _, output = self.graphs[j]
        if self.sums[j] is not None:  # None only for a module whose loss weights are all 0 (warned at build)
            with vjp_of("parameters"):
                torch.autograd.backward(output, self.sums[j], inputs=self.modules[j].trainable_parameters)
        self.graphs[j] = None
        self.sums[j] = None
        if self.after_flush is not None:  # data parallel: module j's gradients are final, average them
            self.after_flush(j)


class FusedOptimizerStep:
    """The optimizer step inside the schedule (system.fused_optimizer_step): parameters are stepped, and their
    gradients freed, as soon as the gradients are final: a loss's own parameters (`method.loss_parameters`)
    after its backward, a module's after its weight VJP; anything else at the end.

    MLAAN's EMA copies move toward the live blocks' weights of before this step's update, as in the plain
    step: the EMA pairs of loss i move right after loss i (the last use of its EMA copies in the step); a live
    weight updated before that is read from a copy taken just before its update. Each EMA tensor moves once
    per step, before any update of its own (the literal LAM's copies are also trained), so the arithmetic per
    tensor is that of the plain step."""

    def __init__(self, modules: list[LocalModule], method: LocalMethod, step: Callable[[list[torch.Tensor]], None]):
        self.modules, self.method, self.step = modules, method, step
        self.stepped: set[int] = set()
        self.losses_done: set[int] = set()
        self.stash: dict[int, torch.Tensor] = {}  # id(live tensor) -> its value before this step's update
        # id(live tensor) -> the losses whose EMA pairs read it
        self.readers: dict[int, list[int]] = {}
        for i in range(len(modules)):
            for tensor in method.ema_pairs_of_loss(i)[1]:
                self.readers.setdefault(id(tensor), []).append(i)

    def after_loss(self, i: int) -> None:
        targets, live = self.method.ema_pairs_of_loss(i)
        if targets:
            if any(id(t) in self.stash for t in live):
                live = [self.stash.get(id(t), t) for t in live]
            self.method.update_ema(targets, live)
        self.losses_done.add(i)
        self._step(self.method.loss_parameters(i))

    def after_flush(self, j: int) -> None:
        self._step(self.modules[j].trainable_parameters)

    def finish(self) -> None:
        for i in range(len(self.modules)):  # EMA pairs of a module without a loss this step (none today)
            if i not in self.losses_done and self.method.ema_pairs_of_loss(i)[0]:
                self.after_loss(i)
        rest = [p for p in (*self.method.backbone.parameters(), *self.method.parameters()) if p.grad is not None]
        self._step(rest)
        self.stash.clear()

    @torch.no_grad()
    def _step(self, params: list[torch.Tensor]) -> None:
        params = [p for p in params if p.grad is not None and id(p) not in self.stepped]
        if not params:
            return
        for p in params:  # an EMA that has yet to read this weight reads it from a copy of before the update
            if any(i not in self.losses_done for i in self.readers.get(id(p), ())):
                self.stash[id(p)] = p.detach().clone()
        self.step(params)
        for p in params:
            p.grad = None
            self.stepped.add(id(p))


class LossFork:
    """Where module losses run, and when the main stream takes their results. This class is the no-op:
    no side stream, each loss runs in place and is processed at once (`in_flight = 0`)."""

    in_flight = 0
    """How many launched losses the main stream leaves unprocessed while it queues the next module's forward."""

    def forked(self) -> AbstractContextManager:
        """The context a loss's forward and backward run in."""
        return nullcontext()

    def done(self) -> object:
        """A marker of the loss work queued so far (call inside `forked`)."""
        return None

    def wait(self, done: object) -> None:
        """The main stream waits for the work before `done` (before it reads the loss's cotangents)."""

    def join(self) -> None:
        """The main stream waits for all the loss work."""


class SideStreamFork(LossFork):
    """Fork and join of the loss work between the main stream and a side stream, by events only (no host
    synchronisation, so it is legal inside CUDA graph capture)."""

    in_flight = 1

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
    """What `LossFork.done` returned after the loss's backward."""


def _fork_for(side_stream: torch.cuda.Stream | LossFork | None, batch: Batch) -> LossFork:
    if side_stream is None:
        return LossFork()
    if isinstance(side_stream, LossFork):
        return side_stream
    if batch.x.device.type != "cuda":
        raise ValueError(
            f"side_stream needs the batch on a CUDA device, but it is on {batch.x.device}; pass side_stream=None"
        )
    return SideStreamFork(side_stream, torch.cuda.current_stream(batch.x.device))


def local_train_step(
    modules: list[LocalModule],
    method: LocalMethod,
    batch: Batch,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
    *,
    side_stream: torch.cuda.Stream | LossFork | None = None,
    after_flush: Callable[[int], None] | None = None,
    step_parameters: Callable[[list[torch.Tensor]], None] | None = None,
) -> torch.Tensor:
    """Forward and backward of one batch through the local schedule; fills `.grad` of the backbone
    and method parameters (no optimizer step). Returns the last module's loss, detached.

    `step_parameters(params)` (system.fused_optimizer_step; e.g. `functools.partial(fastlocal.optim.
    step_parameters, optimizer)`): the optimizer step runs inside the schedule instead, on each group of
    parameters once its gradients are final, and the gradients are freed (`FusedOptimizerStep`); nothing is
    left in `.grad` and the caller does not call `optimizer.step()`.

    `forward_context` wraps every forward and loss computation, never a backward (autocast for bf16).

    `side_stream` (CUDA only; `Trainer` makes one when `system.cuda_streams` is on; a `LossFork` is used
    as it is): module i's loss, forward and backward, runs on this stream while the current ("main")
    stream runs module i+1's forward; the main stream waits for it (an event) before it reads the loss's
    cotangents at a_i, for the cascade VJPs and the weight VJPs. Only module i+1's forward moves ahead of
    the processing of loss i (accumulation, cascade VJPs, the flush it allows), which touches neither its
    inputs nor its outputs: the same kernels on the same data in the same order per tensor, so the
    gradients are bitwise those of `side_stream=None`. Everything is joined back to the main stream before
    `method.before_optimizer_step()` (EMA) and before returning. Works eagerly and inside CUDA graph
    capture (the side stream first waits on the capturing stream, and is joined back to it).

    Memory bound with a side stream: the main stream waits for module i's loss before it queues module
    i+2's forward, so at most two losses are in flight (loss i, and loss i+1 queued behind it on the side
    stream). Their graphs (heads, LAM, decoders) are never both alive: they run in order on one stream,
    which reuses its own freed memory in stream order; the cotangents at a_i of both are. Module i-W+1's
    graph is freed after module i+1's forward instead of before it, since its last cotangent comes from
    loss i. So the peak is the one-stream peak plus at most one module graph, one loss graph and two
    cotangents the size of a module output (and the side stream's cached blocks are not shared with the
    main stream's).

    Cross-stream memory, without `record_stream` (under capture it would keep every such block out of
    reuse until the capture ends): a_i (allocated on the main stream, read by loss i through
    `own`/`cascade`) stays referenced by `cotangents.graphs[i]` until module i is flushed, which is after
    the main stream waited for loss i. The cotangents at a_i (allocated on the side stream, read by the
    main stream) are dropped only by main-stream code (`finish`, `flush`, the end of the step), and every
    later side-stream allocation follows a `forked()` wait on the main stream, so the side stream can
    reuse their memory only after the main stream's reads of them.

    Modules and losses must not write their inputs in place (none do): with a side stream such a write
    would race with the loss still reading a_i.

    `after_flush(j)` (data parallel, `fastlocal.parallel.data.GradientAverager`) is called right after module j
    received its last cotangent and its weight VJP ran, on the main stream; module K-1 is flushed last."""
    fork = _fork_for(side_stream, batch)
    num_modules, window = len(modules), method.window
    fused = None if step_parameters is None else FusedOptimizerStep(modules, method, step_parameters)
    if fused is not None:
        if after_flush is not None:
            raise ValueError("step_parameters (the fused optimizer step) does not combine with after_flush")
        after_flush = fused.after_flush
    cotangents = _Cotangents(modules, window, after_flush)
    last_loss = None

    def launch(i: int, output: torch.Tensor) -> _LossInFlight:
        # With a side stream: queued behind module i's forward (and behind the previous loss).
        with fork.forked():
            own = output.detach().requires_grad_()
            cascade = output.detach().requires_grad_()
            with forward_context():
                loss = method.module_loss(i, own, cascade, batch)
            if loss is not None:
                # Heads, decoders and LAMs get their gradients; the graph above a_i is freed. On a side
                # stream, autograd runs each backward op on its forward's stream.
                loss.backward()
            return _LossInFlight(i, own, cascade, loss, fork.done())

    def finish(pending: _LossInFlight) -> None:
        # What follows loss i's backward, on the main stream.
        nonlocal last_loss
        i = pending.index
        if pending.loss is not None:
            fork.wait(pending.done)  # own.grad and cascade.grad are read from here on
            cotangents.add_loss_gradients(i, pending.own.grad, pending.cascade.grad)
            if i == num_modules - 1:
                last_loss = pending.loss.detach()
            if fused is not None:
                fused.after_loss(i)
        done = i - window + 1
        if done >= 0:
            cotangents.flush(done)

    in_flight: deque[_LossInFlight] = deque()  # launched, not yet processed: at most fork.in_flight + 1
    previous = None
    try:
        for i in range(num_modules):
            inputs = _module_input(batch, previous, window)
            with forward_context():
                output = modules[i](inputs)  # with a side stream: overlaps loss i-1
            cotangents.graphs[i] = (inputs, output)
            in_flight.append(launch(i, output))
            while len(in_flight) > fork.in_flight:
                finish(in_flight.popleft())  # with a side stream: waits for loss i-1 before module i+1's forward
            previous = output
        while in_flight:
            finish(in_flight.popleft())
        for j in range(max(0, num_modules - window + 1), num_modules):
            cotangents.flush(j)
    finally:
        fork.join()  # also on an error, so a capture never ends with the side stream unjoined
    if fused is not None:
        fused.finish()  # the EMA moved loss by loss
    else:
        method.before_optimizer_step()
    return last_loss
