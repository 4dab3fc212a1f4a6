"""Dataset readers that return uint8 images ``(N, 3, H, W)`` and int64 labels ``(N,)``.

Readers are written from the file formats rather than through torchvision's dataset classes (whose md5
checks reject small hand-written files); torchvision is imported only to download a missing dataset.

- cifar10: ``root/cifar-10-batches-py/`` python pickles. Unpickling can run code, so these files are
  trusted: use the ones downloaded from the CIFAR site or by torchvision, never files from an unknown source.
- svhn: ``root/{train,test}_32x32.mat`` (label 10 is digit 0).
- stl10: ``root/stl10_binary/{train,test}_{X,y}.bin`` (column-major pixels, labels 1..10).
- imagefolder: a folder or .tar/.tar.gz/.tgz archive holding ``train/<class>/*`` and ``test/<class>/*``,
  optionally under one top-level folder; decoded with PIL to RGB. Decoded splits are cached as .npz.

``max_n > 0`` keeps the first N images of a split, class-balanced (see :func:`balanced_quotas`).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np

from fastlocal.config import UserError

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
# Bumped whenever the decoded content for the same key could change (decoder, resize, layout rules).
CACHE_VERSION = 1
# Decoding fewer images than this shows no progress bar.
PROGRESS_MIN_IMAGES = 1000

_Candidate = TypeVar("_Candidate", bound=Hashable)


class DataError(UserError):
    """A dataset that cannot be found or read: the message names the file and the fix."""


@dataclass
class SplitData:
    """One split of a dataset, in the reader's order."""

    images: np.ndarray
    """uint8 (N, 3, H, W)."""
    labels: np.ndarray
    """int64 (N,), indices into class_names."""
    class_names: list[str]


# --------------------------------------------------------------------------------------------------
# Class-balanced subsetting


def balanced_quotas(counts: Sequence[int], total: int) -> list[int]:
    """How many images to take from each class so that the `total` is spread evenly.

    Every class gets total // C, and the first total % C classes one more; a class with fewer images
    than its share gives all it has, and its shortfall is spread over the others the same way, so the
    result sums to `total` whenever sum(counts) >= total.
    """
    if total > sum(counts):
        raise ValueError(f"cannot take {total} images from {sum(counts)}")
    quotas = [0] * len(counts)
    active = list(range(len(counts)))
    remaining = total
    while active:
        share = remaining // len(active)
        saturated = [k for k in active if counts[k] <= share]
        if not saturated:
            extra = remaining - share * len(active)
            for position, k in enumerate(active):
                quotas[k] = share + (1 if position < extra else 0)
            break
        for k in saturated:
            quotas[k] = counts[k]
            remaining -= counts[k]
        active = [k for k in active if k not in saturated]
    return quotas


def _check_max_n(max_n: int, available: int, split: str, what: str) -> None:
    if max_n > available:
        setting = f"data.max_{split}"
        raise DataError(
            f"{setting} = {max_n} is larger than the {split} split of {what}, which has {available} "
            f"images; set {setting} to at most {available} (or 0 for all of them)"
        )


def balanced_subset(labels: np.ndarray, num_classes: int, max_n: int, split: str, what: str) -> np.ndarray:
    """Indices (ascending, so the reader's order is kept) of the first `max_n` images, class-balanced."""
    _check_max_n(max_n, len(labels), split, what)
    per_class = [np.flatnonzero(labels == k) for k in range(num_classes)]
    quotas = balanced_quotas([len(p) for p in per_class], max_n)
    chosen = np.concatenate([p[:q] for p, q in zip(per_class, quotas, strict=True)] + [np.zeros(0, np.int64)])
    return np.sort(chosen)


def _choose_readable(
    per_class: Sequence[Sequence[_Candidate]],
    max_n: int,
    check: Callable[[list[_Candidate]], Iterable[_Candidate]],
    *,
    split: str,
    what: str,
    bad: Collection[_Candidate] = (),
) -> list[list[_Candidate]]:
    """Per class, the chosen candidates: all, or the class-balanced first `max_n`, none of them bad.

    `check` is given each chosen candidate once, in class order, and returns those that are bad
    (or raises); `bad` are known to be bad already.
    """
    total = sum(len(candidates) for candidates in per_class)
    bad = set(bad)
    checked: set[_Candidate] = set()
    # Rounds: pick the balanced subset among candidates not known to be bad and check what is new; a bad
    # one is replaced by the next one of its class in the following round.
    while True:
        good = [[c for c in candidates if c not in bad] for candidates in per_class]
        available = sum(len(g) for g in good)
        wanted = max_n if max_n > 0 else available
        if wanted > available:
            raise DataError(
                f"data.max_{split} = {max_n} needs {max_n} readable {split} images in {what}, "
                f"but only {available} of {total} are readable ({len(bad)} skipped); lower data.max_{split}"
            )
        quotas = balanced_quotas([len(g) for g in good], wanted)
        chosen = [g[:q] for g, q in zip(good, quotas, strict=True)]
        new = [c for candidates in chosen for c in candidates if c not in checked]
        if not new:
            return chosen
        checked.update(new)
        bad.update(check(new))


def subset_split(data: SplitData, max_n: int, split: str, what: str) -> SplitData:
    if max_n <= 0:
        return data
    keep = balanced_subset(data.labels, len(data.class_names), max_n, split, what)
    return SplitData(np.ascontiguousarray(data.images[keep]), data.labels[keep], data.class_names)


# --------------------------------------------------------------------------------------------------
# Native formats (cifar10, svhn, stl10)

_IMAGEFOLDER_HINT = (
    "or use data.source=imagefolder with data.root set to an image-folder folder or archive "
    "(train/<class>/*, test/<class>/*)"
)


def _ensure_files(
    source: str, root: Path, required: list[Path], folder_hint: str, download: bool, fetch: Callable[[], None]
) -> None:
    """Make sure `required` exist, downloading with `fetch` when allowed; else raise a DataError."""
    missing = [p for p in required if not p.is_file()]
    if not missing:
        return
    names = ", ".join(str(p.relative_to(root)) for p in missing)
    fix = (
        f"download it on a machine with internet (torchvision.datasets.{source.upper()}(root, "
        f"download=True)) and copy it into {root}, or set data.root to a folder holding {folder_hint}, "
        f"{_IMAGEFOLDER_HINT}"
    )
    if not download:
        raise DataError(
            f"{source}: {names} not found under {root} and data.download is false. "
            f"Fix: set data.download=true (needs internet), or {fix}"
        )
    try:
        fetch()
    except Exception as err:  # noqa: BLE001 -- any download failure becomes the same user-facing error
        raise DataError(
            f"{source}: {names} not found under {root}, and the download failed "
            f"({type(err).__name__}: {err}). Fix: {fix}"
        ) from None
    still_missing = [p for p in required if not p.is_file()]
    if still_missing:
        raise DataError(
            f"{source}: the download finished but {', '.join(map(str, still_missing))} is still missing. Fix: {fix}"
        )


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as err:  # noqa: BLE001 -- unpickling can raise nearly anything on a bad file
        raise DataError(
            f"cannot read {path} ({type(err).__name__}: {err}); delete it so it is downloaded again, "
            f"or replace it with the original CIFAR-10 python-version file"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a CIFAR-10 batch (a dict); replace it with the original file")
    # Files pickled by Python 2 have bytes keys, files written by Python 3 str keys.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar10(root: str | Path, split: str, *, download: bool) -> SplitData:
    root = Path(root).expanduser().absolute()
    folder = root / "cifar-10-batches-py"
    batch_names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    required = [folder / name for name in batch_names] + [folder / "batches.meta"]

    def fetch() -> None:
        import torchvision

        torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)

    _ensure_files("cifar10", root, required, "cifar-10-batches-py", download, fetch)
    images, labels = [], []
    for path in required[:-1]:
        batch = _unpickle(path)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = np.asarray(batch["labels"], dtype=np.int64)
        except (KeyError, ValueError) as err:
            raise DataError(
                f"{path} is not a CIFAR-10 batch (need 'data' uint8 (N, 3072) and 'labels'): {err}; "
                f"replace it with the original file"
            ) from None
        if len(batch_labels) != len(data):
            raise DataError(f"{path} has {len(data)} images but {len(batch_labels)} labels; replace it")
        images.append(data)
        labels.append(batch_labels)
    meta = _unpickle(required[-1])
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if not class_names:
        class_names = [str(k) for k in range(10)]
    return _checked(SplitData(np.concatenate(images), np.concatenate(labels), class_names), required[0])


def read_svhn(root: str | Path, split: str, *, download: bool) -> SplitData:
    root = Path(root).expanduser().absolute()
    path = root / f"{split}_32x32.mat"

    def fetch() -> None:
        import torchvision

        torchvision.datasets.SVHN(str(root), split=split, download=True)

    _ensure_files("svhn", root, [path], f"{split}_32x32.mat", download, fetch)
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
        x, y = mat["X"], mat["y"]
    except Exception as err:  # noqa: BLE001 -- scipy raises various errors on a bad .mat file
        raise DataError(
            f"cannot read {path} ({type(err).__name__}: {err}); delete it so it is downloaded again, "
            f"or replace it with the original SVHN cropped-digits file"
        ) from None
    if x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"{path}: X has shape {x.shape}, expected (32, 32, 3, N); replace the file")
    images = np.ascontiguousarray(np.asarray(x, dtype=np.uint8).transpose(3, 2, 0, 1))
    labels = np.asarray(y, dtype=np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN stores the digit 0 as label 10
    return _checked(SplitData(images, labels, [str(k) for k in range(10)]), path)


def read_stl10(root: str | Path, split: str, *, download: bool) -> SplitData:
    root = Path(root).expanduser().absolute()
    folder = root / "stl10_binary"
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"

    def fetch() -> None:
        import torchvision

        torchvision.datasets.STL10(str(root), split=split, download=True)

    _ensure_files("stl10", root, [x_path, y_path], "stl10_binary", download, fetch)
    raw = np.fromfile(x_path, dtype=np.uint8)
    image_bytes = 3 * 96 * 96
    if raw.size % image_bytes:
        raise DataError(f"{x_path} has {raw.size} bytes, not a multiple of 3*96*96; it is truncated, replace it")
    # Each channel plane is stored column-major: reshape, then swap the two spatial axes.
    images = np.ascontiguousarray(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
    class_names = STL10_CLASSES
    names_file = folder / "class_names.txt"
    if names_file.is_file():
        lines = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(lines) == 10:
            class_names = lines
    if len(labels) != len(images):
        raise DataError(f"{x_path} holds {len(images)} images but {y_path} {len(labels)} labels; replace them")
    return _checked(SplitData(images, labels, list(class_names)), y_path)


def _checked(data: SplitData, path: Path) -> SplitData:
    if len(data.labels) and (data.labels.min() < 0 or data.labels.max() >= len(data.class_names)):
        raise DataError(
            f"{path}: labels range over {data.labels.min()}..{data.labels.max()}, expected "
            f"0..{len(data.class_names) - 1}; replace the file with the original"
        )
    return data


NATIVE_READERS: dict[str, Callable[..., SplitData]] = {
    "cifar10": read_cifar10,
    "svhn": read_svhn,
    "stl10": read_stl10,
}


# --------------------------------------------------------------------------------------------------
# Image folders and archives


@dataclass
class _Listing:
    """The image files of one image-folder dataset, per split and class, sorted by path."""

    class_names: list[str]
    """Sorted train/ class folder names; a label is an index into this list."""
    files: dict[str, list[list[tuple[str, object]]]]
    """split -> per class (label order) -> [(relative path for messages, reader handle)]."""
    identity: str
    """What the decoded content depends on (file names, sizes, mtimes), for the cache key."""


def _is_image(name: str) -> bool:
    base = PurePosixPath(name).name
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _layout_error(root: Path, found: Iterable[str], detail: str) -> DataError:
    shown = sorted(found)
    listing = ", ".join(shown[:10]) + (f", ... ({len(shown)} in all)" if len(shown) > 10 else "")
    return DataError(
        f"{root}: {detail}; found top-level entries: {listing or '(none)'}. Expected the image-folder layout "
        f"train/<class>/<image> and test/<class>/<image>, optionally under one top-level folder "
        f"(e.g. cifar10-jpeg/train/airplane/0000.jpg). Put the images in that layout, or point data.root "
        f"at the folder or archive that holds train/ and test/"
    )


def _find_prefix(root: Path, top_dirs: dict[str, set[str]], top_files: set[str]) -> str:
    """The folder that holds train/ and test/: '' or the single top-level folder.

    top_dirs maps each top-level folder to the names of the folders inside it.
    """
    found = {d + "/" for d in top_dirs} | top_files
    if "train" in top_dirs or "test" in top_dirs:
        prefix = ""
        present = set(top_dirs)
    else:
        candidates = [d for d in top_dirs if not d.startswith((".", "__MACOSX"))]
        if len(candidates) != 1 or not ({"train", "test"} & top_dirs[candidates[0]]):
            raise _layout_error(root, found, "no train/ and test/ folders")
        prefix = candidates[0]
        present = top_dirs[prefix]
    for split in SPLITS:
        if split not in present:
            where = f"{prefix}/" if prefix else "the top level"
            others = sorted(present - {split})
            raise _layout_error(
                root,
                found,
                f"no {split}/ folder at {where} (it holds: {', '.join(d + '/' for d in others) or 'nothing'})",
            )
    return prefix


def _build_listing(
    root: Path, per_split: dict[str, dict[str, list[tuple[str, object]]]], identity: str, base: str
) -> _Listing:
    """Check classes (non-empty, test subset of train) and order everything."""
    train_classes = sorted(per_split["train"])
    if not train_classes:
        raise DataError(f"{root}: {base}train/ has no class folders; put the training images in train/<class>/<image>")
    for split in SPLITS:
        for class_name, entries in per_split[split].items():
            if not entries:
                raise DataError(
                    f"{root}: class folder {base}{split}/{class_name}/ has no images (files ending in "
                    f"{', '.join(IMAGE_EXTENSIONS)}); add images to it or remove the folder"
                )
    if not any(per_split["test"].values()):
        raise DataError(
            f"{root}: {base}test/ has no class folders with images; put the test images in "
            f"test/<class>/<image>, with class folder names as in train/"
        )
    extra = sorted(set(per_split["test"]) - set(train_classes))
    if extra:
        raise DataError(
            f"{root}: {base}test/ has classes that are not in {base}train/: {', '.join(extra)}; every "
            f"test class needs a train/ folder of the same name (labels are the sorted train/ folder names)"
        )
    files = {
        split: [sorted(per_split[split].get(c, []), key=lambda e: e[0]) for c in train_classes] for split in SPLITS
    }
    return _Listing(train_classes, files, identity)


class _FolderSource:
    """An image-folder dataset on disk."""

    def __init__(self, root: Path):
        self.root = root
        self._listing: _Listing | None = None

    def close(self) -> None:
        pass

    def identity(self) -> str:
        return self.listing().identity

    def listing(self) -> _Listing:
        if self._listing is not None:
            return self._listing
        top_dirs: dict[str, set[str]] = {}
        top_files: set[str] = set()
        for entry in os.scandir(self.root):
            if entry.is_dir():
                top_dirs[entry.name] = {e.name for e in os.scandir(entry.path) if e.is_dir()}
            else:
                top_files.add(entry.name)
        prefix = _find_prefix(self.root, top_dirs, top_files)
        base = self.root / prefix if prefix else self.root
        digest = hashlib.sha256(f"folder:{base.resolve()}".encode())
        per_split: dict[str, dict[str, list[tuple[str, object]]]] = {}
        for split in SPLITS:
            classes: dict[str, list[tuple[str, object]]] = {}
            # Sorted walk, so the digest does not depend on the file system's listing order.
            for class_entry in sorted(os.scandir(base / split), key=lambda e: e.name):
                if not class_entry.is_dir() or class_entry.name.startswith("."):
                    continue
                entries = classes.setdefault(class_entry.name, [])
                for dirpath, dirnames, filenames in os.walk(class_entry.path):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    for filename in sorted(filenames):
                        if not _is_image(filename):
                            continue
                        path = Path(dirpath) / filename
                        rel = path.relative_to(self.root).as_posix()
                        st = path.stat()
                        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                        entries.append((rel, path))
            per_split[split] = classes
        self._listing = _build_listing(self.root, per_split, digest.hexdigest(), f"{prefix}/" if prefix else "")
        return self._listing

    def read(self, handles: Sequence[object]) -> Iterable[bytes]:
        for path in handles:
            yield Path(path).read_bytes()  # type: ignore[arg-type]


class _TarSource:
    """An image-folder dataset inside a .tar / .tar.gz / .tgz archive."""

    def __init__(self, root: Path):
        self.root = root
        st = root.stat()
        self._identity = f"archive:{root.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        self._archive: tarfile.TarFile | None = None
        self._listing: _Listing | None = None

    def identity(self) -> str:
        return self._identity

    def _open(self) -> tarfile.TarFile:
        if self._archive is None:
            self._archive = tarfile.open(self.root, "r:*")
        return self._archive

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    def listing(self) -> _Listing:
        if self._listing is not None:
            return self._listing
        members = self._open().getmembers()
        paths: list[tuple[tuple[str, ...], tarfile.TarInfo | None]] = []
        top_dirs: dict[str, set[str]] = {}
        top_files: set[str] = set()
        for member in members:
            parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
            if not parts or not (member.isdir() or member.isfile()):
                continue
            if member.isfile() and len(parts) == 1:
                top_files.add(parts[0])
                continue
            top_dirs.setdefault(parts[0], set())
            if len(parts) >= 3 or (len(parts) == 2 and member.isdir()):
                top_dirs[parts[0]].add(parts[1])
            paths.append((parts, member if member.isfile() else None))
        prefix = _find_prefix(self.root, top_dirs, top_files)
        skip = 1 if prefix else 0
        per_split: dict[str, dict[str, list[tuple[str, object]]]] = {s: {} for s in SPLITS}
        for parts, member in paths:
            if skip and parts[0] != prefix:
                continue
            inner = parts[skip:]
            if len(inner) < 2 or inner[0] not in per_split or inner[1].startswith("."):
                continue
            entries = per_split[inner[0]].setdefault(inner[1], [])
            if member is not None and len(inner) >= 3 and _is_image(inner[-1]):
                entries.append(("/".join(parts), member))
        self._listing = _build_listing(self.root, per_split, self._identity, f"{prefix}/" if prefix else "")
        return self._listing

    def read(self, handles: Sequence[object]) -> Iterable[bytes]:
        archive = self._open()
        for member in handles:
            f = archive.extractfile(member)  # type: ignore[arg-type]
            if f is None:
                raise tarfile.ReadError(f"member {member.name} has no data")  # type: ignore[attr-defined]
            yield f.read()


class _BadImage(Exception):
    pass


def _decode(data: bytes, image_size: int) -> np.ndarray:
    """JPEG/PNG/... bytes -> uint8 (H, W, 3); resized to (image_size, image_size) when > 0."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if image_size > 0 and img.size != (image_size, image_size):
                # PIL's bilinear filter widens its support when shrinking, i.e. it antialiases.
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 -- PIL raises many types on bad data
        raise _BadImage(f"{type(err).__name__}: {err}") from None


def _read_order(handle: object) -> int:
    # Archive members are read in archive order so a compressed stream is never rewound.
    return getattr(handle, "offset", 0)


def _decode_split(
    source: _FolderSource | _TarSource,
    split: str,
    max_n: int,
    *,
    image_size: int,
    on_bad_image: str,
    progress: bool,
    name: str,
) -> tuple[SplitData, list[str]]:
    """Decode one split (class-balanced first max_n when > 0); returns the data and skipped files."""
    listing = source.listing()
    per_class = listing.files[split]
    _check_max_n(max_n, sum(len(entries) for entries in per_class), split, str(source.root))
    decoded: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    first: tuple[str, tuple[int, ...]] | None = None
    bar = None

    def decode(new: list[tuple[str, object]]) -> list[tuple[str, object]]:
        nonlocal first, bar
        todo = sorted(new, key=lambda e: _read_order(e[1]))
        if bar is None and progress and len(todo) >= PROGRESS_MIN_IMAGES:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"decoding {name} {split}", unit="img", leave=False)
        elif bar is not None:
            bar.total += len(todo)
        unreadable = []
        for (rel, handle), data in zip(todo, source.read([handle for _, handle in todo]), strict=True):
            try:
                pixels = _decode(data, image_size)
            except _BadImage as err:
                if on_bad_image != "skip":
                    raise DataError(
                        f"cannot read image {rel} in {source.root} ({err}); delete or replace the file, "
                        f"or set data.on_bad_image=skip to leave unreadable images out"
                    ) from None
                bad[rel] = str(err)
                unreadable.append((rel, handle))
                continue
            finally:
                if bar is not None:
                    bar.update(1)
            if first is None:
                first = (rel, pixels.shape)
            elif pixels.shape != first[1]:
                raise DataError(
                    f"images in {source.root} differ in size: {first[0]} is {first[1][1]}x{first[1][0]} "
                    f"but {rel} is {pixels.shape[1]}x{pixels.shape[0]}; set data.image_size=N to resize "
                    f"every image to NxN"
                )
            decoded[rel] = pixels
        return unreadable

    try:
        chosen = _choose_readable(per_class, max_n, decode, split=split, what=str(source.root))
    finally:
        if bar is not None:
            bar.close()
    entries = [e for class_entries in chosen for e in class_entries]
    labels = np.concatenate(
        [np.full(len(c), k, dtype=np.int64) for k, c in enumerate(chosen)] + [np.zeros(0, np.int64)]
    )
    if entries:
        images = np.stack([decoded[rel].transpose(2, 0, 1) for rel, _ in entries])
    else:
        size = image_size if image_size > 0 else 0
        images = np.zeros((0, 3, size, size), dtype=np.uint8)
    return SplitData(images, labels, list(listing.class_names)), sorted(bad)


# --------------------------------------------------------------------------------------------------
# Decoded-uint8 cache


def cache_dir(configured: str = "") -> Path:
    """cfg.data.cache_dir, else $FASTLOCAL_CACHE, else ~/.cache/fastlocal."""
    return Path(configured or os.environ.get("FASTLOCAL_CACHE") or Path.home() / ".cache" / "fastlocal").expanduser()


def _cache_key(identity: str, split: str, max_n: int, image_size: int, on_bad_image: str) -> str:
    return f"v{CACHE_VERSION}|{identity}|{split}|{max_n}|{image_size}|{on_bad_image}"


def _cache_path(directory: Path, name: str, split: str, key: str) -> Path:
    return directory / f"{name}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def _load_cache(path: Path, key: str) -> tuple[SplitData, list[str]] | None:
    """The cached split, or None when absent, unreadable or for another key."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            images, labels = npz["images"], npz["labels"]
            class_names = [str(c) for c in npz["class_names"]]
            skipped = [str(s) for s in npz["skipped"]]
        if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (len(images),):
            return None
        return SplitData(images, labels.astype(np.int64, copy=False), class_names), skipped
    except Exception:  # noqa: BLE001 -- a broken cache is ignored and rewritten
        return None


def save_npz_atomic(path: Path, what: str, redo: str, **arrays: np.ndarray) -> None:
    """Write `arrays` to `path` atomically (temporary file + rename); a cache that cannot be written only
    warns (`what` names it, `redo` says what happens next run)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.chmod(tmp, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        warnings.warn(
            f"could not write the {what} {path} ({err}); {redo} next run. Set data.cache_dir or "
            f"$FASTLOCAL_CACHE to a writable folder",
            stacklevel=4,
        )


def _save_cache(path: Path, key: str, data: SplitData, skipped: list[str]) -> None:
    save_npz_atomic(path, "decoded-image cache", "the images will be decoded again", key=np.array(key),
                    images=data.images, labels=data.labels, class_names=np.array(data.class_names, dtype=str),
                    skipped=np.array(skipped, dtype=str))


def read_imagefolder(
    root: str | Path,
    *,
    max_train: int = 0,
    max_test: int = 0,
    image_size: int = 0,
    on_bad_image: str = "error",
    cache: str | Path | None = None,
    progress: bool = True,
    name: str = "imagefolder",
) -> dict[str, SplitData]:
    """Both splits of an image-folder dataset, decoded (or loaded from the cache when `cache` is set).

    root: a folder or .tar/.tar.gz/.tgz archive with train/<class>/* and test/<class>/*, optionally
    under one top-level folder. Returns {"train": ..., "test": ...}; labels index the sorted train/
    class folder names.
    """
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise DataError(
            f"data.root {root} does not exist; set data.root to a folder or .tar/.tar.gz archive holding "
            f"train/<class>/* and test/<class>/*"
        )
    max_n = {"train": max_train, "test": max_test}
    source: _FolderSource | _TarSource
    try:
        source = _FolderSource(root) if root.is_dir() else _TarSource(root)
        result: dict[str, SplitData] = {}
        skipped: dict[str, list[str]] = {}
        keys = {}
        for split in SPLITS:
            if cache is None:
                continue
            keys[split] = _cache_key(source.identity(), split, max_n[split], image_size, on_bad_image)
            hit = _load_cache(_cache_path(Path(cache), name, split, keys[split]), keys[split])
            if hit is not None:
                result[split], skipped[split] = hit
        try:
            for split in SPLITS:
                if split in result:
                    continue
                result[split], skipped[split] = _decode_split(
                    source,
                    split,
                    max_n[split],
                    image_size=image_size,
                    on_bad_image=on_bad_image,
                    progress=progress,
                    name=name,
                )
                if cache is not None:
                    _save_cache(
                        _cache_path(Path(cache), name, split, keys[split]), keys[split], result[split], skipped[split]
                    )
        finally:
            source.close()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        if root.is_dir():
            raise DataError(
                f"cannot read the image folder {root} ({type(err).__name__}: {err}); check that the files "
                f"under it are readable"
            ) from None
        raise DataError(
            f"cannot read the archive {root}: it is truncated, corrupt or not a .tar/.tar.gz/.tgz archive "
            f"({type(err).__name__}: {err}); re-download or re-create it (compare its size with the "
            f"original), or extract it and set data.root to the extracted folder"
        ) from None
    all_skipped = [s for split in SPLITS for s in skipped.get(split, [])]
    if all_skipped:
        warnings.warn(
            f"{name}: skipped {len(all_skipped)} unreadable image(s) in {root} (data.on_bad_image=skip), "
            f"e.g. {all_skipped[0]}",
            stacklevel=2,
        )
    return result
