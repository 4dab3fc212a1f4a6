"""Tests for fastlocal.kernels: the Triton kernels against their references, and the backend dispatch.

Triton tests (marked `triton`) run on a CUDA device, or on the CPU under the interpreter, which
tests/conftest.py switches on where there is no CUDA (TRITON_INTERPRET=1 must be set before triton is
imported); the dispatch and reference tests always run. Under the interpreter the tensors stay on the CPU
even where CUDA exists: the interpreter copies kernel arguments to the host, so it cannot follow the
device addresses in the EMA kernel's pointer table.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastlocal.kernels import KERNEL_BACKENDS, ema_update_, gap_linear_cross_entropy, resolve_backend
from fastlocal.kernels.aux_loss import gap_linear_cross_entropy_ref
from fastlocal.kernels.ema import ema_update_loop_ref, ema_update_ref

# Where the Triton tests put their tensors (the tests marked `triton` are skipped when the kernels cannot
# run; see conftest.py at the repository root).
DEVICE = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")

REPO = Path(__file__).resolve().parents[1]


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------


def test_backends_constant():
    assert KERNEL_BACKENDS == ("auto", "triton", "reference")


def test_resolve_backend_reference_and_auto_on_cpu():
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    assert resolve_backend("reference", "cuda") == "reference"
    assert resolve_backend("auto", torch.device("cpu")) == "reference"


def test_resolve_backend_unknown():
    with pytest.raises(ValueError, match="valid: auto, triton, reference"):
        resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.triton
def test_resolve_backend_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError) as info:
        resolve_backend("triton", torch.device("cpu"))
    message = str(info.value)
    assert "CUDA device" in message and "TRITON_INTERPRET=1" in message
    assert "system.kernels=reference" in message
    # The public functions go through the same check.
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ema_update_([torch.zeros(3)], [torch.ones(3)], 0.9, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        x, weight, bias, target = _aux_inputs(2, 3, 2, 2, 4, torch.float32, torch.device("cpu"))
        gap_linear_cross_entropy(x, weight, bias, target, backend="triton")


@pytest.mark.triton
def test_resolve_backend_triton_with_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    # auto never picks the (slow) interpreter.
    assert resolve_backend("auto", torch.device("cpu")) == "reference"


@pytest.mark.triton(compiled=True)
def test_resolve_backend_auto_on_cuda():
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


def test_import_without_triton():
    """`import fastlocal.kernels` must not import triton, the reference backend must work without it, and
    the triton backend must name the package to install (in a subprocess where triton cannot import)."""
    code = """
import sys
import torch

class BlockTriton:
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            BlockTriton.attempts.append(name)
            raise ImportError("triton is blocked in this test")
        return None

assert "triton" not in sys.modules
sys.meta_path.insert(0, BlockTriton())
import fastlocal.kernels as kernels
assert not BlockTriton.attempts, BlockTriton.attempts
assert kernels.resolve_backend("auto", "cpu") == "reference"
ema, live = [torch.zeros(3)], [torch.ones(3)]
kernels.ema_update_(ema, live, 0.75, backend="reference")
assert torch.allclose(ema[0], torch.full((3,), 0.25))
x = torch.randn(2, 3, 2, 2)
loss = kernels.gap_linear_cross_entropy(x, torch.randn(4, 3), None, torch.tensor([0, 3]), backend="auto")
assert loss.shape == ()
assert kernels.resolve_backend("auto", "cuda") == "reference"
try:
    kernels.resolve_backend("triton", "cuda")
except ValueError as error:
    assert "pip install 'fastlocal[triton]'" in str(error), error
else:
    raise AssertionError("no ValueError")
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ----------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------

# Shapes of one CIFAR ResNet BasicBlock that changes width (16 -> 32): conv, BN, conv, BN, 1x1 conv, BN.
BLOCK_SHAPES = [(32, 16, 3, 3), (32,), (32,), (32, 32, 3, 3), (32,), (32,), (32, 16, 1, 1), (32,), (32,)]
# Non-power-of-two sizes, a chunk boundary (2048) and one past it, a 0-d and a 1-element tensor.
ODD_SHAPES = [(7, 3, 3, 3), (2047,), (2048,), (2049,), (), (1,), (5, 13)]
SINGLE_SHAPE = [(13, 5, 3, 3)]


def _many_shapes(count: int = 300) -> list[tuple[int, ...]]:
    sizes = torch.randint(1, 2500, (count,), generator=_generator(1)).tolist()
    return [(size,) for size in sizes]


def _ema_lists(shapes, ema_dtype, live_dtype, device, seed=0):
    generator = _generator(seed)
    ema = [torch.randn(shape, generator=generator).to(device=device, dtype=ema_dtype) for shape in shapes]
    live = [torch.randn(shape, generator=generator).to(device=device, dtype=live_dtype) for shape in shapes]
    return ema, live


def _assert_close_ema(out, ref, dtype):
    if dtype == torch.float32:
        # ~10 ulp at |x| ~ 1: the kernel and PyTorch both use one fma per element, but the interpreter's
        # numpy fma is unfused.
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        # fp16/bf16 storage, fp32 arithmetic, one rounding: at most 1 ulp apart (the interpreter rounds
        # fp32 -> bf16 toward zero, the GPU to nearest even), plus fp32 noise where ema + w * (live - ema)
        # cancels to ~0 (fma or not decides between 0 and 1e-9 there).
        eps = torch.finfo(dtype).eps
        out32, ref32 = out.float(), ref.float()
        bound = eps * torch.maximum(out32.abs(), ref32.abs()) + 1e-6
        assert bool(((out32 - ref32).abs() <= bound).all()), (out32 - ref32).abs().max()


@pytest.mark.triton
@pytest.mark.parametrize(
    "shapes", [BLOCK_SHAPES, ODD_SHAPES, SINGLE_SHAPE, _many_shapes()], ids=["resnet_block", "odd", "single", "many300"]
)
@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_ema_fp32_matches_foreach_lerp(shapes, momentum_kind):
    ema, live = _ema_lists(shapes, torch.float32, torch.float32, DEVICE)
    ref = [t.clone() for t in ema]
    live_before = [t.clone() for t in live]
    for value in [0.995, 0.9, 0.3]:  # 0.3: the other branch of lerp (|1 - m| >= 0.5)
        momentum = torch.tensor(value, device=DEVICE) if momentum_kind == "tensor" else value
        ema_update_(ema, live, momentum, backend="triton")
        ema_update_ref(ref, live, momentum)
        for out, expected in zip(ema, ref, strict=True):
            _assert_close_ema(out, expected, torch.float32)
    for after, before in zip(live, live_before, strict=True):
        assert torch.equal(after, before)
    # The update did something: three steps moved ema well away from its start.
    start, _ = _ema_lists(shapes, torch.float32, torch.float32, DEVICE)
    assert any(not torch.allclose(a, b) for a, b in zip(ema, start, strict=True))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_ema_low_precision_matches_fp32_reference(dtype, momentum_kind):
    shapes = BLOCK_SHAPES[:3] + ODD_SHAPES
    ema, live = _ema_lists(shapes, dtype, dtype, DEVICE)
    live_before = [t.clone() for t in live]
    for value in (0.9, 0.9, 0.2):
        momentum = torch.tensor(value, device=DEVICE) if momentum_kind == "tensor" else value
        step_ref = [t.clone() for t in ema]
        ema_update_(ema, live, momentum, backend="triton")
        ema_update_ref(step_ref, live, momentum)
        for out, expected in zip(ema, step_ref, strict=True):
            assert out.dtype == dtype
            # Each step from the kernel's own state: two independent chains drift apart by an ulp per
            # step under the interpreter's round-toward-zero, which says nothing about the kernel.
            _assert_close_ema(out, expected, dtype)
    for after, before in zip(live, live_before, strict=True):
        assert torch.equal(after, before)


@pytest.mark.triton
def test_ema_fp16_storage_uses_fp32_arithmetic():
    # live - ema = -120000 overflows fp16 (max 65504); in fp32 the result 60000 + 0.1 * -120000 = 48000
    # is representable.
    ema = [torch.full((5,), 60000.0, dtype=torch.float16, device=DEVICE)]
    live = [torch.full((5,), -60000.0, dtype=torch.float16, device=DEVICE)]
    ema_update_(ema, live, 0.9, backend="triton")
    assert torch.isfinite(ema[0]).all()
    torch.testing.assert_close(ema[0].float(), torch.full((5,), 48000.0, device=DEVICE), rtol=1e-3, atol=0)


@pytest.mark.triton
def test_ema_mixed_dtypes_one_launch_per_group():
    from fastlocal.kernels import ema as ema_module

    shapes = BLOCK_SHAPES
    ema32, live32 = _ema_lists(shapes, torch.float32, torch.float32, DEVICE, seed=2)
    ema16, live16 = _ema_lists(shapes[:4], torch.bfloat16, torch.bfloat16, DEVICE, seed=3)
    ema_mixed, live_mixed = _ema_lists(shapes[:2], torch.float32, torch.bfloat16, DEVICE, seed=4)
    ema = ema32 + ema16 + ema_mixed
    live = live32 + live16 + live_mixed
    ref = [t.clone() for t in ema]
    ema_update_(ema, live, 0.8, backend="triton")
    ema_update_ref(ref, live, 0.8)
    for out, expected in zip(ema, ref, strict=True):
        _assert_close_ema(out, expected, out.dtype)
    plan = ema_module._get_plan(ema, live)
    # Three dtype pairs, all allocations 16-byte aligned: three groups, so three launches.
    assert sorted((str(g.ema_dtype), str(g.live_dtype)) for g in plan.groups) == sorted(
        [("fp32", "fp32"), ("bf16", "bf16"), ("fp32", "bf16")]
    )
    chunks = sum(math.ceil(t.numel() / ema_module.BLOCK) for t in ema)
    assert sum(group.num_chunks for group in plan.groups) == chunks


@pytest.mark.triton
def test_ema_single_group_for_uniform_list():
    from fastlocal.kernels import ema as ema_module

    ema, live = _ema_lists(_many_shapes(), torch.float32, torch.float32, DEVICE)
    ema_update_(ema, live, 0.99, backend="triton")
    plan = ema_module._get_plan(ema, live)
    assert len(plan.groups) == 1
    assert plan.groups[0].num_chunks == sum(math.ceil(t.numel() / ema_module.BLOCK) for t in ema)
    assert not plan.fallback_ema


@pytest.mark.triton
def test_ema_plan_cache_and_invalidation():
    from fastlocal.kernels import ema as ema_module

    ema, live = _ema_lists(ODD_SHAPES, torch.float32, torch.float32, DEVICE)
    ref = [t.clone() for t in ema]
    ema_update_(ema, live, 0.9, backend="triton")
    ema_update_ref(ref, live, 0.9)
    plan = ema_module._get_plan(ema, live)
    ema_update_(ema, live, 0.9, backend="triton")
    ema_update_ref(ref, live, 0.9)
    assert ema_module._get_plan(ema, live) is plan  # cached: no host work beyond the launch
    # Replacing a list element invalidates the plan.
    ema[2] = ema[2].clone()
    ema_update_(ema, live, 0.9, backend="triton")
    ema_update_ref(ref, live, 0.9)
    assert ema_module._get_plan(ema, live) is not plan
    # Moving the first tensor's storage (what module.to() does to every parameter) too.
    ema[0].data = ema[0].data.clone()
    ema_update_(ema, live, 0.9, backend="triton")
    ema_update_ref(ref, live, 0.9)
    for out, expected in zip(ema, ref, strict=True):
        _assert_close_ema(out, expected, torch.float32)


@pytest.mark.triton
def test_ema_non_dense_and_channels_last_tensors():
    from fastlocal.kernels import ema as ema_module

    generator = _generator(5)
    base_ema = torch.randn(6, 8, generator=generator).to(DEVICE)
    base_live = torch.randn(6, 8, generator=generator).to(DEVICE)
    other_ema = torch.randn(6, 8, generator=generator).to(DEVICE)
    other_live = torch.randn(6, 8, generator=generator).to(DEVICE)
    conv_ema = torch.randn(4, 3, 3, 3, generator=generator).to(DEVICE).to(memory_format=torch.channels_last)
    conv_live = torch.randn(4, 3, 3, 3, generator=generator).to(DEVICE).to(memory_format=torch.channels_last)
    ema = [base_ema[:, ::2], conv_ema, other_ema.t()[:3]]  # strided, channels_last (dense), strided
    live = [base_live[:, ::2], conv_live, other_live.t()[:3]]
    ref = [t.clone() for t in ema]
    ema_update_(ema, live, 0.7, backend="triton")
    ema_update_ref(ref, live, 0.7)
    for out, expected in zip(ema, ref, strict=True):
        _assert_close_ema(out, expected, torch.float32)
    plan = ema_module._get_plan(ema, live)
    assert len(plan.fallback_ema) == 2  # the strided views; channels_last goes through the kernel


@pytest.mark.triton
def test_ema_bumps_version_counter():
    ema, live = _ema_lists([(4,)], torch.float32, torch.float32, DEVICE)
    leaf = torch.randn(4, device=DEVICE, requires_grad=True)
    product = (leaf * ema[0]).sum()  # saves ema[0] for the backward
    ema_update_(ema, live, 0.9, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.backward()


@pytest.mark.triton
def test_ema_errors():
    ema, live = _ema_lists([(3,), (4,)], torch.float32, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="pair up"):
        ema_update_(ema, live[:1], 0.9, backend="triton")
    with pytest.raises(ValueError, match="shape"):
        ema_update_(ema, live[::-1], 0.9, backend="triton")
    ema_update_([], [], 0.9, backend="triton")  # nothing to do


def test_ema_loop_reference_matches_foreach_reference():
    for dtype in (torch.float32, torch.bfloat16):
        ema, live = _ema_lists(BLOCK_SHAPES + ODD_SHAPES, dtype, dtype, "cpu")
        loop = [t.clone() for t in ema]
        ema_update_ref(ema, live, 0.9)
        ema_update_loop_ref(loop, live, 0.9)
        tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        for a, b in zip(ema, loop, strict=True):
            torch.testing.assert_close(a, b, **tolerance)


def test_ema_reference_backend():
    ema, live = _ema_lists(ODD_SHAPES, torch.float32, torch.float32, "cpu")
    expected = [torch.lerp(e, v, 1 - 0.9) for e, v in zip(ema, live, strict=True)]
    ema_update_(ema, live, torch.tensor(0.9), backend="reference")
    for out, ref in zip(ema, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.triton
def test_ema_custom_op_and_compile():
    from fastlocal.kernels import ema as ema_module

    ema, live = _ema_lists([(5,), (3, 3)], torch.float32, torch.float32, DEVICE)
    torch.library.opcheck(ema_module._ema_update_op, ([t.clone() for t in ema], live, 0.9, None))
    ref = [t.clone() for t in ema]

    def step(ema_tensors, live_tensors):
        ema_module.ema_update_(ema_tensors, live_tensors, 0.9)

    torch.compile(step, backend="aot_eager", fullgraph=True)(ema, live)
    ema_update_ref(ref, live, 0.9)
    for out, expected in zip(ema, ref, strict=True):
        _assert_close_ema(out, expected, torch.float32)
    # The dispatcher hands the op a new list on every call: the plan must be found by the tensors.
    ema_module.clear_cache()
    for _ in range(3):
        torch.ops.fastlocal.ema_update_(ema, live, 0.5, None)
        ema_update_ref(ref, live, 0.5)
    assert len(ema_module._PLANS) == 1
    for out, expected in zip(ema, ref, strict=True):
        _assert_close_ema(out, expected, torch.float32)


@pytest.mark.triton(compiled=True)
def test_ema_cuda_graph_capture_and_no_host_sync():
    ema, live = _ema_lists(BLOCK_SHAPES, torch.float32, torch.float32, DEVICE)
    ref = [t.clone() for t in ema]
    momentum = torch.tensor(0.9, device=DEVICE)
    ema_update_(ema, live, momentum, backend="triton")  # warm-up: compiles, builds the pointer table
    ema_update_ref(ref, live, momentum)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema_update_(ema, live, momentum, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ema_update_ref(ref, live, momentum)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema_update_(ema, live, momentum, backend="triton")
    for value in (0.5, 0.99):
        momentum.fill_(value)
        graph.replay()
        ema_update_ref(ref, live, momentum)
    torch.cuda.synchronize()
    for out, expected in zip(ema, ref, strict=True):
        _assert_close_ema(out, expected, torch.float32)


# ----------------------------------------------------------------------------------------------------
# Fused GAP + Linear + cross-entropy
# ----------------------------------------------------------------------------------------------------


def _aux_inputs(batch, channels, height, width, classes, dtype, device, seed=0, bias=True, param_dtype=None):
    generator = _generator(seed)
    x = torch.randn(batch, channels, height, width, generator=generator).to(device=device, dtype=dtype)
    param_dtype = param_dtype or torch.float32
    weight = (torch.randn(classes, channels, generator=generator) / math.sqrt(channels)).to(device, param_dtype)
    bias_tensor = torch.randn(classes, generator=generator).to(device, param_dtype) if bias else None
    target = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return x, weight, bias_tensor, target


def _loss_and_grads(fn, x, weight, bias, target, grad_scale=3.0):
    """Loss and the gradients of grad_scale * loss w.r.t. x, weight, bias (grad_output != 1)."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    loss = fn(x, weight, bias, target)
    (loss * grad_scale).backward()
    return loss.detach(), x.grad, weight.grad, None if bias is None else bias.grad


def _fused(**knobs):
    from fastlocal.kernels import aux_loss

    return lambda x, weight, bias, target: aux_loss.gap_linear_cross_entropy(x, weight, bias, target, **knobs)


AUX_CASES = {
    # name: (B, C, H, W, N, bias, knobs)
    "cifar_like": (32, 64, 8, 8, 10, True, {}),
    "odd": (5, 13, 3, 3, 7, True, {}),
    "odd_no_bias": (5, 13, 3, 3, 7, False, {}),
    "odd_separate_pool": (5, 13, 3, 3, 7, True, {"fuse_pool": 0}),
    # Every dim spans several 16-wide tiles: the class-tiled log-sum-exp and all the tile loops.
    "multi_tile": (37, 40, 3, 5, 37, True, {"max_block": 16}),
    "multi_tile_no_bias": (37, 40, 3, 5, 37, False, {"max_block": 16}),
    "many_classes": (6, 24, 2, 2, 200, True, {}),
    # Small head, long batch: dW and db reduced over two batch splits, summed in the backward.
    "batch_splits": (200, 13, 2, 2, 7, True, {}),
    "one_pixel": (7, 20, 1, 1, 3, True, {}),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", list(AUX_CASES), ids=list(AUX_CASES))
def test_aux_loss_fp32_matches_reference(case):
    batch, channels, height, width, classes, bias, knobs = AUX_CASES[case]
    inputs = _aux_inputs(batch, channels, height, width, classes, torch.float32, DEVICE, bias=bias)
    expected = _loss_and_grads(gap_linear_cross_entropy_ref, *inputs)
    got = _loss_and_grads(_fused(**knobs), *inputs)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    for name, out, ref in zip(("loss", "dx", "dweight", "dbias"), got, expected, strict=True):
        if ref is None:
            assert out is None
            continue
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.triton
@pytest.mark.parametrize("fuse_pool", [-1, 0])
def test_aux_loss_channels_last(fuse_pool):
    x, weight, bias, target = _aux_inputs(6, 13, 3, 4, 7, torch.float32, DEVICE)
    x = x.to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    expected = _loss_and_grads(gap_linear_cross_entropy_ref, x, weight, bias, target)
    got = _loss_and_grads(_fused(fuse_pool=fuse_pool), x, weight, bias, target)
    assert got[1].is_contiguous(memory_format=torch.channels_last)  # dx keeps x's layout
    for out, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
def test_aux_loss_non_contiguous_input():
    x, weight, bias, target = _aux_inputs(5, 13, 6, 3, 7, torch.float32, DEVICE)
    x = x[:, :, ::2]  # neither NCHW- nor NHWC-contiguous: copied first
    expected = _loss_and_grads(gap_linear_cross_entropy_ref, x, weight, bias, target)
    got = _loss_and_grads(_fused(), x, weight, bias, target)
    for out, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _pytorch_same_dtype(x, weight, bias, target):
    """PyTorch computing in the inputs' own dtype (the baseline of the 2x rule)."""
    dtype = x.dtype
    bias = None if bias is None else bias.to(dtype)
    return F.cross_entropy(F.linear(x.mean((2, 3)), weight.to(dtype), bias), target)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params_low", [False, True], ids=["fp32_params", "low_params"])
@pytest.mark.parametrize("case", ["cifar_like", "odd"])
def test_aux_loss_low_precision_within_twice_pytorch_error(dtype, params_low, case):
    batch, channels, height, width, classes, _, _ = AUX_CASES[case]
    param_dtype = dtype if params_low else torch.float32
    x, weight, bias, target = _aux_inputs(
        batch, channels, height, width, classes, dtype, DEVICE, seed=7, param_dtype=param_dtype
    )
    # fp32 reference on exactly the same (already rounded) inputs.
    exact = _loss_and_grads(gap_linear_cross_entropy_ref, x.float(), weight.float(), bias.float(), target)
    pytorch = _loss_and_grads(_pytorch_same_dtype, x, weight, bias, target)
    fused = _loss_and_grads(_fused(), x, weight, bias, target)
    assert fused[1].dtype == dtype and fused[2].dtype == param_dtype and fused[3].dtype == param_dtype
    for name, got, base, ref in zip(("loss", "dx", "dweight", "dbias"), fused, pytorch, exact, strict=True):
        kernel_error = (got.float() - ref).abs().max().item()
        pytorch_error = (base.float() - ref).abs().max().item()
        # Floor: fp32 resolution of the values (PyTorch may be exact by luck on a tiny tensor).
        floor = 1e-6 * max(1.0, ref.abs().max().item())
        assert kernel_error <= 2 * pytorch_error + floor, (name, kernel_error, pytorch_error)


@pytest.mark.triton
def test_aux_loss_partial_gradients():
    x, weight, bias, target = _aux_inputs(5, 13, 3, 3, 7, torch.float32, DEVICE)
    expected = _loss_and_grads(gap_linear_cross_entropy_ref, x, weight, bias, target, grad_scale=1.0)
    fused = _fused()
    # Frozen head: only dx.
    x_only = x.clone().requires_grad_()
    fused(x_only, weight, bias, target).backward()
    torch.testing.assert_close(x_only.grad, expected[1], rtol=1e-5, atol=1e-6)
    # Input without grad (a detached feature): only the head's gradients.
    w_only, b_only = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    fused(x, w_only, b_only, target).backward()
    torch.testing.assert_close(w_only.grad, expected[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_only.grad, expected[3], rtol=1e-5, atol=1e-6)
    # Bias only.
    b_alone = bias.clone().requires_grad_()
    fused(x, weight, b_alone, target).backward()
    torch.testing.assert_close(b_alone.grad, expected[3], rtol=1e-5, atol=1e-6)
    # No grad at all: just the loss.
    with torch.no_grad():
        torch.testing.assert_close(fused(x, weight, bias, target), expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.triton
def test_aux_loss_saves_only_gradients():
    batch, channels, classes = 5, 13, 7
    x, weight, bias, target = _aux_inputs(batch, channels, 3, 3, classes, torch.float32, DEVICE)
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = _fused()(x, weight, bias, target)
    # dL/dpooled, dL/dW, dL/db (dW and db as partial sums over batch splits, one split at this size): no
    # input, pooled features or logits.
    assert sorted(saved) == sorted(
        [((batch, channels), torch.float32), ((1, classes, channels), torch.float32), ((1, classes), torch.float32)]
    )
    loss.backward()


@pytest.mark.triton
def test_aux_loss_input_errors():
    x, weight, bias, target = _aux_inputs(4, 6, 2, 2, 5, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        gap_linear_cross_entropy(x, weight[:, :5], bias, target, backend="triton")
    with pytest.raises(ValueError, match="target must be int64"):
        gap_linear_cross_entropy(x, weight, bias, target.int(), backend="triton")
    with pytest.raises(ValueError, match="bias must be"):
        gap_linear_cross_entropy(x, weight, bias[:3], target, backend="triton")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        gap_linear_cross_entropy(x[:, :, 0], weight, bias, target, backend="triton")


def test_aux_loss_reference_backend():
    x, weight, bias, target = _aux_inputs(5, 13, 3, 3, 7, torch.bfloat16, "cpu")
    loss = gap_linear_cross_entropy(x, weight, bias, target, backend="reference")
    logits = x.double().mean((2, 3)) @ weight.double().t() + bias.double()
    expected = F.cross_entropy(logits, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
def test_aux_loss_custom_ops_and_compile():
    from fastlocal.kernels import aux_loss

    x, weight, bias, target = _aux_inputs(5, 13, 3, 3, 7, torch.float32, DEVICE)
    torch.library.opcheck(aux_loss._forward_op, (x, weight, bias, target, True, True, 1 << 30, -1))
    _, dpooled, dw, db = aux_loss._forward_impl(x, weight, bias, target, True, True, 1 << 30, -1)
    grad = torch.tensor(2.0, device=DEVICE)
    torch.library.opcheck(
        aux_loss._backward_op, (grad, dpooled, dw, db, list(x.shape), x.dtype, False, weight.dtype, bias.dtype)
    )
    expected = _loss_and_grads(gap_linear_cross_entropy_ref, x, weight, bias, target)

    def loss_fn(x, weight, bias, target):
        return aux_loss.gap_linear_cross_entropy(x, weight, bias, target)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = _loss_and_grads(compiled, x, weight, bias, target)
    for out, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.triton(compiled=True)
def test_aux_loss_cuda_graph_capture_and_no_host_sync():
    x, weight, bias, target = _aux_inputs(64, 64, 8, 8, 10, torch.float32, DEVICE)
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()

    def step():
        loss = gap_linear_cross_entropy(x, weight, bias, target, backend="triton")
        return (loss, *torch.autograd.grad(loss * 3, (x, weight, bias)))

    step()  # warm-up: compile
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    expected = _loss_and_grads(gap_linear_cross_entropy_ref, x, weight, bias, target)
    for out, ref in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
