"""Tests for fastlocal/data/streaming.py (listing, archives, the torch loader) and fastlocal/data/dali.py.

DALI tests run DALI's CPU pipeline (``device_id=None``) and are skipped with a reason when nvidia.dali is
not installed; the ``mixed`` (GPU decode) test needs CUDA. Images in [0, 1] units: the loaders' outputs
are un-normalised with the bundle's mean and std before comparing.
"""

from __future__ import annotations

import importlib.util
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastlocal.config import DataConfig, build_config
from fastlocal.data import IMAGENET_MEAN, IMAGENET_STD, DataBundle, DataError, build_data, streaming
from fastlocal.data.sources import read_imagefolder
from fastlocal.data.streaming import (
    EXTRACTED_MARKER,
    RandomResizedCropFlip,
    TorchImageLoader,
    build_streaming_data,
    choose_loader,
    extract_archive,
    list_imagefolder,
    select_split,
)

REPO = Path(__file__).resolve().parents[1]
# The JPEG CIFAR-10 archive; FASTLOCAL_CIFAR10_JPEG points at a copy where ../shared is absent (GPU machine).
SHARED_ARCHIVE = Path(os.environ.get("FASTLOCAL_CIFAR10_JPEG") or REPO.parent / "shared/data/cifar10-jpeg.tar.gz")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not installed (pip install 'fastlocal[dali]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the mixed (GPU) decoder needs CUDA")
LOADERS = ["torch", pytest.param("dali", marks=needs_dali)]

# Evaluation images of the two loaders, in [0, 1] units. On the CPU both decode with libjpeg-turbo (an
# unresized image comes out identical) and crop the same window; the resizers differ only in rounding
# (PIL: 8-bit fixed-point weights, DALI: float), so a pixel differs by at most a level or two and the
# mean by far less: measured 0.2/255 mean and 1/255 max on CIFAR-10 and on the 300x250..640x480 JPEGs.
CPU_MEAN_TOLERANCE = 1 / 255
CPU_MAX_TOLERANCE = 4 / 255
# nvJPEG (mixed) uses its own IDCT and chroma upsampling: a few levels per pixel, still < 3/255 on average.
GPU_MEAN_TOLERANCE = 3 / 255


def data_config(root, loader="torch", **overrides) -> DataConfig:
    """A DataConfig; the streaming fields are set as attributes until config.py declares them."""
    cfg = DataConfig(source="imagefolder", root=str(root))
    options = dict(loader=loader, crop_size=32, resize_size=36, num_workers=0, dali_decoder="auto")
    options.update(overrides)
    for name, value in options.items():
        setattr(cfg, name, value)
    return cfg


def build(cfg: DataConfig, **kwargs) -> DataBundle:
    options = dict(batch_size=4, eval_batch_size=5, device="cpu", seed=0, progress=False)
    options.update(kwargs)
    return build_streaming_data(cfg, **options)


def unnormalize(x: torch.Tensor, bundle: DataBundle) -> torch.Tensor:
    mean = torch.tensor(bundle.info.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.info.std, device=x.device).view(1, 3, 1, 1)
    return x * std + mean


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.cpu().clone(), y.cpu().clone()) for x, y in loader], strict=True)
    return torch.cat(xs), torch.cat(ys)


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: a few random colours bicubically blown up (JPEG and resizers behave as on photos)."""
    small = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_jpeg_folder(root: Path, sizes, classes=("zebra", "apple"), per_class=(3, 2), seed=0) -> Path:
    """train/ and test/ of JPEGs with the given (width, height) cycled; classes written out of order."""
    rng = np.random.default_rng(seed)
    k = 0
    for split, count in zip(("train", "test"), per_class, strict=True):
        for class_name in classes:
            (root / split / class_name).mkdir(parents=True, exist_ok=True)
            for i in reversed(range(count)):
                width, height = sizes[k % len(sizes)]
                k += 1
                (root / split / class_name / f"{i:03d}.jpg").write_bytes(jpeg_bytes(smooth_image(rng, width, height)))
    return root


def write_tar(path: Path, folder: Path, prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as archive:
        for file in sorted(folder.rglob("*")):
            archive.add(file, arcname=prefix + file.relative_to(folder).as_posix(), recursive=False)
    return path


LARGE_SIZES = [(300, 250), (250, 300), (500, 375), (333, 500), (256, 256), (640, 480), (350, 233)]


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory) -> Path:
    return write_jpeg_folder(tmp_path_factory.mktemp("large") / "data", LARGE_SIZES, per_class=(4, 4))


# --------------------------------------------------------------------------------------------------
# Listing and archives


@pytest.mark.parametrize("kind, prefix", [("folder", ""), ("tar", "top/"), ("tar.gz", "")])
def test_listing_and_eval_pixels_match_the_in_memory_reader(tmp_path, kind, prefix):
    folder = write_jpeg_folder(tmp_path / "src", [(16, 16)], per_class=(3, 2))
    root = folder if kind == "folder" else write_tar(tmp_path / f"data.{kind}", folder, prefix)
    bundle = build(data_config(root, crop_size=16, resize_size=16), eval_batch_size=3)
    assert bundle.info.class_names == ["apple", "zebra"]
    assert (bundle.info.image_size, bundle.info.pad, bundle.info.flip) == (16, 0, True)
    assert (bundle.info.mean, bundle.info.std) == (IMAGENET_MEAN, IMAGENET_STD)
    reference = read_imagefolder(root, cache=None, progress=False)
    images, labels = collect(bundle.test)
    assert labels.tolist() == reference["test"].labels.tolist() == [0, 0, 1, 1]
    # 16x16 images, resize 16, crop 16: the evaluation view is the decoded image itself.
    pixels = (unnormalize(images, bundle) * 255).round().to(torch.uint8)
    np.testing.assert_array_equal(pixels.numpy(), reference["test"].images)


def test_archive_is_extracted_once_and_reused(tmp_path):
    folder = write_jpeg_folder(tmp_path / "src", [(8, 8)])
    archive = write_tar(tmp_path / "data.tar", folder, "top/")
    first = extract_archive(archive, tmp_path / "cache", progress=False)
    marker = first / EXTRACTED_MARKER
    assert marker.is_file() and (first / "top/train/apple/000.jpg").is_file()
    stamp = marker.stat().st_mtime_ns
    assert extract_archive(archive, tmp_path / "cache", progress=False) == first
    assert marker.stat().st_mtime_ns == stamp  # reused, not extracted again
    marker.unlink()  # as if an extraction had been interrupted before its marker
    assert extract_archive(archive, tmp_path / "cache", progress=False) == first
    assert marker.is_file()
    assert not [p for p in (tmp_path / "cache/extracted").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
@pytest.mark.parametrize("cut", ["middle", "member boundary"])
def test_truncated_archive_is_a_data_error(tmp_path, suffix, cut):
    folder = write_jpeg_folder(tmp_path / "src", [(64, 64)], per_class=(20, 4))
    archive = write_tar(tmp_path / f"data{suffix}", folder)
    data = archive.read_bytes()
    if cut == "member boundary":  # tarfile itself reads such a file as a shorter, complete archive
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
        size = members[len(members) // 2].offset
        if suffix == ".tar.gz":
            import gzip

            data = gzip.compress(gzip.decompress(data)[:size])
        else:
            data = data[:size]
    else:
        data = data[: len(data) // 2]
    archive.write_bytes(data)
    with pytest.raises(DataError, match=r"cannot read the archive .*truncated"):
        build(data_config(archive, cache_dir=str(tmp_path / "cache")))
    assert list((tmp_path / "cache/extracted").iterdir()) == []  # the partial extraction was removed


def test_not_an_archive_is_a_data_error(tmp_path):
    path = tmp_path / "data.tar.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(DataError, match=r"truncated, corrupt or not a \.tar"):
        build(data_config(path, cache_dir=str(tmp_path / "cache")))


def test_empty_class_folder_is_a_data_error(tmp_path):
    folder = write_jpeg_folder(tmp_path / "d", [(8, 8)])
    (folder / "train" / "mango").mkdir()
    with pytest.raises(DataError, match=r"class folder train/mango/ has no images"):
        build(data_config(folder))


def test_missing_split_is_a_data_error(tmp_path):
    folder = write_jpeg_folder(tmp_path / "d", [(8, 8)])
    shutil.rmtree(folder / "test")
    with pytest.raises(DataError, match=r"no test/ folder"):
        build(data_config(folder))


def test_missing_root_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        build(data_config(tmp_path / "nowhere"))


def test_max_train_is_class_balanced_first_n(tmp_path):
    folder = write_jpeg_folder(tmp_path / "d", [(8, 8)], per_class=(3, 2))
    listing = list_imagefolder(folder, cache=tmp_path / "cache", progress=False)
    chosen = select_split(listing, "train", 3, cache=None, progress=False)
    assert chosen.paths == ["train/apple/000.jpg", "train/apple/001.jpg", "train/zebra/000.jpg"]
    assert chosen.labels.tolist() == [0, 0, 1]
    with pytest.raises(DataError, match=r"data.max_train = 7 is larger .* has 6 images"):
        select_split(listing, "train", 7, cache=None, progress=False)


# --------------------------------------------------------------------------------------------------
# Bad images


def write_with_bad_images(root: Path) -> Path:
    folder = write_jpeg_folder(root, [(40, 30)], per_class=(3, 2))
    good = (folder / "train/apple/000.jpg").read_bytes()
    (folder / "train/apple/001.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "train/zebra/000.jpg").write_bytes(b"this is not an image" * 4)  # garbage
    return folder


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupt_image_is_an_error_by_default(tmp_path, loader):
    folder = write_with_bad_images(tmp_path / "d")
    with pytest.raises(DataError, match=r"cannot read image train/apple/001.jpg .*data.on_bad_image=skip"):
        build(data_config(folder, loader))


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupt_images_are_skipped_and_replaced(tmp_path, loader):
    folder = write_with_bad_images(tmp_path / "d")
    cfg = data_config(folder, loader, on_bad_image="skip")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable train image"):
        bundle = build(cfg)
    assert bundle.train.num_images == 4  # 6 minus the 2 bad ones
    images, labels = collect(bundle.train)
    assert sorted(labels.tolist()) == [0, 0, 1, 1] and torch.isfinite(images).all()
    cfg.max_train = 2  # class-balanced: the bad first files are replaced by the next of their class
    with pytest.warns(UserWarning, match=r"skipped"):
        listing = list_imagefolder(folder, cache=tmp_path / "cache", progress=False)
        chosen = select_split(listing, "train", 2, on_bad_image="skip", cache=tmp_path / "cache", progress=False)
    assert chosen.paths == ["train/apple/000.jpg", "train/zebra/001.jpg"]


def test_bad_images_found_by_a_skip_run_still_raise_with_error(tmp_path):
    folder = write_with_bad_images(tmp_path / "d")
    cache = tmp_path / "cache"
    listing = list_imagefolder(folder, cache=cache, progress=False)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable train image"):
        select_split(listing, "train", on_bad_image="skip", cache=cache, progress=False)
    with pytest.raises(DataError, match=r"cannot read image train/apple/001.jpg .*(?i:truncated)"):
        select_split(listing, "train", on_bad_image="error", cache=cache, progress=False)


def test_image_check_results_are_cached(tmp_path, monkeypatch):
    folder = write_jpeg_folder(tmp_path / "d", [(8, 8)])
    cache = tmp_path / "cache"
    listing = list_imagefolder(folder, cache=cache, progress=False)
    first = select_split(listing, "train", cache=cache, progress=False)
    calls = []
    monkeypatch.setattr(streaming, "check_image", lambda *args: calls.append(args))
    second = select_split(listing, "train", cache=cache, progress=False)
    assert calls == [] and second.paths == first.paths


# --------------------------------------------------------------------------------------------------
# Loader choice, DALI availability


def test_choose_loader(tmp_path, large_jpegs):
    small = write_jpeg_folder(tmp_path / "small", [(16, 16)])
    assert choose_loader(DataConfig()) == "device"  # bundled
    assert choose_loader(DataConfig(source="cifar10")) == "device"
    assert choose_loader(DataConfig(source="imagefolder", root=str(small))) == "device"
    assert choose_loader(DataConfig(source="imagefolder", root=str(large_jpegs))) == "torch"
    archive = write_tar(tmp_path / "large.tar.gz", large_jpegs, "top/")
    assert choose_loader(DataConfig(source="imagefolder", root=str(archive))) == "torch"
    assert choose_loader(DataConfig(source="imagefolder", root=str(small), image_size=160)) == "torch"
    assert choose_loader(DataConfig(source="imagefolder", root=str(large_jpegs), image_size=32)) == "device"
    assert choose_loader(data_config(small, "dali")) == "dali"
    assert choose_loader(data_config(large_jpegs, "device")) == "device"
    with pytest.raises(DataError, match=r"reads image folders .* not cifar10"):
        build(data_config("", source="cifar10"))


def test_bad_streaming_options_are_clear(tmp_path):
    folder = write_jpeg_folder(tmp_path / "d", [(8, 8)])
    with pytest.raises(DataError, match=r"data.resize_size = 20 is smaller than data.crop_size = 32"):
        build(data_config(folder, resize_size=20))
    with pytest.raises(DataError, match=r"data.loader = 'pil' is not valid; choose one of: auto, device"):
        build(data_config(folder, loader="pil"))


def test_importing_fastlocal_does_not_import_dali():
    code = (
        "import sys, fastlocal, fastlocal.data, fastlocal.data.streaming, fastlocal.data.dali, fastlocal.engine; "
        "assert 'nvidia.dali' not in sys.modules, 'DALI was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_missing_dali_names_the_pip_extra(tmp_path, monkeypatch):
    folder = write_jpeg_folder(tmp_path / "d", [(8, 8)])
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with pytest.raises(DataError, match=r"needs NVIDIA DALI: pip install 'fastlocal\[dali\]' \(nvidia-dali-cuda130\)"):
        build(data_config(folder, "dali"))


@needs_dali
def test_mixed_decoder_without_cuda_is_clear(tmp_path):
    folder = write_jpeg_folder(tmp_path / "d", [(8, 8)])
    with pytest.raises(DataError, match=r"dali_decoder = mixed decodes on the GPU, but the run's device is cpu"):
        build(data_config(folder, "dali", dali_decoder="mixed"))


@pytest.mark.skipif("loader" not in DataConfig.__dataclass_fields__, reason="config.py has no data.loader yet")
def test_build_data_dispatches_to_the_streaming_loaders(tmp_path):
    folder = write_jpeg_folder(tmp_path / "d", [(8, 8)])
    cfg = build_config(
        None,
        [
            "data.source=imagefolder",
            f"data.root={folder}",
            "data.loader=torch",
            "data.crop_size=8",
            "data.resize_size=8",
            "data.num_workers=0",
        ],
    )
    bundle = build_data(cfg.data, batch_size=2, eval_batch_size=2, device="cpu", seed=0, progress=False)
    assert isinstance(bundle.train, TorchImageLoader)


# --------------------------------------------------------------------------------------------------
# Loader semantics (both loaders)


@pytest.mark.parametrize("loader", LOADERS)
def test_epochs_are_a_function_of_seed_and_epoch(large_jpegs, loader):
    bundle = build(data_config(large_jpegs, loader, crop_size=24, resize_size=28), batch_size=3)
    train = bundle.train
    assert len(train) == 3 and train.num_images == 8
    first, labels = collect(train)
    assert first.shape == (8, 3, 24, 24) and first.dtype == torch.float32 and labels.dtype == torch.int64
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4  # every image once
    again, labels_again = collect(train)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert torch.equal(labels_again, labels)
    train.set_epoch(1)
    other, _ = collect(train)
    assert not torch.equal(other, first)
    train.set_epoch(0)
    torch.testing.assert_close(collect(train)[0], first, rtol=0, atol=0)


def test_torch_loader_does_not_depend_on_the_worker_count(large_jpegs):
    serial = build(data_config(large_jpegs, crop_size=24, resize_size=28), batch_size=3)
    parallel = build(data_config(large_jpegs, crop_size=24, resize_size=28, num_workers=2), batch_size=3)
    for loader_a, loader_b in ((serial.train, parallel.train), (serial.test, parallel.test)):
        a, b = collect(loader_a), collect(loader_b)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("loader", LOADERS)
def test_drop_last_and_partial_eval_batches(large_jpegs, loader):
    bundle = build(data_config(large_jpegs, loader), batch_size=3, eval_batch_size=5, drop_last=True)
    assert len(bundle.train) == 2 and [len(y) for _, y in bundle.train] == [3, 3]
    assert len(bundle.test) == 2 and [len(y) for _, y in bundle.test] == [5, 3]
    assert collect(bundle.test)[1].tolist() == [0] * 4 + [1] * 4  # evaluation keeps the list order


def test_shards_split_the_epoch_order(large_jpegs):
    cfg = data_config(large_jpegs)
    bundle = build(cfg, batch_size=3)
    shards = [
        TorchImageLoader(
            bundle.train.images,
            3,
            train=True,
            crop_size=32,
            resize_size=36,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            shard_id=i,
            num_shards=3,
        )
        for i in range(3)
    ]
    keys = [k for shard in shards for k in shard.epoch_keys()]
    assert keys == bundle.train.epoch_keys()
    assert [shard.num_images for shard in shards] == [2, 3, 3]


def test_random_resized_crop_follows_the_recipe():
    transform = RandomResizedCropFlip(16)
    rng = random.Random(0)
    boxes = np.array([transform.box(500, 375, rng) for _ in range(4000)])
    left, top, width, height = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + width <= 500).all() and (top + height <= 375).all()
    fractions, aspects = width * height / (500 * 375), width / height
    # scale (0.08, 1), ratio (3/4, 4/3), up to the rounding of the box to whole pixels.
    assert fractions.min() > 0.079 and fractions.max() <= 1 and 0.74 < aspects.min() and aspects.max() < 1.35
    assert 0.41 < fractions.mean() < 0.46  # torchvision get_params gives 0.435 here (large boxes often do not fit)
    gradient = Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8)[None, :, None], (40, 1, 3)))
    flipped = [
        (lambda x: x[0, :, 0].float().mean() > x[0, :, -1].float().mean())(transform(gradient, s)) for s in range(400)
    ]
    assert 0.4 < np.mean(flipped) < 0.6
    assert not any(RandomResizedCropFlip(16, flip=False)(gradient, s)[0, 0, 0] > 200 for s in range(50))


def test_normalize_options(large_jpegs):
    half = build(data_config(large_jpegs, normalize="half"))
    assert half.info.mean == (0.5, 0.5, 0.5)
    estimated = build(data_config(large_jpegs, normalize="dataset"))
    images, _ = collect(estimated.test)
    # The statistics come from the training images' evaluation view: test images land near 0 mean, 1 std.
    assert 0 < min(estimated.info.std) and max(estimated.info.std) < 0.5
    assert images.mean().abs() < 0.5 and 0.5 < images.std() < 2


# --------------------------------------------------------------------------------------------------
# DALI against the torch loader


def compare_eval(torch_bundle: DataBundle, dali_bundle: DataBundle, mean_tolerance, max_tolerance=None):
    torch_images, torch_labels = collect(torch_bundle.test)
    dali_images, dali_labels = collect(dali_bundle.test)
    assert torch.equal(torch_labels, dali_labels)
    assert dali_images.shape == torch_images.shape and dali_images.dtype == torch.float32
    difference = (unnormalize(dali_images, dali_bundle) - unnormalize(torch_images, torch_bundle)).abs()
    per_image = difference.mean(dim=(1, 2, 3))
    assert per_image.max() <= mean_tolerance, per_image
    if max_tolerance is not None:
        assert difference.max() <= max_tolerance


@pytest.fixture(scope="module")
def cifar_bundles(tmp_path_factory):
    if not SHARED_ARCHIVE.is_file():
        pytest.skip(f"{SHARED_ARCHIVE} is not here")
    # Extracting the 60,000 files takes 10-60 s on a busy disk: keep the extraction (keyed by the archive's
    # path, size and mtime, published only when complete) beside pytest's per-run folders for later runs.
    cache = tmp_path_factory.getbasetemp().parent / "fastlocal-test-extracted"
    cfg = dict(max_train=60, max_test=100, crop_size=32, resize_size=36, cache_dir=str(cache))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_bundle = build(data_config(SHARED_ARCHIVE, "torch", **cfg), batch_size=16, eval_batch_size=32)
        dali_bundle = build(data_config(SHARED_ARCHIVE, "dali", **cfg), batch_size=16, eval_batch_size=32)
    return torch_bundle, dali_bundle


@needs_dali
def test_dali_and_torch_read_the_cifar10_jpeg_archive_alike(cifar_bundles):
    torch_bundle, dali_bundle = cifar_bundles
    assert torch_bundle.info == dali_bundle.info and dali_bundle.info.class_names == CIFAR_CLASSES
    assert dali_bundle.test.num_images == 100 and len(dali_bundle.test) == 4
    compare_eval(torch_bundle, dali_bundle, CPU_MEAN_TOLERANCE, CPU_MAX_TOLERANCE)
    # The same training order (labels) in both; the crops differ (each library draws its own).
    torch_x, torch_y = collect(torch_bundle.train)
    dali_x, dali_y = collect(dali_bundle.train)
    assert torch.equal(torch_y, dali_y) and dali_x.shape == torch_x.shape == (60, 3, 32, 32)


@needs_dali
def test_dali_and_torch_agree_on_larger_jpegs(large_jpegs):
    options = dict(crop_size=224, resize_size=256)
    compare_eval(
        build(data_config(large_jpegs, "torch", **options)),
        build(data_config(large_jpegs, "dali", **options)),
        CPU_MEAN_TOLERANCE,
        CPU_MAX_TOLERANCE,
    )


@needs_dali
def test_dali_train_crops_are_random_resized_crops_in_range(large_jpegs):
    bundle = build(data_config(large_jpegs, "dali", crop_size=64, resize_size=72, flip="off"), batch_size=8)
    images, _ = collect(bundle.train)
    pixels = unnormalize(images, bundle)
    assert images.shape == (8, 3, 64, 64)
    assert pixels.min() > -0.01 and pixels.max() < 1.01  # normalisation undone exactly: a [0, 1] image
    assert bundle.info.flip is False


@needs_dali
@needs_cuda
def test_mixed_decoder_on_cuda(large_jpegs):
    options = dict(crop_size=224, resize_size=256, num_workers=2)
    gpu = build(data_config(large_jpegs, "dali", dali_decoder="mixed", **options), device="cuda")
    x, y = next(iter(gpu.train))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (4, 3, 224, 224)
    compare_eval(build(data_config(large_jpegs, "torch", **options)), gpu, GPU_MEAN_TOLERANCE)


# --------------------------------------------------------------------------------------------------
# A short ImageNet-style run


@pytest.mark.parametrize("loader", LOADERS)
def test_short_imagenet_style_run(tmp_path, large_jpegs, loader):
    from fastlocal.engine import Trainer
    from fastlocal.methods import METHODS, build_method
    from fastlocal.models import build_backbone
    from fastlocal.split import split_backbone

    cfg = build_config(
        None,
        [
            "model.arch=resnet18",
            "method.name=dgl",
            "method.num_modules=2",
            "train.epochs=1",
            "train.batch_size=3",
            "log.progress=false",
            "log.measure_memory=false",
        ],
        METHODS,
    )
    data = build(data_config(large_jpegs, loader, crop_size=32, resize_size=36), batch_size=3, drop_last=True)
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", data.info.num_classes, data.info.image_size)
    modules = split_backbone(backbone, 2, False, "uniform")
    method = build_method(cfg, backbone, modules)
    before = [p.detach().clone() for p in backbone.parameters()]
    summary = Trainer(cfg, backbone, modules, method, data, torch.device("cpu"), tmp_path / "run").fit(
        log=lambda _: None
    )
    assert summary["epochs"] == 1 and 0 <= summary["final_test_acc"] <= 100
    assert summary["dataset"] == "imagefolder"
    assert any(not torch.equal(a, b) for a, b in zip(before, backbone.parameters(), strict=True))


def test_torch_loader_warns_when_it_would_upscale_small_images(tmp_path):
    from fastlocal.config import DataConfig
    from fastlocal.data.streaming import build_streaming_data

    cfg = DataConfig(source="bundled", loader="torch", max_train=20, max_test=10, num_workers=0,
                     cache_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"images are 32 px, so every crop is upscaled"):
        build_streaming_data(cfg, batch_size=4, eval_batch_size=4, device="cpu", seed=0, progress=False)
