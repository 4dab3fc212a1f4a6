"""A data loader whose whole dataset lives on the device as uint8 and is augmented there.

A training batch is one index_select of uint8 images and one gather that does the augmentation for the
whole batch: the random crop is a per-image (row, column) offset into the padded batch and the
horizontal flip reverses the column index of the same gather, so there is no per-image Python loop.
Constant (zero) padding pads the batch once with F.pad; reflect padding is folded into the gather's
indices (padded row r reads source row reflect(r)), which gives the same pixels without materialising
the padded batch and works for uint8 on every backend. The float32 normalised batch is the only float
tensor made.

All randomness of an epoch (order, crop offsets, flips) is drawn up front from a ``torch.Generator`` on
the device seeded from (seed, epoch), so an epoch is a pure function of those two numbers: a resumed run
sees bit-identical batches, and the global RNG is never used. Iteration slices device tensors with
Python integers only, so it does not synchronise with the host.

Under data parallelism (`rank`, `world_size`) a training epoch's order and augmentation are drawn as
above, the same on every rank, and each rank reads its positions of that order by the rule of
:mod:`fastlocal.data.sharding` (padded by wrapping, strided); `batch_size` is then the per-rank batch.
Evaluation splits the images without padding (rank r reads images r, r + world_size, ...), so summing
the per-rank counts counts every test image once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from fastlocal.data.sharding import shard_positions

PAD_MODES = ("reflect", "constant")


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed that mixes (seed, epoch), so nearby pairs give unrelated streams."""
    digest = hashlib.sha256(f"fastlocal-loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batches_per_epoch(num_images: int, batch_size: int, drop_last: bool) -> int:
    """Batches in an epoch: every image once, the last batch partial unless dropped. Every loader's len()."""
    return num_images // batch_size if drop_last else -(-num_images // batch_size)


def reflect_index(size: int, pad: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Source index of each of the size + 2*pad positions of a reflect-padded axis (edge not repeated)."""
    index = torch.arange(-pad, size + pad, device=device).abs()
    return (size - 1) - ((size - 1) - index).abs()


class DeviceLoader:
    """Batches of a device-resident uint8 dataset.

    images: uint8 (N, 3, H, W) on the device; labels: int64 (N,) on the same device.
    With `train`, each epoch is shuffled and augmented (random crop with `pad` pixels of padding in
    `pad_mode`, then a horizontal flip with p=0.5 when `flip`); otherwise batches come in order and are
    only normalised. Yields (x float32 (B, 3, H, W) = (images/255 - mean)/std, y int64 (B,)).
    Call :meth:`set_epoch` before iterating each epoch; iterating twice at one epoch repeats it exactly.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        pad: int = 0,
        pad_mode: str = "reflect",
        flip: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be int64 ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
        if labels.device != images.device:
            raise ValueError(f"images are on {images.device} but labels on {labels.device}; move both")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive; got {mean}, {std}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        if pad < 0 or pad_mode not in PAD_MODES:
            raise ValueError(f"pad must be >= 0 and pad_mode one of {PAD_MODES}; got {pad}, {pad_mode!r}")
        height, width = images.shape[2], images.shape[3]
        if train and pad > 0 and pad_mode == "reflect" and pad >= min(height, width):
            raise ValueError(
                f"reflect padding needs pad < image size, got pad {pad} for {height}x{width} images; "
                f"use a smaller pad or pad_mode='constant'"
            )
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.pad = int(pad)
        self.pad_mode = pad_mode
        self.flip = bool(flip)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.device = images.device
        self.rank, self.world_size = int(rank), int(world_size)
        self._epoch = 0
        # This rank's positions in an epoch's order (training) or its images (evaluation); None: all, in order.
        self._positions = None
        if self.world_size > 1:
            count = images.shape[0]
            self._positions = (shard_positions(count, rank=self.rank, world_size=self.world_size) if self.train
                               else torch.arange(self.rank, count, self.world_size)).to(self.device)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._rows = torch.arange(height, device=self.device)
        self._cols = torch.arange(width, device=self.device)
        if self.pad > 0 and pad_mode == "reflect":
            self._reflect_rows = reflect_index(height, self.pad, self.device)
            self._reflect_cols = reflect_index(width, self.pad, self.device)

    @property
    def num_images(self) -> int:
        """Images this rank reads per epoch (all of them with one process)."""
        return self.images.shape[0] if self._positions is None else self._positions.numel()

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def augments(self) -> bool:
        return self.train and (self.pad > 0 or self.flip)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration gives."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_images, self.batch_size, self.train and self.drop_last)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 (images/255 - mean)/std."""
        return images.float().div_(255).sub_(self._mean).div_(self._std)

    def augment(self, images: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None) -> torch.Tensor:
        """Random crop and flip of a uint8 batch, as one gather from the (virtually) padded batch.

        images: (B, 3, H, W); offsets: int64 (2, B) row and column of each crop's top-left corner in
        the padded image, in [0, 2*pad]; flips: bool (B,) or None.
        """
        batch, channels, height, width = images.shape
        rows = self._rows.expand(batch, -1)  # (B, H)
        cols = self._cols.expand(batch, -1)  # (B, W)
        if offsets is not None:
            rows = rows + offsets[0, :, None]  # row in the padded image
            cols = cols + offsets[1, :, None]
            if self.pad_mode == "constant":
                images = F.pad(images, (self.pad,) * 4, mode="constant", value=0)
            else:
                # Reflect padding folded into the indices: padded row r is source row reflect_rows[r],
                # so the padded batch is never materialised.
                rows = self._reflect_rows[rows]
                cols = self._reflect_cols[cols]
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        # One gather along the flattened spatial axis; on CPU it is ~5x faster than 4-tensor indexing.
        padded_width = images.shape[3]
        flat = (rows[:, :, None] * padded_width + cols[:, None, :]).view(batch, 1, height * width)
        source = images.reshape(batch, channels, -1)
        return torch.gather(source, 2, flat.expand(batch, channels, height * width)).view(
            batch, channels, height, width
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size, count = self.batch_size, self.images.shape[0]
        if not self.train:
            for start in range(0, self.num_images, size):
                if self._positions is None:
                    yield self.normalize(self.images[start : start + size]), self.labels[start : start + size]
                else:
                    index = self._positions[start : start + size]
                    yield self.normalize(self.images.index_select(0, index)), self.labels.index_select(0, index)
            return
        generator = torch.Generator(device=self.device)
        generator.manual_seed(epoch_seed(self.seed, self._epoch))
        # Draw the whole epoch's randomness first, in a fixed order, so each batch is a pure slice.
        order = torch.randperm(count, generator=generator, device=self.device)
        offsets = flips = None
        if self.pad > 0:
            offsets = torch.randint(0, 2 * self.pad + 1, (2, count), generator=generator, device=self.device)
        if self.flip:
            flips = torch.randint(0, 2, (count,), generator=generator, device=self.device).bool()
        if self._positions is not None:  # this rank's share of the epoch, drawn alike on every rank
            order = order[self._positions]
            offsets = None if offsets is None else offsets[:, self._positions]
            flips = None if flips is None else flips[self._positions]
        for step in range(len(self)):
            window = slice(step * size, (step + 1) * size)
            index = order[window]
            images = self.images.index_select(0, index)
            if self.augments:
                images = self.augment(
                    images,
                    None if offsets is None else offsets[:, window],
                    None if flips is None else flips[window],
                )
            yield self.normalize(images), self.labels.index_select(0, index)

    def __repr__(self) -> str:
        return (
            f"DeviceLoader({self.num_images} images {tuple(self.images.shape[1:])} on {self.device}, "
            f"batch_size={self.batch_size}, train={self.train}, pad={self.pad} {self.pad_mode}, "
            f"flip={self.flip}, seed={self.seed}, drop_last={self.drop_last}, rank {self.rank}/{self.world_size})"
        )
