"""Multi-tensor EMA update: ``ema <- m * ema + (1 - m) * live`` for a whole list of tensors in one launch.

What is fused: MLAAN moves every LAM's frozen EMA copy toward the live backbone block once per step
(docs/method.md#methods). The authors' code loops over parameters in Python (3 kernels per tensor: mul_,
mul, add_); ``torch._foreach_lerp_`` needs one kernel per ~100 tensors and one per dtype. Here a single Triton
launch per (ema dtype, live dtype, 16-byte alignment) group updates every tensor: the host packs, once
per list pair, one row ``(ema_address, live_address, length)`` per chunk of ``BLOCK`` elements into a
device int64 table, and program ``i`` of the grid updates chunk ``i``. A step then does no host work
beyond an identity check of the cached lists and the launch, and no host synchronisation, so it can be
captured in a CUDA graph (build the table once before capture: the first call copies it to the device).

Bytes moved per element: read ema + read live + write ema, e.g. 12 B for fp32 and 6 B for bf16 storage;
the table adds 32 B per chunk of ``BLOCK`` elements (under 1 %). For the ResNet-110 K=54 LAM EMA set
(426 tensors, 2.6 M parameters) that is about 31 MB in fp32.

Numerics: arithmetic is fp32 whatever the storage dtype (fp16/bf16 are loaded, upcast, and rounded to
nearest even on store), and follows PyTorch's ``lerp``: with ``w = 1 - m``, ``ema + w * (live - ema)``
when ``|w| < 0.5``, else ``live - (live - ema) * (1 - w)``. So fp32 results match
``torch._foreach_lerp_(ema, live, 1 - m)`` to an ulp, and low-precision results match the reference
that computes in fp32 and rounds once.

The table holds raw addresses: the cache is keyed by the identity of the two list objects and checks,
on every call, that they still hold the same tensor objects and that the first and last tensors of each
list still have the same ``data_ptr`` (this catches ``module.to()``/``.half()``, which swap every
parameter's storage). If a single tensor's storage is swapped in place (``p.data = ...``,
``p.set_(...)``) call ``clear_cache()``. The version counters of the EMA tensors are bumped, so autograd
still detects an EMA update between a forward that saved an EMA weight and its backward.
"""

from __future__ import annotations

import math
import operator
import os
from collections import OrderedDict

import torch
from torch import Tensor

from fastlocal.kernels._triton import tl, triton

# Elements per program. 2048 fp32 = 8 KiB per operand: 16 elements (four 16-byte vectors) per thread
# with 4 warps, enough bytes in flight per SM, and at most 2047 wasted lanes on each tensor's tail.
BLOCK = 2048
NUM_WARPS = 4
_CACHE_SIZE = 8


# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update_ref(ema_tensors: list[Tensor], live_tensors: list[Tensor], momentum: float | Tensor) -> None:
    """Reference: ``torch._foreach_lerp_(ema, live, 1 - m)``, in fp32 for fp16/bf16 storage (fp64 stays fp64).

    ``momentum`` is a float or a 0-d tensor on the tensors' device (then the weight ``1 - m`` is a
    device tensor and no host synchronisation happens).
    """
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for ema, live in zip(ema_tensors, live_tensors, strict=True):
        group = groups.setdefault((ema.dtype, live.dtype), ([], []))
        group[0].append(ema)
        group[1].append(live)
    weight = 1.0 - momentum
    for (ema_dtype, live_dtype), (emas, lives) in groups.items():
        # fp32 arithmetic for fp16/bf16 storage; float64 stays float64 (the float64 tests need it exact).
        compute = torch.float64 if torch.float64 in (ema_dtype, live_dtype) else torch.float32
        exact = ema_dtype == compute
        targets = emas if exact else [t.to(compute) for t in emas]
        sources = lives if live_dtype == compute else [t.to(compute) for t in lives]
        if isinstance(weight, Tensor):
            # The List overload takes per-tensor weights; the Scalar one would call .item() on a tensor.
            torch._foreach_lerp_(targets, sources, [weight.to(compute)] * len(targets))
        else:
            torch._foreach_lerp_(targets, sources, weight)
        if not exact:
            torch._foreach_copy_(emas, targets)


@torch.no_grad()
def ema_update_loop_ref(ema_tensors: list[Tensor], live_tensors: list[Tensor], momentum: float | Tensor) -> None:
    """The authors' per-parameter loop (``ema.mul_(m).add_(live, alpha=1 - m)``); a benchmark baseline."""
    for ema, live in zip(ema_tensors, live_tensors, strict=True):
        if isinstance(momentum, Tensor):
            ema.mul_(momentum).add_(live * (1.0 - momentum))
        else:
            ema.mul_(momentum).add_(live, alpha=1.0 - momentum)


# ----------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _lerp_chunk(ema_ptr, live_ptr, offsets, mask, weight, EMA_DTYPE: tl.constexpr):
        ema = tl.load(ema_ptr + offsets, mask=mask).to(tl.float32)
        live = tl.load(live_ptr + offsets, mask=mask).to(tl.float32)
        diff = live - ema
        # PyTorch's lerp: the form that is exact at the end nearer to the weight.
        small = tl.abs(weight) < 0.5
        # Explicit fma, as PyTorch's compiled lerp (nvcc and the CPU kernels contract a * b + c).
        out = tl.where(small, tl.fma(weight, diff, ema), tl.fma(-diff, 1.0 - weight, live))
        tl.store(ema_ptr + offsets, out.to(EMA_DTYPE), mask=mask)

    @triton.jit
    def ema_update_kernel(
        table_ptr,  # int64 (num_chunks, 4): ema address, live address, length (<= BLOCK), unused
        weight_value,  # fp32 scalar 1 - m, used when WEIGHT_FROM_PTR is False
        momentum_ptr,  # 0-d momentum tensor, read when WEIGHT_FROM_PTR is True
        EMA_DTYPE: tl.constexpr,
        LIVE_DTYPE: tl.constexpr,
        WEIGHT_FROM_PTR: tl.constexpr,
        ALIGNED: tl.constexpr,  # every address in the table is a multiple of 16 bytes
        BLOCK: tl.constexpr,
    ):
        chunk = tl.program_id(0).to(tl.int64)
        row = table_ptr + chunk * 4
        ema_ptr = tl.load(row).to(tl.pointer_type(EMA_DTYPE))
        live_ptr = tl.load(row + 1).to(tl.pointer_type(LIVE_DTYPE))
        length = tl.load(row + 2)
        if ALIGNED:
            # Chunk starts are multiples of BLOCK elements, so they keep the tensor's alignment;
            # the hint lets the compiler emit 16-byte vector loads.
            ema_ptr = tl.multiple_of(ema_ptr, 16)
            live_ptr = tl.multiple_of(live_ptr, 16)
        if WEIGHT_FROM_PTR:
            weight = 1.0 - tl.load(momentum_ptr).to(tl.float32)
        else:
            weight = weight_value
        offsets = tl.arange(0, BLOCK)
        if length == BLOCK:
            # Full chunk: no mask, so loads and stores vectorise.
            _lerp_chunk(ema_ptr, live_ptr, offsets, None, weight, EMA_DTYPE)
        else:
            _lerp_chunk(ema_ptr, live_ptr, offsets, offsets < length, weight, EMA_DTYPE)

    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }


# ----------------------------------------------------------------------------------------------------
# Launcher: per-list-pair plan (cached), one launch per dtype/alignment group
# ----------------------------------------------------------------------------------------------------


def _dense_order(t: Tensor) -> tuple[int, ...] | None:
    """Strides of the non-trivial dims if ``t`` covers a dense block of memory (any dim order), else None."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride(), strict=True) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return None
        expected *= size
    return tuple(stride for size, stride in zip(t.shape, t.stride(), strict=True) if size != 1)


class _Group:
    __slots__ = ("table", "num_chunks", "ema_dtype", "live_dtype", "aligned")

    def __init__(self, table, num_chunks, ema_dtype, live_dtype, aligned):
        self.table = table
        self.num_chunks = num_chunks
        self.ema_dtype = ema_dtype
        self.live_dtype = live_dtype
        self.aligned = aligned


class _Plan:
    """Everything a step needs, built once per (ema list, live list) pair."""

    def __init__(self, ema_tensors: list[Tensor], live_tensors: list[Tensor]):
        if len(ema_tensors) != len(live_tensors):
            raise ValueError(
                f"ema_update_: got {len(ema_tensors)} EMA tensors and {len(live_tensors)} live tensors; "
                "the lists must pair up one to one"
            )
        device = ema_tensors[0].device
        self.ema_list = ema_tensors
        self.live_list = live_tensors
        self.ema_snapshot = tuple(ema_tensors)
        self.live_snapshot = tuple(live_tensors)
        self.canary = self._canary(ema_tensors, live_tensors)
        self.device = device
        rows: dict[tuple, list[tuple[int, int, int, int]]] = {}
        self.fallback_ema: list[Tensor] = []
        self.fallback_live: list[Tensor] = []
        for index, (ema, live) in enumerate(zip(ema_tensors, live_tensors, strict=True)):
            if ema.shape != live.shape:
                raise ValueError(
                    f"ema_update_: tensor {index} has EMA shape {tuple(ema.shape)} but live shape {tuple(live.shape)}"
                )
            if ema.device != device or live.device != device:
                raise ValueError(
                    f"ema_update_: tensor {index} is on {ema.device}/{live.device}, the first EMA tensor on "
                    f"{device}; move all tensors to one device"
                )
            if ema.dtype not in _TL_DTYPES or live.dtype not in _TL_DTYPES:
                raise ValueError(
                    f"ema_update_: tensor {index} has dtypes {ema.dtype}/{live.dtype}; supported: "
                    f"{sorted(str(d) for d in _TL_DTYPES)}"
                )
            numel = ema.numel()
            if numel == 0:
                continue
            order = _dense_order(ema)
            if order is None or order != _dense_order(live):
                # Not one dense block with the same layout in both: the flat kernel cannot address it.
                self.fallback_ema.append(ema)
                self.fallback_live.append(live)
                continue
            ema_address, live_address = ema.data_ptr(), live.data_ptr()
            aligned = ema_address % 16 == 0 and live_address % 16 == 0
            group_rows = rows.setdefault((ema.dtype, live.dtype, aligned), [])
            ema_size, live_size = ema.element_size(), live.element_size()
            for start in range(0, numel, BLOCK):
                group_rows.append(
                    (ema_address + start * ema_size, live_address + start * live_size, min(BLOCK, numel - start), 0)
                )
        self.groups = [
            _Group(
                torch.tensor(group_rows, dtype=torch.int64).to(device),
                len(group_rows),
                _TL_DTYPES[ema_dtype],
                _TL_DTYPES[live_dtype],
                aligned,
            )
            for (ema_dtype, live_dtype, aligned), group_rows in rows.items()
        ]

    @staticmethod
    def _canary(ema_tensors, live_tensors) -> tuple[int, int, int, int]:
        return (
            ema_tensors[0].data_ptr(),
            ema_tensors[-1].data_ptr(),
            live_tensors[0].data_ptr(),
            live_tensors[-1].data_ptr(),
        )

    def matches(self, ema_tensors: list[Tensor], live_tensors: list[Tensor]) -> bool:
        return (
            len(ema_tensors) == len(self.ema_snapshot)
            and len(live_tensors) == len(self.live_snapshot)
            and all(map(operator.is_, ema_tensors, self.ema_snapshot))
            and all(map(operator.is_, live_tensors, self.live_snapshot))
            and self._canary(ema_tensors, live_tensors) == self.canary
        )


_PLANS: OrderedDict[tuple[int, int], _Plan] = OrderedDict()


def clear_cache() -> None:
    """Forget every cached pointer table (call after swapping a tensor's storage in place)."""
    _PLANS.clear()


def _get_plan(ema_tensors: list[Tensor], live_tensors: list[Tensor], by_elements: bool = False) -> _Plan:
    """The cached plan of a list pair, keyed by the two list objects (eager: the caller passes the same
    lists every step), or with ``by_elements`` by the tensors' identities (the custom op, whose lists
    are rebuilt by the dispatcher on every call). The plan holds the lists and the tensors, so none of
    these ids can be reused while the entry exists."""
    if by_elements:
        key = (tuple(map(id, ema_tensors)), tuple(map(id, live_tensors)))
    else:
        key = (id(ema_tensors), id(live_tensors))
    plan = _PLANS.get(key)
    if plan is not None and plan.matches(ema_tensors, live_tensors):
        return plan
    plan = _Plan(ema_tensors, live_tensors)
    _PLANS[key] = plan
    _PLANS.move_to_end(key)
    while len(_PLANS) > _CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def _bump_versions(tensors: tuple[Tensor, ...]) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch versions whose increment_version takes one tensor
        for tensor in tensors:
            torch.autograd.graph.increment_version(tensor)


def ema_update_triton_(
    ema_tensors: list[Tensor], live_tensors: list[Tensor], momentum: float | Tensor, by_elements: bool = False
) -> None:
    """Launcher: one Triton launch per (ema dtype, live dtype, alignment) group of the list."""
    if triton is None:
        raise ValueError("the triton kernel backend needs the `triton` package: pip install 'fastlocal[triton]'")
    if len(ema_tensors) == 0 and len(live_tensors) == 0:
        return
    if ema_tensors and ema_tensors[0].device.type != "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError(
            "ema_update_: the Triton interpreter (TRITON_INTERPRET=1) copies kernel arguments to the host, "
            "so it cannot follow the device addresses of the multi-tensor table; unset TRITON_INTERPRET "
            "on a GPU machine, or use CPU tensors with the interpreter"
        )
    plan = _get_plan(ema_tensors, live_tensors, by_elements)
    if isinstance(momentum, Tensor):
        if momentum.numel() != 1 or momentum.device != plan.device:
            raise ValueError(
                f"ema_update_: momentum tensor must be a single element on {plan.device}, got shape "
                f"{tuple(momentum.shape)} on {momentum.device}"
            )
        weight_value, momentum_arg, from_ptr = 0.0, momentum, True
    else:
        momentum = float(momentum)
        if not math.isfinite(momentum):
            raise ValueError(f"ema_update_: momentum must be finite, got {momentum}")
        # 1 - m in double, then fp32: the same weight _foreach_lerp_ receives from the reference.
        weight_value, momentum_arg, from_ptr = 1.0 - momentum, None, False
    for group in plan.groups:
        ema_update_kernel[(group.num_chunks,)](
            group.table,
            weight_value,
            group.table if momentum_arg is None else momentum_arg,
            EMA_DTYPE=group.ema_dtype,
            LIVE_DTYPE=group.live_dtype,
            WEIGHT_FROM_PTR=from_ptr,
            ALIGNED=group.aligned,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    if plan.fallback_ema:
        ema_update_ref(plan.fallback_ema, plan.fallback_live, momentum)
    _bump_versions(plan.ema_snapshot)


# ----------------------------------------------------------------------------------------------------
# Registration: a custom op so torch.compile treats the update as an opaque in-place op on the EMA list
# (the kernel reads raw addresses, which the compiler cannot see). Eager calls skip the dispatcher:
# its per-call cost for a list of a few hundred tensors is far above the launch itself.
# ----------------------------------------------------------------------------------------------------


def _ema_update_impl(
    ema_tensors: list[Tensor], live_tensors: list[Tensor], momentum_value: float, momentum_tensor: Tensor | None
) -> None:
    ema_update_triton_(
        ema_tensors, live_tensors, momentum_value if momentum_tensor is None else momentum_tensor, by_elements=True
    )


# An explicit schema: annotation inference (of list[Tensor] here) differs between torch versions. The op
# wraps the launcher itself; the fake has nothing to allocate.
_ema_update_op = torch.library.custom_op(
    "fastlocal::ema_update_",
    _ema_update_impl,
    mutates_args={"ema_tensors"},
    schema="(Tensor(a!)[] ema_tensors, Tensor[] live_tensors, float momentum_value, Tensor? momentum_tensor) -> ()",
)


@_ema_update_op.register_fake
def _ema_update_fake(ema_tensors, live_tensors, momentum_value, momentum_tensor) -> None:
    return None


# ----------------------------------------------------------------------------------------------------
# Public function (dispatch on backend lives in fastlocal.kernels.ema_update_)
# ----------------------------------------------------------------------------------------------------


def ema_update_(ema_tensors: list[Tensor], live_tensors: list[Tensor], momentum: float | Tensor) -> None:
    """In place ``ema <- m * ema + (1 - m) * live`` with the Triton kernel (see the module docstring)."""
    if torch.compiler.is_compiling():
        if isinstance(momentum, Tensor):
            _ema_update_op(ema_tensors, live_tensors, 0.0, momentum)
        else:
            _ema_update_op(ema_tensors, live_tensors, float(momentum), None)
        return
    ema_update_triton_(ema_tensors, live_tensors, momentum)
