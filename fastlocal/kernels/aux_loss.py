"""Fused auxiliary loss: global average pool + Linear + cross-entropy, forward and backward.

What is fused: the GAP+Linear head of DGL/MLAAN (``Gx_i``/``Gy_i``, docs/method.md#heads-and-decoders) and
its mean cross-entropy. As in Liger-Kernel's fused linear cross-entropy, the gradients are computed during
the forward pass, so neither the pooled features nor the logits are kept for the backward. Because
``dL/dx`` is a broadcast of ``dL/dpooled / (H*W)`` over the spatial dims, the forward saves that (B, C) fp32 matrix
instead of a (B, C, H, W) tensor; the backward writes ``dx`` once, with the incoming gradient folded in.

Launches (forward 2 or 3, backward 1; eager PyTorch needs about 15 for the same work):

1. ``aux_loss_pool_kernel`` x (B, C, H, W) -> pooled (B, C) fp32. Skipped when the logits fit one tile of
   ``BLOCK_N`` columns and a row of x is small (the CIFAR heads): then kernel 2 pools its own rows.
2. ``aux_loss_logits_kernel`` per (row tile, class tile): logits = pooled @ W^T + b, plus each tile's row max
   and sum of exponentials (a split log-sum-exp, so class tiles run in parallel).
3. ``aux_loss_grad_kernel`` one launch, three kinds of programs: dW tiles (dlogits^T @ pooled, and db = column
   sums of dlogits; for small heads each over one split of the batch, so the reduction runs in parallel
   and the backward adds the few partial sums), dpooled tiles (dlogits @ W), and one program for the
   loss. Each recomputes dlogits = (softmax - onehot) / B from the logits and the combined log-sum-exp,
   so dlogits is never written; every reduction runs in a fixed order (deterministic, no atomics).
4. ``aux_loss_backward_kernel`` (backward): dx = broadcast(dpooled * g / HW) in x's dtype and layout, and
   dW * g, db * g (summing the splits) in the parameters' dtypes, where g is the 0-d grad_output read
   on the device (no host synchronisation, so the step can be captured in a CUDA graph).

Bytes moved (fp32, CIFAR head B=1024, C=64, 8x8, N=10): x is read once (16.8 MB) in the forward and dx
written once (16.8 MB) in the backward, the same as eager's minimum; scratch is B*(C+N) floats, and
the saved state is B*C + S*(N*C + N) floats (S = 8 batch splits here: 283 KB) instead of eager's
pooled features and logits.

Numerics: loads are upcast to fp32; every reduction and ``tl.dot`` accumulates in fp32 with
``input_precision="ieee"`` (no TF32), so fp32 results match the reference to ~1e-6 and fp16/bf16 inputs
are only rounded when dx/dW/db are stored in the input's dtype. Targets must lie in [0, N): checking
that would need a host synchronisation (an out-of-range target gives a wrong loss, not a memory error).
``ignore_index`` and label smoothing are not supported.

Layouts: x may be contiguous NCHW or channels_last (NHWC in memory) without a copy; any other strides
are made contiguous first. The weight and bias are made contiguous (no-ops for nn.Linear parameters).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastlocal.kernels._triton import tl, triton

# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------


def gap_linear_cross_entropy_ref(x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
    """Reference: ``cross_entropy(linear(x.float().mean((2, 3)), weight.float(), bias.float()), target)``."""
    logits = F.linear(x.float().mean((2, 3)), weight.float(), None if bias is None else bias.float())
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _pool_tile(
        x_ptr,
        rows,  # (BLOCK_B,) batch indices
        row_mask,
        chans,  # (BLOCK_C,) channel indices
        chan_mask,
        C,
        HW,
        inv_hw,
        CHANNELS_LAST: tl.constexpr,  # x is NHWC in memory, else NCHW; a literal unit stride vectorises
        BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
    ):
        """Mean over H*W of x[rows, chans] -> (BLOCK_B, BLOCK_C) fp32; masked entries are 0."""
        base = x_ptr + rows.to(tl.int64)[:, None, None] * (C * HW)
        mask_bc = row_mask[:, None, None] & chan_mask[None, :, None]
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for hw_start in range(0, HW, BLOCK_HW):
            hw = hw_start + tl.arange(0, BLOCK_HW)
            mask = mask_bc & (hw < HW)[None, None, :]
            if CHANNELS_LAST:
                offsets = chans[None, :, None] + hw[None, None, :] * C
            else:
                offsets = chans[None, :, None] * HW + hw[None, None, :]
            tile = tl.load(base + offsets, mask=mask, other=0.0)
            acc += tl.sum(tile.to(tl.float32), axis=2)
        return acc * inv_hw

    @triton.jit
    def aux_loss_pool_kernel(
        x_ptr,  # (B, C, H, W), NCHW or NHWC in memory
        pooled_ptr,  # out (B, C) fp32
        B,
        C,
        HW,
        inv_hw,
        CHANNELS_LAST: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_mask = rows < B
        chan_mask = chans < C
        pooled = _pool_tile(
            x_ptr, rows, row_mask, chans, chan_mask, C, HW, inv_hw, CHANNELS_LAST, BLOCK_B, BLOCK_C,
            BLOCK_HW,
        )  # fmt: skip
        mask = row_mask[:, None] & chan_mask[None, :]
        tl.store(pooled_ptr + rows[:, None] * C + chans[None, :], pooled, mask=mask)

    @triton.jit
    def aux_loss_logits_kernel(
        x_ptr,  # (B, C, H, W), read only when FUSE_POOL
        pooled_ptr,  # (B, C) fp32: written when FUSE_POOL, else read
        w_ptr,  # (N, C) contiguous, any float dtype
        b_ptr,  # (N,) or a dummy when not HAS_BIAS
        logits_ptr,  # out (B, N) fp32
        tile_max_ptr,  # out (B, num_n_tiles) fp32: max of the row's logits in this class tile
        tile_sum_ptr,  # out (B, num_n_tiles) fp32: sum of exp(logit - tile max) in this class tile
        B,
        C,
        HW,
        N,
        num_n_tiles,
        inv_hw,
        CHANNELS_LAST: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        FUSE_POOL: tl.constexpr,  # only with a single class tile, else tiles would pool the same rows
        BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < B
        col_mask = cols < N
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for c_start in range(0, C, BLOCK_C):
            chans = c_start + tl.arange(0, BLOCK_C)
            chan_mask = chans < C
            pooled_ptrs = pooled_ptr + rows[:, None] * C + chans[None, :]
            pooled_mask = row_mask[:, None] & chan_mask[None, :]
            if FUSE_POOL:
                pooled = _pool_tile(
                    x_ptr, rows, row_mask, chans, chan_mask, C, HW, inv_hw, CHANNELS_LAST, BLOCK_B,
                    BLOCK_C, BLOCK_HW,
                )  # fmt: skip
                tl.store(pooled_ptrs, pooled, mask=pooled_mask)
            else:
                pooled = tl.load(pooled_ptrs, mask=pooled_mask, other=0.0)
            # W^T tile (BLOCK_C, BLOCK_N)
            w_mask = chan_mask[:, None] & col_mask[None, :]
            w_t = tl.load(w_ptr + cols[None, :] * C + chans[:, None], mask=w_mask, other=0.0).to(tl.float32)
            acc = tl.dot(pooled, w_t, acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        out_mask = row_mask[:, None] & col_mask[None, :]
        tl.store(logits_ptr + rows[:, None] * N + cols[None, :], acc, mask=out_mask)
        logits = tl.where(col_mask[None, :], acc, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        tile_sum = tl.sum(tl.exp(logits - tile_max[:, None]), axis=1)
        tl.store(tile_max_ptr + rows * num_n_tiles + pid_n, tile_max, mask=row_mask)
        tl.store(tile_sum_ptr + rows * num_n_tiles + pid_n, tile_sum, mask=row_mask)

    @triton.jit
    def _row_lse(tile_max_ptr, tile_sum_ptr, rows, row_mask, num_n_tiles, BLOCK_T: tl.constexpr):
        """Combine the per-class-tile (max, sum) of kernel 2 into log-sum-exp per row; 0 on masked rows."""
        tiles = tl.arange(0, BLOCK_T)
        mask = row_mask[:, None] & (tiles < num_n_tiles)[None, :]
        offsets = rows[:, None] * num_n_tiles + tiles[None, :]
        tile_max = tl.load(tile_max_ptr + offsets, mask=mask, other=float("-inf"))
        tile_sum = tl.load(tile_sum_ptr + offsets, mask=mask, other=0.0)
        row_max = tl.where(row_mask, tl.max(tile_max, axis=1), 0.0)
        total = tl.sum(tile_sum * tl.exp(tile_max - row_max[:, None]), axis=1)
        # total >= 1 on real rows (the max term is exp(0)); masked rows take log(1) = 0.
        return row_max + tl.log(tl.where(row_mask, total, 1.0))

    @triton.jit
    def _dlogits_tile(logits_ptr, target_ptr, rows, row_mask, lse, cols, N, inv_b):
        """(softmax - onehot) / B for rows x cols, fp32; 0 outside the matrix."""
        mask = row_mask[:, None] & (cols < N)[None, :]
        logits = tl.load(logits_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=float("-inf"))
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
        probs = tl.exp(logits - lse[:, None])
        onehot = (cols[None, :] == target[:, None]).to(tl.float32)
        return tl.where(mask, (probs - onehot) * inv_b, 0.0)

    @triton.jit
    def aux_loss_grad_kernel(
        pooled_ptr,  # (B, C) fp32
        w_ptr,  # (N, C) contiguous
        target_ptr,  # (B,) int64
        logits_ptr,  # (B, N) fp32
        tile_max_ptr,  # (B, num_n_tiles) fp32
        tile_sum_ptr,  # (B, num_n_tiles) fp32
        dpooled_ptr,  # out (B, C) fp32: dL/dpooled
        dw_ptr,  # out (num_splits, N, C) fp32: dL/dW summed over each split's rows
        db_ptr,  # out (num_splits, N) fp32: dL/db likewise
        loss_ptr,  # out () fp32
        B,
        C,
        N,
        num_n_tiles,
        inv_b,
        num_c_tiles,  # ceil(C / BLOCK_C)
        num_dw_tiles,  # ceil(N / BLOCK_N) * num_c_tiles
        rows_per_split,  # dW programs split the batch into chunks of this many rows (a BLOCK_B multiple)
        num_dw_programs,  # programs [0, num_dw_programs) compute dW (and db) tiles of one split each
        num_dpooled_programs,  # the next ones dpooled tiles; the last program the loss
        HAS_BIAS: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_T: tl.constexpr,  # power of two >= num_n_tiles
        BLOCK_LOSS: tl.constexpr,  # rows per iteration of the loss program
    ):
        pid = tl.program_id(0)
        if pid < num_dw_programs:
            # dW[split, cols, chans] = dlogits[rows, cols]^T @ pooled[rows, chans] over the split's rows;
            # the backward sums the splits (few dW tiles and a long batch would leave one serial loop).
            split = pid // num_dw_tiles
            tile = pid % num_dw_tiles
            pid_n = tile // num_c_tiles
            pid_c = tile % num_c_tiles
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
            col_mask = cols < N
            chan_mask = chans < C
            acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
            db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            row_begin = split * rows_per_split
            row_end = tl.minimum(row_begin + rows_per_split, B)
            for b_start in range(row_begin, row_end, BLOCK_B):
                rows = b_start + tl.arange(0, BLOCK_B)
                row_mask = rows < row_end
                lse = _row_lse(tile_max_ptr, tile_sum_ptr, rows, row_mask, num_n_tiles, BLOCK_T)
                dlogits = _dlogits_tile(logits_ptr, target_ptr, rows, row_mask, lse, cols, N, inv_b)
                pooled_mask = row_mask[:, None] & chan_mask[None, :]
                pooled = tl.load(pooled_ptr + rows[:, None] * C + chans[None, :], mask=pooled_mask, other=0.0)
                acc = tl.dot(tl.trans(dlogits), pooled, acc, input_precision="ieee")
                db_acc += tl.sum(dlogits, axis=0)
            dw_mask = col_mask[:, None] & chan_mask[None, :]
            tl.store(dw_ptr + split * N * C + cols[:, None] * C + chans[None, :], acc, mask=dw_mask)
            if HAS_BIAS:
                if pid_c == 0:
                    tl.store(db_ptr + split * N + cols, db_acc, mask=col_mask)
        elif pid < num_dw_programs + num_dpooled_programs:
            # dpooled[rows, chans] = dlogits[rows, :] @ W[:, chans]
            local = pid - num_dw_programs
            pid_b = local // num_c_tiles
            pid_c = local % num_c_tiles
            rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
            chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
            row_mask = rows < B
            chan_mask = chans < C
            lse = _row_lse(tile_max_ptr, tile_sum_ptr, rows, row_mask, num_n_tiles, BLOCK_T)
            acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
            for n_start in range(0, N, BLOCK_N):
                cols = n_start + tl.arange(0, BLOCK_N)
                dlogits = _dlogits_tile(logits_ptr, target_ptr, rows, row_mask, lse, cols, N, inv_b)
                w_mask = (cols < N)[:, None] & chan_mask[None, :]
                w = tl.load(w_ptr + cols[:, None] * C + chans[None, :], mask=w_mask, other=0.0).to(tl.float32)
                acc = tl.dot(dlogits, w, acc, input_precision="ieee")
            out_mask = row_mask[:, None] & chan_mask[None, :]
            tl.store(dpooled_ptr + rows[:, None] * C + chans[None, :], acc, mask=out_mask)
        else:
            # loss = mean over rows of lse - logit[target]
            total = tl.zeros([BLOCK_LOSS], dtype=tl.float32)
            for b_start in range(0, B, BLOCK_LOSS):
                rows = b_start + tl.arange(0, BLOCK_LOSS)
                row_mask = rows < B
                lse = _row_lse(tile_max_ptr, tile_sum_ptr, rows, row_mask, num_n_tiles, BLOCK_T)
                target = tl.load(target_ptr + rows, mask=row_mask, other=0)
                valid = row_mask & (target >= 0) & (target < N)
                target_logit = tl.load(logits_ptr + rows * N + target, mask=valid, other=0.0)
                total += tl.where(row_mask, lse - target_logit, 0.0)
            tl.store(loss_ptr, tl.sum(total, axis=0) * inv_b)

    @triton.jit
    def aux_loss_backward_kernel(
        grad_ptr,  # () incoming dL_total/dloss
        dpooled_ptr,  # (B, C) fp32 saved by the forward
        dx_ptr,  # out (B, C, H, W) in x's dtype and memory layout
        dw_in_ptr,  # (num_splits, N*C) fp32 saved
        dw_out_ptr,  # out (N*C,) weight dtype
        db_in_ptr,  # (num_splits, N) fp32 saved
        db_out_ptr,  # out (N,) bias dtype
        C,
        HW,
        N,
        num_dw_elements,  # N*C, or 0 when dW is not needed
        num_splits,
        inv_hw,
        num_c_tiles,
        num_dx_programs,  # programs [0, num_dx_programs) write dx: one batch row, BLOCK_C channels each
        num_dw_programs,  # then BLOCK_FLAT elements of dW each; the rest BLOCK_FLAT elements of db each
        CHANNELS_LAST: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        BLOCK_FLAT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        grad = tl.load(grad_ptr).to(tl.float32)
        if pid < num_dx_programs:
            row = pid // num_c_tiles
            chans = (pid % num_c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
            chan_mask = chans < C
            value = tl.load(dpooled_ptr + row * C + chans, mask=chan_mask, other=0.0) * (grad * inv_hw)
            tile = tl.broadcast_to(value[:, None], [BLOCK_C, BLOCK_HW]).to(dx_ptr.dtype.element_ty)
            base = dx_ptr + row.to(tl.int64) * (C * HW)
            for hw_start in range(0, HW, BLOCK_HW):
                hw = hw_start + tl.arange(0, BLOCK_HW)
                mask = chan_mask[:, None] & (hw < HW)[None, :]
                if CHANNELS_LAST:
                    offsets = chans[:, None] + hw[None, :] * C
                else:
                    offsets = chans[:, None] * HW + hw[None, :]
                tl.store(base + offsets, tile, mask=mask)
        elif pid < num_dx_programs + num_dw_programs:
            offsets = (pid - num_dx_programs) * BLOCK_FLAT + tl.arange(0, BLOCK_FLAT)
            mask = offsets < num_dw_elements
            dw = tl.zeros([BLOCK_FLAT], dtype=tl.float32)
            for split in range(0, num_splits):
                dw += tl.load(dw_in_ptr + split * num_dw_elements + offsets, mask=mask, other=0.0)
            tl.store(dw_out_ptr + offsets, (dw * grad).to(dw_out_ptr.dtype.element_ty), mask=mask)
        else:
            offsets = (pid - num_dx_programs - num_dw_programs) * BLOCK_FLAT + tl.arange(0, BLOCK_FLAT)
            mask = offsets < N
            db = tl.zeros([BLOCK_FLAT], dtype=tl.float32)
            for split in range(0, num_splits):
                db += tl.load(db_in_ptr + split * N + offsets, mask=mask, other=0.0)
            tl.store(db_out_ptr + offsets, (db * grad).to(db_out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

# Logits fit one class tile up to this many classes (then kernel 2 may pool its own rows).
_MAX_SINGLE_N_TILE = 128
# Kernel 2 pools its own rows only when a batch row of x (C*H*W elements) is at most this: it runs
# ceil(B/16) programs, too few to stream a large x at full bandwidth.
_MAX_FUSED_ROW = 8192
_TILE = 64  # default tile edge of the GEMM-like loops
_ROWS = 16  # rows per program of kernel 2 (the minimum tl.dot M)
_BLOCK_FLAT = 1024


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def _clamp_block(n: int, cap: int) -> int:
    """Power-of-two tile edge for a dim of size n: at least 16 (tl.dot's minimum), at most cap."""
    return max(16, min(_pow2(n), cap))


@functools.cache
def _capability_major(device: torch.device) -> int | None:
    """The CUDA compute capability's major number of `device` (None off CUDA)."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else None


def _grad_tile_cap(device: torch.device) -> int:
    """Tile edge of kernel 3. Before Hopper (sm_80), 64x64x64 fp32 tiles of a large head (ImageNet: N=1000,
    C=512) keep 7.8 KB per thread in local memory; 32 keep none (`scripts/compile_kernels.py --arch 80`).
    On sm_90 neither spills."""
    major = _capability_major(device)
    return 32 if major is not None and major < 9 else _TILE


def _grad_blocks(batch: int, channels: int, num_classes: int, max_block: int, device: torch.device) -> tuple[int, ...]:
    """Tiles of kernel 3: (block_b, block_n, block_c, num_c_tiles, num_dw_tiles, rows_per_split, splits).

    dW tiles are few for small heads (one for N=10, C=64); then the batch is split so that about 64
    programs share the reduction, each over at least two row blocks.
    """
    cap = min(_TILE, max_block, _grad_tile_cap(device))
    block_b = _clamp_block(batch, cap)
    block_n = _clamp_block(num_classes, cap)
    block_c = _clamp_block(channels, cap)
    num_c_tiles = triton.cdiv(channels, block_c)
    num_dw_tiles = triton.cdiv(num_classes, block_n) * num_c_tiles
    splits = max(1, min(triton.cdiv(batch, 2 * block_b), triton.cdiv(64, num_dw_tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(batch, splits), block_b) * block_b
    splits = triton.cdiv(batch, rows_per_split)
    return block_b, block_n, block_c, num_c_tiles, num_dw_tiles, rows_per_split, splits


def _spatial_layout(x: Tensor) -> tuple[Tensor, bool]:
    """(x, channels_last): x as contiguous NCHW or NHWC memory, copying any other layout to NCHW."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"gap_linear_cross_entropy: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    if batch == 0 or channels == 0 or height * width == 0:
        raise ValueError(f"gap_linear_cross_entropy: x has an empty dim: {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != channels or weight.shape[0] == 0:
        raise ValueError(f"gap_linear_cross_entropy: weight must be (N, C={channels}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"gap_linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if target.shape != (batch,) or target.dtype != torch.int64:
        raise ValueError(
            f"gap_linear_cross_entropy: target must be int64 of shape ({batch},), got {target.dtype} "
            f"{tuple(target.shape)}"
        )
    for name, tensor in (("weight", weight), ("bias", bias), ("target", target)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"gap_linear_cross_entropy: {name} is on {tensor.device}, x on {x.device}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"gap_linear_cross_entropy: x and weight must be float, got {x.dtype}, {weight.dtype}")


def _forward_outputs(
    x: Tensor, weight: Tensor, bias: Tensor | None, need_dx: bool, need_dwb: bool, splits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward's outputs, allocated (also for the fake tensors torch.compile traces with): loss (),
    dpooled (B, C), dW (S, N, C), db (S, N), all fp32; a gradient not needed is empty."""
    batch, channels, num_classes = x.shape[0], x.shape[1], weight.shape[0]
    f32 = torch.float32
    loss = x.new_empty((), dtype=f32)
    dpooled = x.new_empty((batch, channels) if need_dx else (0,), dtype=f32)
    dw = x.new_empty((splits, num_classes, channels) if need_dwb else (0,), dtype=f32)
    db = x.new_empty((splits, num_classes) if need_dwb and bias is not None else (0,), dtype=f32)
    return loss, dpooled, dw, db


def _backward_outputs(
    grad: Tensor,
    dpooled: Tensor,
    dw: Tensor,
    db: Tensor,
    x_shape: list[int],
    x_dtype: torch.dtype,
    x_channels_last: bool,
    weight_dtype: torch.dtype,
    bias_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's outputs (dx in x's layout, dW, db), allocated; empty where the saved one is empty."""
    memory_format = torch.channels_last if x_channels_last else torch.contiguous_format
    empty = grad.new_empty(0)
    dx = (
        torch.empty(x_shape, dtype=x_dtype, device=grad.device, memory_format=memory_format)
        if dpooled.numel() > 0
        else empty
    )
    dw_out = grad.new_empty(dw.shape[1:], dtype=weight_dtype) if dw.numel() > 0 else empty
    db_out = grad.new_empty(db.shape[1:], dtype=bias_dtype) if db.numel() > 0 else empty
    return dx, dw_out, db_out


def _forward_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    need_dx: bool,
    need_dwb: bool,
    max_block: int,
    fuse_pool: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss and the saved gradients: (loss (), dpooled (B, C), dW (S, N, C), db (S, N)), all fp32.

    dW and db come as S partial sums over batch splits (S = 1 unless the head is small, see
    ``_grad_blocks``); the backward adds them up.

    A gradient that is not needed is an empty tensor. ``max_block`` caps every tile edge (tests use 16
    to exercise the multi-tile loops); ``fuse_pool`` is -1 (auto), 0 or 1.
    """
    x, channels_last = _spatial_layout(x)
    batch, channels, height, width = x.shape
    spatial = height * width
    num_classes = weight.shape[0]
    weight = weight.contiguous()
    has_bias = bias is not None
    if has_bias:
        bias = bias.contiguous()
    target = target.contiguous()
    inv_hw = 1.0 / spatial
    f32 = torch.float32

    single_tile = _pow2(num_classes) <= min(_MAX_SINGLE_N_TILE, max_block)
    block_n = max(16, _pow2(num_classes)) if single_tile else _clamp_block(num_classes, min(_TILE, max_block))
    num_n_tiles = triton.cdiv(num_classes, block_n)
    fuse = single_tile and (channels * spatial <= _MAX_FUSED_ROW if fuse_pool < 0 else bool(fuse_pool))

    # Scratch: pooled (B, C), logits (B, N), tile max and tile sum (B, T), in one allocation.
    sizes = [batch * channels, batch * num_classes, batch * num_n_tiles, batch * num_n_tiles]
    scratch = torch.empty(sum(sizes), device=x.device, dtype=f32)
    pooled, logits, tile_max, tile_sum = torch.split(scratch, sizes)

    if fuse:
        block_hw = min(_pow2(spatial), 64)
        block_c = max(16, min(_pow2(channels), 1024 // block_hw, max_block))
        num_warps = 8
    else:
        block_hw = min(_pow2(spatial), 128)
        pool_block_c = min(_pow2(channels), max(1, 8192 // block_hw), max_block)
        aux_loss_pool_kernel[(batch, triton.cdiv(channels, pool_block_c))](
            x, pooled, batch, channels, spatial, inv_hw,
            CHANNELS_LAST=channels_last, BLOCK_B=1, BLOCK_C=pool_block_c, BLOCK_HW=block_hw, num_warps=4,
        )  # fmt: skip
        block_c = _clamp_block(channels, min(_TILE, max_block))
        num_warps = 4
    aux_loss_logits_kernel[(triton.cdiv(batch, _ROWS), num_n_tiles)](
        x, pooled, weight, bias if has_bias else weight, logits, tile_max, tile_sum,
        batch, channels, spatial, num_classes, num_n_tiles, inv_hw,
        CHANNELS_LAST=channels_last, HAS_BIAS=has_bias, FUSE_POOL=fuse, BLOCK_B=_ROWS, BLOCK_N=block_n,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
    )  # fmt: skip

    block_b3, block_n3, block_c3, num_c_tiles, num_dw_tiles, rows_per_split, splits = _grad_blocks(
        batch, channels, num_classes, max_block, x.device
    )
    loss, dpooled, dw, db = _forward_outputs(x, weight, bias, need_dx, need_dwb, splits)
    num_dw_programs = num_dw_tiles * splits if need_dwb else 0
    num_dpooled_programs = triton.cdiv(batch, block_b3) * num_c_tiles if need_dx else 0
    aux_loss_grad_kernel[(num_dw_programs + num_dpooled_programs + 1,)](
        pooled, weight, target, logits, tile_max, tile_sum,
        dpooled if need_dx else loss, dw if need_dwb else loss, db if db.numel() else loss, loss,
        batch, channels, num_classes, num_n_tiles, 1.0 / batch, num_c_tiles, num_dw_tiles, rows_per_split,
        num_dw_programs, num_dpooled_programs,
        HAS_BIAS=has_bias, BLOCK_B=block_b3, BLOCK_N=block_n3, BLOCK_C=block_c3,
        BLOCK_T=max(2, _pow2(num_n_tiles)), BLOCK_LOSS=max(16, min(_pow2(batch), 1024)), num_warps=4,
    )  # fmt: skip
    return loss, dpooled, dw, db


def _backward_impl(
    grad: Tensor,
    dpooled: Tensor,
    dw: Tensor,
    db: Tensor,
    x_shape: list[int],
    x_dtype: torch.dtype,
    x_channels_last: bool,
    weight_dtype: torch.dtype,
    bias_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, db) = saved gradients times ``grad``; an empty input gives an empty output."""
    batch, channels, height, width = x_shape
    spatial = height * width
    need_dx, need_dw, need_db = dpooled.numel() > 0, dw.numel() > 0, db.numel() > 0
    dx, dw_out, db_out = _backward_outputs(
        grad, dpooled, dw, db, x_shape, x_dtype, x_channels_last, weight_dtype, bias_dtype
    )
    num_splits = dw.shape[0] if need_dw else (db.shape[0] if need_db else 0)
    block_hw = min(_pow2(spatial), 256)
    block_c = min(_pow2(channels), max(1, 4096 // block_hw))
    num_c_tiles = triton.cdiv(channels, block_c)
    num_dx_programs = batch * num_c_tiles if need_dx else 0
    num_dw_programs = triton.cdiv(dw_out.numel(), _BLOCK_FLAT)
    num_db_programs = triton.cdiv(db_out.numel(), _BLOCK_FLAT)
    num_programs = num_dx_programs + num_dw_programs + num_db_programs
    if num_programs > 0:
        aux_loss_backward_kernel[(num_programs,)](
            grad, dpooled if need_dx else grad, dx if need_dx else grad, dw if need_dw else grad,
            dw_out if need_dw else grad, db if need_db else grad, db_out if need_db else grad,
            channels, spatial, db_out.numel(), dw_out.numel(), num_splits, 1.0 / spatial, num_c_tiles,
            num_dx_programs, num_dw_programs,
            CHANNELS_LAST=x_channels_last, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_FLAT=_BLOCK_FLAT,
            num_warps=4,
        )  # fmt: skip
    return dx, dw_out, db_out


# ----------------------------------------------------------------------------------------------------
# Registration: custom ops so torch.compile sees two opaque ops with known output shapes instead of
# tracing the launchers. Eager calls go straight to the launchers: the dispatcher round trip of a
# Python custom op costs about as much host time as a kernel launch, and this head is launch-bound.
# ----------------------------------------------------------------------------------------------------


# Explicit schemas: annotation inference differs between torch versions. The ops wrap the launchers
# themselves; the fakes only allocate the outputs.
_forward_op = torch.library.custom_op(
    "fastlocal::gap_linear_ce_fwd",
    _forward_impl,
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor target, bool need_dx, bool need_dwb, "
    "int max_block, int fuse_pool) -> (Tensor, Tensor, Tensor, Tensor)",
)


@_forward_op.register_fake
def _forward_fake(x, weight, bias, target, need_dx, need_dwb, max_block, fuse_pool):
    splits = _grad_blocks(x.shape[0], x.shape[1], weight.shape[0], max_block, x.device)[-1]
    return _forward_outputs(x, weight, bias, need_dx, need_dwb, splits)


_backward_op = torch.library.custom_op(
    "fastlocal::gap_linear_ce_bwd",
    _backward_impl,
    mutates_args=(),
    schema="(Tensor grad, Tensor dpooled, Tensor dw, Tensor db, int[] x_shape, ScalarType x_dtype, "
    "bool x_channels_last, ScalarType weight_dtype, ScalarType bias_dtype) -> (Tensor, Tensor, Tensor)",
)
_backward_op.register_fake(_backward_outputs)


class _GapLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, max_block, fuse_pool):
        need_dx = ctx.needs_input_grad[0]
        need_dwb = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        forward = _forward_op if torch.compiler.is_compiling() else _forward_impl
        loss, dpooled, dw, db = forward(x, weight, bias, target, need_dx, need_dwb, max_block, fuse_pool)
        ctx.save_for_backward(dpooled, dw, db)
        ctx.x_shape = list(x.shape)
        ctx.x_dtype = x.dtype
        ctx.x_channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = weight.dtype if bias is None else bias.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        dpooled, dw, db = ctx.saved_tensors
        empty = dw.new_empty(0)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        backward = _backward_op if torch.compiler.is_compiling() else _backward_impl
        dx, dw_out, db_out = backward(
            grad_loss, dpooled, dw if need_dw else empty, db if need_db else empty, ctx.x_shape,
            ctx.x_dtype, ctx.x_channels_last, ctx.weight_dtype, ctx.bias_dtype,
        )  # fmt: skip
        return (dx if need_dx else None, dw_out if need_dw else None, db_out if need_db else None, None, None, None)


# ----------------------------------------------------------------------------------------------------
# Public function (dispatch on backend lives in fastlocal.kernels.gap_linear_cross_entropy)
# ----------------------------------------------------------------------------------------------------


def gap_linear_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, *, max_block: int = 1 << 30, fuse_pool: int = -1
) -> Tensor:
    """Fused ``cross_entropy(linear(mean(x, (2, 3)), weight, bias), target)`` (Triton); a 0-d fp32 loss.

    x: (B, C, H, W), weight: (N, C), bias: (N,) or None, target: int64 (B,) in [0, N).
    ``max_block`` and ``fuse_pool`` are tuning/testing knobs (see ``_forward_impl``).
    """
    if triton is None:
        raise ValueError("the triton kernel backend needs the `triton` package: pip install 'fastlocal[triton]'")
    _check_inputs(x, weight, bias, target)
    return _GapLinearCrossEntropy.apply(x, weight, bias, target, max_block, fuse_pool)
