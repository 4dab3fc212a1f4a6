"""Local objectives: what a base method computes from one feature map (docs/method.md#heads-and-decoders).

`dgl`: a classifier head + cross-entropy. `infopro`: l1 * BCE(decoder(h), x in [0, 1]) + l2 * label
loss (a 1c2f head with cross-entropy, or supervised contrastive). MLAAN builds two objectives of its
base per module, one on the module's output and one on the LAM's output.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastlocal.config import ConfigError, InfoProConfig, MethodConfig
from fastlocal.heads import build_head, classification_loss
from fastlocal.methods.base import Batch

SUPCON_TEMPERATURE = 0.07
SUPCON_FEATURES = 128


@dataclass(frozen=True)
class ObjectiveOptions:
    """What a method's local objectives are built from."""

    base: str
    """dgl (a classifier head) or infopro (decoder + label loss)."""
    head: str
    """The auxiliary head type (method.head with auto resolved by the method: a name in heads.HEAD_TYPES)."""
    method: MethodConfig
    """Read for head_hidden and head_widen."""
    infopro: InfoProConfig
    """Read for the infopro base: weights, label_loss, decoder_widen."""

    def build_head(self, in_channels: int, outputs: int, final_channels: int, tokens: bool) -> nn.Module:
        return build_head(
            self.head,
            in_channels,
            outputs,
            final_channels,
            self.method.head_hidden,
            self.method.head_widen,
            tokens=tokens,
        )


class ClassifierObjective(nn.Module):
    """DGL's local loss: cross-entropy of a classifier head."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, batch: Batch, kernels: str = "reference") -> torch.Tensor:
        return classification_loss(self.head, features, batch.y, kernels)


MAX_SPECIAL_TOKENS = 4
"""Leading tokens that are not patches (a class token, distillation or register tokens) a decoder skips."""


def patch_grid(num_tokens: int) -> tuple[int, int]:
    """(grid side g, leading special tokens) of a token sequence whose last g*g tokens are square patches."""
    side = math.isqrt(num_tokens)
    special = num_tokens - side * side
    if side == 0 or special > MAX_SPECIAL_TOKENS:
        raise ConfigError(
            f"InfoPro's decoder reconstructs the image from a feature map or a square grid of patch tokens, but "
            f"these features are a sequence of {num_tokens} tokens, which is neither a square grid nor one after at "
            f"most {MAX_SPECIAL_TOKENS} leading class tokens; use method.name=dgl (or mlaan.base=dgl), or "
            "infopro.weights with zero reconstruction weights [0, l2, 0, l2]"
        )
    return side, special


class Decoder(nn.Module):
    """InfoPro's reconstruction decoder: upsample to the input size, conv-BN-ReLU, conv -> 3 logits.

    Token features (B, N, D) are first laid out as the (B, D, g, g) grid of their patches (leading class
    tokens dropped). Returns logits; the loss applies the sigmoid (BCE with logits is the stable form of
    BCE(sigmoid(z)), equal to it wherever the latter is finite)."""

    def __init__(self, in_channels: int, image_size: int, widen: int = 1, num_tokens: int = 0):
        super().__init__()
        hidden = 12 * widen
        self.image_size = image_size
        # (grid side, special tokens) for token inputs, checked at build time so a bad shape fails early.
        self.grid = patch_grid(num_tokens) if num_tokens else None
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:
            side, special = self.grid
            x = x[:, special:].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)
        return self.conv2(F.relu(self.bn(self.conv1(x))))


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = SUPCON_TEMPERATURE) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) on L2-normalised `features` (B, D).

    Positives share the anchor's label, the anchor itself excluded; anchors without a positive are
    left out of the mean (no host synchronisation: done with masks)."""
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.t() / temperature
    n = logits.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    num_positives = positives.sum(1)
    per_anchor = -(log_prob.masked_fill(~positives, 0).sum(1)) / num_positives.clamp(min=1)
    has_positive = (num_positives > 0).to(per_anchor.dtype)
    return (per_anchor * has_positive).sum() / has_positive.sum().clamp(min=1)


class InfoProObjective(nn.Module):
    """l1 * BCE(decoder(h), x01) + l2 * label loss; a part whose weight is 0 is not built."""

    def __init__(
        self,
        options: ObjectiveOptions,
        in_channels: int,
        image_size: int,
        num_classes: int,
        final_channels: int,
        recon_weight: float,
        label_weight: float,
        num_tokens: int = 0,
    ):
        super().__init__()
        self.recon_weight, self.label_weight = recon_weight, label_weight
        self.label_loss = options.infopro.label_loss
        self.decoder = None
        if recon_weight:
            self.decoder = Decoder(in_channels, image_size, options.infopro.decoder_widen, num_tokens)
        self.head = None
        if label_weight:
            outputs = SUPCON_FEATURES if self.label_loss == "supcon" else num_classes
            self.head = options.build_head(in_channels, outputs, final_channels, tokens=num_tokens > 0)

    def forward(self, features: torch.Tensor, batch: Batch, kernels: str = "reference") -> torch.Tensor:
        loss = features.new_zeros(())
        if self.decoder is not None:
            target = batch.images01().to(features.dtype)
            loss = loss + self.recon_weight * F.binary_cross_entropy_with_logits(self.decoder(features), target)
        if self.head is not None:
            if self.label_loss == "supcon":
                label = supcon_loss(self.head(features), batch.y)
            else:
                label = classification_loss(self.head, features, batch.y, kernels)
            loss = loss + self.label_weight * label
        return loss


def infopro_weights(weights: tuple[float, ...], module_index: int, num_modules: int) -> tuple[float, float]:
    """(l1, l2) of local module m: linear from (ixx_1, ixy_1) at m = 0 to (ixx_2, ixy_2) at m = K-2."""
    ixx_1, ixy_1, ixx_2, ixy_2 = weights
    r = module_index / (num_modules - 2) if num_modules > 2 else 0.0
    return ixx_1 * (1 - r) + ixx_2 * r, ixy_1 * (1 - r) + ixy_2 * r


def objective_is_zero(options: ObjectiveOptions, module_index: int, num_modules: int) -> bool:
    """Whether the base objective of local module `module_index` has only zero weights (then none is built)."""
    return options.base == "infopro" and infopro_weights(options.infopro.weights, module_index, num_modules) == (0, 0)


def build_objective(
    options: ObjectiveOptions,
    in_channels: int,
    module_index: int,
    num_modules: int,
    num_classes: int,
    final_channels: int,
    image_size: int,
    num_tokens: int = 0,
) -> nn.Module | None:
    """The base method's local objective on a feature map with `in_channels` channels, or on a sequence of
    `num_tokens` tokens of width `in_channels` (None when all its weights are 0)."""
    if options.base == "dgl":
        return ClassifierObjective(options.build_head(in_channels, num_classes, final_channels, tokens=num_tokens > 0))
    if objective_is_zero(options, module_index, num_modules):
        return None
    l1, l2 = infopro_weights(options.infopro.weights, module_index, num_modules)
    return InfoProObjective(options, in_channels, image_size, num_classes, final_channels, l1, l2, num_tokens)


def warn_untrained(untrained: list[int], setting: str) -> None:
    """Warn that no loss with a nonzero weight reaches the local modules `untrained`."""
    if untrained:
        warnings.warn(
            f"local module(s) {untrained} are reached by no loss with a nonzero weight ({setting}), so their "
            "blocks are never trained (InfoPro with the MLAAN paper's weights (5, 0.5, 0, 0) does this to module "
            "K-2 when nothing cascades into it); choose weights that train every module, e.g. "
            "infopro.weights=[5, 0.5, 0, 1]",
            stacklevel=3,
        )
