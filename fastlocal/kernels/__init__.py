"""Triton kernels with pure-PyTorch references, and the backend dispatch.

Importing this package does not import triton: each public function resolves its backend first and
imports the kernel module (which imports triton) only for the ``triton`` backend, so ``import fastlocal``
and the ``reference`` backend work where triton is not installed.

Backends (``system.kernels`` in the config):

- ``auto``: the Triton kernel when the tensors are on a CUDA device and triton imports (and the Triton
  interpreter is not switched on, which would be orders of magnitude slower), else the reference.
- ``triton``: always the Triton kernel; on a CPU it needs ``TRITON_INTERPRET=1`` (the slow interpreter
  used by the tests).
- ``reference``: the pure-PyTorch reference (``*_ref`` in each kernel file).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
from torch import Tensor

KERNEL_BACKENDS = ("auto", "triton", "reference")

__all__ = ["KERNEL_BACKENDS", "batch_norm_act", "ema_update_", "gap_linear_cross_entropy", "resolve_backend"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return str(error)
    return None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Return ``"triton"`` or ``"reference"`` for a requested backend and the tensors' device.

    Raises ``ValueError`` for an unknown backend, for ``triton`` when triton is not installed, and for
    ``triton`` on a CPU without ``TRITON_INTERPRET=1``.
    """
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(KERNEL_BACKENDS)}")
    if backend == "reference":
        return "reference"
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda" and not _interpreting() and _triton_import_error() is None:
            return "triton"
        return "reference"
    error = _triton_import_error()
    if error is not None:
        raise ValueError(
            f"kernel backend 'triton' needs the `triton` package ({error}): pip install 'fastlocal[triton]', "
            "or use system.kernels=reference"
        )
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"kernel backend 'triton' got tensors on {device}: run on a CUDA device, set TRITON_INTERPRET=1 "
            "before starting Python for the (slow) CPU interpreter, or use system.kernels=reference"
        )
    return "triton"


def ema_update_(
    ema_tensors: list[Tensor], live_tensors: list[Tensor], momentum: float | Tensor, backend: str = "auto"
) -> None:
    """In place ``ema <- m * ema + (1 - m) * live`` for every pair of the two lists.

    Tensors of any sizes, fp32/fp16/bf16 storage (fp32 arithmetic); ``momentum`` is a float or a 0-d
    tensor on the tensors' device (no host synchronisation either way). The Triton path launches one
    kernel per dtype group and caches its pointer table per list pair: pass the same list objects every
    step (see ``fastlocal.kernels.ema``).
    """
    if len(ema_tensors) == 0:
        if len(live_tensors) != 0:
            raise ValueError(f"ema_update_: got 0 EMA tensors and {len(live_tensors)} live tensors")
        return
    if resolve_backend(backend, ema_tensors[0].device) == "triton":
        from fastlocal.kernels import ema

        ema.ema_update_(ema_tensors, live_tensors, momentum)
    else:
        from fastlocal.kernels.ema import ema_update_ref

        if len(ema_tensors) != len(live_tensors):
            raise ValueError(f"ema_update_: got {len(ema_tensors)} EMA tensors and {len(live_tensors)} live tensors")
        ema_update_ref(ema_tensors, live_tensors, momentum)


def gap_linear_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, backend: str = "auto"
) -> Tensor:
    """``cross_entropy(linear(mean(x, (2, 3)), weight, bias), target)``, mean reduction, fp32 loss.

    x: (B, C, H, W) any float dtype, NCHW or channels_last; weight: (N, C); bias: (N,) or None;
    target: int64 (B,) with values in [0, N). The Triton path computes the gradients during the forward
    and saves only them (see ``fastlocal.kernels.aux_loss``).
    """
    if resolve_backend(backend, x.device) == "triton":
        from fastlocal.kernels import aux_loss

        return aux_loss.gap_linear_cross_entropy(x, weight, bias, target)
    from fastlocal.kernels.aux_loss import gap_linear_cross_entropy_ref

    return gap_linear_cross_entropy_ref(x, weight, bias, target)


def batch_norm_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    residual: Tensor | None = None,
    relu: bool = True,
    backend: str = "auto",
) -> Tensor:
    """``relu(batch_norm(x) + residual)`` with training-mode batch statistics; the residual and the ReLU
    are optional. Updates ``running_mean``/``running_var`` in place like ``nn.BatchNorm2d`` (when given).

    x: (N, C, H, W), NCHW or channels_last, any float dtype (fp32 arithmetic; the output has x's dtype);
    weight, bias: (C,). The Triton path fuses the statistics, the normalisation, the add and the ReLU
    into three kernels forward and three backward (see ``fastlocal.kernels.batch_norm``).
    """
    if x.dim() != 4:
        raise ValueError(f"batch_norm_act: expected a 4-d (N, C, H, W) input, got shape {tuple(x.shape)}")
    if resolve_backend(backend, x.device) == "triton":
        from fastlocal.kernels import batch_norm

        return batch_norm.batch_norm_act(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu)
    from fastlocal.kernels.batch_norm import batch_norm_act_ref

    return batch_norm_act_ref(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu)
