"""CIFAR ResNets (He et al. 2016, 6n+2 layers), docs/method.md#methods."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from fastlocal import kernels
from fastlocal.heads import GapLinear
from fastlocal.models.backbone import Backbone

DEPTH_BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
STAGE_WIDTHS = (16, 32, 64)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    fused_batch_norm: str | None = None
    """None: PyTorch's batch norm, ReLU and add. A kernels backend ("triton", "reference"): in training mode
    each batch norm runs fused with the ReLU and the residual add after it (`fastlocal.kernels.batch_norm_act`);
    set with `use_fused_batch_norm`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        if self.fused_batch_norm is not None and self.training:
            return self._forward_fused(x, self.fused_batch_norm)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))

    def _forward_fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        out = batch_norm_act(self.conv1(x), self.bn1, backend)
        shortcut = (
            x if len(self.shortcut) == 0 else batch_norm_act(self.shortcut[0](x), self.shortcut[1], backend, relu=False)
        )
        return batch_norm_act(self.conv2(out), self.bn2, backend, residual=shortcut)


def batch_norm_act(
    x: torch.Tensor, bn: nn.BatchNorm2d, backend: str, residual: torch.Tensor | None = None, relu: bool = True
) -> torch.Tensor:
    """relu(bn(x) + residual) of a BatchNorm2d in training mode, through `fastlocal.kernels.batch_norm_act`."""
    if bn.momentum is None or not bn.track_running_stats or not bn.affine:
        # A cumulative average needs the batch count on the host; keep PyTorch's module for these cases.
        out = bn(x) if residual is None else bn(x) + residual
        return torch.relu(out) if relu else out
    bn.num_batches_tracked.add_(1)
    return kernels.batch_norm_act(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps, residual, relu, backend=backend
    )


def use_fused_batch_norm(modules: Iterable[nn.Module], backend: str | None) -> int:
    """Set `fused_batch_norm` on every BasicBlock inside `modules` (None switches it off); returns how many."""
    return _set_on_blocks(modules, "fused_batch_norm", backend)


def _set_on_blocks(modules: Iterable[nn.Module], attribute: str, value: str | None) -> int:
    blocks = {id(b): b for m in modules for b in m.modules() if isinstance(b, BasicBlock)}
    for block in blocks.values():
        setattr(block, attribute, value)
    return len(blocks)


def init_cifar_weights(module: nn.Module) -> None:
    """Conv N(0, 2/(k*k*C_out)), BN gamma 1 beta 0; Linear keeps PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cifar_resnet(arch: str, num_classes: int, input_size: int = 32) -> Backbone:
    n = DEPTH_BLOCKS[arch]
    stem = nn.Sequential(conv3x3(3, STAGE_WIDTHS[0]), nn.BatchNorm2d(STAGE_WIDTHS[0]), nn.ReLU(inplace=True))
    blocks, block_ids = [], []
    in_channels = STAGE_WIDTHS[0]
    for stage, width in enumerate(STAGE_WIDTHS):
        for index in range(n):
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append(BasicBlock(in_channels, width, stride))
            block_ids.append((stage, index))
            in_channels = width
    head = GapLinear(in_channels, num_classes)
    init_cifar_weights(stem)
    for block in blocks:
        init_cifar_weights(block)
    return Backbone(stem, blocks, block_ids, head, input_size, num_classes)
