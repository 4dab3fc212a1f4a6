"""LAM paired-branch fusion: `a(z) + b(z)` for two CIFAR BasicBlocks of the same shape, as one wide block.

MLAAN's LAM starts with `Aug_i[0](z) + EMA_i[0](z)` (SPEC 3.4): two copies of one block on one input.
Side by side they are one block of twice the width:

- conv1 of both: one convolution with 2*C output channels (weights concatenated along dim 0);
- bn1 of both: one batch norm over 2*C channels; per-channel batch statistics do not mix channels, so
  each half normalises exactly as its own BN would;
- conv2 of both: one grouped convolution (groups=2), each group reading only its own half;
- bn2, the shortcut (identity, or a 1x1 convolution + BN fused the same way) and the ReLU per half;
- the two halves summed, Aug first, as the unfused `aug(z) + ema(z)`.

The result equals the unfused sum up to the summation order inside the convolutions and reductions.
The concatenated weights are built at every forward, so the gradient reaches the trainable copy's
tensors and the EMA copy's tensors stay the frozen ones that `ema_update_` moves in place. Running
statistics are concatenated into temporaries, updated by the batch norm and copied back per copy, so
both copies' buffers (and `num_batches_tracked`) move exactly as their own forwards would move them.
Nothing here owns parameters: which tensors exist, the state_dict and the EMA lists are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastlocal import kernels
from fastlocal.models.cifar_resnet import BasicBlock


def _same_conv(a: nn.Module, b: nn.Module) -> bool:
    return (
        type(a) is nn.Conv2d
        and type(b) is nn.Conv2d
        and a.bias is None
        and b.bias is None
        and a.groups == 1
        and b.groups == 1
        and a.padding_mode == "zeros"
        and b.padding_mode == "zeros"
        and a.weight.shape == b.weight.shape
        and (a.stride, a.padding, a.dilation) == (b.stride, b.padding, b.dilation)
    )


def _same_batch_norm(a: nn.Module, b: nn.Module) -> bool:
    # momentum None (cumulative averaging) would need num_batches_tracked on the host: not fused.
    return (
        type(a) is nn.BatchNorm2d
        and type(b) is nn.BatchNorm2d
        and a.affine
        and b.affine
        and a.track_running_stats
        and b.track_running_stats
        and a.momentum is not None
        and (a.num_features, a.eps, a.momentum) == (b.num_features, b.eps, b.momentum)
    )


def pair_is_fusable(a: nn.Module, b: nn.Module) -> bool:
    """True when `a` and `b` are CIFAR BasicBlocks whose layers line up one for one.

    Any other block (torchvision's ImageNet blocks, a subclass with its own forward) keeps the unfused path.
    """
    if type(a) is not BasicBlock or type(b) is not BasicBlock:
        return False
    if not (_same_conv(a.conv1, b.conv1) and _same_conv(a.conv2, b.conv2)):
        return False
    if not (_same_batch_norm(a.bn1, b.bn1) and _same_batch_norm(a.bn2, b.bn2)):
        return False
    if type(a.relu) is not nn.ReLU or type(b.relu) is not nn.ReLU:
        return False
    if type(a.shortcut) is not nn.Sequential or type(b.shortcut) is not nn.Sequential:
        return False
    if len(a.shortcut) == 0 and len(b.shortcut) == 0:
        return True
    return (
        len(a.shortcut) == 2
        and len(b.shortcut) == 2
        and _same_conv(a.shortcut[0], b.shortcut[0])
        and _same_batch_norm(a.shortcut[1], b.shortcut[1])
    )


def modes_match(a: nn.Module, b: nn.Module) -> bool:
    """Both blocks in the same train/eval mode, layer by layer (one fused BN has one mode)."""
    return all(x.training == y.training for x, y in zip(a.modules(), b.modules(), strict=True))


def _batch_norm_act(
    x: torch.Tensor,
    bns: tuple[nn.BatchNorm2d, nn.BatchNorm2d],
    residual: torch.Tensor | None,
    relu: bool,
    backend: str | None,
) -> torch.Tensor:
    """relu(batch_norm(x) + residual) (relu and residual optional) with the two BNs laid side by side.

    x: (B, 2C, H, W), channels [0, C) belong to bns[0] and [C, 2C) to bns[1]; residual: (B, 2C, H, W).
    Training mode goes through `fastlocal.kernels.batch_norm_act` with `backend` (a BasicBlock's
    `fused_batch_norm`; None: its PyTorch reference); eval mode uses the running statistics.
    """
    first, second = bns
    training = first.training
    weight = torch.cat([first.weight, second.weight])
    bias = torch.cat([first.bias, second.bias])
    # Temporaries: the batch norm updates them in place; the halves are copied back below.
    running_mean = torch.cat([first.running_mean, second.running_mean])
    running_var = torch.cat([first.running_var, second.running_var])
    if training:  # the blocks' own rule: the fused kernel when set, else PyTorch's batch norm, add, ReLU
        out = kernels.batch_norm_act(x, weight, bias, running_mean, running_var, first.momentum, first.eps,
                                     residual=residual, relu=relu, backend=backend or "reference")
    else:
        out = F.batch_norm(x, running_mean, running_var, weight, bias, False, first.momentum, first.eps)
        if residual is not None:
            out = out + residual
        if relu:
            out = F.relu(out)
    if training:
        channels = first.num_features
        with torch.no_grad():
            for half, bn in enumerate(bns):
                bn.running_mean.copy_(running_mean[half * channels : (half + 1) * channels])
                bn.running_var.copy_(running_var[half * channels : (half + 1) * channels])
                bn.num_batches_tracked.add_(1)  # as nn.BatchNorm2d's own forward counts
    return out


def fused_pair_forward(a: BasicBlock, b: BasicBlock, z: torch.Tensor) -> torch.Tensor:
    """a(z) + b(z) as one double-width block; needs pair_is_fusable(a, b) and modes_match(a, b).

    z: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride). BN+ReLU steps follow `a.fused_batch_norm`.
    """
    backend = a.fused_batch_norm
    channels = a.conv1.out_channels
    conv1, conv2 = a.conv1, a.conv2
    weight1 = torch.cat([a.conv1.weight, b.conv1.weight])
    h = F.conv2d(z, weight1, None, conv1.stride, conv1.padding, conv1.dilation)
    h = _batch_norm_act(h, (a.bn1, b.bn1), None, True, backend)
    # groups=2: output half k reads input half k only, as each copy's conv2 reads its own bn1 output.
    weight2 = torch.cat([a.conv2.weight, b.conv2.weight])
    h = F.conv2d(h, weight2, None, conv2.stride, conv2.padding, conv2.dilation, groups=2)
    if len(a.shortcut) == 0:
        residual = torch.cat([z, z], 1)
    else:
        short = a.shortcut[0]
        weight_short = torch.cat([a.shortcut[0].weight, b.shortcut[0].weight])
        residual = F.conv2d(z, weight_short, None, short.stride, short.padding, short.dilation)
        residual = _batch_norm_act(residual, (a.shortcut[1], b.shortcut[1]), None, False, backend)
    h = _batch_norm_act(h, (a.bn2, b.bn2), residual, True, backend)
    return h[:, :channels] + h[:, channels:]
