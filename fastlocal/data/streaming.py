"""Streaming loaders for large images (ImageNet): a DataLoader with torchvision.transforms.v2, or DALI.

They decode every batch from the files with the ImageNet recipe (docs/method.md#recipes): for training
RandomResizedCrop(crop, scale=(0.08, 1), ratio=(3/4, 4/3)) + flip, for evaluation a resize of the shorter
side to ``resize_size`` and a center crop; normalised on the device. Both read one checked file list
(:func:`select_images`), so ``data.on_bad_image`` acts before the first batch and a corrupt file never
stalls a worker or a DALI pipeline, and one order (:meth:`Loader.order`), so batches hold the same labels;
the pixels differ, as each library crops and resizes its own way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fastlocal.config import DataConfig
from fastlocal.data import DatasetInfo, normalization, root_folder, sources
from fastlocal.data.loader import Loader, epoch_seed
from fastlocal.data.sources import BadImage, DataError, ImageList

# data.normalize = dataset estimates the statistics from this many training images (evaluation view).
STATS_MAX_IMAGES = 1024


def check_image(path: Path, formats: frozenset[str] | None = None) -> bool:
    """True when `path` decodes (and is one of `formats`, PIL names, when given), else BadImage.

    A JPEG is decoded at 1/8 scale (libjpeg's DCT scaling): every byte of the compressed data is still
    read, so truncation and corrupt entropy-coded data are caught, at a fraction of a full decode.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            image_format = img.format
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as err:  # noqa: BLE001 -- PIL raises many types on bad data
        raise BadImage(f"{type(err).__name__}: {err}") from None
    if formats is not None and image_format not in formats:
        raise BadImage(f"{image_format} images are not decoded by DALI (it reads {', '.join(sorted(formats))})")
    return True


def select_images(cfg: DataConfig, split: str, *, formats=None, progress: bool = True) -> ImageList:
    """The checked files of `split` to stream (all, or the class-balanced first data.max_<split>), cached."""
    cache = sources.cache_dir(cfg.cache_dir)
    folder = sources.list_imagefolder(root_folder(cfg), cache=cache, progress=progress)
    check, variant = (lambda path: check_image(path, formats)), f"checked {sorted(formats or ['PIL'])}"
    arrays = sources.read_split(folder, split, check, cfg, cache=cache / "checked", variant=variant, progress=progress)
    return ImageList(folder.base, arrays["paths"].tolist(), arrays["labels"].astype(np.int64), folder.class_names)


def image_transform(train: bool, crop_size: int, resize_size: int, flip: bool = True):
    """PIL image -> uint8 (3, crop, crop): the recipe's training or evaluation view (torchvision v2)."""
    from torchvision.transforms import v2

    if train:
        steps = [v2.RandomResizedCrop(crop_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)]
        steps += [v2.RandomHorizontalFlip()] if flip else []
    else:
        steps = [v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)]
    return v2.Compose([*steps, v2.PILToTensor()])


class _ImageFiles(torch.utils.data.Dataset):
    """Item (index, seed) -> (uint8 (3, crop, crop) image, int label); seed < 0: no randomness."""

    def __init__(self, images: ImageList, transform):
        self.base, self.paths, self.labels, self.transform = images.base, images.paths, images.labels, transform

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        index, seed = key
        path = self.base / self.paths[index]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except Exception as err:  # noqa: BLE001 -- a file changed after the check: name it, do not hang
            raise DataError(
                f"cannot read image {path} ({type(err).__name__}: {err}); it changed after the "
                f"up-front check? delete or replace it"
            ) from None
        # Seeded per image, so a crop does not depend on the worker count; fork_rng keeps the caller's RNG.
        with torch.random.fork_rng(devices=[], enabled=seed >= 0):
            if seed >= 0:
                torch.manual_seed(seed)
            return self.transform(image), int(self.labels[index])


class TorchImageLoader(Loader):
    """Batches decoded by PIL and transformed by torchvision.transforms.v2 in DataLoader workers.

    Workers send uint8 (B, 3, crop, crop) batches (pinned on CUDA), copied with non_blocking and
    normalised on the device, so host-to-device traffic is a quarter of float32's. Every image's
    augmentation is seeded from (seed, epoch, index): an epoch is the same whatever num_workers is.
    `sharding`: the :class:`Loader` options.
    """

    def __init__(
        self, images: ImageList, batch_size: int, cfg: DataConfig, info: DatasetInfo, *, device, train, **sharding
    ):
        super().__init__(len(images), batch_size, train=train, **sharding)
        self.images, self.device, workers = images, torch.device(device), cfg.num_workers
        self.normalize_with(info.mean, info.std)
        # The sampler is a plain list of (index, seed) keys, refilled before each epoch: a sampler holding the
        # loader would make a cycle, leaving the workers' shutdown to the garbage collector, which can close
        # their queues first and then wait seconds per worker for a message that never arrives.
        self._keys: list[tuple[int, int]] = []
        transform = image_transform(train, cfg.crop_size, cfg.resize_size, info.flip)
        self._loader = torch.utils.data.DataLoader(
            _ImageFiles(images, transform),
            batch_size=self.batch_size,
            sampler=self._keys,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=self.drop_last,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def keys(self) -> list[tuple[int, int]]:
        """(index, per-image augmentation seed, -1 for none) of this epoch, in reading order."""
        order = self.order()
        if not self.train:
            return [(i, -1) for i in order.tolist()]
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 1))
        seeds = torch.randint(0, 1 << 62, (self.num_items,), generator=generator)
        return list(zip(order.tolist(), seeds[order].tolist(), strict=True))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._keys[:] = self.keys()[self.start_step * self.batch_size :]
        for images, labels in self._loader:
            yield self.normalize(images.to(self.device, non_blocking=True)), labels.to(self.device, non_blocking=True)


def streaming_loaders(cfg: DataConfig, kind: str, device: torch.device | str, progress: bool = True):
    """(make, info) for an image folder or archive streamed by `kind` (torch or dali): make(split, batch_size,
    **sharding) is the split's loader; see build_data."""
    formats = None
    if kind == "dali":
        from fastlocal.data.dali import DALI_FORMATS, DaliLoader, import_dali

        import_dali()  # fail before any listing or extraction work
        formats = DALI_FORMATS
    crop, resize = cfg.crop_size, cfg.resize_size
    images = {split: select_images(cfg, split, formats=formats, progress=progress) for split in ("train", "test")}
    train = images["train"]
    size = sources.shorter_side(train.base / train.paths[0])
    if 0 < size <= crop // 2:
        # Upscaling every image 2x or more (e.g. 32 px CIFAR to the default 224) is almost always a mistake.
        warnings.warn(
            f"the {kind} loader crops data.crop_size = {crop} pixels, but the images are {size} px, so "
            f"every crop is upscaled; set data.crop_size (and data.resize_size) to at most {size}, or use "
            f"data.loader=device, the in-memory loader made for small images",
            stacklevel=3,
        )

    def sample() -> np.ndarray:  # evaluation views of up to STATS_MAX_IMAGES training images, spread evenly
        picks = np.unique(np.linspace(0, len(train) - 1, min(len(train), STATS_MAX_IMAGES)).round().astype(int))
        views = _ImageFiles(train, image_transform(False, crop, resize))
        return np.stack([views[int(i), -1][0].numpy() for i in picks])

    mean, std = normalization("imagenet" if cfg.normalize == "auto" else cfg.normalize, sample)
    loader_class = DaliLoader if kind == "dali" else TorchImageLoader
    classes, flip = train.class_names, cfg.flip != "off"
    info = DatasetInfo(cfg.source, len(classes), crop, classes, tuple(mean), tuple(std), 0, "constant", flip)

    def make(split: str, batch_size: int, **sharding) -> Loader:
        return loader_class(images[split], batch_size, cfg, info, device=device, train=split == "train", **sharding)

    return make, info
