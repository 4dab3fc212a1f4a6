"""A 3x3 convolution (stride 1, padding 1, no bias) for few channels, in channels-last layout.

Why: on an H200, in a bf16 channels-last MLAAN ResNet-32 K=15 step, cuDNN ran the convolutions of the
16-channel first stage with sm80 kernels taking 56 us (forward), 128 us (input gradient) and 141 us
(weight gradient) per call at batch 1024, 0.5 to 1.2 TB/s of the tensors' bytes, while the other stages'
convolutions ran at about 20 us. With 16 channels the convolution is a thin matrix product (K = 144, N = 16),
bound by memory, not by tensor-core throughput. Experimental: kept out of the `fastlocal` package until a
GPU run shows it pays (see README.md here); `use_triton_conv` switches it on in the CIFAR ResNet blocks.

The input x is viewed as an (M, CI) matrix, M = N*H*W pixels in NHWC order; a program takes BLOCK_P
pixels and, for each of the 9 taps, loads the shifted (BLOCK_P, CI) tile (zeros outside the image) and
multiplies it by that tap's (CI, CO) weight slice, accumulating in fp32:

- forward: ``y = sum_tap shift_tap(x) @ w_tap``;
- input gradient: the same kernel on dy, with the weight flipped in space and its channels swapped;
- weight gradient: ``dw_tap = dy^T @ shift_tap(x)``, one (CO, CI) partial per program and tap, summed in a
  fixed order (deterministic).

Products of fp32 tiles use ``input_precision="ieee"`` (no TF32): fp32 inputs give fp32 results; bf16/fp16
inputs give exact products accumulated in fp32, the output rounded to the input's dtype. CI and CO are powers of two
from 16 to 64 (``tl.dot`` needs 16 at least; more channels are where cuDNN is fast).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlocal.kernels import resolve_backend
from fastlocal.models.cifar_resnet import BasicBlock

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference below works without triton
    triton = None
    tl = None

# Pixels of one program (rows of its matrix products); programs per tap of the weight gradient.
CONV_PIXELS = 128
WGRAD_PROGRAMS = 256
CHANNELS = (16, 32, 64)


def conv3x3_ref(x: Tensor, weight: Tensor) -> Tensor:
    return F.conv2d(x, weight, padding=1)


def supports(x: Tensor, weight: Tensor) -> str | None:
    """None when `conv3x3` can run these tensors, else why not."""
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        return f"needs a 4-d input and a 3x3 weight, got {tuple(x.shape)} and {tuple(weight.shape)}"
    out_channels, in_channels = weight.shape[:2]
    if x.shape[1] != in_channels:
        return f"input has {x.shape[1]} channels, the weight expects {in_channels}"
    if in_channels not in CHANNELS or out_channels not in CHANNELS:
        return f"needs {'/'.join(map(str, CHANNELS))} channels in and out, got {in_channels} -> {out_channels}"
    if x.dtype != weight.dtype:
        return f"input is {x.dtype}, weight is {weight.dtype}"
    return None


if triton is not None:

    @triton.jit
    def _conv3x3_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        M,
        H,
        W,
        CI: tl.constexpr,
        CO: tl.constexpr,
        BLOCK_P: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # x (M, CI) and y (M, CO) NHWC; w (9, CI, CO): tap-major, tap = 3 * kh + kw.
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        in_range = p < M
        hw = p % (H * W)
        h = hw // W
        w = hw % W
        ci = tl.arange(0, CI)
        co = tl.arange(0, CO)
        acc = tl.zeros([BLOCK_P, CO], dtype=tl.float32)
        for tap in tl.static_range(9):
            dh = tap // 3 - 1
            dw = tap % 3 - 1
            valid = in_range & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
            source = (p + dh * W + dw).to(tl.int64)  # the same image's pixel wherever `valid`
            xs = tl.load(x_ptr + source[:, None] * CI + ci[None, :], mask=valid[:, None], other=0.0)
            wt = tl.load(w_ptr + (tap * CI + ci[:, None]) * CO + co[None, :])
            if UPCAST:
                xs, wt = xs.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(xs, wt, acc, input_precision=PRECISION)
        y_ptrs = y_ptr + p.to(tl.int64)[:, None] * CO + co[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=in_range[:, None])

    @triton.jit
    def _wgrad_kernel(
        x_ptr,
        dy_ptr,
        partial_ptr,
        M,
        H,
        W,
        pixels_per_program,
        CI: tl.constexpr,
        CO: tl.constexpr,
        BLOCK_P: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # Program (tap, i): partial[i, tap] = sum over its pixels of dy[p]^T x[p shifted by tap], (CO, CI).
        # The tap varies fastest over the grid, so the 9 programs of one pixel range run together and read
        # their tiles of dy and x from memory once (then from L2).
        tap, pid = tl.program_id(0), tl.program_id(1)
        dh = tap // 3 - 1
        dw = tap % 3 - 1
        ci = tl.arange(0, CI)
        co = tl.arange(0, CO)
        acc = tl.zeros([CO, CI], dtype=tl.float32)
        first = pid * pixels_per_program
        for start in range(0, pixels_per_program, BLOCK_P):
            p = first + start + tl.arange(0, BLOCK_P)
            in_range = p < M
            hw = p % (H * W)
            h = hw // W
            w = hw % W
            valid = in_range & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
            g = tl.load(dy_ptr + p.to(tl.int64)[:, None] * CO + co[None, :], mask=in_range[:, None], other=0.0)
            source = (p + dh * W + dw).to(tl.int64)
            xs = tl.load(x_ptr + source[:, None] * CI + ci[None, :], mask=valid[:, None], other=0.0)
            if UPCAST:
                g, xs = g.to(tl.float32), xs.to(tl.float32)
            acc = tl.dot(tl.trans(g), xs, acc, input_precision=PRECISION)
        out = partial_ptr + ((pid * 9 + tap) * CO + co[:, None]) * CI + ci[None, :]
        tl.store(out, acc)


def _launch_options(x: Tensor) -> dict:
    """UPCAST: the Triton interpreter (CPU) multiplies bf16 tiles wrongly (Triton 3.8), so there the tiles
    go to fp32 first, which gives the same exact products; a GPU multiplies bf16 and fp16 tiles natively.
    PRECISION: "ieee" for fp32 tiles (no TF32); 16-bit tiles take Triton's default path (exact products,
    fp32 accumulation; the setting only concerns fp32 operands). num_warps: one warp per 32 pixels, 4 at
    the least, which keeps every tile of CONV_TILES near 100 registers on sm_90 (with 4 warps, 256 pixels
    take up to 190 and the 32-channel weight gradient spills: `python scripts/compile_kernels.py --sweep`)."""
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and x.dtype in (torch.bfloat16, torch.float16)
    fp32_tiles = upcast or x.dtype == torch.float32
    return {"UPCAST": upcast, "PRECISION": "ieee" if fp32_tiles else "tf32", "num_warps": max(4, CONV_PIXELS // 32)}


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _tap_major(weight: Tensor) -> Tensor:
    """(CO, CI, 3, 3) -> (9, CI, CO), tap = 3 * kh + kw."""
    return weight.permute(2, 3, 1, 0).reshape(9, weight.shape[1], weight.shape[0]).contiguous()


def _forward(x: Tensor, taps: Tensor, out_channels: int) -> Tensor:
    n, in_channels, h, w = x.shape
    y = torch.empty((n, out_channels, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    rows = n * h * w
    _conv3x3_kernel[(triton.cdiv(rows, CONV_PIXELS),)](
        x, taps, y, rows, h, w, CI=in_channels, CO=out_channels, BLOCK_P=CONV_PIXELS, **_launch_options(x)
    )
    return y


def _weight_grad(x: Tensor, dy: Tensor) -> Tensor:
    n, in_channels, h, w = x.shape
    out_channels = dy.shape[1]
    rows = n * h * w
    pixels_per_program = CONV_PIXELS * triton.cdiv(triton.cdiv(rows, CONV_PIXELS), WGRAD_PROGRAMS)
    programs = triton.cdiv(rows, pixels_per_program)
    partials = torch.empty((programs, 9, out_channels, in_channels), device=x.device, dtype=torch.float32)
    _wgrad_kernel[(9, programs)](
        x,
        dy,
        partials,
        rows,
        h,
        w,
        pixels_per_program,
        CI=in_channels,
        CO=out_channels,
        BLOCK_P=CONV_PIXELS,
        **_launch_options(x),
    )
    # (9, CO, CI) -> (CO, CI, 3, 3); a fixed-order sum over the programs
    return partials.sum(0).reshape(3, 3, out_channels, in_channels).permute(2, 3, 0, 1)


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        x = _nhwc(x)
        ctx.save_for_backward(x, weight)
        return _forward(x, _tap_major(weight), weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = _nhwc(dy)
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            # The input gradient is this convolution of dy with the weight flipped in space, channels swapped.
            dx = _forward(dy, _tap_major(weight.flip(2, 3).transpose(0, 1)), weight.shape[1])
        if ctx.needs_input_grad[1]:
            dweight = _weight_grad(x, dy).to(weight.dtype)
        return dx, dweight


def conv3x3_triton(x: Tensor, weight: Tensor) -> Tensor:
    """The Triton path of `conv3x3` (see there)."""
    return _Conv3x3.apply(x, weight)


def conv3x3(x: Tensor, weight: Tensor, backend: str = "auto") -> Tensor:
    """``conv2d(x, weight, padding=1)`` for a (CO, CI, 3, 3) weight, stride 1, no bias, under autocast like
    ``F.conv2d`` (both cast to the autocast dtype). The Triton path (16, 32 or 64 channels in and out;
    output channels_last) raises ``ValueError`` for other shapes. Backends as in `fastlocal.kernels`."""
    if resolve_backend(backend, x.device) == "reference":
        return conv3x3_ref(x, weight)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    problem = supports(x, weight)
    if problem is not None:
        raise ValueError(f"conv3x3 (Triton): {problem}; use the reference backend for this convolution")
    return conv3x3_triton(x, weight)


# ----------------------------------------------------------------------------------------------------
# The switch in the CIFAR ResNet blocks
# ----------------------------------------------------------------------------------------------------

# The widest 3x3 convolutions taken: cuDNN ran the 16-channel first stage slowly on an H200, the wider
# stages at full speed.
TRITON_CONV_CHANNELS = 16


class TritonConv3x3(nn.Conv2d):
    """A block's nn.Conv2d with its forward through `conv3x3` (same parameters, same state_dict)."""

    kernels_backend = "triton"

    def forward(self, x: Tensor) -> Tensor:
        return conv3x3(x, self.weight, backend=self.kernels_backend)


def _takes_triton_conv(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.bias is None
        and max(conv.in_channels, conv.out_channels) <= TRITON_CONV_CHANNELS
    )


def use_triton_conv(modules: Iterable[nn.Module], backend: str | None) -> int:
    """Route the 3x3 stride-1 convolutions of at most TRITON_CONV_CHANNELS channels of every BasicBlock
    inside `modules` through `conv3x3` with `backend` (None switches back to PyTorch's); returns how many
    blocks were visited."""
    blocks = {id(b): b for m in modules for b in m.modules() if isinstance(b, BasicBlock)}
    for block in blocks.values():
        for conv in (block.conv1, block.conv2):
            if not _takes_triton_conv(conv):
                continue
            if backend is None:
                conv.__class__ = nn.Conv2d
                conv.__dict__.pop("kernels_backend", None)
            else:
                conv.__class__ = TritonConv3x3
                conv.kernels_backend = backend
    return len(blocks)
