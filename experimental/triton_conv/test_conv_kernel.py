"""The few-channel 3x3 convolution kernel against PyTorch's convolution in float64 (see README.md)."""

import conv as conv_module
import pytest
import torch
import torch.nn.functional as F
from builders import assert_same_forward_backward, forward_backward, short_mlaan_run
from conv import conv3x3, use_triton_conv

from fastlocal.models.cifar_resnet import BasicBlock, use_fused_batch_norm

pytestmark = pytest.mark.triton
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def leaves(shape, out_channels, device, dtype=torch.float32, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(out_channels, shape[1], 3, 3, generator=g, dtype=torch.float64) / 12).to(
        device=device, dtype=dtype
    )
    dy = torch.randn(shape[0], out_channels, *shape[2:], generator=g, dtype=torch.float64)
    return x.requires_grad_(), w.requires_grad_(), dy


def reference_f64(x, w, dy):
    x64, w64 = (t.detach().double().cpu().requires_grad_() for t in (x, w))
    y = F.conv2d(x64, w64, padding=1)
    y.backward(dy)
    return y, x64.grad, w64.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(
    "shape,out_channels",
    [((2, 16, 5, 7), 16), ((3, 16, 4, 4), 32), ((1, 32, 6, 3), 16), ((2, 64, 1, 9), 64)],
    ids=["16-16", "16-32", "32-16-odd", "64-64-one-row"],
)
def test_fp32_matches_float64_convolution(shape, out_channels, channels_last, device, monkeypatch):
    # Small tiles and few weight-gradient programs, so every test shape spans several of each.
    monkeypatch.setattr(conv_module, "CONV_PIXELS", 16)
    monkeypatch.setattr(conv_module, "WGRAD_PROGRAMS", 3)
    x, w, dy = leaves(shape, out_channels, device, channels_last=channels_last)
    y = conv3x3(x, w, backend="triton")
    y.backward(dy.to(device=device, dtype=y.dtype))
    y_ref, dx_ref, dw_ref = reference_f64(x, w, dy)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.float32
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double().cpu(), dw_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_is_exact_products_summed_in_fp32(device):
    x, w, dy = leaves((2, 16, 6, 6), 16, device, dtype=torch.bfloat16)
    y = conv3x3(x, w, backend="triton")
    y.backward(dy.to(device=device, dtype=y.dtype))
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    # The reference sees the same bf16 values (and the bf16-rounded dy): only output rounding differs.
    y_ref, dx_ref, dw_ref = reference_f64(x, w, dy.to(torch.bfloat16).double())
    for got, ref in ((y, y_ref), (x.grad, dx_ref), (w.grad, dw_ref)):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_casts_both_like_conv2d(device):
    x, w, _ = leaves((2, 16, 4, 4), 16, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = conv3x3(x, w, backend="triton")
        expected = F.conv2d(x, w, padding=1)
    assert y.dtype == expected.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32  # the casts' backward returns fp32 gradients
    torch.testing.assert_close(y.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_unsupported_shapes_are_a_clear_error():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="16/32/64 channels in and out, got 3 -> 16.*reference backend"):
        conv3x3(x, torch.randn(16, 3, 3, 3), backend="triton")
    with pytest.raises(ValueError, match="3x3 weight"):
        conv3x3(torch.randn(1, 16, 4, 4), torch.randn(16, 16, 1, 1), backend="triton")


def test_reference_backend_is_conv2d():
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(conv3x3(x, w, backend="reference"), F.conv2d(x, w, padding=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused_batch_norm", [None, "triton"], ids=["plain_bn", "fused_bn"])
def test_blocks_with_triton_conv_follow_the_plain_blocks(fused_batch_norm, device):
    # A 16-channel block (both convolutions replaced) and a downsampling one (16 -> 32 channels: none is).
    torch.manual_seed(0)
    plain = torch.nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2)).to(device)
    fast = torch.nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2)).to(device)
    fast.load_state_dict(plain.state_dict())
    use_fused_batch_norm([plain, fast], fused_batch_norm)
    assert use_triton_conv([fast], "triton") == 2
    x = torch.randn(3, 16, 6, 6, device=device)
    assert_same_forward_backward(forward_backward(fast, x), forward_backward(plain, x))


def test_only_narrow_stride_one_convolutions_take_the_triton_path(monkeypatch):
    calls = []
    monkeypatch.setattr(
        conv_module, "conv3x3_triton", lambda x, w: calls.append(tuple(w.shape)) or F.conv2d(x, w, padding=1)
    )
    blocks = [BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 32, 1)]
    use_triton_conv(blocks, "triton")
    x = torch.randn(2, 16, 8, 8)
    for block in blocks:
        x = block(x)
    assert calls == [(16, 16, 3, 3)] * 2  # the first block's two; 32 channels and stride 2 stay with PyTorch
    use_triton_conv(blocks, None)
    blocks[0](torch.randn(2, 16, 8, 8))
    assert len(calls) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_mlaan_training_with_triton_conv_follows_the_plain_run(device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    def triton_conv(backbone, method):
        assert use_triton_conv([backbone, method], "triton") > 9  # the backbone's 9 blocks and the LAMs'

    fast = short_mlaan_run(device, prepare=triton_conv, steps=2)[0]
    assert fast == pytest.approx(short_mlaan_run(device, steps=2)[0], rel=1e-4)
