"""Benchmark of the few-channel 3x3 convolution: cuDNN (eager PyTorch) against the Triton kernel of
conv.py, forward + both gradients, under each tile size (see README.md for how to run it on a GPU)."""

from __future__ import annotations

import conv as conv_module
import pytest
import torch
from conv import conv3x3
from test_bench_kernels import (
    DEVICE,
    SMOKE,
    TIMINGS,
    TRITON,
    _benchmark_timed,
    _dtype_name,
    _environment,
    _record_speed,
)

# ----------------------------------------------------------------------------------------------------
# The few-channel 3x3 convolution, forward + both gradients
# ----------------------------------------------------------------------------------------------------

CONV_SHAPES = {
    # name: (N, C, H, W) at batch 1024, and the CPU smoke size; C channels in and out
    "stage1": ((1024, 16, 32, 32), (2, 16, 6, 6)),
    "stage2": ((1024, 32, 16, 16), (2, 32, 4, 4)),
}


# Pixels per program of the Triton convolution to try; the first is the shipped default.
CONV_TILES = [128, 64, 256]


@pytest.mark.parametrize("pixels", CONV_TILES, ids=lambda p: f"pixels{p}")
@pytest.mark.parametrize("timing", TIMINGS)
@pytest.mark.parametrize("implementation", ["eager", TRITON])
@pytest.mark.parametrize("shape_name", list(CONV_SHAPES))
def test_bench_conv3x3(benchmark, monkeypatch, shape_name, implementation, timing, pixels):
    """cuDNN (eager PyTorch) against the Triton convolution; the Triton one under each tile size."""
    if implementation == "eager" and pixels != CONV_TILES[0]:
        pytest.skip("the tile size is the Triton kernel's")
    monkeypatch.setattr(conv_module, "CONV_PIXELS", pixels)
    full, smoke = CONV_SHAPES[shape_name]
    shape = smoke if SMOKE else full
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.randn(shape[1], shape[1], 3, 3, generator=generator) / 12).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(shape, generator=generator).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    backend = "triton" if implementation == "triton" else "reference"

    def forward_backward():
        y = conv3x3(x, weight, backend=backend)
        torch.autograd.grad(y, (x, weight), dy)

    _benchmark_timed(benchmark, forward_backward, timing, f"conv3x3 {shape_name} {_dtype_name(dtype)} {timing}")
    benchmark.extra_info.update(_environment(dtype))
    benchmark.extra_info.update(
        {
            "shape": shape_name,
            "implementation": implementation,
            "timing": timing,
            "x_shape": list(shape),
            "conv_pixels": pixels,
        }
    )
    # The floor: forward reads x, writes y; input gradient reads dy, writes dx; weight gradient reads x, dy.
    _record_speed(benchmark, 6 * x.numel() * x.element_size())


def test_bench_default_tile_is_the_first():
    assert CONV_TILES[0] == conv_module.CONV_PIXELS
