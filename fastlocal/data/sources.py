"""Datasets read once: uint8 arrays or checked file lists, with the class-balanced choice and the cache.

cifar10, svhn, stl10 come from torchvision's classes over files in ``data.root`` (never downloaded);
image folders hold ``train/<class>/*`` and ``test/<class>/*``, optionally under one top-level folder,
listed by torchvision's ``make_dataset``. An archive is extracted once into the cache with tarfile's
``data`` filter: no member (``../x``, an absolute path, a link pointing out) writes outside it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.resources
import os
import shutil
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fastlocal.config import DataConfig, UserError

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BUNDLED_FILE = "cifar10-subset.tar.gz"
# Bumped whenever cached content for the same key could change (decoder, resize, layout rules).
CACHE_VERSION = 2
# Written inside an extracted archive's folder last, so a folder without it is an interrupted extraction.
EXTRACTED_MARKER = ".fastlocal-extracted"
# torchvision class and the file or folder it reads under data.root.
NATIVE = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py/ (the python version)"),
    "svhn": ("SVHN", "{split}_32x32.mat"),
    "stl10": ("STL10", "stl10_binary/"),
}


class DataError(UserError):
    """A dataset that cannot be found or read: the message names the file and the fix."""


class BadImage(Exception):
    """An image file that does not decode; the message says why."""


@dataclass
class SplitData:
    """One split of a dataset, in the reader's order: images uint8 (N, 3, H, W), labels int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


def cache_dir(configured: str = "") -> Path:
    """data.cache_dir, else $FASTLOCAL_CACHE, else ~/.cache/fastlocal."""
    return Path(configured or os.environ.get("FASTLOCAL_CACHE") or Path.home() / ".cache" / "fastlocal").expanduser()


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


def read_native(source: str, root: str | Path, split: str) -> SplitData:
    """One split of cifar10, svhn or stl10 from the files under `root` (torchvision's layout)."""
    import torchvision.datasets

    root = Path(root).expanduser().absolute()
    class_name, where = NATIVE[source]
    where = where.format(split=split)
    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        if source == "cifar10":
            dataset = dataset_class(str(root), train=split == "train", download=False)
            images, labels = dataset.data.transpose(0, 3, 1, 2), dataset.targets  # NHWC -> NCHW
        else:
            dataset = dataset_class(str(root), split=split, download=False)
            images, labels = dataset.data, dataset.labels
    except Exception as err:  # noqa: BLE001 -- torchvision raises RuntimeError when missing, others when corrupt
        raise DataError(
            f"{source}: cannot read {where} under {root} ({type(err).__name__}: {err}). fastlocal never downloads: "
            f"on a machine with internet run torchvision.datasets.{class_name}(root, download=True) and copy "
            f"{where} into {root}, or set data.root to the folder that holds it, or use data.source=imagefolder "
            f"with data.root set to an image folder or archive (train/<class>/*, ...)"
        ) from None
    class_names = list(getattr(dataset, "classes", None) or [str(k) for k in range(10)])
    return SplitData(np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64), class_names)


def balanced_quotas(counts: Sequence[int], total: int) -> list[int]:
    """How many images to take from each class so that the `total` is spread evenly: round-robin over the
    classes in order, one image from each class that has any left, until `total` are taken.

    So every class gets total // C, and the first total % C classes one more; a class with fewer images
    than its share gives all it has, and its shortfall is spread over the others the same way.
    """
    if total > sum(counts):
        raise ValueError(f"cannot take {total} images from {sum(counts)}")
    counts, rounds = np.asarray(counts, dtype=np.int64), 0  # rounds: the complete rounds
    while rounds < counts.max(initial=0) and np.minimum(counts, rounds + 1).sum() <= total:
        rounds += 1
    quotas = np.minimum(counts, rounds)
    quotas[np.flatnonzero(counts > rounds)[: total - quotas.sum()]] += 1  # the last, partial round
    return quotas.tolist()


def choose_images(
    per_class: list[list[str]], read: Callable, cfg: DataConfig, split: str, what: str, progress: bool = True
) -> tuple[list[list[tuple[str, object]]], list[str]]:
    """Per class, [(name, read(name))] for all names or the class-balanced first data.max_<split> readable ones,
    and the sorted names skipped as unreadable (data.on_bad_image). `read` raises BadImage for an unreadable
    image; data.num_workers threads read."""
    max_n = getattr(cfg, f"max_{split}")
    total = sum(len(names) for names in per_class)
    if max_n > total:
        raise DataError(
            f"data.max_{split} = {max_n} is larger than the {split} split of {what}, which has {total} "
            f"images; set data.max_{split} to at most {total} (or 0 for all of them)"
        )
    values: dict[str, object] = {}
    bad: dict[str, str] = {}
    # A bar only for reads that last more than a second; PIL releases the GIL, so threads read in parallel.
    bar = tqdm(
        desc=f"reading {split} images of {Path(what).name}", unit="img", leave=False, delay=1, disable=not progress
    )
    pool = concurrent.futures.ThreadPoolExecutor(max(1, cfg.num_workers))

    def attempt(name: str) -> tuple[object, str | None]:
        try:
            return read(name), None
        except BadImage as err:
            return None, str(err)

    try:
        while True:  # rounds: choose among names not known to be bad, read the new ones, repeat
            good = [[n for n in names if n not in bad] for names in per_class]
            available = sum(len(g) for g in good)
            wanted = max_n if max_n > 0 else available
            if wanted > available:
                raise DataError(
                    f"data.max_{split} = {max_n} needs {max_n} readable {split} images in {what}, but only "
                    f"{available} of {total} are readable ({len(bad)} skipped); lower data.max_{split}"
                )
            quotas = balanced_quotas([len(g) for g in good], wanted)
            chosen = [g[:q] for g, q in zip(good, quotas, strict=True)]
            todo = [n for names in chosen for n in names if n not in values]
            if not todo:
                return [[(n, values[n]) for n in names] for names in chosen], sorted(bad)
            for name, (value, error) in zip(todo, pool.map(attempt, todo), strict=True):
                if error is None:
                    values[name] = value
                elif cfg.on_bad_image == "skip":
                    bad[name] = error
                else:
                    raise DataError(
                        f"cannot read image {name} in {what} ({error}); delete or replace the file, or set "
                        f"data.on_bad_image=skip to leave unreadable images out"
                    )
                bar.update(1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()


def extract_archive(archive: Path, cache: Path, *, progress: bool = True) -> Path:
    """Extract `archive` once into `cache`/extracted/ (keyed by its path, size and mtime) and return the folder.

    Extraction goes to a temporary folder, the marker is written last, and one rename publishes it, so
    an interrupted run or concurrent processes never leave a half-written folder that looks done.
    """
    archive = archive.resolve()
    st = archive.stat()
    key = hashlib.sha256(f"{archive}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    parent = cache / "extracted"
    target = parent / f"{archive.name.split('.')[0] or 'archive'}-{key}"
    if (target / EXTRACTED_MARKER).is_file():
        return target
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{target.name}.", suffix=".tmp"))
        with tarfile.open(archive, "r:*") as tar:
            members = tqdm(
                tar, desc=f"extracting {archive.name}", unit="file", leave=False, delay=1, disable=not progress
            )
            # One pass, front to back; the "data" filter refuses members that would land outside `tmp`.
            tar.extractall(tmp, members=members, filter="data")
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
    except tarfile.FilterError as err:
        raise DataError(
            f"the archive {archive} holds {err.tarinfo.name!r}, which would write or link outside the "
            f"folder it is extracted to ({err}); nothing was extracted. Re-create the archive with "
            f"relative paths and no links leaving it"
        ) from None
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise DataError(
            f"cannot read the archive {archive}: it is truncated, corrupt or not a .tar/.tar.gz/.tgz "
            f"archive ({type(err).__name__}: {err}); re-download or re-create it (compare its size with "
            f"the original), or extract it and set data.root to the extracted folder"
        ) from None
    except OSError as err:
        raise DataError(
            f"cannot extract {archive} into {parent} ({type(err).__name__}: {err}); free disk space or "
            f"set data.cache_dir or $FASTLOCAL_CACHE to a writable folder with room, or extract it "
            f"yourself and set data.root to the folder"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_image(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith((".", "__MACOSX")))


def find_base(origin: Path, folder: Path) -> Path:
    """The folder holding train/ and test/: `folder` or its single subfolder, else a DataError."""
    top, base = _subfolders(folder), folder
    if len(top) == 1 and not {"train", "test"} & set(top):  # one top-level folder that holds the splits
        base, top = folder / top[0], _subfolders(folder / top[0])
    missing = [split + "/" for split in SPLITS if split not in top]
    if missing:
        files = [e.name for e in os.scandir(base) if e.is_file() and e.name != EXTRACTED_MARKER]
        raise DataError(
            f"{origin}: no {' and '.join(missing)} folder at {f'{base.name}/' if base != folder else 'the top level'} "
            f"(it holds: {', '.join(sorted([d + '/' for d in top] + files)) or 'nothing'}). Expected the image-folder "
            f"layout train/<class>/<image> and test/<class>/<image>, optionally under one top-level folder "
            f"(e.g. cifar10-jpeg/train/airplane/0000.jpg)"
        )
    return base


@dataclass
class ImageFolder:
    """The image files of an image-folder dataset: `files`[split][label] are sorted paths relative to `base`
    (the folder holding train/ and test/), labels index the sorted train/ class folders `class_names`;
    `identity` changes with any file's name, size or modification time (the cache key)."""

    origin: Path  # data.root as given (a folder or an archive), for messages
    base: Path
    class_names: list[str]
    files: dict[str, list[list[str]]]
    identity: str


@dataclass
class ImageList:
    """The files one streaming loader reads: paths relative to `base`, labels int64 (N,), in reading order."""

    base: Path
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def list_imagefolder(root: str | Path, *, cache: Path, progress: bool = True) -> ImageFolder:
    """The image files under `root` (a folder, or an archive extracted once into `cache`)."""
    origin = Path(root).expanduser().absolute()
    if not origin.exists():
        raise DataError(
            f"data.root {origin} does not exist; set data.root to a folder or .tar/.tar.gz archive holding "
            f"train/<class>/* and test/<class>/*"
        )
    from torchvision.datasets.folder import make_dataset

    folder = origin if origin.is_dir() else extract_archive(origin, cache, progress=progress)
    base = find_base(origin, folder)
    class_names = _subfolders(base / "train")
    if not class_names:
        raise DataError(f"{origin}: train/ has no class folders; put the training images in train/<class>/<image>")
    extra = sorted(set(_subfolders(base / "test")) - set(class_names))
    if extra:
        raise DataError(
            f"{origin}: test/ has classes that are not in train/: {', '.join(extra)}; every test class "
            f"needs a train/ folder of the same name (labels are the sorted train/ folder names)"
        )
    digest = hashlib.sha256(f"folder:{base.resolve()}".encode())
    files: dict[str, list[list[str]]] = {}
    labels = {c: k for k, c in enumerate(class_names)}
    for split in SPLITS:
        per_class: list[list[str]] = [[] for _ in class_names]
        for path, label in make_dataset(str(base / split), labels, is_valid_file=_is_image, allow_empty=True):
            relative = Path(path).relative_to(base).as_posix()
            st = os.stat(path)
            digest.update(f"{relative}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            per_class[label].append(relative)
        for name, names in zip(class_names, per_class, strict=True):
            if not names and (base / split / name).is_dir():
                raise DataError(
                    f"{origin}: class folder {split}/{name}/ has no images (files ending in "
                    f"{', '.join(IMAGE_EXTENSIONS)}); add images to it or remove the folder"
                )
        files[split] = per_class
    if not any(files["test"]):
        raise DataError(f"{origin}: test/ has no images; put the test images in test/<class>/<image>")
    return ImageFolder(origin, base, class_names, files, digest.hexdigest())


def shorter_side(path: Path) -> int:
    """The shorter side of the image at `path` in pixels, 0 when it does not open (its reader reports it)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return min(img.size)
    except Exception:  # noqa: BLE001 -- PIL raises many types on bad data
        return 0


def _decode(path: Path, image_size: int) -> np.ndarray:
    """An image file -> uint8 (3, H, W) RGB; resized to (image_size, image_size) when > 0."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if image_size > 0 and img.size != (image_size, image_size):
                # PIL's bilinear filter widens its support when shrinking, i.e. it antialiases.
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as err:  # noqa: BLE001 -- PIL raises many types on bad data
        raise BadImage(f"{type(err).__name__}: {err}") from None


def cached(cache: Path, name: str, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict:
    """The arrays stored under `key` in `cache`/`name`-<hash>.npz, else compute() (and store them)."""
    path = Path(cache) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) == key:
                return {k: npz[k] for k in npz.files}
    except Exception:  # noqa: BLE001 -- absent, broken or another key: computed again and rewritten
        pass
    arrays = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, key=np.array(key), **arrays)
            os.chmod(tmp, 0o644)  # mkstemp's 0o600 would hide the cache from other users
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as err:
        warnings.warn(
            f"could not write the cache {path} ({err}); it is computed again next run. Set data.cache_dir "
            f"or $FASTLOCAL_CACHE to a writable folder",
            stacklevel=2,
        )
    return arrays


def read_split(
    folder: ImageFolder, split: str, read: Callable, cfg: DataConfig, cache: Path, variant: str, progress: bool = True
) -> dict[str, np.ndarray]:
    """The chosen images of `split` (see :func:`choose_images`) as arrays: paths (relative to folder.base),
    labels int64 and, when `read` returns pixels, images uint8 (N, 3, H, W). Read once, then loaded from the
    cache, whose key holds everything they depend on (`variant`: how they were read)."""

    def compute() -> dict[str, np.ndarray]:
        reader = lambda rel: read(folder.base / rel)
        chosen, skipped = choose_images(folder.files[split], reader, cfg, split, str(folder.origin), progress)
        entries = [entry for names in chosen for entry in names]
        if not entries:
            raise DataError(f"{folder.origin}: no readable {split} images; check data.root and data.max_{split}")
        arrays = dict(
            paths=np.array([rel for rel, _ in entries], dtype=str),
            skipped=np.array(skipped, dtype=str),
            labels=np.array([k for k, names in enumerate(chosen) for _ in names], np.int64),
        )
        if isinstance(entries[0][1], np.ndarray):
            (first, pixels), shape = entries[0], entries[0][1].shape
            odd, odd_pixels = next((e for e in entries if e[1].shape != shape), (None, pixels))
            if odd is not None:
                raise DataError(
                    f"images in {folder.origin} differ in size: {first} is {shape[2]}x{shape[1]} but {odd} is "
                    f"{odd_pixels.shape[2]}x{odd_pixels.shape[1]}; set data.image_size=N to resize every image to NxN"
                )
            arrays["images"] = np.stack([pixels for _, pixels in entries])
        return arrays

    key = f"v{CACHE_VERSION}|{folder.identity}|{split}|{getattr(cfg, f'max_{split}')}|{variant}|{cfg.on_bad_image}"
    arrays = cached(cache, f"{cfg.source}-{split}", key, compute)
    if len(arrays["skipped"]):
        warnings.warn(
            f"{cfg.source}: skipped {len(arrays['skipped'])} unreadable {split} image(s) in {folder.origin} "
            f"(data.on_bad_image=skip), e.g. {arrays['skipped'][0]}",
            stacklevel=3,
        )
    return arrays


def read_imagefolder(root: str | Path, /, *, cache: Path, progress: bool = True, **options) -> dict[str, SplitData]:
    """{split: SplitData} of the image folder or archive `root`, decoded once and cached in `cache`. `options` are
    DataConfig fields: max_train, max_test, image_size, on_bad_image, num_workers, and source (names the cache)."""
    cfg = DataConfig(**{"source": "imagefolder", **options})
    folder = list_imagefolder(root, cache=Path(cache), progress=progress)
    decode, variant = (lambda path: _decode(path, cfg.image_size)), f"PIL {cfg.image_size}"
    splits = {}
    for split in SPLITS:
        arrays = read_split(folder, split, decode, cfg, cache=Path(cache), variant=variant, progress=progress)
        splits[split] = SplitData(arrays["images"], arrays["labels"].astype(np.int64), folder.class_names)
    return splits
