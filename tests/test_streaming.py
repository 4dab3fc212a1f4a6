"""Tests for fastlocal/data/streaming.py (the torch loader, the file list) and fastlocal/data/dali.py.

DALI tests run DALI's CPU pipeline (``device_id=None``) and are skipped with a reason when nvidia.dali is
not installed; the ``mixed`` (GPU decode) test needs CUDA. The two loaders are not promised to agree to
the pixel (each crops and resizes its own way): they are tested for shapes, label order and pixel
statistics, and DALI's decoding against PIL's within a tolerance. Images in [0, 1] units: the loaders'
outputs are un-normalised with the bundle's mean and std before comparing.
"""

from __future__ import annotations

import io
import os
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

from fastlocal.config import ConfigError, DataConfig, build_config
from fastlocal.data import DataBundle, DataError, Loader, build_data, choose_loader, streaming
from fastlocal.data.loader import shard_indices
from fastlocal.data.sources import EXTRACTED_MARKER, extract_archive, read_imagefolder
from fastlocal.data.streaming import TorchImageLoader, select_images

REPO = Path(__file__).resolve().parents[1]
# The JPEG CIFAR-10 archive; FASTLOCAL_CIFAR10_JPEG points at a copy where ../shared is absent (GPU machine).
SHARED_ARCHIVE = Path(os.environ.get("FASTLOCAL_CIFAR10_JPEG") or REPO.parent / "shared/data/cifar10-jpeg.tar.gz")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LOADERS = ["torch", pytest.param("dali", marks=pytest.mark.dali)]

# DALI's decode against PIL's (an image decoded, not resized): on the CPU both use libjpeg-turbo, so a pixel
# differs by at most a level or two; nvJPEG (mixed) has its own IDCT and chroma upsampling, a few levels.
CPU_MEAN_TOLERANCE = 1 / 255
CPU_MAX_TOLERANCE = 4 / 255
GPU_MEAN_TOLERANCE = 3 / 255
# Per-channel mean and std of whole evaluation epochs, DALI against torch after each resized and cropped its
# own way (rounding of the resized size and crop window differ by up to a pixel).
STATISTICS_TOLERANCE = 4 / 255


def data_config(root, loader="torch", **overrides) -> DataConfig:
    options = dict(source="imagefolder", root=str(root), loader=loader, crop_size=32, resize_size=36, num_workers=0)
    options.update(overrides)
    options.setdefault("cache_dir", str(Path(root).parent / "cache") if str(root) else "")
    return DataConfig(**options)


def build(cfg: DataConfig, **kwargs) -> DataBundle:
    options = dict(batch_size=4, eval_batch_size=5, device="cpu", seed=0, progress=False)
    options.update(kwargs)
    return build_data(cfg, **options)


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
    assert (bundle.info.mean, bundle.info.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's
    reference = read_imagefolder(root, cache=tmp_path / "cache", progress=False)
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
    chosen = select_images(data_config(folder, max_train=3), "train", progress=False)
    assert chosen.paths == ["train/apple/000.jpg", "train/apple/001.jpg", "train/zebra/000.jpg"]
    assert chosen.labels.tolist() == [0, 0, 1]
    with pytest.raises(DataError, match=r"data.max_train = 7 is larger .* has 6 images"):
        select_images(data_config(folder, max_train=7), "train", progress=False)


# --------------------------------------------------------------------------------------------------
# Bad images


def write_with_bad_images(root: Path) -> Path:
    folder = write_jpeg_folder(root, [(40, 30)], per_class=(3, 2))
    good = (folder / "train/apple/000.jpg").read_bytes()
    (folder / "train/apple/001.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "train/zebra/000.jpg").write_bytes(b"")  # zero bytes
    return folder


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupt_image_is_an_error_by_default(tmp_path, loader):
    folder = write_with_bad_images(tmp_path / "d")
    with pytest.raises(DataError, match=r"cannot read image train/apple/001.jpg .*data.on_bad_image=skip"):
        build(data_config(folder, loader))


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupt_images_are_skipped_and_replaced(tmp_path, loader):
    folder = write_with_bad_images(tmp_path / "d")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable train image"):
        bundle = build(data_config(folder, loader, on_bad_image="skip"))
    assert bundle.train.num_images == 4  # 6 minus the 2 bad ones
    images, labels = collect(bundle.train)
    assert sorted(labels.tolist()) == [0, 0, 1, 1] and torch.isfinite(images).all()
    # Class-balanced: the bad first files are replaced by the next of their class.
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable train image.*train/zebra/000.jpg"):
        chosen = select_images(data_config(folder, loader, on_bad_image="skip", max_train=2), "train", progress=False)
    assert chosen.paths == ["train/apple/000.jpg", "train/zebra/001.jpg"]


def test_bad_images_found_by_a_skip_run_still_raise_with_error(tmp_path):
    folder = write_with_bad_images(tmp_path / "d")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable train image"):
        select_images(data_config(folder, on_bad_image="skip"), "train", progress=False)
    with pytest.raises(DataError, match=r"cannot read image train/apple/001.jpg .*(?i:truncated)"):
        select_images(data_config(folder), "train", progress=False)


def test_image_check_results_are_cached(tmp_path, monkeypatch):
    folder = write_jpeg_folder(tmp_path / "d", [(8, 8)])
    first = select_images(data_config(folder), "train", progress=False)
    calls = []
    monkeypatch.setattr(streaming, "check_image", lambda *args: calls.append(args))
    second = select_images(data_config(folder), "train", progress=False)
    assert calls == [] and second.paths == first.paths


# --------------------------------------------------------------------------------------------------
# Loader choice, options, DALI availability


def test_choose_loader(tmp_path, large_jpegs):
    small = write_jpeg_folder(tmp_path / "small", [(16, 16)])
    assert choose_loader(DataConfig()) == "device"  # bundled
    assert choose_loader(DataConfig(source="cifar10")) == "device"
    assert choose_loader(DataConfig(source="imagefolder", root=str(small))) == "device"
    assert choose_loader(DataConfig(source="imagefolder", root=str(large_jpegs))) == "torch"
    archive = write_tar(tmp_path / "large.tar.gz", large_jpegs, "top/")
    assert choose_loader(DataConfig(source="imagefolder", root=str(archive), cache_dir=str(tmp_path / "c"))) == "torch"
    assert choose_loader(DataConfig(source="imagefolder", root=str(small), image_size=160)) == "torch"
    assert choose_loader(DataConfig(source="imagefolder", root=str(large_jpegs), image_size=32)) == "device"
    assert choose_loader(data_config(small, "dali")) == "dali"
    assert choose_loader(data_config(large_jpegs, "device")) == "device"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.resize_size=20", "data.crop_size=32"], r"data.resize_size = 20 is smaller than data.crop_size = 32"),
        (["data.loader=pil"], r"data.loader = 'pil' is not valid; choose one of: auto, device"),
        (["data.loader=torch", "data.source=cifar10"], r"reads image folders .* not cifar10; use data.loader=device"),
        (["data.loader=dali", "data.dali_decoder=mixed", "system.device=cpu"], r"dali_decoder = mixed decodes .*GPU"),
        (["data.dali_decoder=mixed"], r"dali_decoder = mixed .* data.loader = auto"),
    ],
)
def test_bad_streaming_options_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, overrides)


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


@pytest.mark.dali
def test_mixed_decoder_without_cuda_is_clear(tmp_path):
    folder = write_jpeg_folder(tmp_path / "d", [(8, 8)])
    with pytest.raises(DataError, match=r"dali_decoder = mixed decodes on the GPU, but the run's device is cpu"):
        build(data_config(folder, "dali", dali_decoder="mixed", crop_size=8, resize_size=8))


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
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    bundle = build_data(cfg.data, batch_size=2, eval_batch_size=2, device="cpu", seed=0, progress=False)
    assert isinstance(bundle.train, TorchImageLoader)


# --------------------------------------------------------------------------------------------------
# Loader semantics (both loaders): shapes, order, determinism, shards


@pytest.mark.parametrize("loader", LOADERS)
def test_epochs_are_a_function_of_seed_and_epoch(large_jpegs, loader):
    bundle = build(data_config(large_jpegs, loader, crop_size=24, resize_size=28), batch_size=3)
    train = bundle.train
    assert isinstance(train, Loader) and isinstance(bundle.test, Loader)
    assert len(train) == 3 and train.num_images == 8
    first, labels = collect(train)
    assert first.shape == (8, 3, 24, 24) and first.dtype == torch.float32 and labels.dtype == torch.int64
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4  # every image once
    # The label order is the shared epoch order, whichever loader reads it.
    order = shard_indices(8, seed=0, epoch=0)
    assert labels.tolist() == [int(i) // 4 for i in order]
    again, labels_again = collect(train)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert torch.equal(labels_again, labels)
    train.set_epoch(1)
    other, other_labels = collect(train)
    assert not torch.equal(other, first)
    train.set_epoch(0)
    torch.testing.assert_close(collect(train)[0], first, rtol=0, atol=0)
    train.set_epoch(1, start_step=1)  # resumed mid-epoch: the batches after the first, as the whole epoch read them
    rest, rest_labels = collect(train)
    assert rest_labels.tolist() == other_labels[3:].tolist()
    if loader == "torch":  # DALI draws its augmentation per pipeline: the same images, other crops
        torch.testing.assert_close(rest, other[3:], rtol=0, atol=0)


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


@pytest.mark.parametrize("loader", LOADERS)
def test_ranks_read_their_shard_of_the_epoch(large_jpegs, loader):
    shards = [build(data_config(large_jpegs, loader), batch_size=3, rank=r, world_size=3).train for r in range(3)]
    assert [shard.num_images for shard in shards] == [3, 3, 3]  # 8 images padded to 9 by wrapping
    order = shard_indices(8, seed=0, epoch=0)
    padded = torch.cat([order, order[:1]])
    for rank, shard in enumerate(shards):
        assert collect(shard)[1].tolist() == [int(i) // 4 for i in padded[rank::3]]


@pytest.mark.parametrize("loader", LOADERS)
def test_train_views_follow_the_recipe(large_jpegs, loader):
    bundle = build(data_config(large_jpegs, loader, crop_size=64, resize_size=72, flip="off"), batch_size=8)
    images, _ = collect(bundle.train)
    pixels = unnormalize(images, bundle)
    assert images.shape == (8, 3, 64, 64) and bundle.info.flip is False
    assert pixels.min() > -0.01 and pixels.max() < 1.01
    # Random crops of at least 8% of the area: the crops' mean colour stays near the images' mean colour.
    views, _ = collect(build(data_config(large_jpegs, loader, crop_size=64, resize_size=64)).test)
    crop_means = pixels.mean(dim=(0, 2, 3))
    full_means = unnormalize(views, bundle).mean(dim=(0, 2, 3))
    assert (crop_means - full_means).abs().max() < 0.15


def test_torch_train_crops_scale_and_flip():
    transform = streaming.image_transform(True, 16, 16)
    gradient = Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8)[None, :, None], (40, 1, 3)))
    torch.manual_seed(0)
    views = torch.stack([transform(gradient) for _ in range(400)]).float()
    rising = views[:, 0, :, 0].mean(1) < views[:, 0, :, -1].mean(1)
    assert 0.4 < rising.float().mean() < 0.6  # flipped half the time
    # Width of each crop in source pixels (the gradient rises 5 levels a column): area (0.08, 1) of the 50x40
    # image and aspect (3/4, 4/3) give widths from sqrt(0.08 * 2000 * 3/4) = 11 to the whole 50.
    width = (views[:, 0, 0, -1] - views[:, 0, 0, 0]).abs() / 5 * 16 / 15
    assert 9 < width.min() < 20 and 40 < width.max() < 53


def test_normalize_options(large_jpegs):
    half = build(data_config(large_jpegs, normalize="half"))
    assert half.info.mean == (0.5, 0.5, 0.5)
    estimated = build(data_config(large_jpegs, normalize="dataset"))
    images, _ = collect(estimated.test)
    # The statistics come from the training images' evaluation view: test images land near 0 mean, 1 std.
    assert 0 < min(estimated.info.std) and max(estimated.info.std) < 0.5
    assert images.mean().abs() < 0.5 and 0.5 < images.std() < 2


# --------------------------------------------------------------------------------------------------
# DALI against PIL and the torch loader


def compare_decode(torch_bundle: DataBundle, dali_bundle: DataBundle, mean_tolerance, max_tolerance=None):
    """Evaluation views at crop = resize = image size, i.e. the decoded images: DALI's against PIL's."""
    torch_images, torch_labels = collect(torch_bundle.test)
    dali_images, dali_labels = collect(dali_bundle.test)
    assert torch.equal(torch_labels, dali_labels)
    assert dali_images.shape == torch_images.shape and dali_images.dtype == torch.float32
    difference = (unnormalize(dali_images, dali_bundle) - unnormalize(torch_images, torch_bundle)).abs()
    assert difference.mean(dim=(1, 2, 3)).max() <= mean_tolerance
    if max_tolerance is not None:
        assert difference.max() <= max_tolerance


def channel_statistics(bundle: DataBundle) -> torch.Tensor:
    images = unnormalize(collect(bundle.test)[0], bundle)
    return torch.stack([images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))])


@pytest.fixture(scope="module")
def cifar_bundles(tmp_path_factory):
    if not SHARED_ARCHIVE.is_file():
        pytest.skip(f"{SHARED_ARCHIVE} is not here")
    # Extracting the 60,000 files takes a while: keep the extraction (keyed by the archive's path, size and
    # mtime, published only when complete) beside pytest's per-run folders for later runs.
    cache = tmp_path_factory.getbasetemp().parent / "fastlocal-test-extracted"
    cfg = dict(max_train=60, max_test=100, crop_size=32, resize_size=32, cache_dir=str(cache))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_bundle = build(data_config(SHARED_ARCHIVE, "torch", **cfg), batch_size=16, eval_batch_size=32)
        dali_bundle = build(data_config(SHARED_ARCHIVE, "dali", **cfg), batch_size=16, eval_batch_size=32)
    return torch_bundle, dali_bundle


@pytest.mark.dali
def test_dali_decodes_the_cifar10_jpeg_archive_as_pil(cifar_bundles):
    torch_bundle, dali_bundle = cifar_bundles
    assert torch_bundle.info == dali_bundle.info and dali_bundle.info.class_names == CIFAR_CLASSES
    assert dali_bundle.test.num_images == 100 and len(dali_bundle.test) == 4
    compare_decode(torch_bundle, dali_bundle, CPU_MEAN_TOLERANCE, CPU_MAX_TOLERANCE)
    # The same training order (labels) in both; the crops differ (each library draws its own).
    torch_x, torch_y = collect(torch_bundle.train)
    dali_x, dali_y = collect(dali_bundle.train)
    assert torch.equal(torch_y, dali_y) and dali_x.shape == torch_x.shape == (60, 3, 32, 32)


@pytest.mark.dali
def test_dali_and_torch_agree_on_larger_jpegs(tmp_path, large_jpegs):
    exact = write_jpeg_folder(tmp_path / "d", [(96, 96)], per_class=(2, 3))
    exact_torch, exact_dali = (build(data_config(exact, k, crop_size=96, resize_size=96)) for k in ("torch", "dali"))
    compare_decode(exact_torch, exact_dali, CPU_MEAN_TOLERANCE, CPU_MAX_TOLERANCE)
    options = dict(crop_size=224, resize_size=256)
    torch_bundle, dali_bundle = (
        build(data_config(large_jpegs, "torch", **options)),
        build(data_config(large_jpegs, "dali", **options)),
    )
    assert torch.equal(collect(torch_bundle.test)[1], collect(dali_bundle.test)[1])
    difference = (channel_statistics(torch_bundle) - channel_statistics(dali_bundle)).abs()
    assert difference.max() <= STATISTICS_TOLERANCE, difference


@pytest.mark.dali
@pytest.mark.gpu  # the mixed (GPU) decoder
def test_mixed_decoder_on_cuda(tmp_path, large_jpegs):
    options = dict(crop_size=224, resize_size=256, num_workers=2)
    gpu = build(data_config(large_jpegs, "dali", dali_decoder="mixed", **options), device="cuda")
    x, y = next(iter(gpu.train))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (4, 3, 224, 224)
    exact = write_jpeg_folder(tmp_path / "d", [(96, 96)], per_class=(2, 3))
    compare_decode(
        build(data_config(exact, "torch", crop_size=96, resize_size=96)),
        build(data_config(exact, "dali", dali_decoder="mixed", crop_size=96, resize_size=96), device="cuda"),
        GPU_MEAN_TOLERANCE,
    )


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
    folder = write_jpeg_folder(tmp_path / "d", [(32, 32)])
    with pytest.warns(UserWarning, match=r"images are 32 px, so every crop is upscaled"):
        build(data_config(folder, crop_size=224, resize_size=256))
