"""The fused batch norm + residual add + ReLU kernel against PyTorch's batch norm in float64."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from builders import assert_same_forward_backward, forward_backward, short_mlaan_run

from fastlocal.kernels import batch_norm as bn_kernel
from fastlocal.kernels import batch_norm_act
from fastlocal.models.cifar_resnet import BasicBlock, use_fused_batch_norm

pytestmark = pytest.mark.triton
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def run(backend, x, weight, bias, residual, relu, grad_seed=3):
    """Output, gradients of (x, weight, bias, residual) and the running statistics after one call."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    running_mean = torch.zeros(x.shape[1], dtype=stats_dtype, device=x.device)
    running_var = torch.ones(x.shape[1], dtype=stats_dtype, device=x.device)
    y = batch_norm_act(
        leaves[0], leaves[1], leaves[2], running_mean, running_var, 0.1, 1e-5, leaves[3], relu, backend=backend
    )
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    y.backward(dy.to(device=y.device, dtype=y.dtype))
    grads = [t.grad if t is not None else None for t in leaves]
    return y, grads, running_mean, running_var


def reference_f64(x, weight, bias, residual, relu):
    """PyTorch's batch norm in float64 on the CPU: the obviously right answer."""
    return run(
        "reference", *(t.detach().double().cpu() if t is not None else None for t in (x, weight, bias, residual)), relu
    )


def assert_close_all(got, expected, rtol, atol):
    y, grads, rm, rv = got
    y_ref, grads_ref, rm_ref, rv_ref = expected
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=rtol, atol=atol)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is not None:
            torch.testing.assert_close(g.double().cpu(), g_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(rm.double().cpu(), rm_ref.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double().cpu(), rv_ref.double(), rtol=1e-5, atol=1e-6)


def inputs(shape, channels_last, residual, device, dtype=torch.float32, mean=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + mean).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(shape[1], generator=g) + 0.5).to(device)
    bias = torch.randn(shape[1], generator=g).to(device)
    res = torch.randn(shape, generator=g).to(device=device, dtype=dtype) if residual else None
    return x, weight, bias, res


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 70, 3, 3)], ids=["C5", "C70"])
def test_fp32_matches_float64_batch_norm(shape, channels_last, residual, relu, device):
    x, weight, bias, res = inputs(shape, channels_last, residual, device)
    got = run("triton", x, weight, bias, res, relu)
    assert got[0].dtype == torch.float32
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if residual:  # the residual's gradient comes back in the residual's own layout, without a copy
        assert got[1][3].stride() == res.stride()
    assert_close_all(got, reference_f64(x, weight, bias, res, relu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_many_partial_sums_per_program(monkeypatch, device):
    # Few partial-sum programs, so each loops over several row tiles (what large batches do on a GPU), and
    # partials summed in several loop steps by several programs.
    monkeypatch.setattr(bn_kernel, "TARGET_PARTIALS", 3)
    monkeypatch.setattr(bn_kernel, "FINALIZE_ROWS", 2)
    monkeypatch.setattr(bn_kernel, "FINALIZE_CHANNELS", 4)
    x, weight, bias, res = inputs((4, 16, 12, 12), True, True, device)
    assert_close_all(
        run("triton", x, weight, bias, res, True), reference_f64(x, weight, bias, res, True), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_keeps_an_exact_variance(device):
    # Shifted sums: a channel mean of 1000 with unit spread must not cancel catastrophically in fp32.
    x, weight, bias, _ = inputs((4, 3, 8, 8), False, False, device, mean=1000.0)
    assert_close_all(
        run("triton", x, weight, bias, None, False), reference_f64(x, weight, bias, None, False), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_storage_follows_the_fp32_math(device):
    x, weight, bias, res = inputs((3, 16, 5, 5), True, True, device, dtype=torch.bfloat16)
    y, grads, rm, rv = run("triton", x, weight, bias, res, True)
    assert y.dtype == grads[0].dtype == grads[3].dtype == torch.bfloat16
    assert grads[1].dtype == torch.float32
    # The reference sees the same bf16 values, computes in float64; the difference is bf16 rounding.
    assert_close_all((y, grads, rm, rv), reference_f64(x, weight, bias, res, True), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wanted", ["all", "residual_only"])
def test_residual_in_another_dtype_and_only_some_gradients(wanted, device):
    # A bf16 input with an fp32 residual: the residual's gradient is not dy's dtype, so the dx pass computes
    # dz again instead of reading it back; with only the residual's gradient wanted there is no dx pass.
    x, weight, bias, res = inputs((3, 16, 5, 5), True, True, device, dtype=torch.bfloat16)
    res = res.float()
    leaves = [t.clone().requires_grad_(wanted == "all" or t is res) for t in (x, weight, bias, res)]
    y = batch_norm_act(*leaves[:3], None, None, 0.1, 1e-5, leaves[3], True, backend="triton")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=y.dtype)
    y.backward(dy)
    expected = [t.double().cpu().requires_grad_() for t in (x, weight, bias, res)]
    F.relu(F.batch_norm(expected[0], None, None, expected[1], expected[2], True, 0.1, 1e-5) + expected[3]).backward(
        dy.double().cpu()
    )
    assert leaves[3].grad.dtype == torch.float32
    for got, ref in zip(leaves, expected):
        if got.requires_grad:
            torch.testing.assert_close(got.grad.double().cpu(), ref.grad, rtol=2e-2, atol=2e-2)
        else:
            assert got.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_layouts_and_an_expanded_gradient(device):
    x, weight, bias, res = inputs((2, 8, 4, 4), True, True, device)
    res = res.contiguous()  # residual NCHW, input channels_last
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, res)]
    batch_norm_act(*leaves[:3], None, None, 0.1, 1e-5, leaves[3], True, backend="triton").mean().backward()
    expected = [t.double().cpu().requires_grad_() for t in (x, weight, bias, res)]
    F.relu(
        F.batch_norm(expected[0], None, None, expected[1], expected[2], True, 0.1, 1e-5) + expected[3]
    ).mean().backward()  # dy of a mean is an expanded (stride 0) tensor
    for got, ref in zip(leaves, expected):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2], ids=["identity", "downsample"])
def test_fused_block_follows_the_plain_block(stride, device):
    torch.manual_seed(0)
    plain = BasicBlock(8, 8 if stride == 1 else 16, stride).to(device)
    for bn in (m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.uniform_(bn.bias, -0.5, 0.5)
    fused = BasicBlock(8, 8 if stride == 1 else 16, stride).to(device)
    fused.load_state_dict(plain.state_dict())
    assert use_fused_batch_norm([fused], "triton") == 1
    x = torch.randn(4, 8, 6, 6, device=device)
    assert_same_forward_backward(forward_backward(fused, x), forward_backward(plain, x))
    for a, b in zip(fused.buffers(), plain.buffers()):  # running statistics and num_batches_tracked
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fused.eval()
    plain.eval()
    with torch.no_grad():  # evaluation runs PyTorch's batch norm on the running statistics
        torch.testing.assert_close(fused(x), plain(x))


def test_bad_input_rank_is_a_clear_error():
    with pytest.raises(ValueError, match="expected a 4-d"):
        batch_norm_act(torch.randn(4, 3), torch.ones(3), torch.zeros(3), None, None, 0.1, 1e-5)


def test_the_flag_switches_blocks_on_and_off():
    blocks = [BasicBlock(4, 4, 1), BasicBlock(4, 8, 2)]
    assert use_fused_batch_norm(blocks, "triton") == 2
    assert all(b.fused_batch_norm == "triton" for b in blocks)
    use_fused_batch_norm(blocks, None)
    assert all(b.fused_batch_norm is None for b in blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocks[0](torch.randn(2, 4, 3, 3))  # the plain path again


def mlaan_losses(fused: bool, device: str):
    def fuse(backbone, method):
        assert use_fused_batch_norm([backbone, method], "triton") > 9  # the backbone's 9 blocks and the LAMs'

    return short_mlaan_run(device, prepare=fuse if fused else None, steps=2)[0]


@pytest.mark.parametrize("device", DEVICES)
def test_mlaan_training_with_fused_batch_norm_follows_the_plain_run(device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # only the batch-norm arithmetic differs
    assert mlaan_losses(True, device) == pytest.approx(mlaan_losses(False, device), rel=1e-4)


@pytest.mark.parametrize("residual", [True, False])
def test_custom_ops_and_compile(residual):
    # Registered like the aux loss's and the EMA's: opcheck the ops, then a compiled call against eager.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, weight, bias, res = inputs((2, 5, 3, 4), True, residual, device)
    running = (torch.zeros(5, device=device), torch.ones(5, device=device))
    torch.library.opcheck(bn_kernel._forward_op, (x, weight, bias, res, *running, 0.1, 1e-5, True))
    y, stats = bn_kernel._forward_impl(x, weight, bias, res, None, None, 0.1, 1e-5, True)
    dy = torch.randn_like(y)
    torch.library.opcheck(bn_kernel._backward_op, (dy, x, y, weight, stats, True, True, residual, torch.float32, True))

    def call(*args):
        return bn_kernel.batch_norm_act(*args)

    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    for fn in (call, compiled):
        got = run_with(fn, x, weight, bias, res)
        if fn is call:
            expected = got
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def run_with(fn, x, weight, bias, residual):
    """Output, gradients and running statistics of one call of `fn` (batch_norm_act's Triton path)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    running_mean, running_var = torch.zeros(x.shape[1], device=x.device), torch.ones(x.shape[1], device=x.device)
    y = fn(leaves[0], leaves[1], leaves[2], running_mean, running_var, 0.1, 1e-5, leaves[3], True)
    y.backward(torch.ones_like(y))
    return [y, *(t.grad for t in leaves if t is not None), running_mean, running_var]
