"""Datasets as device-resident uint8 tensors with on-device augmentation.

:func:`build_data` reads a dataset (see :mod:`fastlocal.data.sources`), moves both splits to the device
once and returns a shuffled, augmented training :class:`DeviceLoader` and an ordered test loader, with
the per-source augmentation and normalisation recipe in :class:`DatasetInfo`.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastlocal.config import DataConfig
from fastlocal.data.loader import DeviceLoader
from fastlocal.data.sources import (
    NATIVE_READERS,
    DataError,
    SplitData,
    cache_dir,
    read_imagefolder,
    subset_split,
)

__all__ = ["DataBundle", "DataError", "DatasetInfo", "DeviceLoader", "build_data", "bundled_path", "read_splits"]

BUNDLED_FILE = "cifar10-subset.tar.gz"
DEFAULT_NATIVE_ROOT = "data"

CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DatasetInfo:
    name: str
    """cifar10, svhn, stl10, imagefolder or bundled."""
    num_classes: int
    image_size: int
    """Height == width of every image."""
    class_names: list[str]
    mean: tuple[float, float, float]
    """Per-channel mean in [0, 1] units, subtracted before dividing by std."""
    std: tuple[float, float, float]
    pad: int
    """Random-crop padding in pixels (0 = no crop)."""
    pad_mode: str
    """reflect or constant (zeros)."""
    flip: bool
    """Random horizontal flip."""


@dataclass
class DataBundle:
    train: DeviceLoader
    """Shuffled and augmented."""
    test: DeviceLoader
    """In order, not augmented, never drops a batch."""
    info: DatasetInfo


@dataclass(frozen=True)
class _Recipe:
    pad: int | None  # None: image_size // 8
    pad_mode: str
    flip: bool
    normalize: str


# The paper's per-source recipes, used where the config says auto / -1.
RECIPES = {
    "cifar10": _Recipe(4, "reflect", True, "cifar10"),
    "bundled": _Recipe(4, "reflect", True, "cifar10"),
    "svhn": _Recipe(2, "constant", False, "half"),
    "stl10": _Recipe(4, "constant", True, "half"),
    "imagefolder": _Recipe(None, "reflect", True, "dataset"),
}


def bundled_path() -> Path:
    """The CIFAR-10 subset shipped inside the package (1000 train / 200 test JPEGs per class)."""
    path = importlib.resources.files("fastlocal.data").joinpath("bundled", BUNDLED_FILE)
    if not path.is_file():
        raise DataError(
            f"the bundled dataset {path} is missing from this installation; reinstall fastlocal (the "
            f"package data must include fastlocal/data/bundled/{BUNDLED_FILE}) or recreate it with "
            f"scripts/make_bundled_subset.py, or set data.source to another dataset"
        )
    return Path(str(path))


def read_splits(cfg: DataConfig, *, progress: bool = True) -> dict[str, SplitData]:
    """Both splits of the configured dataset as uint8 numpy arrays (on the host), subset as configured."""
    if cfg.source in NATIVE_READERS:
        root = Path(cfg.root or DEFAULT_NATIVE_ROOT)
        reader = NATIVE_READERS[cfg.source]
        max_n = {"train": cfg.max_train, "test": cfg.max_test}
        return {
            split: subset_split(
                reader(root, split, download=cfg.download), max_n[split], split, f"{cfg.source} in {root}"
            )
            for split in ("train", "test")
        }
    if cfg.source in ("imagefolder", "bundled"):
        if cfg.source == "imagefolder" and not cfg.root:
            raise DataError(
                "data.source = imagefolder needs data.root: a folder or .tar/.tar.gz archive holding "
                "train/<class>/* and test/<class>/*"
            )
        return read_imagefolder(
            cfg.root if cfg.source == "imagefolder" else bundled_path(),
            max_train=cfg.max_train,
            max_test=cfg.max_test,
            image_size=cfg.image_size,
            on_bad_image=cfg.on_bad_image,
            cache=cache_dir(cfg.cache_dir),
            progress=progress,
            name=cfg.source,
        )
    raise DataError(
        f"data.source = {cfg.source!r} is not valid; choose one of: "
        f"{', '.join(['bundled', *NATIVE_READERS, 'imagefolder'])}"
    )


def channel_stats(images: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Exact per-channel mean and std (population) of uint8 (N, 3, H, W) images, in [0, 1] units."""
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / 255
    for channel in range(3):
        histogram = np.bincount(images[:, channel].reshape(-1), minlength=256).astype(np.float64)
        total = histogram.sum()
        mean = float((histogram * values).sum() / total)
        variance = float((histogram * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(variance, 1e-12) ** 0.5)
    return (means[0], means[1], means[2]), (stds[0], stds[1], stds[2])


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
            f"{cfg.source} test images are {test.images.shape[3]}x{test.images.shape[2]} but training images "
            f"{width}x{height}; set data.image_size=N to resize both to NxN"
        )
    recipe = RECIPES[cfg.source]
    pad = cfg.pad if cfg.pad >= 0 else (recipe.pad if recipe.pad is not None else height // 8)
    pad_mode = recipe.pad_mode if cfg.pad_mode == "auto" else cfg.pad_mode
    flip = recipe.flip if cfg.flip == "auto" else cfg.flip == "on"
    if pad > 0 and pad_mode == "reflect" and pad >= height:
        raise DataError(
            f"data.pad = {pad} with reflect padding needs images larger than {pad} pixels, but they are "
            f"{height}x{width}; set a smaller data.pad or data.pad_mode=constant"
        )
    normalize = recipe.normalize if cfg.normalize == "auto" else cfg.normalize
    if normalize == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif normalize == "half":
        mean, std = HALF, HALF
    elif normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize == "dataset":
        mean, std = channel_stats(train.images)
    else:
        raise DataError(
            f"data.normalize = {cfg.normalize!r} is not valid; choose one of: auto, cifar10, half, imagenet, dataset"
        )
    return DatasetInfo(
        name=cfg.source,
        num_classes=len(train.class_names),
        image_size=int(height),
        class_names=list(train.class_names),
        mean=mean,
        std=std,
        pad=int(pad),
        pad_mode=pad_mode,
        flip=bool(flip),
    )


def build_data(
    cfg: DataConfig,
    *,
    batch_size: int,
    eval_batch_size: int,
    device: torch.device,
    seed: int,
    drop_last: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> DataBundle:
    """Read the configured dataset and return the two loaders (device-resident, or streaming for large images).

    Data parallel: `batch_size` and `eval_batch_size` are per rank, and each loader reads this rank's shard
    (the streaming loaders take theirs from torch.distributed, see `streaming.shard_info`)."""
    from fastlocal.data.streaming import build_streaming_data, uses_streaming  # DALI is imported only when used

    if uses_streaming(cfg):
        return build_streaming_data(cfg, batch_size=batch_size, eval_batch_size=eval_batch_size, device=device,
                                    seed=seed, drop_last=drop_last, progress=progress)
    splits = read_splits(cfg, progress=progress)
    info = resolve_info(cfg, splits)
    device = torch.device(device)

    def to_device(data: SplitData) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.ascontiguousarray(data.images)).to(device)
        labels = torch.from_numpy(np.ascontiguousarray(data.labels, dtype=np.int64)).to(device)
        return images, labels

    train_images, train_labels = to_device(splits["train"])
    test_images, test_labels = to_device(splits["test"])
    augmentation = dict(mean=info.mean, std=info.std, pad=info.pad, pad_mode=info.pad_mode, flip=info.flip,
                        rank=rank, world_size=world_size)
    return DataBundle(
        train=DeviceLoader(
            train_images, train_labels, batch_size, train=True, seed=seed, drop_last=drop_last, **augmentation
        ),
        test=DeviceLoader(test_images, test_labels, eval_batch_size, train=False, seed=seed, **augmentation),
        info=info,
    )
