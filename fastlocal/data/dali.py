"""NVIDIA DALI pipelines for image folders: JPEG decoding on the GPU (``mixed``) or the CPU (``cpu``).

Training fuses decoding with RandomResizedCrop (with ``mixed`` nvJPEG decodes only the crop's region),
then resizes, mirrors and normalises in one ``crop_mirror_normalize`` writing float32 CHW; evaluation
resizes the shorter side and center-crops. Without CUDA the whole pipeline runs on the CPU
(``device_id=None``). Each epoch builds a pipeline over this rank's files in :meth:`Loader.order`
(``random_shuffle`` off). DALI is imported only when a loader is made; without it the DataError names
the pip extra.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from fastlocal.data.loader import Loader, epoch_seed
from fastlocal.data.sources import DataError, ImageList

READER_NAME = "reader"
# Image formats DALI's decoders read (PIL's names); a GIF, say, would fail inside the pipeline.
DALI_FORMATS = frozenset({"JPEG", "PNG", "TIFF", "BMP", "PPM", "JPEG2000", "WEBP", "MPO"})


def import_dali():
    """The nvidia.dali module, or a DataError naming the pip extra when it is not installed."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as err:
        raise DataError(
            f"data.loader = dali needs NVIDIA DALI: pip install 'fastlocal[dali]' (nvidia-dali-cuda130) "
            f"(importing it failed: {err})"
        ) from None
    return dali


@functools.cache
def image_pipeline():
    """The pipeline definition (made on first use, so importing this module does not import DALI)."""
    dali = import_dali()
    fn, types = dali.fn, dali.types

    @dali.pipeline_def
    def pipeline(files, labels, loader):
        cfg, info, decoder, crop = loader.cfg, loader.info, loader.decoder, loader.cfg.crop_size
        root, linear = str(loader.images.base), dict(interp_type=types.INTERP_LINEAR, antialias=True)
        jpegs, labels = fn.readers.file(
            file_root=root, files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name=READER_NAME
        )
        if loader.train:
            area, aspect = [0.08, 1.0], [3 / 4, 4 / 3]  # RandomResizedCrop's scale and ratio
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder, output_type=types.RGB, random_area=area, random_aspect_ratio=aspect
            )
            images = fn.resize(images, resize_x=crop, resize_y=crop, **linear)
            crop_args = dict(mirror=fn.random.coin_flip(probability=0.5) if info.flip else 0)
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=cfg.resize_size, **linear)
            crop_args = dict(crop=(crop, crop), crop_pos_x=0.5, crop_pos_y=0.5)
        if loader.on_cuda and decoder == "cpu":
            images = images.gpu()  # uint8 crops cross PCIe, not float32
        mean, std = [255 * m for m in info.mean], [255 * s for s in info.std]
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, **crop_args
        )
        return images, labels.gpu() if loader.on_cuda else labels

    return pipeline


class DaliLoader(Loader):
    """Batches from a DALI pipeline over an :class:`~fastlocal.data.sources.ImageList`.

    Yields (x float32 (B, 3, crop, crop) normalised with `info`'s mean and std, on `device`; y int64 (B,)).
    From `cfg` (DataConfig): crop_size, resize_size; dali_decoder, auto (mixed on a CUDA device, cpu
    otherwise), mixed or cpu; num_workers, DALI's CPU worker threads. `sharding`: as :class:`Loader`'s.
    """

    def __init__(self, images: ImageList, batch_size: int, cfg, info, *, device, train, **sharding):
        import_dali()
        super().__init__(len(images), batch_size, train=train, **sharding)
        self.images, self.cfg, self.info, self.device = images, cfg, info, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.on_cuda, decoder = self.device.type == "cuda", cfg.dali_decoder
        if decoder == "mixed" and not self.on_cuda:
            raise DataError(
                f"data.dali_decoder = mixed decodes on the GPU, but the run's device is {self.device.type}; "
                f"use data.dali_decoder=cpu (or auto), or system.device=cuda on a machine with a GPU"
            )
        self.decoder = "mixed" if decoder == "mixed" or (decoder == "auto" and self.on_cuda) else "cpu"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        # A resumed epoch skips its first batches; DALI draws the augmentation per pipeline, so the crops and
        # flips of the rest differ from an uninterrupted epoch's (the images and their order do not).
        order = self.order().tolist()[self.start_step * self.batch_size :]
        try:
            pipe = image_pipeline()(
                files=[self.images.paths[i] for i in order],
                labels=[int(self.images.labels[i]) for i in order],
                batch_size=self.batch_size,
                num_threads=max(1, self.cfg.num_workers),
                prefetch_queue_depth=2,
                device_id=self.device.index if self.on_cuda else None,
                seed=epoch_seed(self.seed, self.epoch, self.rank) & 0x7FFFFFFF,
                loader=self,
            )
            pipe.build()
            policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
            for (batch,) in DALIGenericIterator([pipe], ["x", "y"], reader_name=READER_NAME, last_batch_policy=policy):
                labels = batch["y"].view(-1).to(self.device, torch.int64, non_blocking=True)
                yield batch["x"].to(self.device, non_blocking=True), labels
        except RuntimeError as err:  # building or running the pipeline
            detail = " ".join(str(err).split())[:600]
            raise DataError(
                f"the DALI pipeline over {self.images.base} failed: {detail}. The files were checked before "
                f"the pipeline was built, so one changed since, or DALI cannot decode a file PIL can; "
                f"remove it or use data.loader=torch"
            ) from None
