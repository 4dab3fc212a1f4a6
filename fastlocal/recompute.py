"""Recomputation: run a chain of blocks keeping only each block's input, and recompute a block's forward
when a vector-Jacobian product needs its graph (docs/usage.md#memory-options, `system.recompute`).

    y = run_chain([(block, [block]), ...], x)      # x: (B, C, H, W); the blocks' graphs are not kept

Memory: the chain keeps the input of every segment (one activation per segment, saved through autograd's
saved-tensor mechanism, so `saved_tensors_hooks` such as `fastlocal.measure.SavedTensorAccountant` or a CPU
offload see them as they see any activation) and, during a backward, the graph of one segment at a time.
Time: one extra forward of every segment per backward through the chain (MLAAN's cascade runs W-1 input-only
VJPs and one weight VJP through a module, so a module is recomputed W times).

Exactness: the first forward runs without a graph and updates batch-norm running statistics as usual; a
recomputation restores every buffer of the segment's modules afterwards, so running statistics move once per
step whatever the number of recomputations. The recomputed forward runs under the autocast state of the first,
so it computes the same values, and the gradients are those of the plain chain up to floating-point
reassociation (the float64 tests in tests/test_recompute.py compare weights after several steps).
Segments must be deterministic functions of their input and weights (no dropout: the random state is not
replayed).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

Segment = tuple[Callable[[torch.Tensor], torch.Tensor], Sequence[nn.Module]]
"""A callable of one tensor, and the modules whose parameters and buffers it uses."""

_WANTS = threading.local()


@contextlib.contextmanager
def vjp_of(what: str) -> Iterator[None]:
    """Tell the recomputed chains that the backward run inside this context needs only the gradients of
    `what`: "inputs" (an input-only VJP, MLAAN's cascade) or "parameters" (a weight VJP). Without it every
    gradient the chain's inputs require is computed; the engine discards the unused ones either way, so
    this only saves the work of computing them."""
    assert what in ("inputs", "parameters")
    previous = getattr(_WANTS, "what", None)
    _WANTS.what = what
    try:
        yield
    finally:
        _WANTS.what = previous


def _restoring_buffers(modules: Sequence[nn.Module]) -> contextlib.AbstractContextManager:
    buffers = [b for m in modules for b in m.buffers()]
    if not buffers:
        return contextlib.nullcontext()
    saved = [b.clone() for b in buffers]

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved, strict=True):
                    buffer.copy_(value)

    return restore()


class _RecomputedChain(torch.autograd.Function):
    """forward(segments, autocast state, x, *parameters the segments train) -> the chain's output."""

    @staticmethod
    def forward(ctx, segments: list[Segment], autocast: tuple, x: torch.Tensor, *params: torch.Tensor):
        ctx.segments, ctx.autocast = segments, autocast
        ctx.param_ids = [id(p) for p in params]
        inputs = []
        with torch.no_grad():
            for function, _ in segments:
                inputs.append(x)
                x = function(x)
        ctx.save_for_backward(*inputs)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        segments, inputs = ctx.segments, ctx.saved_tensors
        wants = getattr(_WANTS, "what", None)
        need_params = wants != "inputs" and any(ctx.needs_input_grad[3:])
        need_input = ctx.needs_input_grad[2] and wants != "parameters"
        param_grads: dict[int, torch.Tensor] = {}
        device_type, enabled, dtype = ctx.autocast
        for index in range(len(segments) - 1, -1, -1):
            function, modules = segments[index]
            params = [p for m in modules for p in m.parameters() if p.requires_grad] if need_params else []
            leaf = inputs[index].detach().requires_grad_(index > 0 or need_input)
            wrt = ([leaf] if leaf.requires_grad else []) + params
            if not wrt:
                break
            # The buffers are restored after the VJP: batch norm's backward checks that the running
            # statistics it was given are the ones of its forward.
            with _restoring_buffers(modules):
                with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    output = function(leaf)
                grads = torch.autograd.grad(output, wrt, grad, allow_unused=True)
            if leaf.requires_grad:
                grad, grads = grads[0], grads[1:]
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    param_grads[id(p)] = g if id(p) not in param_grads else param_grads[id(p)] + g
            del output, grads
        return (None, None, grad if need_input else None, *(param_grads.get(i) for i in ctx.param_ids))


def chain_parameters(segments: Sequence[Segment]) -> list[torch.Tensor]:
    """The trainable parameters the segments use, each once, in order."""
    seen, params = set(), []
    for _, modules in segments:
        for m in modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def run_chain(segments: Sequence[Segment], x: torch.Tensor) -> torch.Tensor:
    """The segments applied in turn to `x`, keeping only each segment's input for backward (see the module
    docstring). Without grad mode (evaluation) it is the plain chain."""
    if not torch.is_grad_enabled():
        for function, _ in segments:
            x = function(x)
        return x
    device_type = x.device.type
    autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    return _RecomputedChain.apply(list(segments), autocast, x, *chain_parameters(segments))


def set_recompute(modules: Sequence[nn.Module], method: nn.Module, level: str) -> None:
    """Apply system.recompute = `level` (none, heads, modules, all) to the local modules and the method."""
    assert level in ("none", "heads", "modules", "all"), level
    for module in modules:
        module.recompute = level in ("modules", "all")
    method.recompute_heads = level in ("heads", "all")
