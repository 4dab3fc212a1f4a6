"""NVIDIA DALI pipelines for image folders: JPEG decoding on the GPU (``mixed``) or the CPU (``cpu``).

Training: the file reader, a fused decode + RandomResizedCrop (area (0.08, 1), aspect (3/4, 4/3); with
``mixed`` nvJPEG decodes only the crop's region), a resize to crop x crop, a coin-flip mirror and the
normalisation in one ``crop_mirror_normalize`` that writes float32 CHW. Evaluation: decode, resize the
shorter side to ``resize_size``, center crop ``crop_size``, normalise. With a CUDA device the output is
a CUDA tensor already (the CPU decoder's uint8 crops are copied to the GPU before normalising); on a
CPU-only machine the whole pipeline runs on the CPU (``device_id=None``).

The loader shares :mod:`fastlocal.data.streaming`'s file list, order and sharding: each epoch (re)builds
a pipeline whose file list is that epoch's order, with ``random_shuffle`` off, so an epoch is a function
of (seed, epoch) and a resumed run reads the same order as an uninterrupted one. DALI is imported only
here and only when used; without it :func:`import_dali` raises a DataError that names the extra.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from fastlocal.data.loader import batches_per_epoch, epoch_seed
from fastlocal.data.sources import DataError
from fastlocal.data.streaming import ImageList, check_batch_and_shard, epoch_order, shard_bounds

MISSING_DALI = "data.loader = dali needs NVIDIA DALI: pip install 'fastlocal[dali]' (nvidia-dali-cuda130)"
READER_NAME = "reader"


def import_dali():
    """The nvidia.dali module, or a DataError naming the pip extra when it is not installed."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as err:
        raise DataError(f"{MISSING_DALI} (importing it failed: {err})") from None
    return dali


def dali_version() -> str | None:
    try:
        return import_dali().__version__
    except DataError:
        return None


def resolve_decoder(name: str, device: torch.device | str) -> str:
    """data.dali_decoder -> mixed or cpu (auto: mixed on a CUDA device, cpu otherwise)."""
    device = torch.device(device)
    if name == "auto":
        return "mixed" if device.type == "cuda" else "cpu"
    if name == "mixed" and device.type != "cuda":
        raise DataError(
            f"data.dali_decoder = mixed decodes on the GPU, but the run's device is {device.type}; use "
            f"data.dali_decoder=cpu (or auto), or system.device=cuda on a machine with a GPU"
        )
    if name not in ("mixed", "cpu"):
        raise DataError(f"data.dali_decoder = {name!r} is not valid; choose one of: auto, mixed, cpu")
    return name


class DaliLoader:
    """Batches from a DALI pipeline over an :class:`~fastlocal.data.streaming.ImageList`.

    Yields (x float32 (B, 3, crop, crop) normalised, on `device`; y int64 (B,)). Training batches follow
    the epoch's order (set by :meth:`set_epoch`) and augmentation seeded from (seed, epoch); evaluation
    batches come in list order and the last one may be partial. `num_threads`: DALI's CPU worker threads.
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
        decoder: str = "auto",
        num_threads: int = 4,
        shard_id: int = 0,
        num_shards: int = 1,
        list_dir: str | Path | None = None,
    ):
        self._dali = import_dali()
        check_batch_and_shard(batch_size, shard_id, num_shards)
        bad = next((p for p in images.paths if "\n" in p or "\r" in p), None)
        if bad is not None:
            raise DataError(f"image path {bad!r} contains a line break, which DALI's file list cannot hold; rename it")
        self.images = images
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.crop_size, self.resize_size = int(crop_size), int(resize_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.decoder = resolve_decoder(decoder, self.device)
        self.num_threads = max(1, int(num_threads))
        self.shard_id, self.num_shards = int(shard_id), int(num_shards)
        self.list_dir = Path(list_dir) if list_dir is not None else None
        self._epoch = 0

    @property
    def num_images(self) -> int:
        start, end = shard_bounds(len(self.images), self.shard_id, self.num_shards)
        return end - start

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_images, self.batch_size, self.train and self.drop_last)

    # -- pipeline ---------------------------------------------------------------------------------------
    def _write_file_list(self, order: Sequence[int]) -> Path:
        """A DALI file list ("relative/path label" per line) in reading order; the reader shards it."""
        folder = self.list_dir if self.list_dir is not None else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix="dali-", suffix=".txt")
        paths, labels = self.images.paths, self.images.labels
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{paths[i]} {int(labels[i])}\n" for i in order)
        return Path(name)

    def _pipeline(self, file_list: Path, seed: int):
        dali = self._dali
        fn, types = dali.fn, dali.types
        on_cuda = self.device.type == "cuda"
        pipe = dali.Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if on_cuda else None,
            seed=seed,
            prefetch_queue_depth=2,
        )
        decoder_device = "mixed" if self.decoder == "mixed" else "cpu"
        mean = [255 * m for m in self.mean]
        std = [255 * s for s in self.std]
        with pipe:
            jpegs, labels = fn.readers.file(
                file_root=str(self.images.folder),
                file_list=str(file_list),
                shard_id=self.shard_id,
                num_shards=self.num_shards,
                random_shuffle=False,  # the order is the file list's: the epoch's permutation
                pad_last_batch=True,  # no wrap into the next epoch; the iterator drops the padding
                name=READER_NAME,
            )
            if self.train:
                images = fn.decoders.image_random_crop(
                    jpegs,
                    device=decoder_device,
                    output_type=types.RGB,
                    random_area=[0.08, 1.0],
                    random_aspect_ratio=[3 / 4, 4 / 3],
                    num_attempts=10,
                )
                images = fn.resize(
                    images,
                    resize_x=self.crop_size,
                    resize_y=self.crop_size,
                    interp_type=types.INTERP_LINEAR,
                    antialias=True,
                )
                if on_cuda and decoder_device == "cpu":
                    images = images.gpu()  # uint8 crops cross PCIe, not float32
                mirror = fn.random.coin_flip(probability=0.5) if self.flip else 0
                images = fn.crop_mirror_normalize(
                    images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, mirror=mirror
                )
            else:
                images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
                # subpixel_scale off: the scale is (integer output size) / (input size), as PIL's resize.
                images = fn.resize(
                    images,
                    resize_shorter=self.resize_size,
                    interp_type=types.INTERP_LINEAR,
                    antialias=True,
                    subpixel_scale=False,
                )
                if on_cuda and decoder_device == "cpu":
                    images = images.gpu()
                images = fn.crop_mirror_normalize(
                    images,
                    crop=(self.crop_size, self.crop_size),
                    crop_pos_x=0.5,
                    crop_pos_y=0.5,
                    dtype=types.FLOAT,
                    output_layout="CHW",
                    mean=mean,
                    std=std,
                )
            if on_cuda:
                labels = labels.gpu()
            pipe.set_outputs(images, labels)
        return pipe

    def _dali_error(self, err: Exception) -> DataError:
        detail = " ".join(str(err).split())[:600]
        return DataError(
            f"the DALI pipeline over {self.images.folder} failed: {detail}. The files were checked before the "
            f"pipeline was built, so one changed since, or DALI cannot decode a file PIL can; remove it or use "
            f"data.loader=torch"
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self.train:
            order = epoch_order(len(self.images), self.seed, self._epoch).tolist()
            seed = epoch_seed(self.seed, self._epoch) & 0x7FFFFFFF
        else:
            order, seed = range(len(self.images)), self.seed & 0x7FFFFFFF
        file_list = self._write_file_list(order)
        pipe = iterator = None
        try:
            pipe = self._pipeline(file_list, seed)
            try:
                pipe.build()
                policy = LastBatchPolicy.DROP if self.train and self.drop_last else LastBatchPolicy.PARTIAL
                iterator = DALIGenericIterator([pipe], ["x", "y"], reader_name=READER_NAME, last_batch_policy=policy)
            except RuntimeError as err:
                raise self._dali_error(err) from None
            finally:
                file_list.unlink(missing_ok=True)  # read when the pipeline is built
            while True:
                try:
                    batch = next(iterator)[0]
                except StopIteration:
                    return
                except RuntimeError as err:
                    raise self._dali_error(err) from None
                x = batch["x"].to(self.device, non_blocking=True)
                y = batch["y"].view(-1).to(self.device, torch.int64, non_blocking=True)
                yield x, y
        finally:
            file_list.unlink(missing_ok=True)
            # Free the pipeline (its threads, buffers and decoder state) before the next epoch builds one.
            del iterator, pipe

    def __repr__(self) -> str:
        return (
            f"DaliLoader({self.num_images} images of {self.images.folder}, batch_size={self.batch_size}, "
            f"train={self.train}, crop={self.crop_size}, resize={self.resize_size}, flip={self.flip}, "
            f"decoder={self.decoder}, threads={self.num_threads}, shard {self.shard_id}/{self.num_shards}, "
            f"device={self.device})"
        )
