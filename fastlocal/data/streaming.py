"""Streaming image-folder loaders for large images (ImageNet): PIL workers (``torch``) or DALI (``dali``).

The in-memory :class:`~fastlocal.data.loader.DeviceLoader` holds a whole dataset as uint8 on the device,
which fits CIFAR-sized images but not ImageNet at 224 px. The loaders here decode every batch from the
files instead, with the ImageNet recipe (SPEC 5):

- train: RandomResizedCrop(crop, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip + normalise;
- eval: resize the shorter side to ``resize_size``, center crop ``crop_size``, normalise.

Both loaders read the same file list, made here once: the sorted class folders of train/ (labels), the
sorted files of each class, class-balanced first-N subsets (``data.max_train`` / ``max_test``) and an
up-front decodability check of every chosen file (cached per file list), so ``data.on_bad_image`` acts
before the first batch and a corrupt file never stalls a worker or a DALI pipeline mid-epoch. A .tar or
.tar.gz archive is extracted once into the cache folder (DALI's file reader needs files on disk).

Both loaders follow :class:`DeviceLoader`'s interface: ``set_epoch``, ``len``, iteration yielding
(x float32 (B, 3, crop, crop) normalised on the device, y int64 (B,)), ``num_images``. A training epoch's
order is ``randperm`` from a generator seeded with (seed, epoch), the same order in both loaders; with
several processes (``torch.distributed``) each takes a contiguous shard of that order, the rule DALI's
file reader uses.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import random
import shutil
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from fastlocal.config import DataConfig
from fastlocal.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    DatasetInfo,
    bundled_path,
    channel_stats,
    sources,
)
from fastlocal.data.loader import batches_per_epoch, epoch_seed
from fastlocal.data.sources import DataError, cache_dir, save_npz_atomic

LOADERS = ("auto", "device", "torch", "dali")
DALI_DECODERS = ("auto", "mixed", "cpu")
STREAMING_SOURCES = ("imagefolder", "bundled")
# loader = auto streams image folders whose images are at least this large (shorter side, pixels).
STREAMING_MIN_SIZE = 128
# Written inside an extracted archive's folder last, so a folder without it is an interrupted extraction.
EXTRACTED_MARKER = ".fastlocal-extracted"
# Bumped whenever the check or the cache layout changes.
CHECK_VERSION = 1
# Image formats DALI's decoders read (PIL's names); a GIF, say, would fail inside the pipeline.
DALI_FORMATS = frozenset({"JPEG", "PNG", "TIFF", "BMP", "PPM", "JPEG2000", "WEBP", "MPO"})
# data.normalize = dataset estimates the statistics from this many training images (evaluation view).
STATS_MAX_IMAGES = 1024
CHECK_CHUNK = 256


# --------------------------------------------------------------------------------------------------
# Config (read with defaults until the fields are in DataConfig)


def _option(cfg: DataConfig, name: str, default):
    return getattr(cfg, name, default)


def _check_options(cfg: DataConfig) -> tuple[int, int, int]:
    crop, resize = int(_option(cfg, "crop_size", 224)), int(_option(cfg, "resize_size", 256))
    workers = int(_option(cfg, "num_workers", 4))
    loader, decoder = _option(cfg, "loader", "auto"), _option(cfg, "dali_decoder", "auto")
    if loader not in LOADERS:
        raise DataError(f"data.loader = {loader!r} is not valid; choose one of: {', '.join(LOADERS)}")
    if decoder not in DALI_DECODERS:
        raise DataError(f"data.dali_decoder = {decoder!r} is not valid; choose one of: {', '.join(DALI_DECODERS)}")
    if crop < 1:
        raise DataError(f"data.crop_size = {crop} is not valid; it must be at least 1 (224 for ImageNet)")
    if resize < crop:
        raise DataError(
            f"data.resize_size = {resize} is smaller than data.crop_size = {crop}; evaluation resizes the "
            f"shorter side to resize_size and then center-crops crop_size, so set resize_size >= crop_size "
            f"(ImageNet: 256 and 224)"
        )
    if workers < 0:
        raise DataError(f"data.num_workers = {workers} is not valid; use 0 (decode in the main process) or more")
    return crop, resize, workers


def choose_loader(cfg: DataConfig) -> str:
    """The loader `cfg` selects: device, torch or dali (resolving data.loader = auto).

    auto streams with ``torch`` an imagefolder whose images are large (data.image_size >= 128, or with
    data.image_size = 0 a first training image whose shorter side is >= 128); everything else (cifar10,
    svhn, stl10, bundled, small image folders) uses the in-memory ``device`` loader.
    """
    loader = _option(cfg, "loader", "auto")
    if loader != "auto":
        return loader
    if cfg.source != "imagefolder" or not cfg.root:
        return "device"
    if cfg.image_size > 0:
        return "torch" if cfg.image_size >= STREAMING_MIN_SIZE else "device"
    size = _first_image_size(Path(cfg.root).expanduser())
    return "torch" if size is not None and size >= STREAMING_MIN_SIZE else "device"


def uses_streaming(cfg: DataConfig) -> bool:
    """Whether :func:`fastlocal.data.build_data` should hand `cfg` to :func:`build_streaming_data`."""
    return choose_loader(cfg) != "device"


def _image_size_of(read) -> int | None:
    from PIL import Image

    try:
        with Image.open(read) as img:
            return min(img.size)
    except Exception:  # noqa: BLE001 -- any failure: let the chosen reader report it properly
        return None


def _first_image_size(root: Path) -> int | None:
    """Shorter side of the first image found under train/ or test/ (None when there is none to peek at).

    Reads one file (a folder) or the first members of an archive, never the whole dataset.
    """
    try:
        if root.is_dir():
            bases = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            for base in bases:
                for split in sources.SPLITS:
                    if not (base / split).is_dir():
                        continue
                    for class_dir in sorted(p for p in (base / split).iterdir() if p.is_dir()):
                        for entry in sorted(class_dir.iterdir()):
                            if entry.is_file() and sources._is_image(entry.name):
                                return _image_size_of(entry)
            return None
        if root.is_file():
            with tarfile.open(root, "r:*") as archive:
                for count, member in enumerate(archive):
                    if count > 1000:
                        return None
                    parts = member.name.split("/")
                    if member.isfile() and sources._is_image(member.name) and set(parts[:-2]) & set(sources.SPLITS):
                        f = archive.extractfile(member)
                        return None if f is None else _image_size_of(f)
    except (OSError, tarfile.TarError, EOFError, zlib.error):
        return None
    return None


# --------------------------------------------------------------------------------------------------
# Archives


def _archive_error(archive: Path, err: BaseException) -> DataError:
    return DataError(
        f"cannot read the archive {archive}: it is truncated, corrupt or not a .tar/.tar.gz/.tgz archive "
        f"({type(err).__name__}: {err}); re-download or re-create it (compare its size with the original), "
        f"or extract it and set data.root to the extracted folder"
    )


def extract_archive(archive: Path, cache: Path, *, progress: bool = True) -> Path:
    """Extract `archive` once into `cache`/extracted/ and return the folder; later calls reuse it.

    The folder is keyed by the archive's path, size and modification time. Extraction goes to a
    temporary folder, the marker file is written last, and one rename publishes it, so an interrupted
    run or several processes extracting at once never leave a half-written folder that looks done.
    """
    archive = archive.resolve()
    st = archive.stat()
    key = hashlib.sha256(f"{archive}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    name = archive.name.split(".")[0] or "archive"
    parent = cache / "extracted"
    target = parent / f"{name}-{key}"
    if (target / EXTRACTED_MARKER).is_file():
        return target
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{name}-{key}.", suffix=".tmp"))
    except OSError as err:
        raise DataError(
            f"cannot create the extraction folder under {parent} ({err}); set data.cache_dir or "
            f"$FASTLOCAL_CACHE to a writable folder with room for the extracted images, or extract {archive} "
            f"yourself and set data.root to the folder"
        ) from None
    bar = None
    try:
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"extracting {archive.name}", unit="file", leave=False)
        made: set[Path] = {tmp}
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:  # streaming: a .tar.gz is decompressed once, front to back
                # Only plain files and folders, with relative paths that stay inside the folder (what
                # tarfile's "data" filter allows, without its per-component realpath calls: 4x faster on
                # 60,000 small files). Links, devices and absolute or ../ paths are left out.
                parts = PurePosixPath(member.name).parts
                if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in parts:
                    continue
                destination = tmp.joinpath(*parts) if parts else tmp
                folder = destination if member.isdir() else destination.parent
                if folder not in made:
                    folder.mkdir(parents=True, exist_ok=True)
                    made.add(folder)
                if member.isfile():
                    source = tar.extractfile(member)
                    with open(destination, "wb") as f:
                        shutil.copyfileobj(source, f)
                    if bar is not None:
                        bar.update(1)
            # tarfile ends its iteration quietly when the file stops at a member boundary; a complete
            # archive ends with a zero block there (POSIX), so a missing one means the file was cut.
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(tarfile.BLOCKSIZE)
            if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                raise tarfile.ReadError("the file ends before the archive's end-of-archive block")
        (tmp / EXTRACTED_MARKER).write_text(f"{archive}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / EXTRACTED_MARKER).is_file():  # a stale, unfinished folder: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise _archive_error(archive, err) from None
    except OSError as err:
        raise DataError(
            f"cannot extract {archive} into {parent} ({type(err).__name__}: {err}); free disk space or set "
            f"data.cache_dir to a folder with room, or extract it yourself and set data.root to the folder"
        ) from None
    finally:
        if bar is not None:
            bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# Listing, subsetting and the up-front image check


@dataclass
class FolderListing:
    """Every image file of an image-folder dataset, per split and class."""

    folder: Path
    """The folder on disk that the relative paths are under (the extracted folder for an archive)."""
    origin: Path
    """data.root as the user gave it (folder or archive), for messages."""
    class_names: list[str]
    """Sorted train/ class folder names; a label is an index into this list."""
    files: dict[str, list[list[str]]]
    """split -> per class (label order) -> sorted relative posix paths."""
    identity: str
    """Depends on every file's name, size and modification time (for the check cache)."""


@dataclass
class ImageList:
    """The files one loader reads, in the reader's order (class by class, sorted names)."""

    folder: Path
    paths: list[str]
    """Relative posix paths under `folder`."""
    labels: np.ndarray
    """int64 (N,)."""
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def list_imagefolder(root: str | Path, *, cache: Path, progress: bool = True) -> FolderListing:
    """The shared listing both streaming loaders read: sorted class folders of train/ (the labels),
    sorted files; train/ and test/ are required, optionally under one top-level folder; an empty class
    folder, a missing split or a test class without a train folder is a DataError.

    It is the listing of :func:`fastlocal.data.sources.read_imagefolder` (the in-memory reader), so every
    loader gives an image the same label.
    """
    origin = Path(root).expanduser().absolute()
    if not origin.exists():
        raise DataError(
            f"data.root {origin} does not exist; set data.root to a folder or .tar/.tar.gz archive holding "
            f"train/<class>/* and test/<class>/*"
        )
    folder = origin if origin.is_dir() else extract_archive(origin, cache, progress=progress)
    try:
        listing = sources._FolderSource(folder).listing()
    except OSError as err:
        raise DataError(
            f"cannot read the image folder {folder} ({type(err).__name__}: {err}); check that the files under "
            f"it are readable"
        ) from None
    files = {split: [[rel for rel, _ in entries] for entries in listing.files[split]] for split in sources.SPLITS}
    return FolderListing(folder, origin, list(listing.class_names), files, listing.identity)


def check_image(path: Path, formats: frozenset[str] | None = None) -> str | None:
    """None when `path` decodes, else why not. `formats`: PIL format names the reader accepts.

    A JPEG is decoded at 1/8 scale (libjpeg's DCT scaling): every byte of the compressed data is still
    read, so truncation and corrupt entropy-coded data are caught, at a fraction of a full decode.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            if formats is not None and img.format not in formats:
                return f"{img.format} images are not decoded by DALI (it reads {', '.join(sorted(formats))})"
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as err:  # noqa: BLE001 -- PIL raises many types on bad data
        return f"{type(err).__name__}: {err}"
    return None


def _check_many(folder: Path, paths: Sequence[str], formats: frozenset[str] | None) -> list[str | None]:
    return [check_image(folder / p, formats) for p in paths]


_UNKNOWN, _GOOD, _BAD = 0, 1, 2


def _status_path(cache: Path, key: str) -> Path:
    return cache / "checked" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def _load_status(path: Path, key: str, count: int) -> tuple[np.ndarray, dict[str, str]] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key or npz["status"].shape != (count,):
                return None
            return npz["status"].astype(np.int8), dict(zip(npz["bad_paths"].tolist(), npz["bad_errors"].tolist()))
    except Exception:  # noqa: BLE001 -- absent or broken: check again
        return None


def _save_status(path: Path, key: str, status: np.ndarray, bad: dict[str, str]) -> None:
    save_npz_atomic(path, "image-check cache", "the images will be checked again", key=np.array(key),
                    status=status, bad_paths=np.array(list(bad), dtype=str),
                    bad_errors=np.array(list(bad.values()), dtype=str))


def _bad_image_error(listing: FolderListing, rel: str, error: str) -> DataError:
    inside = f" (extracted to {listing.folder})" if listing.folder != listing.origin else ""
    return DataError(
        f"cannot read image {rel} in {listing.origin}{inside} ({error}); delete or replace the file, or set "
        f"data.on_bad_image=skip to leave unreadable images out"
    )


def select_split(
    listing: FolderListing,
    split: str,
    max_n: int = 0,
    *,
    on_bad_image: str = "error",
    formats: frozenset[str] | None = None,
    cache: Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> ImageList:
    """The files of `split` to read: all, or the class-balanced first `max_n` (as the in-memory reader),
    each checked to decode. With on_bad_image = skip an unreadable file is left out (and replaced by the
    next file of its class when max_n > 0); with error the first one raises a DataError naming it.
    The results of the check are cached per file list, so a second run checks nothing.
    """
    per_class = listing.files[split]
    flat = [rel for entries in per_class for rel in entries]
    starts = np.cumsum([0] + [len(entries) for entries in per_class])
    what = str(listing.origin)
    sources._check_max_n(max_n, len(flat), split, what)
    key = f"v{CHECK_VERSION}|{listing.identity}|{split}|{sorted(formats) if formats else 'pil'}"
    status_file = _status_path(cache, key) if cache is not None else None
    loaded = _load_status(status_file, key, len(flat)) if status_file is not None else None
    status, bad = loaded if loaded is not None else (np.zeros(len(flat), np.int8), {})
    changed = False
    bar = None

    def check(new: list[int]) -> list[int]:
        nonlocal changed, bar
        # With error, files known to be bad (from the cache) stay candidates, so they raise here.
        known_bad = next((j for j in new if status[j] == _BAD), None)
        if known_bad is not None:
            raise _bad_image_error(listing, flat[known_bad], bad.get(flat[known_bad], "unreadable"))
        todo = [j for j in new if status[j] == _UNKNOWN]
        if not todo:
            return []
        changed = True
        if bar is None and progress and len(todo) >= sources.PROGRESS_MIN_IMAGES:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"checking {split} images", unit="img", leave=False)
        elif bar is not None:
            bar.total += len(todo)
        unreadable = []
        chunks = [todo[i : i + CHECK_CHUNK] for i in range(0, len(todo), CHECK_CHUNK)]
        # PIL releases the GIL while decoding, so threads check files in parallel.
        with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
            results = pool.map(lambda c: _check_many(listing.folder, [flat[j] for j in c], formats), chunks)
            for chunk, errors in zip(chunks, results, strict=True):
                for j, error in zip(chunk, errors, strict=True):
                    if error is None:
                        status[j] = _GOOD
                        continue
                    status[j] = _BAD
                    bad[flat[j]] = error
                    unreadable.append(j)
                    if on_bad_image != "skip":
                        pool.shutdown(wait=False, cancel_futures=True)
                        if status_file is not None:
                            _save_status(status_file, key, status, bad)
                        raise _bad_image_error(listing, flat[j], error)
                if bar is not None:
                    bar.update(len(chunk))
        return unreadable

    candidates = [list(range(starts[k], starts[k + 1])) for k in range(len(per_class))]
    known_bad = [j for j in range(len(flat)) if status[j] == _BAD] if on_bad_image == "skip" else []
    try:
        chosen = sources._choose_readable(candidates, max_n, check, split=split, what=what, bad=known_bad)
    finally:
        if bar is not None:
            bar.close()
    if changed and status_file is not None:
        _save_status(status_file, key, status, bad)
    # The bad files passed over: those before each class's last chosen file (or in a class with none).
    ends = [c[-1] if c else starts[k + 1] - 1 for k, c in enumerate(chosen)]
    skipped = [rel for k in range(len(per_class)) for rel in flat[starts[k] : ends[k] + 1] if rel in bad]
    if skipped and on_bad_image == "skip":
        warnings.warn(
            f"skipped {len(skipped)} unreadable {split} image(s) in {what} (data.on_bad_image=skip), e.g. "
            f"{skipped[0]}: {bad[skipped[0]]}",
            stacklevel=2,
        )
    paths = [flat[j] for c in chosen for j in c]
    labels = np.concatenate([np.full(len(c), k, np.int64) for k, c in enumerate(chosen)] + [np.zeros(0, np.int64)])
    return ImageList(listing.folder, paths, labels, list(listing.class_names))


# --------------------------------------------------------------------------------------------------
# Order, shards, normalisation


def shard_info() -> tuple[int, int]:
    """(shard_id, num_shards): this process's rank and the world size under torch.distributed, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_batch_and_shard(batch_size: int, shard_id: int, num_shards: int) -> None:
    """The arguments both image loaders (PIL workers and DALI) validate alike."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")


def shard_bounds(count: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[start, end) of shard `shard_id` of `count` items: DALI's file-reader rule, so both loaders agree."""
    return count * shard_id // num_shards, count * (shard_id + 1) // num_shards


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """int64 (count,): the training order of an epoch, a pure function of (seed, epoch)."""
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(count, generator=generator)


def sample_seed(seed_of_epoch: int, index: int) -> int:
    """A per-image augmentation seed, so an image's crop and flip do not depend on the worker count."""
    return (seed_of_epoch ^ ((index + 1) * 0x9E3779B97F4A7C15)) & ((1 << 63) - 1)


class ResizeCenterCrop:
    """Evaluation view, PIL -> uint8 (3, crop, crop): shorter side to `resize_size` (bilinear, antialiased),
    center crop `crop_size`.

    The rounding is DALI's (long side = round(long * resize / short), crop anchor = round half up of
    (size - crop) / 2), not torchvision's Resize / CenterCrop (truncate; round half to even), so both
    loaders crop the same window; torchvision's would differ by a pixel in about one image in four.
    """

    def __init__(self, resize_size: int, crop_size: int):
        self.resize_size, self.crop_size = int(resize_size), int(crop_size)

    def __call__(self, image, seed: int = -1) -> torch.Tensor:
        from PIL import Image

        width, height = image.size
        scale = self.resize_size / min(width, height)
        if width <= height:
            size = (self.resize_size, math.floor(height * scale + 0.5))
        else:
            size = (math.floor(width * scale + 0.5), self.resize_size)
        # PIL's bilinear filter widens its support when shrinking, i.e. it antialiases (as DALI's antialias).
        image = image.resize(size, Image.Resampling.BILINEAR)
        left = (size[0] - self.crop_size + 1) // 2
        top = (size[1] - self.crop_size + 1) // 2
        return _to_tensor(image.crop((left, top, left + self.crop_size, top + self.crop_size)))


class RandomResizedCropFlip:
    """Training view, (PIL, seed) -> uint8 (3, crop, crop): RandomResizedCrop then a horizontal flip (p=0.5).

    The crop follows torchvision's RandomResizedCrop: up to 10 draws of an area fraction in `scale` and a
    log-uniform aspect ratio in `ratio` until the box fits, else the central box of the clamped ratio;
    the box is resized to crop x crop with PIL's antialiased bilinear filter in one step. All draws come
    from ``random.Random(seed)``, a per-image seed, rather than torch's global generator, which would have
    to be forked and reseeded per image (about 2x the cost of the transform on a 32x32 JPEG).
    """

    def __init__(self, crop_size: int, flip: bool = True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.crop_size, self.flip = int(crop_size), bool(flip)
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = ratio

    def box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, box width, box height) inside a width x height image."""
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            box_width = round(math.sqrt(target * aspect))
            box_height = round(math.sqrt(target / aspect))
            if 0 < box_width <= width and 0 < box_height <= height:
                return rng.randint(0, width - box_width), rng.randint(0, height - box_height), box_width, box_height
        aspect = width / height
        if aspect < self.ratio[0]:
            box_width, box_height = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            box_width, box_height = round(height * self.ratio[1]), height
        else:
            box_width, box_height = width, height
        return (width - box_width) // 2, (height - box_height) // 2, box_width, box_height

    def __call__(self, image, seed: int) -> torch.Tensor:
        from PIL import Image

        rng = random.Random(seed)
        left, top, box_width, box_height = self.box(*image.size, rng)
        image = image.resize(
            (self.crop_size, self.crop_size),
            Image.Resampling.BILINEAR,
            box=(left, top, left + box_width, top + box_height),
        )
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image)


def _to_tensor(image) -> torch.Tensor:
    """PIL RGB image -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())


def _open_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # noqa: BLE001 -- a file changed after the check: name it, do not hang
        raise DataError(
            f"cannot read image {path} ({type(err).__name__}: {err}); it changed after the up-front check? "
            f"delete or replace it (data.on_bad_image=skip leaves unreadable images out)"
        ) from None


def estimate_stats(images: ImageList, crop_size: int, resize_size: int) -> tuple[tuple, tuple]:
    """Per-channel mean and std (in [0, 1] units) of up to STATS_MAX_IMAGES training images, spread evenly
    over the list, in the evaluation view (resize + center crop): data.normalize = dataset for streaming."""
    count = len(images)
    picks = np.unique(np.linspace(0, count - 1, min(count, STATS_MAX_IMAGES)).round().astype(np.int64))
    transform = ResizeCenterCrop(resize_size, crop_size)
    batch = np.stack([transform(_open_rgb(images.folder / images.paths[i])).numpy() for i in picks])
    return channel_stats(batch)


def resolve_normalization(cfg: DataConfig, train: ImageList, crop_size: int, resize_size: int):
    """mean, std for the streaming loaders: auto is ImageNet's (SPEC 5)."""
    normalize = "imagenet" if cfg.normalize == "auto" else cfg.normalize
    if normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if normalize == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    if normalize == "half":
        return HALF, HALF
    if normalize == "dataset":
        return estimate_stats(train, crop_size, resize_size)
    raise DataError(
        f"data.normalize = {cfg.normalize!r} is not valid; choose one of: auto, cifar10, half, imagenet, dataset"
    )


# --------------------------------------------------------------------------------------------------
# The torch (PIL worker) loader


class _ImageFiles(torch.utils.data.Dataset):
    """Item (index, seed) -> (uint8 (3, crop, crop) image, int label); `transform(image, seed)`."""

    def __init__(self, images: ImageList, transform):
        self.folder, self.paths, self.labels = images.folder, images.paths, images.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        return self.transform(_open_rgb(self.folder / self.paths[index]), seed), int(self.labels[index])


class _EpochKeys(torch.utils.data.Sampler):
    """Yields the (index, per-image seed) keys of the current epoch's shard, in reading order.

    It holds the epoch itself rather than a reference to its loader: a loader <-> sampler cycle would
    leave the DataLoader's worker shutdown to the cyclic garbage collector, which can close the worker
    queues first and then wait seconds per worker for a shutdown message that never arrives.
    """

    def __init__(self, count: int, *, train: bool, seed: int, shard_id: int, num_shards: int):
        self.count, self.train, self.seed = count, train, seed
        self.start, self.end = shard_bounds(count, shard_id, num_shards)
        self.epoch = 0

    def __len__(self) -> int:
        return self.end - self.start

    def keys(self) -> list[tuple[int, int]]:
        if not self.train:
            return [(i, -1) for i in range(self.start, self.end)]
        base = epoch_seed(self.seed, self.epoch)
        order = epoch_order(self.count, self.seed, self.epoch)[self.start : self.end].tolist()
        return [(i, sample_seed(base, i)) for i in order]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys())


class TorchImageLoader:
    """Batches decoded by PIL in DataLoader workers, normalised on the device.

    Workers send uint8 (B, 3, crop, crop) batches (pinned on CUDA), copied with non_blocking and
    normalised there, so host-to-device traffic is a quarter of float32's. Every image's augmentation
    is seeded from (seed, epoch, index): an epoch is the same whatever num_workers is.
    """

    def __init__(
        self,
        images: ImageList,
        batch_size: int,
        *,
        train: bool,
        crop_size: int,
        resize_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        flip: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        shard_id: int = 0,
        num_shards: int = 1,
    ):
        check_batch_and_shard(batch_size, shard_id, num_shards)
        self.images = images
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.crop_size, self.resize_size = int(crop_size), int(resize_size)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.shard_id, self.num_shards = int(shard_id), int(num_shards)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        transform = RandomResizedCropFlip(crop_size, flip) if train else ResizeCenterCrop(resize_size, crop_size)
        self._keys = _EpochKeys(
            len(images), train=self.train, seed=self.seed, shard_id=self.shard_id, num_shards=self.num_shards
        )
        self._loader = torch.utils.data.DataLoader(
            _ImageFiles(images, transform),
            batch_size=self.batch_size,
            sampler=self._keys,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=self.train and self.drop_last,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    @property
    def num_images(self) -> int:
        start, end = shard_bounds(len(self.images), self.shard_id, self.num_shards)
        return end - start

    @property
    def epoch(self) -> int:
        return self._keys.epoch

    def set_epoch(self, epoch: int) -> None:
        self._keys.epoch = int(epoch)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_images, self.batch_size, self.train and self.drop_last)

    def epoch_keys(self) -> list[tuple[int, int]]:
        """(index, per-image seed) of this epoch's shard, in reading order."""
        return self._keys.keys()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().div_(255).sub_(self._mean).div_(self._std)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._loader:
            images = images.to(self.device, non_blocking=True)
            yield self.normalize(images), labels.to(self.device, non_blocking=True)

    def __repr__(self) -> str:
        return (
            f"TorchImageLoader({self.num_images} images of {self.images.folder}, batch_size={self.batch_size}, "
            f"train={self.train}, crop={self.crop_size}, resize={self.resize_size}, flip={self.flip}, "
            f"workers={self.num_workers}, shard {self.shard_id}/{self.num_shards}, device={self.device})"
        )


# --------------------------------------------------------------------------------------------------
# Entry point


def build_streaming_data(
    cfg: DataConfig,
    *,
    batch_size: int,
    eval_batch_size: int,
    device: torch.device | str,
    seed: int,
    drop_last: bool = False,
    progress: bool = True,
) -> DataBundle:
    """The streaming loaders for an image folder or archive: data.loader = dali gives DALI pipelines,
    anything else the torch (PIL worker) loader. Same contract as :func:`fastlocal.data.build_data`."""
    crop, resize, workers = _check_options(cfg)
    kind = "dali" if choose_loader(cfg) == "dali" else "torch"
    device = torch.device(device)
    if cfg.source not in STREAMING_SOURCES:
        raise DataError(
            f"data.loader = {_option(cfg, 'loader', 'auto')} reads image folders (data.source = imagefolder or "
            f"bundled), not {cfg.source}; use data.loader=device (or auto) for {cfg.source}"
        )
    decoder = None
    if kind == "dali":
        from fastlocal.data.dali import import_dali, resolve_decoder

        import_dali()  # fail before any listing or extraction work
        decoder = resolve_decoder(_option(cfg, "dali_decoder", "auto"), device)
    if cfg.image_size > 0 and cfg.image_size != crop:
        warnings.warn(
            f"data.image_size = {cfg.image_size} applies to the in-memory loader; the {kind} loader crops "
            f"data.crop_size = {crop} pixels (set data.crop_size instead)",
            stacklevel=2,
        )
    if cfg.source == "imagefolder" and not cfg.root:
        raise DataError(
            "data.source = imagefolder needs data.root: a folder or .tar/.tar.gz archive holding "
            "train/<class>/* and test/<class>/*"
        )
    cache = cache_dir(cfg.cache_dir)
    root = Path(cfg.root) if cfg.source == "imagefolder" else bundled_path()
    listing = list_imagefolder(root, cache=cache, progress=progress)
    first_size = _first_image_size(root)
    if first_size is not None and 2 * first_size <= crop:
        # Upscaling every image 2x or more (e.g. 32 px CIFAR to the default 224) is almost always a mistake: slow,
        # and not the dataset's recipe.
        warnings.warn(
            f"the {kind} loader crops data.crop_size = {crop} pixels, but the images are {first_size} px, so "
            f"every crop is upscaled; set data.crop_size (and data.resize_size) to at most {first_size}, or use "
            "data.loader=device, the in-memory loader made for small images",
            stacklevel=2,
        )
    formats = DALI_FORMATS if kind == "dali" else None
    choose = dict(on_bad_image=cfg.on_bad_image, formats=formats, cache=cache, num_workers=workers, progress=progress)
    train = select_split(listing, "train", cfg.max_train, **choose)
    test = select_split(listing, "test", cfg.max_test, **choose)
    if len(train) == 0:
        raise DataError(f"the {cfg.source} training split is empty; check data.root and data.max_train")
    mean, std = resolve_normalization(cfg, train, crop, resize)
    flip = True if cfg.flip == "auto" else cfg.flip == "on"
    shard_id, num_shards = shard_info()
    common = dict(
        crop_size=crop,
        resize_size=resize,
        mean=mean,
        std=std,
        flip=flip,
        seed=seed,
        device=device,
        shard_id=shard_id,
        num_shards=num_shards,
    )
    if kind == "dali":
        from fastlocal.data.dali import DaliLoader

        common.update(decoder=decoder, num_threads=max(1, workers), list_dir=cache / "dali-lists")
        train_loader = DaliLoader(train, batch_size, train=True, drop_last=drop_last, **common)
        test_loader = DaliLoader(test, eval_batch_size, train=False, **common)
    else:
        common.update(num_workers=workers)
        train_loader = TorchImageLoader(train, batch_size, train=True, drop_last=drop_last, **common)
        test_loader = TorchImageLoader(test, eval_batch_size, train=False, **common)
    info = DatasetInfo(
        name=cfg.source,
        num_classes=len(train.class_names),
        image_size=crop,
        class_names=list(train.class_names),
        mean=tuple(mean),
        std=tuple(std),
        pad=0,
        pad_mode="constant",
        flip=flip,
    )
    return DataBundle(train=train_loader, test=test_loader, info=info)
