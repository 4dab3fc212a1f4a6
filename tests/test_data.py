"""Tests for fastlocal/data: readers on tiny hand-written files, the cache, errors, sharding, the device loader."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastlocal.config import DataConfig, UserError
from fastlocal.data import DataBundle, DataError, DatasetInfo, DeviceLoader, Loader, build_data, read_splits, sources
from fastlocal.data.loader import reflect_index, shard_indices
from fastlocal.data.sources import balanced_quotas, read_imagefolder, read_native

SHARED_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CPU = torch.device("cpu")


def build(cfg: DataConfig, **kwargs) -> DataBundle:
    options = dict(batch_size=4, eval_batch_size=5, device=CPU, seed=0, progress=False)
    options.update(kwargs)
    return build_data(cfg, **options)


# --------------------------------------------------------------------------------------------------
# Native formats (torchvision's readers; their md5 checks would reject hand-written files)


@pytest.fixture
def unchecked_md5(monkeypatch):
    import torchvision.datasets

    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.stl10):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)


def write_cifar(root: Path, labels_per_batch: list[list[int]]) -> list[np.ndarray]:
    """Five train batches and a test batch (the last list) as pickles with CIFAR-10's keys; returns the data."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    arrays = []
    for name, labels in zip(names, labels_per_batch, strict=True):
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with (folder / name).open("wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        arrays.append(data)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_vis": 3072}, f)
    return arrays


def test_cifar10_reader_reads_pixels_and_labels_exactly(tmp_path, unchecked_md5):
    labels = [[i % 10 for i in range(b * 3, b * 3 + 3)] for b in range(5)] + [[9, 0, 4, 4]]
    arrays = write_cifar(tmp_path, labels)
    train = read_native("cifar10", tmp_path, "train")
    test = read_native("cifar10", tmp_path, "test")
    assert train.images.dtype == np.uint8 and train.images.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(train.images.reshape(15, -1), np.concatenate(arrays[:5]))
    # CHW order: the first 1024 bytes are the red plane, row-major.
    np.testing.assert_array_equal(train.images[4, 0], arrays[1][1, :1024].reshape(32, 32))
    np.testing.assert_array_equal(train.images[4, 2, 5, 7], arrays[1][1, 2048 + 5 * 32 + 7])
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [i % 10 for i in range(15)]
    assert test.labels.tolist() == [9, 0, 4, 4] and test.images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(test.images.reshape(4, -1), arrays[5])
    assert train.class_names == CIFAR_CLASSES


def test_svhn_reader_maps_label_10_to_0(tmp_path, unchecked_md5):
    scipy_io = pytest.importorskip("scipy.io", reason="SVHN's .mat files need scipy (a dependency of fastlocal)")

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    data = read_native("svhn", tmp_path, "train")
    assert data.images.shape == (5, 3, 32, 32) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 1, 2, 0, 9]
    for i in range(5):
        np.testing.assert_array_equal(data.images[i], x[:, :, :, i].transpose(2, 0, 1))
    assert data.images[3, 1, 4, 6] == x[4, 6, 1, 3]  # (row, column, channel, image)


def test_stl10_reader_transposes_column_major_pixels(tmp_path, unchecked_md5):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    # Column-major per channel plane: byte (n, c, column, row) holds pixel (n, c, row, column).
    raw = images.transpose(0, 1, 3, 2).tobytes()
    (folder / "test_X.bin").write_bytes(raw)
    (folder / "test_y.bin").write_bytes(bytes([1, 10, 5]))
    data = read_native("stl10", tmp_path, "test")
    np.testing.assert_array_equal(data.images, images)
    assert data.labels.tolist() == [0, 9, 4]
    # The same convention spelled out on raw bytes: image 1, channel 2, row 3, column 70.
    assert data.images[1, 2, 3, 70] == raw[1 * 3 * 9216 + 2 * 9216 + 70 * 96 + 3]
    assert len(data.class_names) == 10


def test_native_max_train_is_class_balanced_in_file_order(tmp_path, unchecked_md5):
    labels = [[i % 10 for i in range(b * 12, b * 12 + 12)] for b in range(5)] + [[k for k in range(10)]]
    arrays = write_cifar(tmp_path, labels)
    bundle = build(DataConfig(source="cifar10", root=str(tmp_path), max_train=25, max_test=10))
    all_labels = np.array([label for batch in labels[:5] for label in batch])
    # 25 over 10 classes: 3 each for classes 0..4, 2 each for 5..9, each class's first images.
    quotas = [3] * 5 + [2] * 5
    keep = np.sort(np.concatenate([np.flatnonzero(all_labels == k)[:q] for k, q in enumerate(quotas)]))
    train = bundle.train
    assert train.num_images == 25
    assert train.labels.tolist() == all_labels[keep].tolist()
    np.testing.assert_array_equal(train.images.reshape(25, -1).numpy(), np.concatenate(arrays[:5])[keep])
    assert bundle.test.num_images == 10


def test_balanced_quotas():
    assert balanced_quotas([5, 5, 5], 7) == [3, 2, 2]
    assert balanced_quotas([5, 5, 5], 15) == [5, 5, 5]
    assert balanced_quotas([1, 10, 10], 9) == [1, 4, 4]
    assert balanced_quotas([1, 10, 10], 10) == [1, 5, 4]
    assert balanced_quotas([0, 3, 3], 4) == [0, 2, 2]
    assert balanced_quotas([2, 9, 3, 9], 20) == [2, 8, 3, 7]
    assert balanced_quotas([2, 5, 5], 7) == [2, 3, 2]  # class 0 is used up exactly when the extra one is handed out
    with pytest.raises(ValueError):
        balanced_quotas([1, 1], 3)


def test_native_sources_never_download_and_say_where_files_go(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for name in ("CIFAR10", "SVHN", "STL10"):
        monkeypatch.setattr(getattr(torchvision.datasets, name), "download", no_download)
    for source, where in (("cifar10", "cifar-10-batches-py/"), ("svhn", "train_32x32.mat"), ("stl10", "stl10_binary/")):
        with pytest.raises(DataError, match=rf"{source}: cannot read {where}.*never downloads.*copy") as info:
            build(DataConfig(source=source, root=str(tmp_path)))
        assert isinstance(info.value, UserError) and str(tmp_path) in str(info.value)
        assert "data.root" in str(info.value) and "imagefolder" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Image folders


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_spec(seed: int = 0, size: int = 16, per_class: dict[str, int] | None = None) -> dict:
    """{split: {class: {file name: HWC uint8 pixels}}}; classes and files created out of sorted order."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"zebra": 3, "apple": 3, "mango": 3}
    spec = {}
    for split, extra in (("train", 0), ("test", -1)):
        spec[split] = {}
        for class_name, count in per_class.items():
            names = [f"{n:02d}.png" for n in reversed(range(count + extra))]
            spec[split][class_name] = {n: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for n in names}
    return spec


def write_folder(root: Path, spec: dict) -> Path:
    for split, classes in spec.items():
        for class_name, files in classes.items():
            (root / split / class_name).mkdir(parents=True, exist_ok=True)
            for name, pixels in files.items():
                data = pixels if isinstance(pixels, bytes) else png_bytes(pixels)
                (root / split / class_name / name).write_bytes(data)
    return root


def write_tar(path: Path, spec: dict, prefix: str = "") -> Path:
    mode = "w:gz" if path.name.endswith(("gz", "tgz")) else "w"
    with tarfile.open(path, mode) as archive:
        for split, classes in spec.items():
            for class_name, files in classes.items():
                for name, pixels in files.items():
                    data = pixels if isinstance(pixels, bytes) else png_bytes(pixels)
                    info = tarfile.TarInfo(f"{prefix}{split}/{class_name}/{name}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return path


def expected_split(spec: dict, split: str) -> tuple[np.ndarray, list[int]]:
    images, labels = [], []
    for label, class_name in enumerate(sorted(spec["train"])):
        files = spec[split].get(class_name, {})
        for name in sorted(files):
            images.append(files[name].transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images), labels


@pytest.mark.parametrize(
    "kind, prefix", [("folder", ""), ("folder", "top/"), ("tar", ""), ("tar", "top/"), ("tar.gz", "top/"), ("tgz", "")]
)
def test_imagefolder_reads_folders_and_archives(tmp_path, kind, prefix):
    spec = make_spec()
    if kind == "folder":
        root = tmp_path / "data"
        write_folder(root / prefix, spec)
    else:
        root = write_tar(tmp_path / f"data.{kind}", spec, prefix)
    splits = read_imagefolder(root, cache=tmp_path / "cache", progress=False)
    assert splits["train"].class_names == ["apple", "mango", "zebra"]
    for split in ("train", "test"):
        images, labels = expected_split(spec, split)
        np.testing.assert_array_equal(splits[split].images, images)
        assert splits[split].labels.tolist() == labels
        assert splits[split].images.dtype == np.uint8 and splits[split].labels.dtype == np.int64


def test_imagefolder_max_train_is_class_balanced_in_sorted_name_order(tmp_path):
    spec = make_spec()
    root = write_tar(tmp_path / "data.tar.gz", spec, "top/")
    splits = read_imagefolder(root, max_train=5, max_test=4, cache=tmp_path / "cache", progress=False)
    train, test = splits["train"], splits["test"]
    assert train.labels.tolist() == [0, 0, 1, 1, 2]
    first = [("apple", "00.png"), ("apple", "01.png"), ("mango", "00.png"), ("mango", "01.png"), ("zebra", "00.png")]
    expected = [spec["train"][c][n].transpose(2, 0, 1) for c, n in first]
    np.testing.assert_array_equal(train.images, np.stack(expected))
    assert test.labels.tolist() == [0, 0, 1, 2]
    with pytest.raises(DataError, match=r"data.max_train = 10 is larger .* has 9 images"):
        read_imagefolder(root, max_train=10, cache=tmp_path / "cache", progress=False)


def test_imagefolder_decodes_jpeg_and_resizes(tmp_path):
    rng = np.random.default_rng(3)
    smooth = np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((6, 6, 1), np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    spec = {
        "train": {"a": {"0.jpg": buffer.getvalue()}, "b": {"0.png": png_bytes(smooth[:12, :12])}},
        "test": {"a": {"0.jpg": buffer.getvalue()}},
    }
    root = write_folder(tmp_path / "d", spec)
    with pytest.raises(DataError, match=r"differ in size: .*24x24.*12x12.*data\.image_size"):
        read_imagefolder(root, cache=tmp_path / "cache", progress=False)
    splits = read_imagefolder(root, image_size=8, cache=tmp_path / "cache", progress=False)
    assert splits["train"].images.shape == (2, 3, 8, 8)
    splits = read_imagefolder(root, image_size=24, cache=tmp_path / "cache", progress=False)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(splits["train"].images[0], decoded.transpose(2, 0, 1))
    assert np.abs(decoded.astype(int) - smooth).mean() < 16  # lossy, but the same picture


@pytest.fixture(scope="module")
def bundled_splits(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return read_splits(DataConfig(source="bundled", cache_dir=str(cache)), progress=False), cache


def test_bundled_subset_loads(bundled_splits):
    splits, cache = bundled_splits
    train, test = splits["train"], splits["test"]
    assert train.class_names == CIFAR_CLASSES
    assert train.images.shape == (10000, 3, 32, 32) and test.images.shape == (2000, 3, 32, 32)
    assert np.bincount(train.labels).tolist() == [1000] * 10
    assert np.bincount(test.labels).tolist() == [200] * 10
    assert len(list(cache.glob("bundled-*.npz"))) == 2
    info = build(DataConfig(source="bundled", cache_dir=str(cache), max_train=100, max_test=50)).info
    assert info == DatasetInfo(
        name="bundled",
        num_classes=10,
        image_size=32,
        class_names=CIFAR_CLASSES,
        mean=(125.3 / 255, 123.0 / 255, 113.9 / 255),
        std=(63.0 / 255, 62.1 / 255, 66.7 / 255),
        pad=4,
        pad_mode="reflect",
        flip=True,
    )


def test_bundled_subset_matches_the_shared_archive(bundled_splits):
    if not SHARED_ARCHIVE.is_file():
        pytest.skip(f"shared archive {SHARED_ARCHIVE} not present")
    with tarfile.open(SHARED_ARCHIVE, "r|gz") as archive:  # stream: stop at the member
        member = next(m for m in archive if m.name == "cifar10-jpeg/train/bird/0000.jpg")
        pixels = np.asarray(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB"))
    train = bundled_splits[0]["train"]
    np.testing.assert_array_equal(train.images[2000], pixels.transpose(2, 0, 1))


def test_shared_archive_class_balanced_subset(tmp_path_factory):
    if not SHARED_ARCHIVE.is_file():
        pytest.skip(f"shared archive {SHARED_ARCHIVE} not present")
    # Extracting its 60,000 files takes a while: keep the extraction (keyed by the archive's path, size and
    # mtime, published only when complete) beside pytest's per-run folders for later runs.
    cache = tmp_path_factory.getbasetemp().parent / "fastlocal-test-extracted"
    splits = read_imagefolder(SHARED_ARCHIVE, max_train=200, max_test=100, cache=cache, progress=False)
    train, test = splits["train"], splits["test"]
    assert train.class_names == CIFAR_CLASSES
    assert train.images.shape == (200, 3, 32, 32) and test.images.shape == (100, 3, 32, 32)
    assert np.bincount(train.labels).tolist() == [20] * 10
    assert np.bincount(test.labels).tolist() == [10] * 10


# --------------------------------------------------------------------------------------------------
# Cache


def test_cache_is_written_reused_and_rewritten_when_broken(tmp_path, monkeypatch):
    spec = make_spec()
    root = write_folder(tmp_path / "d", spec)
    cache = tmp_path / "cache"
    first = read_imagefolder(root, max_train=4, cache=cache, progress=False)
    files = sorted(cache.glob("imagefolder-*.npz"))
    assert len(files) == 2 and not list(cache.glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as patch:
        patch.setattr(sources, "_decode", no_decoding)
        again = read_imagefolder(root, max_train=4, cache=cache, progress=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(again[split].images, first[split].images)
        np.testing.assert_array_equal(again[split].labels, first[split].labels)
        assert again[split].class_names == first[split].class_names

    for path in files:
        path.write_bytes(b"not an npz file")
    rebuilt = read_imagefolder(root, max_train=4, cache=cache, progress=False)
    np.testing.assert_array_equal(rebuilt["train"].images, first["train"].images)
    with monkeypatch.context() as patch:
        patch.setattr(sources, "_decode", no_decoding)
        read_imagefolder(root, max_train=4, cache=cache, progress=False)  # rewritten, so loadable again

    # A changed file (new mtime) is a different source: decoded again, new content.
    new_pixels = np.zeros((16, 16, 3), np.uint8)
    target = root / "train" / "apple" / "00.png"
    target.write_bytes(png_bytes(new_pixels))
    os.utime(target, ns=(1, 1))
    changed = read_imagefolder(root, max_train=4, cache=cache, progress=False)
    np.testing.assert_array_equal(changed["train"].images[0], new_pixels.transpose(2, 0, 1))


# --------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("suffix", ["tar.gz", "tar"])
def test_truncated_archive(tmp_path, suffix):
    path = write_tar(tmp_path / f"data.{suffix}", make_spec(size=32), "top/")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"data\.{suffix}: it is truncated, corrupt"):
        read_imagefolder(path, cache=tmp_path / "cache", progress=False)


def test_not_an_archive(tmp_path):
    path = tmp_path / "data.tar.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(DataError, match=r"truncated, corrupt or not a \.tar"):
        read_imagefolder(path, cache=tmp_path / "cache", progress=False)


def corrupt_spec() -> dict:
    spec = make_spec(per_class={"cat": 3, "dog": 3})
    spec["train"]["cat"]["01.jpg"] = b"this is not a jpeg"
    return spec


def test_corrupt_image_is_an_error_by_default(tmp_path):
    root = write_folder(tmp_path / "d", corrupt_spec())
    with pytest.raises(DataError, match=r"cannot read image train/cat/01.jpg .*data\.on_bad_image=skip"):
        read_imagefolder(root, cache=tmp_path / "cache", progress=False)


def test_corrupt_image_is_skipped_and_replaced(tmp_path):
    spec = corrupt_spec()
    root = write_tar(tmp_path / "d.tar.gz", spec)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable train image\(s\).*train/cat/01.jpg"):
        splits = read_imagefolder(root, on_bad_image="skip", cache=tmp_path / "cache", progress=False)
    # cat: 00.png 01.jpg (unreadable) 01.png 02.png
    assert splits["train"].labels.tolist() == [0, 0, 0, 1, 1, 1]
    # Class-balanced subset: the unreadable file is replaced by the next one of its class.
    with pytest.warns(UserWarning, match="skipped 1"):
        splits = read_imagefolder(root, on_bad_image="skip", max_train=4, cache=tmp_path / "cache", progress=False)
    cats = spec["train"]["cat"]
    np.testing.assert_array_equal(splits["train"].images[1], cats["01.png"].transpose(2, 0, 1))
    assert splits["train"].labels.tolist() == [0, 0, 1, 1]
    # From the cache the warning comes again.
    cache = tmp_path / "cache"
    for _ in range(2):
        with pytest.warns(UserWarning, match="skipped 1"):
            read_imagefolder(root, on_bad_image="skip", cache=cache, progress=False)


def test_zero_byte_image_is_named_or_counted(tmp_path):
    spec = make_spec(per_class={"cat": 2, "dog": 2})
    spec["train"]["dog"]["00.jpg"] = b""
    root = write_folder(tmp_path / "d", spec)
    with pytest.raises(DataError, match=r"cannot read image train/dog/00.jpg .*data\.on_bad_image=skip"):
        read_imagefolder(root, cache=tmp_path / "cache", progress=False)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable train image\(s\).*train/dog/00.jpg"):
        splits = read_imagefolder(root, on_bad_image="skip", cache=tmp_path / "cache", progress=False)
    assert splits["train"].labels.tolist() == [0, 0, 1, 1]


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


@pytest.mark.parametrize("kind", ["parent", "symlink", "hardlink", "absolute"])
def test_archive_members_never_write_outside_the_extraction(tmp_path, kind):
    archive = write_tar(tmp_path / "d.tar", make_spec())
    outside = tmp_path / "outside.txt"
    with tarfile.open(archive, "a") as tar:
        info = tarfile.TarInfo({"parent": "../../outside.txt", "absolute": str(outside)}.get(kind, "train/apple/x.png"))
        if kind in ("symlink", "hardlink"):
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = str(outside) if kind == "hardlink" else "../../../../outside.txt"
            tar.addfile(info)
        else:
            info.size = 7
            tar.addfile(info, io.BytesIO(b"escaped"))
    before = files_under(tmp_path)
    cache = tmp_path / "cache"
    if kind == "absolute":  # the data filter strips the leading slash: the file lands inside the extraction
        read_imagefolder(archive, cache=cache, progress=False)
        assert [p for p in cache.rglob("outside.txt")][0].is_relative_to(cache / "extracted")
    else:
        with pytest.raises(DataError, match=r"would write or link outside the folder it is extracted to"):
            read_imagefolder(archive, cache=cache, progress=False)
        assert files_under(tmp_path) == before  # nothing written anywhere, the partial extraction removed
    assert not outside.exists()


def test_missing_test_folder(tmp_path):
    spec = make_spec()
    del spec["test"]
    root = write_folder(tmp_path / "d", spec)
    with pytest.raises(DataError, match=r"no test/ folder at the top level \(it holds: train/\).*test/<class>"):
        read_imagefolder(root, cache=tmp_path / "cache", progress=False)
    archive = write_tar(tmp_path / "d.tar", spec, "top/")
    with pytest.raises(DataError, match=r"no test/ folder at top/"):
        read_imagefolder(archive, cache=tmp_path / "cache", progress=False)


def test_no_split_folders_at_all(tmp_path):
    (tmp_path / "d" / "cats").mkdir(parents=True)
    (tmp_path / "d" / "dogs").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no train/ and test/ folder at the top level \(it holds: cats/, dogs/\)"):
        read_imagefolder(tmp_path / "d", cache=tmp_path / "cache", progress=False)


def test_empty_class_folder(tmp_path):
    root = write_folder(tmp_path / "d", make_spec())
    (root / "train" / "kiwi").mkdir()
    (root / "train" / "kiwi" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder train/kiwi/ has no images"):
        read_imagefolder(root, cache=tmp_path / "cache", progress=False)


def test_test_classes_must_be_train_classes(tmp_path):
    spec = make_spec()
    spec["test"]["kiwi"] = {"0.png": np.zeros((16, 16, 3), np.uint8)}
    root = write_folder(tmp_path / "d", spec)
    with pytest.raises(DataError, match=r"test/ has classes that are not in train/: kiwi"):
        read_imagefolder(root, cache=tmp_path / "cache", progress=False)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist; set data.root"):
        build(DataConfig(source="imagefolder", root=str(tmp_path / "nowhere")))


def test_non_square_images_need_image_size(tmp_path):
    spec = {s: {"a": {"0.png": np.zeros((8, 12, 3), np.uint8)}} for s in ("train", "test")}
    root = write_folder(tmp_path / "d", spec)
    with pytest.raises(DataError, match=r"12x8, but the models need square images; set data.image_size"):
        build(DataConfig(source="imagefolder", root=str(root), cache_dir=str(tmp_path / "c")))


# --------------------------------------------------------------------------------------------------
# build_data recipes


def test_recipe_defaults_and_overrides(tmp_path, unchecked_md5):
    write_cifar(tmp_path, [[i % 10 for i in range(10)]] * 5 + [[0, 1]])
    cfg = DataConfig(source="cifar10", root=str(tmp_path))
    bundle = build(cfg, drop_last=True, batch_size=8, eval_batch_size=3)
    info = bundle.info
    assert (info.name, info.num_classes, info.image_size) == ("cifar10", 10, 32)
    assert (info.pad, info.pad_mode, info.flip) == (4, "reflect", True)
    assert info.mean == pytest.approx((0.4914, 0.4824, 0.4467), abs=1e-4)
    assert info.std == pytest.approx((0.2471, 0.2435, 0.2616), abs=1e-4)
    train, test = bundle.train, bundle.test
    assert train.train and train.drop_last and len(train) == 50 // 8 and train.pad == 4 and train.flip
    assert not test.train and len(test) == 1 and test.num_images == 2
    cfg = DataConfig(source="cifar10", root=str(tmp_path), normalize="imagenet", pad=2, pad_mode="constant", flip="off")
    info = build(cfg).info
    assert (info.pad, info.pad_mode, info.flip) == (2, "constant", False)
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    half = build(DataConfig(source="cifar10", root=str(tmp_path), normalize="half")).info
    assert half.mean == half.std == (0.5, 0.5, 0.5)


def test_svhn_and_stl10_recipes(tmp_path, unchecked_md5):
    scipy_io = pytest.importorskip("scipy.io", reason="SVHN's .mat files need scipy (a dependency of fastlocal)")

    x = np.zeros((32, 32, 3, 4), np.uint8)
    for split in ("train", "test"):
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3]])})
    info = build(DataConfig(source="svhn", root=str(tmp_path))).info
    assert (info.pad, info.pad_mode, info.flip, info.mean, info.std) == (2, "constant", False, (0.5,) * 3, (0.5,) * 3)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}_X.bin").write_bytes(bytes(2 * 3 * 96 * 96))
        (folder / f"{split}_y.bin").write_bytes(bytes([1, 2]))
    info = build(DataConfig(source="stl10", root=str(tmp_path))).info
    assert (info.image_size, info.pad, info.pad_mode, info.flip, info.mean) == (96, 4, "constant", True, (0.5,) * 3)


def test_imagefolder_recipe_uses_dataset_statistics(tmp_path):
    spec = make_spec(size=24)
    root = write_folder(tmp_path / "d", spec)
    bundle = build(DataConfig(source="imagefolder", root=str(root), cache_dir=str(tmp_path / "c")))
    info = bundle.info
    assert (info.name, info.num_classes, info.image_size) == ("imagefolder", 3, 24)
    assert (info.pad, info.pad_mode, info.flip) == (24 // 8, "reflect", True)
    images = expected_split(spec, "train")[0].astype(np.float64) / 255
    assert info.mean == pytest.approx(tuple(images.mean(axis=(0, 2, 3))), abs=1e-12)
    assert info.std == pytest.approx(tuple(images.std(axis=(0, 2, 3))), abs=1e-12)
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.num_images == 9


# --------------------------------------------------------------------------------------------------
# DeviceLoader


def make_loader(count=10, size=6, batch_size=4, **kwargs) -> DeviceLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(count)  # label = image index, to track each image through the shuffle
    options = dict(train=True, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    options.update(kwargs)
    return DeviceLoader(images, labels, batch_size, **options)


def collect(loader: DeviceLoader) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return xs, ys


def test_loader_shapes_dtypes_and_len():
    loader = make_loader(pad=2, flip=True)
    xs, ys = collect(loader)
    assert len(loader) == 3 == len(xs) and loader.num_images == 10
    assert [tuple(x.shape) for x in xs] == [(4, 3, 6, 6), (4, 3, 6, 6), (2, 3, 6, 6)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in zip(xs, ys, strict=True))
    dropping = make_loader(drop_last=True)
    assert len(dropping) == 2 == len(collect(dropping)[0])
    assert len(make_loader(count=8, drop_last=True)) == 2 == len(make_loader(count=8))
    assert len(make_loader(train=False, drop_last=True)) == 3  # eval never drops


def test_eval_is_ordered_and_exactly_normalised():
    loader = make_loader(train=False, pad=2, flip=True)
    xs, ys = collect(loader)
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    expected = (loader.images.float() / 255 - mean) / std
    assert torch.equal(torch.cat(xs), expected)
    assert torch.cat(ys).tolist() == list(range(10))


def test_every_image_once_per_epoch():
    loader = make_loader(count=23, batch_size=5, pad=1, flip=True)
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert sorted(torch.cat(collect(loader)[1]).tolist()) == list(range(23))
    loader = make_loader(count=23, batch_size=5, drop_last=True)
    seen = torch.cat(collect(loader)[1]).tolist()
    assert len(seen) == 20 == len(set(seen))


def test_same_seed_and_epoch_give_identical_batches():
    first = make_loader(count=50, batch_size=8, pad=2, flip=True, seed=7)
    second = make_loader(count=50, batch_size=8, pad=2, flip=True, seed=7)
    first.set_epoch(3)
    reference = collect(first)
    for _ in range(2):
        collect(second)  # iterate other epochs first: a resumed run
        second.set_epoch(second.epoch + 1)
    second.set_epoch(3)
    state = torch.get_rng_state()
    for run in (collect(first), collect(second)):
        for a, b in zip(reference[0] + reference[1], run[0] + run[1], strict=True):
            assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used


def test_different_epoch_or_seed_gives_different_order():
    loader = make_loader(count=50, batch_size=8)
    loader.set_epoch(0)
    order0 = torch.cat(collect(loader)[1])
    loader.set_epoch(1)
    order1 = torch.cat(collect(loader)[1])
    other_seed = make_loader(count=50, batch_size=8, seed=1)
    assert not torch.equal(order0, order1)
    assert not torch.equal(order0, torch.cat(collect(other_seed)[1]))


def test_no_pad_no_flip_is_identity_up_to_order():
    loader = make_loader(count=20, batch_size=6)
    for x, y in loader:
        assert torch.equal(x, loader.normalize(loader.images[y]))


def unnormalised(loader: DeviceLoader) -> tuple[np.ndarray, np.ndarray]:
    """All training outputs of one epoch as uint8 pixels, and their image indices."""
    xs, ys = collect(loader)
    pixels = (torch.cat(xs) * 255).round().to(torch.uint8).numpy()
    return pixels, torch.cat(ys).numpy()


@pytest.mark.parametrize("pad_mode, np_mode", [("reflect", "reflect"), ("constant", "constant")])
@pytest.mark.parametrize("flip", [False, True])
def test_crop_is_a_window_of_the_padded_image(pad_mode, np_mode, flip):
    size, pad, count = 5, 2, 200
    loader = make_loader(
        count=count, size=size, batch_size=32, pad=pad, pad_mode=pad_mode, flip=flip, mean=(0, 0, 0), std=(1, 1, 1)
    )
    pixels, index = unnormalised(loader)
    images = loader.images.numpy()
    offsets, flipped = set(), set()
    for out, i in zip(pixels, index, strict=True):
        padded = np.pad(images[i], ((0, 0), (pad, pad), (pad, pad)), mode=np_mode)  # zeros for constant
        matches = [
            (r, c, f)
            for r in range(2 * pad + 1)
            for c in range(2 * pad + 1)
            for f in ((False, True) if flip else (False,))
            if np.array_equal(out, (lambda w: w[:, :, ::-1] if f else w)(padded[:, r : r + size, c : c + size]))
        ]
        assert matches, f"output for image {i} is not a (flipped) window of its padded image"
        offsets.add(matches[0][:2])
        flipped.add(matches[0][2])
    assert len(offsets) == (2 * pad + 1) ** 2  # every offset occurs in 200 draws
    assert flipped == ({False, True} if flip else {False})


def test_reflect_padding_hand_made():
    # One 3x3 image with distinct values; the padded image by hand (reflect without repeating the edge).
    image = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=torch.uint8)
    assert reflect_index(3, 2).tolist() == [2, 1, 0, 1, 2, 1, 0]
    loader = DeviceLoader(
        image.expand(3, 3, 3).unsqueeze(0).contiguous(),
        torch.zeros(1, dtype=torch.int64),
        1,
        train=True,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        pad=1,
    )
    padded = [[5, 4, 5, 6, 5], [2, 1, 2, 3, 2], [5, 4, 5, 6, 5], [8, 7, 8, 9, 8], [5, 4, 5, 6, 5]]
    out = loader.augment(loader.images, torch.tensor([[0], [2]]), None)[0, 1]
    assert out.tolist() == [row[2:5] for row in padded[0:3]]
    out = loader.augment(loader.images, torch.tensor([[2], [1]]), torch.tensor([True]))[0, 0]
    assert out.tolist() == [row[1:4][::-1] for row in padded[2:5]]
    constant = DeviceLoader(
        loader.images, loader.labels, 1, train=True, mean=(0, 0, 0), std=(1, 1, 1), pad=1, pad_mode="constant"
    )
    out = constant.augment(constant.images, torch.tensor([[0], [0]]), None)[0, 2]
    assert out.tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]


def test_flip_only():
    loader = make_loader(count=64, size=4, batch_size=16, flip=True, mean=(0, 0, 0), std=(1, 1, 1))
    pixels, index = unnormalised(loader)
    images = loader.images.numpy()
    flips = []
    for out, i in zip(pixels, index, strict=True):
        if np.array_equal(out, images[i]):
            flips.append(False)
        else:
            np.testing.assert_array_equal(out, images[i][:, :, ::-1])
            flips.append(True)
    assert 16 < sum(flips) < 48


@pytest.mark.parametrize("num_items, world_size", [(10, 1), (10, 3), (7, 4), (2, 5)])
def test_shard_indices_follow_distributed_sampler(num_items, world_size):
    from torch.utils.data import DistributedSampler

    permutation = shard_indices(num_items, seed=3, epoch=2)
    assert sorted(permutation.tolist()) == list(range(num_items))
    for rank in range(world_size):
        # torch's rule applied to the epoch's permutation: padded by wrapping around, every world_size-th item.
        expected = list(DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=False))
        shard = shard_indices(num_items, seed=3, epoch=2, rank=rank, world_size=world_size)
        assert shard.tolist() == permutation[expected].tolist()
    assert not torch.equal(shard_indices(50, seed=3, epoch=2), shard_indices(50, seed=3, epoch=3))
    assert not torch.equal(shard_indices(50, seed=3, epoch=2), shard_indices(50, seed=4, epoch=2))
    with pytest.raises(ValueError, match="rank"):
        shard_indices(5, seed=0, epoch=0, rank=2, world_size=2)


def test_device_loader_ranks_read_their_shard():
    loaders = [make_loader(count=10, batch_size=3, pad=1, flip=True, rank=r, world_size=3) for r in range(3)]
    assert all(isinstance(loader, Loader) for loader in loaders)
    assert [loader.num_images for loader in loaders] == [4, 4, 4] and [len(loader) for loader in loaders] == [2] * 3
    order = shard_indices(10, seed=0, epoch=0).tolist()
    padded = order + order[:2]
    for rank, loader in enumerate(loaders):
        assert torch.cat(collect(loader)[1]).tolist() == padded[rank::3]  # labels are the image indices


def test_loader_rejects_bad_inputs():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images.float(), labels, 2, train=True, mean=(0,) * 3, std=(1,) * 3)
    with pytest.raises(ValueError, match=r"\(N,\) labels"):
        DeviceLoader(images, labels[:3], 2, train=True, mean=(0,) * 3, std=(1,) * 3)


def test_reflect_padding_must_be_smaller_than_the_images(tmp_path):
    root = write_folder(tmp_path / "d", make_spec(size=16))
    cfg = dict(source="imagefolder", root=str(root), cache_dir=str(tmp_path / "c"), pad_mode="reflect")
    with pytest.raises(DataError, match="reflect padding needs images larger than 16 pixels"):
        build(DataConfig(**cfg, pad=16))
    assert build(DataConfig(**cfg, pad=15)).info.pad == 15


@pytest.mark.gpu
def test_loader_on_cuda_matches_cpu_semantics():
    loader = make_loader(count=40, size=8, batch_size=16, pad=2, flip=True, mean=(0, 0, 0), std=(1, 1, 1))
    cuda = DeviceLoader(
        loader.images.cuda(), loader.labels.cuda(), 16, train=True, mean=(0, 0, 0), std=(1, 1, 1), pad=2, flip=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xs, ys = collect(cuda)
    assert xs[0].is_cuda and sorted(torch.cat(ys).tolist()) == list(range(40))
    again = collect(cuda)
    assert all(torch.equal(a, b) for a, b in zip(xs, again[0], strict=True))
    offsets = torch.tensor([[0, 4], [3, 1]])
    flips = torch.tensor([True, False])
    for mode in ("reflect", "constant"):
        loader.pad_mode = cuda.pad_mode = mode
        expected = loader.augment(loader.images[:2], offsets, flips)
        assert torch.equal(cuda.augment(cuda.images[:2], offsets.cuda(), flips.cuda()).cpu(), expected)


def test_a_device_loader_started_mid_epoch_yields_the_rest_of_the_epoch():
    """set_epoch(e, start_step=s), as a run resumed from a step checkpoint calls it: the batches s, s+1, ... of
    the whole epoch, pixels (crops and flips) and labels alike, and len() still the whole epoch's."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 8, 8), generator=g, dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(10), 3, train=True, mean=(0.5,) * 3, std=(0.5,) * 3, pad=2, flip=True)
    loader.set_epoch(2)
    whole = list(loader)
    loader.set_epoch(2, start_step=2)
    rest = list(loader)
    assert len(loader) == 4 and len(rest) == 2
    for (x, y), (x_whole, y_whole) in zip(rest, whole[2:], strict=True):
        assert torch.equal(x, x_whole) and torch.equal(y, y_whole)
