"""Datasets and loaders, one path per image size (options are validated in :mod:`fastlocal.config`).

Small images (cifar10, svhn, stl10, the bundled subset, image folders of small images) are decoded once
into a uint8 cache and served from the device by :class:`DeviceLoader`. Large images (ImageNet-style
image folders) stream through :class:`~fastlocal.data.streaming.TorchImageLoader` or, the fast path,
:class:`~fastlocal.data.dali.DaliLoader`. Every loader is a :class:`Loader` reading its share of each
epoch from :func:`~fastlocal.data.loader.shard_indices`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastlocal.config import DataConfig
from fastlocal.data import sources
from fastlocal.data.loader import DeviceLoader, Loader
from fastlocal.data.sources import DataError, SplitData, bundled_path

__all__ = [
    "DataBundle",
    "DataError",
    "DatasetInfo",
    "DeviceLoader",
    "Loader",
    "build_data",
    "bundled_path",
    "read_splits",
]

DEFAULT_NATIVE_ROOT = "data"
# data.loader = auto streams image folders whose images are at least this large (shorter side, pixels).
STREAMING_MIN_SIZE = 128
# Per-channel (mean, std) in [0, 1] units by data.normalize; "dataset" is measured on the training images.
NORMALIZATIONS = {
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class DatasetInfo:
    name: str  # data.source
    num_classes: int
    image_size: int  # height == width of every image the model sees
    class_names: list[str]
    mean: tuple[float, float, float]  # per channel, in [0, 1] units, subtracted before dividing by std
    std: tuple[float, float, float]
    pad: int  # random-crop padding in pixels (0 = no crop)
    pad_mode: str  # reflect or constant (zeros)
    flip: bool  # random horizontal flip


@dataclass
class DataBundle:
    train: Loader  # shuffled and augmented
    test: Loader  # in order, not augmented, never drops a batch
    info: DatasetInfo


# The paper's per-source recipes (docs/method.md#recipes), used where the config says auto / -1:
# (pad, None = image_size // 8; pad_mode; flip; normalize).
RECIPES = {
    "cifar10": (4, "reflect", True, "cifar10"),
    "bundled": (4, "reflect", True, "cifar10"),
    "svhn": (2, "constant", False, "half"),
    "stl10": (4, "constant", True, "half"),
    "imagefolder": (None, "reflect", True, "dataset"),
}


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (population) of uint8 (N, 3, H, W) images, in [0, 1] units, from
    histograms: no float copy of the images."""
    values = np.arange(256) / 255
    frequencies = [np.bincount(images[:, c].reshape(-1), minlength=256) / images[:, c].size for c in range(3)]
    means = [float(f @ values) for f in frequencies]
    stds = [max(float(f @ (values - m) ** 2), 1e-12) ** 0.5 for f, m in zip(frequencies, means, strict=True)]
    return tuple(means), tuple(stds)


def normalization(normalize: str, sample) -> tuple[tuple, tuple]:
    """(mean, std) for data.normalize (auto already resolved); `sample()` gives uint8 (N, 3, H, W) training
    images for "dataset"."""
    return channel_stats(sample()) if normalize == "dataset" else NORMALIZATIONS[normalize]


def root_folder(cfg: DataConfig) -> Path:
    """The image folder or archive the config reads (the bundled archive for source = bundled)."""
    return bundled_path() if cfg.source == "bundled" else Path(cfg.root)


def choose_loader(cfg: DataConfig, progress: bool = True) -> str:
    """device, torch or dali; data.loader = auto streams with torch an image folder of large images
    (data.image_size, else the first training image's shorter side, >= STREAMING_MIN_SIZE)."""
    if cfg.loader != "auto":
        return cfg.loader
    if cfg.source != "imagefolder":
        return "device"
    if cfg.image_size > 0:
        return "torch" if cfg.image_size >= STREAMING_MIN_SIZE else "device"
    folder = sources.list_imagefolder(root_folder(cfg), cache=sources.cache_dir(cfg.cache_dir), progress=progress)
    first = next(names[0] for names in folder.files["train"] if names)  # every listed class has images
    return "torch" if sources.shorter_side(folder.base / first) >= STREAMING_MIN_SIZE else "device"


def read_splits(cfg: DataConfig, *, progress: bool = True) -> dict[str, SplitData]:
    """Both splits of the configured dataset as uint8 numpy arrays (on the host), subset as configured."""
    if cfg.source not in sources.NATIVE:
        cache = sources.cache_dir(cfg.cache_dir)
        return sources.read_imagefolder(root_folder(cfg), cache=cache, progress=progress, **dataclasses.asdict(cfg))
    root = Path(cfg.root or DEFAULT_NATIVE_ROOT)
    splits = {}
    for split in sources.SPLITS:
        data = sources.read_native(cfg.source, root, split)
        if getattr(cfg, f"max_{split}") > 0:  # the class-balanced first max_<split>, in file order
            per_class = [[str(i) for i in np.flatnonzero(data.labels == k)] for k in range(len(data.class_names))]
            chosen, _ = sources.choose_images(
                per_class, lambda name: None, cfg, split, f"{cfg.source} in {root}", False
            )
            keep = np.sort([int(name) for names in chosen for name, _ in names])
            data = SplitData(np.ascontiguousarray(data.images[keep]), data.labels[keep], data.class_names)
        splits[split] = data
    return splits


def resolve_info(cfg: DataConfig, splits: dict[str, SplitData]) -> DatasetInfo:
    """The dataset's recipe: per-source defaults, overridden by the config's non-auto values."""
    train, test = splits["train"], splits["test"]
    if len(train.labels) == 0:
        raise DataError(f"the {cfg.source} training split is empty; check data.root and data.max_train")
    height, width = train.images.shape[2:]
    if height != width:
        raise DataError(
            f"{cfg.source} images are {width}x{height}, but the models need square images; set "
            f"data.image_size=N to resize every image to NxN"
        )
    if len(test.labels) and test.images.shape[2:] != train.images.shape[2:]:
        raise DataError(
            f"{cfg.source} test images are {test.images.shape[3]}x{test.images.shape[2]} but training "
            f"images {width}x{height}; set data.image_size=N to resize both to NxN"
        )
    recipe_pad, recipe_pad_mode, recipe_flip, recipe_normalize = RECIPES[cfg.source]
    pad = cfg.pad if cfg.pad >= 0 else (recipe_pad if recipe_pad is not None else height // 8)
    pad_mode = recipe_pad_mode if cfg.pad_mode == "auto" else cfg.pad_mode
    if pad > 0 and pad_mode == "reflect" and pad >= height:
        raise DataError(
            f"data.pad = {pad} with reflect padding needs images larger than {pad} pixels, but they are "
            f"{height}x{width}; set a smaller data.pad or data.pad_mode=constant"
        )
    mean, std = normalization(recipe_normalize if cfg.normalize == "auto" else cfg.normalize, lambda: train.images)
    flip = recipe_flip if cfg.flip == "auto" else cfg.flip == "on"
    classes = list(train.class_names)
    return DatasetInfo(cfg.source, len(classes), int(height), classes, mean, std, int(pad), pad_mode, flip)


def build_data(cfg: DataConfig, *, batch_size: int, eval_batch_size: int, device, progress=True, **sharding):
    """Read the configured dataset and return the two loaders (device-resident, or streaming for large images).
    `sharding`: the :class:`Loader` options seed, rank, world_size and drop_last (training only)."""
    kind = choose_loader(cfg, progress)
    if kind != "device":
        from fastlocal.data.streaming import streaming_loaders

        make, info = streaming_loaders(cfg, kind, device, progress)
    else:
        splits = read_splits(cfg, progress=progress)
        info = resolve_info(cfg, splits)
        tensors = {k: [torch.from_numpy(a).to(device) for a in (d.images, d.labels)] for k, d in splits.items()}
        augment = dict(mean=info.mean, std=info.std, pad=info.pad, pad_mode=info.pad_mode, flip=info.flip)

        def make(split: str, batch_size: int, **sharding) -> Loader:
            return DeviceLoader(*tensors[split], batch_size, train=split == "train", **augment, **sharding)

    return DataBundle(make("train", batch_size, **sharding), make("test", eval_batch_size, **sharding), info)
