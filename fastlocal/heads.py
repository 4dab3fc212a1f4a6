"""Auxiliary heads: small networks that turn a module's output into a local training signal.

Head names as in docs/method.md#heads-and-decoders: `<convs>c<linears>f`, e.g. `1c2f` = conv3x3, BN, ReLU,
GAP, Linear(C1 -> d), ReLU, Linear(d -> C). `0c1f` is plain GAP + Linear, the head type the fused Triton loss covers.

Heads take feature maps (B, C, H, W) or token sequences (B, N, D) (a vision transformer's blocks): global
average pooling averages over the positions, H x W or N. On tokens a head's "conv" layers are per-token
Linear + LayerNorm + GELU layers (no spatial neighbourhood to convolve over).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEAD_TYPES = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C): mean over H x W; (B, N, D) -> (B, D): mean over the N tokens."""
    if x.dim() == 4:
        return x.mean((2, 3))
    if x.dim() == 3:
        return x.mean(1)
    raise ValueError(f"heads take features (B, C, H, W) or tokens (B, N, D), got shape {tuple(x.shape)}")


class GapLinear(nn.Module):
    """GAP + Linear: (B, C, H, W) or (B, N, C) -> (B, num_classes)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(global_average_pool(x))


def head_conv_plan(in_channels: int, final_channels: int, widen: int = 1) -> tuple[int, int]:
    """(C1, stride) of a head's first conv: double the width and halve the resolution until the
    backbone's final width is reached, then keep both (CIFAR: 16->32 s2, 32->64 s2, 64->64 s1)."""
    if in_channels < final_channels:
        return 2 * in_channels * widen, 2
    return in_channels * widen, 1


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (9 * out_channels)))
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def token_linear_norm_act(in_features: int, out_features: int) -> list[nn.Module]:
    """The token counterpart of conv_bn_relu: per-token Linear, LayerNorm, GELU (a transformer's own layers)."""
    return [nn.Linear(in_features, out_features), nn.LayerNorm(out_features), nn.GELU()]


class ConvHead(nn.Module):
    """`num_convs` conv3x3+BN+ReLU layers, GAP, then `num_linears` Linear layers with ReLU between.
    `tokens`: the input is (B, N, D) and the conv layers are per-token Linear+LayerNorm+GELU of the same widths."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        final_channels: int,
        num_convs: int,
        num_linears: int,
        hidden: int = 128,
        widen: int = 1,
        tokens: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        if num_convs >= 1:
            width, stride = head_conv_plan(in_channels, final_channels, widen)
            layers += token_linear_norm_act(channels, width) if tokens else conv_bn_relu(channels, width, stride)
            channels = width
        for _ in range(num_convs - 1):
            layers += token_linear_norm_act(channels, channels) if tokens else conv_bn_relu(channels, channels, 1)
        self.features = nn.Sequential(*layers)
        linears: list[nn.Module] = []
        for _ in range(num_linears - 1):
            linears += [nn.Linear(channels, hidden), nn.ReLU(inplace=True)]
            channels = hidden
        linears.append(nn.Linear(channels, num_classes))
        self.classifier = nn.Sequential(*linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(global_average_pool(self.features(x)))


def build_head(
    name: str,
    in_channels: int,
    num_classes: int,
    final_channels: int,
    hidden: int = 128,
    widen: int = 1,
    tokens: bool = False,
) -> nn.Module:
    if name not in HEAD_TYPES:
        raise ValueError(f"unknown head {name!r}; choose one of: {', '.join(HEAD_TYPES)}")
    num_convs, num_linears = int(name[0]), int(name[2])
    if num_convs == 0 and num_linears == 1:
        return GapLinear(in_channels, num_classes)
    return ConvHead(in_channels, num_classes, final_channels, num_convs, num_linears, hidden, widen, tokens)


def classification_loss(
    head: nn.Module, features: torch.Tensor, target: torch.Tensor, kernels: str = "reference"
) -> torch.Tensor:
    """Mean cross-entropy of `head(features)`. GAP+Linear heads go through the kernel dispatch
    (`system.kernels`: the fused Triton loss on CUDA under `auto`), every other head through PyTorch."""
    if kernels != "reference" and isinstance(head, GapLinear) and features.dim() == 4:
        from fastlocal.kernels import gap_linear_cross_entropy

        return gap_linear_cross_entropy(features, head.fc.weight, head.fc.bias, target, backend=kernels)
    return F.cross_entropy(head(features), target)
