"""Kernel benchmarks (pytest-benchmark): multi-tensor EMA, the fused GAP + Linear + cross-entropy, the
fused batch norm + residual add + ReLU (the experimental 3x3 convolution's are in experimental/triton_conv/).

On a GPU:

    python -m pytest bench/test_bench_kernels.py --benchmark-columns=median,iqr,min,rounds

compares, inside one run and one group per workload, the authors' per-parameter EMA loop,
``torch._foreach_lerp_`` and the Triton kernel on the LAM EMA tensors of MLAAN ResNet-32 K=15 and
ResNet-110 K=54, and eager PyTorch against the fused aux loss (forward + backward) at the CIFAR head
(B=1024, C=64, 8x8, N=10) and an ImageNet head (B=256, C=512, 7x7, N=1000). ``extra_info`` holds the
device, versions, dtype, shapes, the median in microseconds and the bandwidth in GB/s.

The aux loss and the batch norm are also timed `graph` (on CUDA): the forward + backward
captured once in a CUDA graph and replayed, which is what a graphed training step pays (device time, no
Python dispatch); `call` times each call from Python as eager code pays it. The batch norm runs at the three
stage shapes of a CIFAR ResNet at batch 1024 in bf16 channels_last, as `system.precision=bf16
system.channels_last=true`; the Triton kernel is also timed under other launch shapes, to choose the
defaults.

Without CUDA the same tests run as a smoke check of the harness on tiny shapes (widths / 8, tiny heads):
the references always, the Triton paths (marked ``triton``) only with ``TRITON_INTERPRET=1``:

    TRITON_INTERPRET=1 python -m pytest bench/test_bench_kernels.py --benchmark-disable
"""

from __future__ import annotations

import os

import pytest
import torch
from common import environment

from fastlocal.kernels import batch_norm_act, ema_update_, gap_linear_cross_entropy
from fastlocal.kernels.aux_loss import gap_linear_cross_entropy_ref
from fastlocal.kernels.ema import ema_update_loop_ref, ema_update_ref

# Under the interpreter the kernels' tensors stay on the CPU (tests/test_kernels.py says why).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
SMOKE = DEVICE.type != "cuda"  # tiny shapes: only the harness is being checked
TRITON = pytest.param("triton", marks=pytest.mark.triton)
WARMUP_CALLS = 1 if SMOKE else 5
EMA_MOMENTUM = 0.995


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _environment(dtype: torch.dtype) -> dict:
    return {**environment(DEVICE), "smoke": SMOKE, "dtype": _dtype_name(dtype)}


def _timed(step, timing: str):
    """`step` itself (`call`), or a replay of it captured in a CUDA graph (`graph`: device time only)."""
    if timing == "call":
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compilation, cuDNN plans) outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


TIMINGS = ["call", pytest.param("graph", marks=pytest.mark.gpu)]


def _benchmark_timed(benchmark, forward_backward, timing: str, group: str) -> None:
    """Warm up, then benchmark `forward_backward` timed per `timing` (device synchronised each round)."""
    run = _timed(forward_backward, timing)

    def step():
        run()
        _synchronize()

    for _ in range(WARMUP_CALLS):
        step()
    benchmark.group = group
    benchmark(step)


def _record_speed(benchmark, bytes_moved: int) -> None:
    """Median in microseconds and bandwidth in GB/s into extra_info (absent with --benchmark-disable)."""
    benchmark.extra_info["bytes_moved"] = bytes_moved
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    median = stats.stats.median
    benchmark.extra_info["median_us"] = round(median * 1e6, 2)
    benchmark.extra_info["iqr_us"] = round(stats.stats.iqr * 1e6, 2)
    benchmark.extra_info["gb_per_s"] = round(bytes_moved / median / 1e9, 1)


# ----------------------------------------------------------------------------------------------------
# EMA over the LAM EMA copies
# ----------------------------------------------------------------------------------------------------

# The MLAAN models whose LAM EMA copies are benchmarked (reference leap presets, ema_scope = all).
EMA_MODELS = {"resnet32_k15": ("resnet32", 15), "resnet110_k54": ("resnet110", 54)}


def lam_ema_tensor_shapes(preset: str, width_divisor: int = 1) -> list[tuple[int, ...]]:
    """Shapes of every LAM EMA tensor of the real MLAAN model, in module order; `width_divisor` shrinks
    the channel dimensions for the CPU smoke mode."""
    from fastlocal.config import build_config
    from fastlocal.methods import METHODS, build_method
    from fastlocal.models import build_backbone
    from fastlocal.split import split_backbone

    arch, k = EMA_MODELS[preset]
    cfg = build_config(None, ["method.name=mlaan", f"method.num_modules={k}", f"model.arch={arch}"], METHODS)
    backbone = build_backbone(arch, 10, 32)
    method = build_method(cfg, backbone, split_backbone(backbone, k))
    targets, _ = method.ema_tensors()
    return [tuple(max(1, d // width_divisor) if i < 2 else d for i, d in enumerate(t.shape)) for t in targets]


def test_lam_ema_tensor_sets_are_the_models():
    """W = 2: modules 1..K-2 have a LAM; 9 EMA tensors for a block that changes width, else 6."""
    assert len(lam_ema_tensor_shapes("resnet32_k15")) == 9 * 9 + 4 * 6
    numel = sum(torch.Size(shape).numel() for shape in lam_ema_tensor_shapes("resnet110_k54"))
    assert 2_000_000 < numel < 3_000_000


EMA_IMPLEMENTATIONS = {
    "loop": lambda ema, live: ema_update_loop_ref(ema, live, EMA_MOMENTUM),
    "foreach_lerp": lambda ema, live: ema_update_ref(ema, live, EMA_MOMENTUM),
    "triton": lambda ema, live: ema_update_(ema, live, EMA_MOMENTUM, backend="triton"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("implementation", ["loop", "foreach_lerp", TRITON])
@pytest.mark.parametrize("preset", list(EMA_MODELS))
def test_bench_ema(benchmark, preset, implementation, dtype):
    shapes = lam_ema_tensor_shapes(preset, width_divisor=8 if SMOKE else 1)
    generator = torch.Generator().manual_seed(0)
    ema = [torch.randn(shape, generator=generator).to(DEVICE, dtype) for shape in shapes]
    live = [torch.randn(shape, generator=generator).to(DEVICE, dtype) for shape in shapes]
    update = EMA_IMPLEMENTATIONS[implementation]

    def step():
        update(ema, live)
        _synchronize()

    for _ in range(WARMUP_CALLS):  # untimed: Triton compile, pointer table, allocator
        step()
    benchmark.group = f"ema {preset} {str(dtype).removeprefix('torch.')}"
    benchmark(step)

    numel = sum(tensor.numel() for tensor in ema)
    unique = sorted(set(shapes), key=lambda shape: (len(shape), shape))
    benchmark.extra_info.update(_environment(dtype))
    benchmark.extra_info.update(
        {
            "preset": preset,
            "implementation": implementation,
            "num_tensors": len(shapes),
            "num_elements": numel,
            "shapes": {str(shape): shapes.count(shape) for shape in unique},
        }
    )
    element_size = ema[0].element_size()
    _record_speed(benchmark, numel * 3 * element_size)  # read ema, read live, write ema


# ----------------------------------------------------------------------------------------------------
# Fused GAP + Linear + cross-entropy, forward + backward
# ----------------------------------------------------------------------------------------------------

AUX_SHAPES = {
    # name: (B, C, H, W, N) full size, and the CPU smoke size
    "cifar_head": ((1024, 64, 8, 8, 10), (8, 16, 4, 4, 10)),
    "imagenet_head": ((256, 512, 7, 7, 1000), (4, 32, 3, 3, 50)),
}


def _fused_aux_loss(x, weight, bias, target):
    return gap_linear_cross_entropy(x, weight, bias, target, backend="triton")


AUX_IMPLEMENTATIONS = {"eager": gap_linear_cross_entropy_ref, "triton": _fused_aux_loss}


@pytest.mark.parametrize("timing", TIMINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("implementation", ["eager", TRITON])
@pytest.mark.parametrize("shape_name", list(AUX_SHAPES))
def test_bench_aux_loss(benchmark, shape_name, implementation, dtype, timing):
    full, smoke = AUX_SHAPES[shape_name]
    batch, channels, height, width, classes = smoke if SMOKE else full
    generator = torch.Generator().manual_seed(0)
    # x in the activation dtype; the head's parameters stay fp32, as with autocast.
    x = torch.randn(batch, channels, height, width, generator=generator).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(classes, channels, generator=generator) / channels**0.5).to(DEVICE)
    weight.requires_grad_()
    bias = torch.zeros(classes, device=DEVICE, requires_grad=True)
    target = torch.randint(0, classes, (batch,), generator=generator).to(DEVICE)
    loss_fn = AUX_IMPLEMENTATIONS[implementation]

    def forward_backward():
        loss = loss_fn(x, weight, bias, target)
        torch.autograd.grad(loss, (x, weight, bias))

    _benchmark_timed(benchmark, forward_backward, timing, f"aux_loss {shape_name} {_dtype_name(dtype)} {timing}")

    benchmark.extra_info.update(_environment(dtype))
    benchmark.extra_info.update(
        {
            "shape": shape_name,
            "implementation": implementation,
            "timing": timing,
            "x_shape": [batch, channels, height, width],
            "num_classes": classes,
        }
    )
    # The floor of any implementation: read x once, write dx once.
    _record_speed(benchmark, 2 * x.numel() * x.element_size())


# ----------------------------------------------------------------------------------------------------
# Batch norm + residual add + ReLU (a residual block's second batch norm), forward + backward
# ----------------------------------------------------------------------------------------------------

BN_SHAPES = {
    # name: (N, C, H, W) at batch 1024, and the CPU smoke size
    "stage1": ((1024, 16, 32, 32), (4, 16, 8, 8)),
    "stage2": ((1024, 32, 16, 16), (4, 32, 4, 4)),
    "stage3": ((1024, 64, 8, 8), (4, 64, 2, 2)),
}


def _bench_batch_norm(benchmark, shape_name: str, implementation: str, timing: str, group_suffix: str = "") -> None:
    full, smoke = BN_SHAPES[shape_name]
    shape = smoke if SMOKE else full
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)

    def activation():
        t = torch.randn(shape, generator=generator).to(DEVICE, dtype)
        return t.contiguous(memory_format=torch.channels_last).requires_grad_()

    x, residual, dy = activation(), activation(), activation().detach()
    channels = shape[1]
    weight = torch.ones(channels, device=DEVICE, requires_grad=True)
    bias = torch.zeros(channels, device=DEVICE, requires_grad=True)
    running_mean = torch.zeros(channels, device=DEVICE)
    running_var = torch.ones(channels, device=DEVICE)
    backend = "triton" if implementation == "triton" else "reference"

    def forward_backward():
        y = batch_norm_act(x, weight, bias, running_mean, running_var, 0.1, 1e-5, residual, True, backend=backend)
        torch.autograd.grad(y, (x, weight, bias, residual), dy)

    group = f"batch_norm {shape_name} {_dtype_name(dtype)} {timing}{group_suffix}"
    _benchmark_timed(benchmark, forward_backward, timing, group)
    benchmark.extra_info.update(_environment(dtype))
    benchmark.extra_info.update(
        {"shape": shape_name, "implementation": implementation, "timing": timing, "x_shape": list(shape)}
    )
    # The floor: read x, the residual and dy once, write y, dx and the residual's gradient once.
    _record_speed(benchmark, 6 * x.numel() * x.element_size())


@pytest.mark.parametrize("timing", TIMINGS)
@pytest.mark.parametrize("implementation", ["eager", TRITON])
@pytest.mark.parametrize("shape_name", list(BN_SHAPES))
def test_bench_batch_norm(benchmark, shape_name, implementation, timing):
    _bench_batch_norm(benchmark, shape_name, implementation, timing)


# The fused batch norm's launch shapes to try, as overrides of the constants of fastlocal.kernels.batch_norm
# ({} is the shipped default). The partial sums read up to three tensors in a loop, so their tile size
# (PARTIALS_TILE elements) and program count (TARGET_PARTIALS) set how many bytes are in flight; the
# kernels that sum the partials are bound by latency (FINALIZE_ROWS per loop step, FINALIZE_CHANNELS per
# program); ELEMENTWISE_WARPS are the warps of the two elementwise passes.
BN_LAUNCH_SHAPES = [
    {},
    {"FINALIZE_ROWS": 64},
    {"FINALIZE_ROWS": 64, "FINALIZE_CHANNELS": 64},  # the forward's finalize as of commit 9a1131c
    {"TARGET_PARTIALS": 256},
    {"TARGET_PARTIALS": 1024},
    {"ELEMENTWISE_WARPS": 8},
    {"PARTIALS_TILE": 2048},
    {"PARTIALS_TILE": 2048, "TARGET_PARTIALS": 256},
    {"PARTIALS_TILE": 4096},
    {"PARTIALS_TILE": 4096, "TARGET_PARTIALS": 256},
    {"PARTIALS_TILE": 4096, "TARGET_PARTIALS": 1024},
]


def launch_shape_name(overrides: dict) -> str:
    return "-".join(f"{name.lower()}{value}" for name, value in overrides.items()) or "default"


@pytest.mark.triton
@pytest.mark.parametrize("launch", BN_LAUNCH_SHAPES, ids=launch_shape_name)
@pytest.mark.parametrize("shape_name", ["stage1", "stage3"])
def test_bench_batch_norm_launch_shapes(benchmark, monkeypatch, shape_name, launch):
    """The Triton batch norm under each launch shape (graph-timed on CUDA): which default to ship."""
    from fastlocal.kernels import batch_norm

    for name, value in launch.items():
        monkeypatch.setattr(batch_norm, name, value)
    timing = "graph" if DEVICE.type == "cuda" else "call"
    _bench_batch_norm(benchmark, shape_name, "triton", timing, group_suffix=" launch shapes")
    benchmark.extra_info["launch_shape"] = launch_shape_name(launch)


def test_bench_launch_shapes_name_constants_of_the_kernels():
    from fastlocal.kernels import batch_norm

    for overrides in BN_LAUNCH_SHAPES:
        for name, value in overrides.items():
            assert isinstance(getattr(batch_norm, name), int) and getattr(batch_norm, name) != value
    assert launch_shape_name({}) == "default"
    assert launch_shape_name({"PARTIALS_TILE": 2048, "TARGET_PARTIALS": 256}) == "partials_tile2048-target_partials256"


def test_bench_helpers_median():
    """_record_speed's arithmetic on a stand-in for pytest-benchmark's stats object."""

    class Stats:
        median = 2e-6
        iqr = 1e-7

    class Meta:
        stats = Stats()

    class Bench:
        extra_info: dict = {}
        stats = Meta()

    bench = Bench()
    _record_speed(bench, 4_000_000)
    assert bench.extra_info["median_us"] == 2.0 and bench.extra_info["gb_per_s"] == 2000.0
