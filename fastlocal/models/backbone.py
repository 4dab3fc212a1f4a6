"""The backbone contract every method and split relies on: ``stem``, ``blocks``, ``head``.

A backbone is described by its *parts*: part 0 is the stem, part p >= 1 is block p-1. Splits group
consecutive parts into local modules; methods attach heads to module outputs. Neither knows which
architecture it runs on: they read only :class:`PartInfo` (names, channels, resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastlocal.config import CIFAR_ARCHS, IMAGENET_ARCHS, ConfigError


@dataclass(frozen=True)
class PartInfo:
    name: str
    """'stem' or 'stage.index', e.g. '1.0' for block (1, 0)."""
    stage: int
    """-1 for the stem."""
    index: int
    out_channels: int
    out_size: int
    """Spatial size (H == W) of the part's output for the backbone's input size."""


class Backbone(nn.Module):
    """stem -> blocks[0] -> ... -> blocks[-1] -> head (GAP + Linear).

    `block_ids[i]` is the (stage, index) address of blocks[i]. `parts` lists the stem and the blocks,
    in order; `part_info` describes their outputs at `input_size`.
    """

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], block_ids: list[tuple[int, int]],
                 head: nn.Module, input_size: int, num_classes: int):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.block_ids = list(block_ids)
        self.head = head
        self.input_size = input_size
        self.num_classes = num_classes
        self.part_info = self._probe_parts()

    @property
    def parts(self) -> list[nn.Module]:
        return [self.stem, *self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def block_part(self, stage: int, index: int) -> int:
        """Part number of block (stage, index)."""
        try:
            return 1 + self.block_ids.index((stage, index))
        except ValueError:
            raise ConfigError(f"the backbone has no block ({stage}, {index}); blocks are {self.block_ids}") from None

    @torch.no_grad()
    def _probe_parts(self) -> list[PartInfo]:
        # One batch-1 forward in eval mode (BN statistics untouched) tells every part's output shape.
        was_training = self.training
        self.eval()
        x = torch.zeros(1, 3, self.input_size, self.input_size)
        infos = []
        for part, name, stage, index in zip(self.parts, ["stem", *[f"{s}.{i}" for s, i in self.block_ids]],
                                            [-1, *[s for s, _ in self.block_ids]],
                                            [0, *[i for _, i in self.block_ids]]):
            x = part(x)
            infos.append(PartInfo(name, stage, index, x.shape[1], x.shape[-1]))
        self.train(was_training)
        return infos


def build_backbone(arch: str, num_classes: int, input_size: int, zero_init_residual: bool = False) -> Backbone:
    if arch in CIFAR_ARCHS:
        from fastlocal.models.cifar_resnet import cifar_resnet

        return cifar_resnet(arch, num_classes, input_size)
    if arch in IMAGENET_ARCHS:
        from fastlocal.models.imagenet_resnet import imagenet_resnet

        return imagenet_resnet(arch, num_classes, input_size, zero_init_residual)
    raise ConfigError(f"model.arch = {arch!r} is not valid; choose one of: {', '.join(CIFAR_ARCHS + IMAGENET_ARCHS)}")
