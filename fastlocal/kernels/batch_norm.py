"""Training-mode batch norm fused with the residual add and the ReLU: ``relu(bn(x) + residual)``.

Why: on an H200, a bf16 channels-last MLAAN ResNet-32 K=15 step spent 39 % of its GPU time in PyTorch's
channels-last batch-norm kernels and 12 % more in the ReLU and residual-add passes around them (cuDNN's
batch norm is not used for bf16 inputs). Every residual block has two such batch norms, and MLAAN's LAM
heads run four to five blocks per module, so these memory-bound passes are most of what a local step
adds to BP.

What is fused, per call (x viewed as an (M, C) matrix, M = N*H*W, any layout with mergeable H, W):

- forward: a partial-sums kernel (each program sums ``x - K`` and ``(x - K)^2`` over its rows, K being the
  channel's first element: the shifted-data variance, stable when the mean is large), a finalize kernel
  (mean, 1/std, the per-channel scale and shift, the running-statistics update), and one pass
  ``y = relu(x * scale + shift + residual)``;
- backward: a partial-sums kernel of ``dz`` and ``dz * x_hat`` (``dz`` = dy masked by ``y > 0``; it also
  writes ``dz``, the residual's gradient, when there is one), a kernel summing the partials, and one pass
  writing ``dx`` (reading the stored ``dz`` back instead of ``dy`` and ``y``).

Arithmetic is fp32 whatever the storage dtype; y, dx and the residual's gradient are stored in the dtype
of x and of the residual. Partial sums are reduced in a fixed order, so results are deterministic.
Running statistics follow ``nn.BatchNorm2d``: biased variance for the normalisation, unbiased variance in
``running_var``, ``running = (1 - momentum) * running + momentum * batch``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlocal.kernels._triton import tl, triton

# Elements of one tile of the elementwise passes, and of one loop step of the partial-sums kernels (smaller:
# they keep two fp32 accumulator tiles and up to three input tiles live); programs of the partial sums.
TILE = 4096
PARTIALS_TILE = 1024
TARGET_PARTIALS = 512
# The kernels that sum the partials: rows summed per loop step, and channels per program. They are bound by
# latency (each loop step waits for its loads), so few steps and several programs: 512 partials of a
# 64-channel norm take 2 steps in each of 4 programs (before: 8 steps in one program, 7 us on an H200).
FINALIZE_ROWS = 256
FINALIZE_CHANNELS = 16
# Warps of the elementwise passes (32 elements of a 4096-element tile per thread with 4).
ELEMENTWISE_WARPS = 4


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------


def batch_norm_act_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    residual: Tensor | None = None,
    relu: bool = True,
) -> Tensor:
    """``relu(batch_norm(x, training=True) + residual)`` with PyTorch ops (the ReLU and residual optional)."""
    out = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

if triton is not None:
    # Stride legend. Every 4-d tensor is read as an (M, C) matrix, M = N*H*W, through three strides named
    # s<tensor><dim>: <dim> is n (image), c (channel) or hw (pixel within an image, H and W merged); <tensor> is
    #   x: the input, r: the residual (forward) or its gradient (backward), y: the output,
    #   d: the output's gradient dy, z: dz (the masked dy, stored as the residual's gradient), g: dx.
    # M, C: the matrix; hw_size: H*W; rows_per_program: rows of the (M, C) view one partial-sum program sums.
    # Pointers of tensors a launch does not use are a valid dummy (x); the constexpr flags say so.

    @triton.jit
    def _tile_offsets(rows, cols, hw_size, stride_n, stride_c, stride_hw):
        # Row m of the (M, C) view is image m // HW, pixel m % HW; int64 so large batches cannot overflow.
        n = (rows // hw_size).to(tl.int64)
        hw = (rows % hw_size).to(tl.int64)
        return n[:, None] * stride_n + hw[:, None] * stride_hw + cols[None, :].to(tl.int64) * stride_c

    @triton.jit
    def bn_stats_partials_kernel(
        x_ptr,
        partial_ptr,
        M,
        C,
        hw_size,
        sxn,
        sxc,
        sxhw,
        rows_per_program,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_m, pid_c = tl.program_id(0), tl.program_id(1)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        shift = tl.load(x_ptr + cols.to(tl.int64) * sxc, mask=col_mask, other=0.0).to(tl.float32)
        s1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        first = pid_m * rows_per_program
        for start in range(0, rows_per_program, BLOCK_M):
            rows = first + start + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & col_mask[None, :]
            offsets = _tile_offsets(rows, cols, hw_size, sxn, sxc, sxhw)
            d = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - shift[None, :]
            d = tl.where(mask, d, 0.0)
            s1 += d
            s2 += d * d
        _store_partials(partial_ptr, pid_m, cols, col_mask, C, s1, s2)

    @triton.jit
    def _store_partials(partial_ptr, pid_m, cols, col_mask, C, s1, s2):
        # Row pid_m of the (num_partials, 2, C) partials: the column sums of the two accumulator tiles.
        out = partial_ptr + pid_m * 2 * C + cols
        tl.store(out, tl.sum(s1, axis=0), mask=col_mask)
        tl.store(out + C, tl.sum(s2, axis=0), mask=col_mask)

    @triton.jit
    def _sum_partials(partial_ptr, num_partials, cols, col_mask, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # The two (num_partials, C) halves of the (num_partials, 2, C) partials, summed over their rows in
        # a fixed order.
        a1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        a2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for start in range(0, num_partials, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            mask = (p < num_partials)[:, None] & col_mask[None, :]
            row = partial_ptr + p[:, None] * 2 * C + cols[None, :]
            a1 += tl.load(row, mask=mask, other=0.0)
            a2 += tl.load(row + C, mask=mask, other=0.0)
        return tl.sum(a1, axis=0), tl.sum(a2, axis=0)

    @triton.jit
    def bn_stats_finalize_kernel(
        x_ptr,
        partial_ptr,
        num_partials,
        weight_ptr,
        bias_ptr,
        running_mean_ptr,
        running_var_ptr,
        mean_ptr,
        invstd_ptr,
        scale_ptr,
        shift_ptr,
        M,
        C,
        sxc,
        eps,
        momentum,
        UPDATE_RUNNING: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        k = tl.load(x_ptr + cols.to(tl.int64) * sxc, mask=col_mask, other=0.0).to(tl.float32)
        s1, s2 = _sum_partials(partial_ptr, num_partials, cols, col_mask, C, BLOCK_P, BLOCK_C)
        shifted_mean = s1 / M
        var = tl.maximum(s2 / M - shifted_mean * shifted_mean, 0.0)
        mean = k + shifted_mean
        invstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(weight_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        scale = w * invstd
        tl.store(mean_ptr + cols, mean, mask=col_mask)
        tl.store(invstd_ptr + cols, invstd, mask=col_mask)
        tl.store(scale_ptr + cols, scale, mask=col_mask)
        tl.store(shift_ptr + cols, b - mean * scale, mask=col_mask)
        if UPDATE_RUNNING:
            rm = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0)
            rv = tl.load(running_var_ptr + cols, mask=col_mask, other=0.0)
            unbiased = var * (M * 1.0) / tl.maximum(M - 1, 1)
            rm_new = (1.0 - momentum) * rm.to(tl.float32) + momentum * mean
            rv_new = (1.0 - momentum) * rv.to(tl.float32) + momentum * unbiased
            tl.store(running_mean_ptr + cols, rm_new.to(running_mean_ptr.dtype.element_ty), mask=col_mask)
            tl.store(running_var_ptr + cols, rv_new.to(running_var_ptr.dtype.element_ty), mask=col_mask)

    @triton.jit
    def bn_apply_kernel(
        x_ptr,
        res_ptr,
        y_ptr,
        scale_ptr,
        shift_ptr,
        M,
        C,
        hw_size,
        sxn,
        sxc,
        sxhw,
        srn,
        src,
        srhw,
        syn,
        syc,
        syhw,
        HAS_RESIDUAL: tl.constexpr,
        RELU: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        mask = (rows < M)[:, None] & col_mask[None, :]
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
        x = tl.load(x_ptr + _tile_offsets(rows, cols, hw_size, sxn, sxc, sxhw), mask=mask, other=0.0)
        out = x.to(tl.float32) * scale[None, :] + shift[None, :]
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + _tile_offsets(rows, cols, hw_size, srn, src, srhw), mask=mask, other=0.0)
            out += r.to(tl.float32)
        if RELU:
            out = tl.maximum(out, 0.0)
        y_ptrs = y_ptr + _tile_offsets(rows, cols, hw_size, syn, syc, syhw)
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _masked_grad(dy_ptr, y_ptr, rows, cols, mask, hw_size, sdn, sdc, sdhw, syn, syc, syhw, RELU: tl.constexpr):
        # dz = dy where the output was positive (the ReLU's gradient), in fp32.
        dz = tl.load(dy_ptr + _tile_offsets(rows, cols, hw_size, sdn, sdc, sdhw), mask=mask, other=0.0)
        dz = dz.to(tl.float32)
        if RELU:
            y = tl.load(y_ptr + _tile_offsets(rows, cols, hw_size, syn, syc, syhw), mask=mask, other=0.0)
            dz = tl.where(y.to(tl.float32) > 0.0, dz, 0.0)
        return dz

    @triton.jit
    def bn_grad_partials_kernel(
        dy_ptr,
        y_ptr,
        x_ptr,
        mean_ptr,
        invstd_ptr,
        partial_ptr,
        dz_ptr,
        M,
        C,
        hw_size,
        sdn,
        sdc,
        sdhw,
        syn,
        syc,
        syhw,
        sxn,
        sxc,
        sxhw,
        szn,
        szc,
        szhw,
        rows_per_program,
        RELU: tl.constexpr,
        STORE_DZ: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # STORE_DZ: also write dz (the residual's gradient), so the dx pass reads it instead of dy and y.
        pid_m, pid_c = tl.program_id(0), tl.program_id(1)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
        invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0)
        s1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        first = pid_m * rows_per_program
        for start in range(0, rows_per_program, BLOCK_M):
            rows = first + start + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & col_mask[None, :]
            dz = _masked_grad(dy_ptr, y_ptr, rows, cols, mask, hw_size, sdn, sdc, sdhw, syn, syc, syhw, RELU)
            if STORE_DZ:
                dz_ptrs = dz_ptr + _tile_offsets(rows, cols, hw_size, szn, szc, szhw)
                tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
            x = tl.load(x_ptr + _tile_offsets(rows, cols, hw_size, sxn, sxc, sxhw), mask=mask, other=0.0)
            x_hat = (x.to(tl.float32) - mean[None, :]) * invstd[None, :]
            s1 += dz
            s2 += tl.where(mask, dz * x_hat, 0.0)
        _store_partials(partial_ptr, pid_m, cols, col_mask, C, s1, s2)

    @triton.jit
    def bn_grad_sums_kernel(partial_ptr, num_partials, sums_ptr, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # sums (2, C): the bias gradient sum(dz) and the weight gradient sum(dz * x_hat).
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        s1, s2 = _sum_partials(partial_ptr, num_partials, cols, col_mask, C, BLOCK_P, BLOCK_C)
        tl.store(sums_ptr + cols, s1, mask=col_mask)
        tl.store(sums_ptr + C + cols, s2, mask=col_mask)

    @triton.jit
    def bn_grad_input_kernel(
        dy_ptr,
        y_ptr,
        x_ptr,
        mean_ptr,
        invstd_ptr,
        weight_ptr,
        sums_ptr,
        dx_ptr,
        dres_ptr,
        M,
        C,
        hw_size,
        sdn,
        sdc,
        sdhw,
        syn,
        syc,
        syhw,
        sxn,
        sxc,
        sxhw,
        sgn,
        sgc,
        sghw,
        srn,
        src,
        srhw,
        RELU: tl.constexpr,
        DZ_STORED: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        WANT_DX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # DZ_STORED: the partial-sums pass already wrote dz into dres; read it back (one tensor, not two).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        mask = (rows < M)[:, None] & col_mask[None, :]
        dres_ptrs = dres_ptr + _tile_offsets(rows, cols, hw_size, srn, src, srhw)
        if DZ_STORED:
            dz = tl.load(dres_ptrs, mask=mask, other=0.0).to(tl.float32)
        else:
            dz = _masked_grad(dy_ptr, y_ptr, rows, cols, mask, hw_size, sdn, sdc, sdhw, syn, syc, syhw, RELU)
            if HAS_RESIDUAL:
                tl.store(dres_ptrs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
        if WANT_DX:
            mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
            invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0)
            w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            mean_dz = tl.load(sums_ptr + cols, mask=col_mask, other=0.0) / M
            mean_dz_xhat = tl.load(sums_ptr + C + cols, mask=col_mask, other=0.0) / M
            x = tl.load(x_ptr + _tile_offsets(rows, cols, hw_size, sxn, sxc, sxhw), mask=mask, other=0.0)
            x_hat = (x.to(tl.float32) - mean[None, :]) * invstd[None, :]
            dx = (w * invstd)[None, :] * (dz - mean_dz[None, :] - x_hat * mean_dz_xhat[None, :])
            dx_ptrs = dx_ptr + _tile_offsets(rows, cols, hw_size, sgn, sgc, sghw)
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launch helpers and launchers
# ----------------------------------------------------------------------------------------------------


def _nchw_strides(t: Tensor) -> tuple[int, int, int] | None:
    """(stride of N, of C, of one pixel) when H and W merge into one pixel index, else None."""
    sn, sc, sh, sw = t.stride()
    if t.shape[2] == 1 or sh == t.shape[3] * sw:
        return sn, sc, sw
    return None


def _dense(t: Tensor, like: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    strides = _nchw_strides(t)
    if strides is None:
        t = t.contiguous(memory_format=torch.channels_last if _channels_last(like) else torch.contiguous_format)
        strides = _nchw_strides(t)
    return t, strides


def _channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _tiles(num_channels: int, tile: int = TILE) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(num_channels), 64)
    return max(tile // block_c, 16), block_c


class _Grid(NamedTuple):
    """Launch shapes for an (M, C) view: the elementwise passes and the partial-sum kernels."""

    block_c: int
    tile_m: int  # rows of an elementwise tile
    programs_c: int
    programs_m: int  # partial-sum programs (rows of the partials)
    rows_per_program: int
    block_m: int  # rows of one loop step of the partial sums
    partials_warps: int  # of a partial-sum program: about 8 elements of each tile per thread (a 4096-element
    # tile with 4 warps takes 158 registers on sm_90, 77 with 16: `python scripts/compile_kernels.py --sweep`)
    block_c_finalize: int  # channels of one program summing the partials
    programs_c_finalize: int
    finalize_warps: int  # about 8 elements of each of its two accumulator tiles per thread


def _grid(rows: int, num_channels: int) -> _Grid:
    tile_m, block_c = _tiles(num_channels)
    block_m = min(_tiles(num_channels, PARTIALS_TILE)[0], max(16, triton.next_power_of_2(rows)))
    rows_per_program = block_m * triton.cdiv(triton.cdiv(rows, block_m), TARGET_PARTIALS)
    partials_warps = max(4, min(16, block_m * block_c // 256))
    block_c_finalize = min(block_c, FINALIZE_CHANNELS)
    return _Grid(
        block_c,
        tile_m,
        triton.cdiv(num_channels, block_c),
        triton.cdiv(rows, rows_per_program),
        rows_per_program,
        block_m,
        partials_warps,
        block_c_finalize,
        triton.cdiv(num_channels, block_c_finalize),
        max(4, min(16, FINALIZE_ROWS * block_c_finalize // 256)),
    )


def _forward_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor]:
    """(y, stats (2, C): the batch mean and 1/std); updates the running statistics in place when given."""
    x, sx = _dense(x, x)
    n, c, h, w = x.shape
    rows, hw = n * h * w, h * w
    device = x.device
    g = _grid(rows, c)
    partials = torch.empty(g.programs_m, 2, c, device=device, dtype=torch.float32)
    bn_stats_partials_kernel[(g.programs_m, g.programs_c)](
        x,
        partials,
        rows,
        c,
        hw,
        *sx,
        g.rows_per_program,
        BLOCK_M=g.block_m,
        BLOCK_C=g.block_c,
        num_warps=g.partials_warps,
    )
    stats = torch.empty(2, c, device=device, dtype=torch.float32)
    mean, invstd = stats.unbind(0)
    scale, shift = torch.empty(2, c, device=device, dtype=torch.float32).unbind(0)
    update = running_mean is not None
    bn_stats_finalize_kernel[(g.programs_c_finalize,)](
        x,
        partials,
        g.programs_m,
        weight,
        bias,
        running_mean if update else mean,
        running_var if update else mean,
        mean,
        invstd,
        scale,
        shift,
        rows,
        c,
        sx[1],
        eps,
        momentum,
        UPDATE_RUNNING=update,
        BLOCK_P=FINALIZE_ROWS,
        BLOCK_C=g.block_c_finalize,
        num_warps=g.finalize_warps,
    )
    y = torch.empty_like(x)
    sy = _nchw_strides(y)
    grid = (triton.cdiv(rows, g.tile_m), g.programs_c)
    if residual is not None:
        residual, sr = _dense(residual, x)
    else:
        sr = sx
    bn_apply_kernel[grid](
        x,
        residual if residual is not None else x,
        y,
        scale,
        shift,
        rows,
        c,
        hw,
        *sx,
        *sr,
        *sy,
        HAS_RESIDUAL=residual is not None,
        RELU=relu,
        BLOCK_M=g.tile_m,
        BLOCK_C=g.block_c,
        num_warps=ELEMENTWISE_WARPS,
    )
    return y, stats


def _forward_outputs(x: Tensor) -> tuple[Tensor, Tensor]:
    y = torch.empty_like(x, memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
    return y, x.new_empty(2, x.shape[1], dtype=torch.float32)


def _backward_impl(
    dy: Tensor,
    x: Tensor,
    y: Tensor | None,
    weight: Tensor,
    stats: Tensor,
    relu: bool,
    want_dx: bool,
    want_dres: bool,
    residual_dtype: torch.dtype,
    residual_channels_last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx or an empty tensor, the residual's gradient or an empty tensor, sums (2, C): the bias gradient
    sum(dz) and the weight gradient sum(dz * x_hat))."""
    x, sx = _dense(x, x)  # the forward ran on this layout (a no-op for the dense x a convolution writes)
    mean, invstd = stats.unbind(0)
    dy, sd = _dense(dy, x)
    n, c, h, w = x.shape
    rows, hw = n * h * w, h * w
    sy = _nchw_strides(y) if y is not None else sx
    g = _grid(rows, c)
    dx, dres = _backward_outputs(x, want_dx, want_dres, residual_dtype, residual_channels_last)
    sg = _nchw_strides(dx) if want_dx else sx
    sr = _nchw_strides(dres) if want_dres else sx
    # dz is a masked copy of dy: stored in dres's dtype it is exact when that is dy's dtype.
    store_dz = want_dres and dres.dtype == dy.dtype
    partials = torch.empty(g.programs_m, 2, c, device=x.device, dtype=torch.float32)
    bn_grad_partials_kernel[(g.programs_m, g.programs_c)](
        dy,
        y if y is not None else x,
        x,
        mean,
        invstd,
        partials,
        dres if store_dz else x,
        rows,
        c,
        hw,
        *sd,
        *sy,
        *sx,
        *sr,
        g.rows_per_program,
        RELU=relu,
        STORE_DZ=store_dz,
        BLOCK_M=g.block_m,
        BLOCK_C=g.block_c,
        num_warps=g.partials_warps,
    )
    sums = torch.empty(2, c, device=x.device, dtype=torch.float32)
    bn_grad_sums_kernel[(g.programs_c_finalize,)](
        partials, g.programs_m, sums, c, BLOCK_P=FINALIZE_ROWS, BLOCK_C=g.block_c_finalize, num_warps=g.finalize_warps
    )
    if want_dx or (want_dres and not store_dz):
        grid = (triton.cdiv(rows, g.tile_m), g.programs_c)
        bn_grad_input_kernel[grid](
            dy,
            y if y is not None else x,
            x,
            mean,
            invstd,
            weight,
            sums,
            dx if want_dx else x,
            dres if want_dres else x,
            rows,
            c,
            hw,
            *sd,
            *sy,
            *sx,
            *sg,
            *sr,
            RELU=relu,
            DZ_STORED=store_dz,
            HAS_RESIDUAL=want_dres,
            WANT_DX=want_dx,
            BLOCK_M=g.tile_m,
            BLOCK_C=g.block_c,
            num_warps=ELEMENTWISE_WARPS,
        )
    return dx, dres, sums


def _backward_outputs(
    x: Tensor, want_dx: bool, want_dres: bool, residual_dtype: torch.dtype, residual_channels_last: bool
) -> tuple[Tensor, Tensor]:
    dx = torch.empty_like(x) if want_dx else x.new_empty(0)
    fmt = torch.channels_last if residual_channels_last else torch.contiguous_format
    dres = (
        torch.empty(x.shape, device=x.device, dtype=residual_dtype, memory_format=fmt) if want_dres else x.new_empty(0)
    )
    return dx, dres


def _backward_fake(dy, x, y, weight, stats, relu, want_dx, want_dres, residual_dtype, residual_channels_last):
    x = x.contiguous(memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
    dx, dres = _backward_outputs(x, want_dx, want_dres, residual_dtype, residual_channels_last)
    return dx, dres, x.new_empty(2, x.shape[1], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Registration: custom ops, as in aux_loss.py and ema.py, so torch.compile treats the passes as opaque ops
# (the kernels read raw strides). Eager calls skip the dispatcher (its host cost is that of a launch).
# ----------------------------------------------------------------------------------------------------


# Explicit schemas: annotation inference differs between torch versions. The ops wrap the launchers
# themselves; the fakes only allocate the outputs.
_forward_op = torch.library.custom_op(
    "fastlocal::batch_norm_act_fwd",
    _forward_impl,
    mutates_args={"running_mean", "running_var"},
    schema="(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, float momentum, float eps, bool relu) -> (Tensor, Tensor)",
)


@_forward_op.register_fake
def _forward_fake(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
    return _forward_outputs(x)


_backward_op = torch.library.custom_op(
    "fastlocal::batch_norm_act_bwd",
    _backward_impl,
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor? y, Tensor weight, Tensor stats, bool relu, bool want_dx, "
    "bool want_dres, ScalarType residual_dtype, bool residual_channels_last) -> (Tensor, Tensor, Tensor)",
)
_backward_op.register_fake(_backward_fake)


class _BatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
        forward = _forward_op if torch.compiler.is_compiling() else _forward_impl
        y, stats = forward(
            x, weight, bias, residual, running_mean, running_var, momentum if momentum is not None else 0.0, eps, relu
        )
        ctx.save_for_backward(x, y if relu else None, weight, stats)
        ctx.relu = relu
        ctx.residual_like = (residual.dtype, _channels_last(residual)) if residual is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, stats = ctx.saved_tensors
        want_dx = ctx.needs_input_grad[0]
        want_dres = ctx.residual_like is not None and ctx.needs_input_grad[3]
        residual_dtype, residual_channels_last = ctx.residual_like or (x.dtype, False)
        backward = _backward_op if torch.compiler.is_compiling() else _backward_impl
        dx, dres, sums = backward(
            dy, x, y, weight, stats, ctx.relu, want_dx, want_dres, residual_dtype, residual_channels_last
        )
        dweight = sums[1].to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = sums[0].to(weight.dtype) if ctx.needs_input_grad[2] else None
        return (dx if want_dx else None), dweight, dbias, (dres if want_dres else None), None, None, None, None, None


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
) -> Tensor:
    """The Triton path of ``fastlocal.kernels.batch_norm_act`` (see there)."""
    return _BatchNormAct.apply(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu)
