"""The backbone contract every method and split relies on: ``stem``, ``blocks``, ``head``.

A backbone is described by its *parts*: part 0 is the stem, part p >= 1 is block p-1. Splits group
consecutive parts into local modules; methods attach heads to module outputs. Neither knows which
architecture it runs on: they read only :class:`PartInfo` (names and output shapes).

Two feature layouts are understood: images (B, C, H, W) and tokens (B, N, D) (a vision transformer's
sequence; heads pool over the tokens). Any network that is a stem followed by an ordered sequence of
blocks producing one of these is a backbone (`fastlocal.models.adapters` cuts library models into one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastlocal.config import ConfigError


@dataclass(frozen=True)
class PartInfo:
    name: str
    """'stem' or 'stage.index', e.g. '1.0' for block (1, 0)."""
    stage: int
    """-1 for the stem."""
    index: int
    out_channels: int
    """Feature width: C of an image feature map, D of a token sequence."""
    out_size: int
    """Spatial size (H) of an image feature map, the number of tokens N of a sequence."""
    shape: tuple[int, ...] = ()
    """The part's output shape without the batch dimension, for the backbone's input size."""

    @property
    def tokens(self) -> bool:
        """True for a token sequence (N, D), False for a feature map (C, H, W)."""
        return len(self.shape) == 2


class Backbone(nn.Module):
    """stem -> blocks[0] -> ... -> blocks[-1] -> head (GAP + Linear).

    `block_ids[i]` is the (stage, index) address of blocks[i]. `parts` lists the stem and the blocks,
    in order; `part_info` describes their outputs at `input_size`.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: list[nn.Module],
        block_ids: list[tuple[int, int]] | None,
        head: nn.Module,
        input_size: int,
        num_classes: int | None = None,
    ):
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ConfigError(
                "a backbone needs at least one block after the stem; pass the network's blocks as an ordered list"
            )
        for i, part in enumerate([stem, *blocks, head]):
            if not isinstance(part, nn.Module):
                where = "the stem" if i == 0 else "the head" if i == len(blocks) + 1 else f"block {i - 1}"
                raise ConfigError(f"{where} is a {type(part).__name__}, not a torch.nn.Module")
        if block_ids is None:
            block_ids = [(0, i) for i in range(len(blocks))]
        if len(block_ids) != len(blocks) or len(set(block_ids)) != len(block_ids):
            raise ConfigError(f"block_ids must name each of the {len(blocks)} blocks once, got {list(block_ids)}")
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.block_ids = list(block_ids)
        self.head = head
        self.input_size = input_size
        self.part_info, logits_shape = self._probe_parts()
        if len(logits_shape) != 1 or (num_classes is not None and logits_shape[0] != num_classes):
            wanted = "(batch, num_classes)" if num_classes is None else f"(batch, {num_classes})"
            raise ConfigError(
                f"the head must return logits of shape {wanted}, but it returned "
                f"(batch, {', '.join(map(str, logits_shape))})"
            )
        self.num_classes = logits_shape[0]

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
    def _probe_parts(self) -> tuple[list[PartInfo], tuple[int, ...]]:
        """Every part's output shape, and the head's, from one batch-1 forward in eval mode (BN statistics
        untouched) on an input of `input_size`."""
        was_training = self.training
        self.eval()
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        x = torch.zeros(1, 3, self.input_size, self.input_size, device=device)
        infos = []
        try:
            for part, name, stage, index in zip(
                self.parts,
                ["stem", *[f"{s}.{i}" for s, i in self.block_ids]],
                [-1, *[s for s, _ in self.block_ids]],
                [0, *[i for _, i in self.block_ids]],
            ):
                x = _run_part(part, x, "the stem" if stage == -1 else f"block {name}")
                infos.append(part_info(name, stage, index, x))
            logits = _run_part(self.head, x, "the head")
        finally:
            self.train(was_training)
        return infos, tuple(logits.shape[1:])


def _run_part(part: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    try:
        out = part(x)
    except Exception as err:  # the user's parts: say which one failed on which input
        raise ConfigError(
            f"{what} fails on an input of shape {tuple(x.shape)}: {type(err).__name__}: {err}. "
            "Check that each block accepts the previous part's output and that input_size "
            "is right"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{what} returns a {type(out).__name__}; every part must return one tensor")
    return out


def part_info(name: str, stage: int, index: int, out: torch.Tensor) -> PartInfo:
    """PartInfo of a batch-1 output: a feature map (1, C, H, W) or a token sequence (1, N, D)."""
    shape = tuple(out.shape[1:])
    if len(shape) == 3:
        return PartInfo(name, stage, index, shape[0], shape[-1], shape)
    if len(shape) == 2:
        return PartInfo(name, stage, index, shape[1], shape[0], shape)
    raise ConfigError(
        f"part {name} returns features of shape (batch, {', '.join(map(str, shape))}); local "
        "learning needs feature maps (batch, C, H, W) or token sequences (batch, N, D) between "
        "the parts"
    )
