"""A training step replayed from a CUDA graph (`system.cuda_graphs`).

At CIFAR sizes a local-learning step is launch-bound: hundreds of small kernels per module, heads and
EMA. Capturing the whole step (local forwards and backwards, EMA, optimizer step) once and replaying it
removes the per-kernel CPU cost. What capture needs, and how it is met here:

- static inputs: the batch is copied into buffers the graph reads;
- no host synchronisation inside the step: the engine's step has none (the loss stays on the device);
- a learning rate the graph can read: the optimizer's LR is a device tensor, filled before each replay
  (`fastlocal.engine.set_learning_rate`);
- warm-up before capture: a few eager steps on a side stream (cudnn autotuning, Triton compilation,
  the EMA kernel's pointer table, the optimizer's momentum buffers);
- gradients owned by the graph: set to None before capture, so backward allocates them in the graph's
  pool and every replay writes the same memory.

One graph serves one batch shape. A batch of another shape (the partial last batch of an epoch) runs
eagerly: no recapture per step, the same math. When capture fails, a warning says why and the run goes on
eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


class GraphedStep:
    """`step(x, y) -> loss` (zero_grad excluded) run eagerly `warmup_steps` times, then captured once and
    replayed for every batch of the captured shape. `zero_grad()` is the eager path's gradient reset."""

    def __init__(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        zero_grad: Callable[[], None],
        warmup_steps: int = 3,
    ):
        self.step = step
        self.zero_grad = zero_grad
        self.warmup_left = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x, y, loss
        self.failed = False

    def eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.zero_grad()
        return self.step(x, y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.eager(x, y)
        if self.graph is not None:
            static_x, static_y, static_loss = self.static
            if x.shape != static_x.shape or x.stride() != static_x.stride():
                return self.eager(x, y)  # e.g. the partial last batch
            static_x.copy_(x)
            static_y.copy_(y)
            self.graph.replay()
            return static_loss
        if self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.eager(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        return self.capture(x, y)

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        static_x, static_y = x.clone(), y.clone()
        self.zero_grad()  # gradients to None: backward allocates them in the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_loss = self.step(static_x, static_y)
        except Exception as err:  # an op that cannot be captured: say which, then train eagerly
            torch.cuda.synchronize()
            self.failed = True
            warnings.warn(
                f"CUDA graph capture of the training step failed ({type(err).__name__}: {err}); "
                "training eagerly from here (set system.cuda_graphs=false to skip the attempt)",
                stacklevel=2,
            )
            return self.eager(x, y)
        self.graph, self.static = graph, (static_x, static_y, static_loss)
        graph.replay()  # capture records the work; this runs it for the current batch
        return static_loss
