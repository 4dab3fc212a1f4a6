"""The one build path of a run: from a `Config` (and the environment torchrun sets) to the device, the parallel
context, the data, the learner (backbone, local modules, method) and the trainer.

    run = build_run(cfg, out_dir)        # everything a run needs, ready to train
    summary = run.trainer.fit(log=run.log)

The command-line front ends (`fastlocal.train`, `fastlocal.plan`, `fastlocal.analyze`) call into this file;
nothing here imports them. The order matters in three places: the process group exists before the data is
sharded, the kernels are chosen before the model moves to its device (the fused batch norm swaps modules), and
every rank takes rank 0's weights before a trainer wraps them.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch

from fastlocal.config import IMAGENET_ARCHS, Config, DataConfig, UserError, resolve_num_modules
from fastlocal.learner import LocalLearner
from fastlocal.parallel import data as data_parallel
from fastlocal.parallel.group import DataParallel, init_data_parallel, resolve_parallel, silent_log
from fastlocal.parallel.mesh import Mesh

# (number of classes, image size) of the data sources whose shape is fixed: a plan needs both (the heads'
# widths, the feature-map sizes) but must not read the images to learn them.
SOURCE_SHAPES: dict[str, tuple[int, int]] = {
    "bundled": (10, 32),
    "cifar10": (10, 32),
    "svhn": (10, 32),
    "stl10": (10, 96),
}


# -- device and kernels ------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """system.device -> a torch.device (auto: CUDA where there is one)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("system.device = cuda, but no CUDA device is available; use system.device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_kernels(name: str, device: torch.device) -> str:
    """system.kernels -> the kernel backend ("triton" or "reference") on `device`."""
    from fastlocal.kernels import resolve_backend

    try:
        return resolve_backend(name, device)
    except ValueError as err:
        raise UserError(f"system.kernels = {name}: {err}") from None


# -- the learner -------------------------------------------------------------------------------------------------
def build_learner(
    cfg: Config, num_classes: int, image_size: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
) -> LocalLearner:
    """The `fastlocal.LocalLearner` (backbone, local modules, method) of a run with `cfg` on images of
    `image_size` pixels normalised with `mean`/`std`: the Python API's learner is what the CLI trains."""
    from fastlocal.models import build_backbone

    backbone = build_backbone(cfg.model.arch, num_classes, image_size, cfg.model.zero_init_residual)
    return LocalLearner.from_config(cfg, backbone, mean, std)


def describe_leaps(cfg: Config, source: str) -> str:
    """The run log's line on where the LAM leap lists came from."""
    if source == "preset":
        return (
            f"leap lists: preset (the authors' table for {cfg.model.arch} K={resolve_num_modules(cfg.method)}, "
            "written for this split)"
        )
    return (
        "leap lists: generated (fastlocal's rule; the authors wrote no table for this arch, K and split, "
        "see docs/method.md#splits-and-leap-tables)"
    )


def data_shape(data: DataConfig, arch: str, num_classes: int = 0, image_size: int = 0) -> tuple[int, int]:
    """(number of classes, image size) a run on `data` will see, from the config alone.

    A fixed-shape source answers from SOURCE_SHAPES. An image folder: the classes are its train/
    subfolders (counted, not read), the size is data.crop_size for the streaming loaders (torch, dali) or
    data.image_size; `num_classes` / `image_size` (> 0) answer where the config cannot."""
    if data.source in SOURCE_SHAPES:
        known_classes, known_size = SOURCE_SHAPES[data.source]
        return num_classes or known_classes, image_size or known_size
    if not image_size:
        streams = data.loader in ("torch", "dali") or (
            data.loader == "auto" and arch in IMAGENET_ARCHS and data.image_size == 0
        )
        image_size = data.crop_size if streams else data.image_size
    if not image_size:
        raise UserError(
            "the image size of this image folder is known only from its images; set data.image_size, "
            "data.loader=torch (which crops to data.crop_size), or pass --image-size N"
        )
    if not num_classes:
        train = Path(data.root).expanduser() / "train"
        if not train.is_dir():
            raise UserError(
                f"cannot count the classes of data.root = {data.root!r} without reading it (no folder "
                f"{train}); pass --num-classes N"
            )
        num_classes = sum(1 for p in train.iterdir() if p.is_dir())
    return num_classes, image_size


def plan(cfg: Config, num_classes: int, image_size: int) -> dict:
    """What a run with `cfg` builds: the modules' part names, the LAM leap lists by module, where they
    came from, and the trainable and frozen parameter counts (backbone, heads, LAM copies)."""
    torch.manual_seed(cfg.system.seed)
    learner = build_learner(cfg, num_classes, image_size)
    backbone, modules, method = learner.backbone, learner.local_modules, learner.method
    names = [info.name for info in backbone.part_info]
    params = [*backbone.parameters(), *method.parameters()]
    return {
        "modules": [[names[p] for p in m.part_ids] for m in modules],
        "leaps": {str(i): [names[p] for p in parts] for i, parts in getattr(method, "leap_parts", {}).items()},
        "leaps_source": getattr(method, "leaps_source", None),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "frozen_parameters": sum(p.numel() for p in params if not p.requires_grad),
    }


def profile_pipeline(
    cfg: Config, num_classes: int, image_size: int, num_stages: int, link_gbps: float = 0.0, micro_batches: int = 4
) -> dict:
    """`plan --profile`: fastlocal.parallel.cost.profile on this run's device, with random images of the run's
    shape (the costs do not depend on the pixels)."""
    from fastlocal.parallel.cost import profile

    info = SimpleNamespace(image_size=image_size, num_classes=num_classes, mean=(0.5,) * 3, std=(0.5,) * 3)
    return profile(
        cfg,
        lambda method_cfg: build_learner(method_cfg, num_classes, image_size),
        info,
        resolve_device(cfg.system.device),
        num_stages,
        link_gbps,
        micro_batches,
    )


# -- the parallel context ---------------------------------------------------------------------------------------
@dataclass
class ParallelContext:
    """How this process takes part in the run. `mode`: "none", "data" (data parallel), "modules" (a pipeline of
    the local modules) or "hybrid" (data replicas of a pipeline). The data is read as shard `shard` of
    `num_shards` (data ranks; hybrid: replicas) at `batch_size` images per step and shard."""

    mode: str
    device: torch.device
    batch_size: int
    group: DataParallel | None = None
    mesh: Mesh | None = None
    shard: int = 0
    num_shards: int = 1

    @property
    def is_main(self) -> bool:
        """The process that logs and writes the run directory."""
        return self.group is None or self.group.is_main


def build_parallel(cfg: Config, device: torch.device) -> ParallelContext:
    """Join the process group torchrun set up (if any) and say where this process sits: data parallel under
    torchrun by default (train.batch_size is the global batch), or the stages of a module pipeline."""
    mode = resolve_parallel(cfg.system.parallel)
    context = ParallelContext(mode, device, cfg.train.batch_size)
    if mode == "none":
        if cfg.system.sync_batch_norm:
            warnings.warn(
                "system.sync_batch_norm = true applies to data-parallel runs only; this run has one process",
                stacklevel=2,
            )
        return context
    world_size = int(os.environ["WORLD_SIZE"])
    if mode == "data":
        context.batch_size = data_parallel.per_rank_batch(cfg.train.batch_size, world_size)
        data_parallel.check_options(cfg, device)
    else:  # a pipeline: every stage reads the data, stage 0 uses it
        from fastlocal.parallel.mesh import hybrid_mesh, hybrid_replicas
        from fastlocal.parallel.pipeline import check_pipeline

        check_pipeline(cfg)
        if mode == "hybrid":  # D = W/S replicas of the pipeline, each on its shard of every global batch
            replicas = hybrid_replicas(world_size, cfg.system.pipeline_stages)
            context.batch_size = data_parallel.per_rank_batch(cfg.train.batch_size, replicas)
    context.group, context.device = init_data_parallel(device, timedelta(seconds=cfg.system.dist_timeout))
    if mode == "data":
        context.shard, context.num_shards = context.group.rank, context.group.world_size
    if mode == "hybrid":
        context.mesh = hybrid_mesh(cfg.system.pipeline_stages, context.device)
        context.shard, context.num_shards = context.mesh.replica, context.mesh.num_replicas
    return context


# -- kernels, placement, trainer --------------------------------------------------------------------------------
def place_learner(cfg: Config, learner: LocalLearner, context: ParallelContext) -> None:
    """Choose the kernels (and the fused batch norm, which swaps the CIFAR blocks' modules), move the model to
    its device and memory format, and under torchrun give every rank rank 0's weights."""
    from fastlocal.models.cifar_resnet import use_fused_batch_norm

    backbone, method, device = learner.backbone, learner.method, context.device
    method.kernels = resolve_kernels(cfg.system.kernels, device)
    sync_batch_norm = context.group is not None and cfg.system.sync_batch_norm
    if cfg.system.fused_batch_norm == "true":
        enable_on_blocks(
            "system.fused_batch_norm",
            use_fused_batch_norm,
            backbone,
            method,
            method.kernels,
            cfg.model.arch,
            "the blocks run PyTorch's batch norm",
        )
    elif cfg.system.fused_batch_norm == "auto" and device.type == "cuda" and method.kernels == "triton":
        if not sync_batch_norm:
            use_fused_batch_norm([backbone, method], "triton")  # nothing happens for backbones without CIFAR blocks
    memory_format = torch.channels_last if cfg.system.channels_last else torch.preserve_format
    backbone.to(device, memory_format=memory_format)
    method.to(device, memory_format=memory_format)
    if context.group is not None:
        if cfg.system.sync_batch_norm:
            data_parallel.use_sync_batch_norm(backbone, method)
        data_parallel.broadcast_from_rank0(backbone, method)


def enable_on_blocks(option: str, use, backbone, method, backend: str, arch: str, otherwise: str) -> None:
    """`option`=true, a Triton path of the CIFAR ResNet blocks (`use` sets it on them): set it, or say why
    it cannot be."""
    if backend != "triton":
        warnings.warn(
            f"{option}=true needs the Triton kernels (a CUDA device, or TRITON_INTERPRET=1 for the CPU "
            f"interpreter), but system.kernels resolved to {backend!r}: {otherwise}",
            stacklevel=2,
        )
    if use([backbone, method], backend) == 0:
        warnings.warn(
            f"{option}=true: model.arch={arch!r} has no CIFAR ResNet blocks; it applies to the CIFAR "
            "ResNets only, so nothing changes",
            stacklevel=2,
        )


def build_trainer(cfg: Config, context: ParallelContext, learner: LocalLearner, data, out_dir: Path, log=print):
    """The trainer of this process: one device or data parallel (`fastlocal.engine.Trainer`), a stage of the
    local-module pipeline, or a stage of pipelined backprop."""
    backbone, modules, method, device = learner.backbone, learner.local_modules, learner.method, context.device
    if context.mode == "modules" and cfg.method.name == "bp":
        from fastlocal.parallel.pipelined_bp import PipelinedBackpropTrainer

        return PipelinedBackpropTrainer(cfg, backbone, method, data, device, out_dir, context.group, log=log)
    if context.mode in ("modules", "hybrid"):
        from fastlocal.parallel.pipeline import PipelineTrainer

        return PipelineTrainer(
            cfg, backbone, modules, method, data, device, out_dir, context.group, log=log, mesh=context.mesh
        )
    from fastlocal.engine import Trainer

    return Trainer(cfg, backbone, modules, method, data, device, out_dir, context.group)


@dataclass
class Run:
    """A run, built: its trainer, the log this process writes to (silent on ranks other than 0) and the lines
    that describe what was built."""

    trainer: object
    log: object
    description: list[str] = field(default_factory=list)


def build_run(cfg: Config, out_dir: Path, log=print) -> Run:
    """Everything a run with `cfg` needs, in order: device, parallel context, data, learner, kernels and
    placement, trainer."""
    from fastlocal.data import build_data
    from fastlocal.split import describe_split

    context = build_parallel(cfg, resolve_device(cfg.system.device))
    if not context.is_main:
        log = silent_log
    if cfg.system.num_threads:
        torch.set_num_threads(cfg.system.num_threads)
    if context.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.system.seed)
    data = build_data(
        cfg.data,
        batch_size=context.batch_size,
        eval_batch_size=cfg.train.eval_batch_size,
        device=context.device,
        seed=cfg.system.seed,
        drop_last=cfg.train.drop_last,
        progress=cfg.log.progress and context.is_main,
        rank=context.shard,
        world_size=context.num_shards,
    )
    learner = build_learner(cfg, data.info.num_classes, data.info.image_size, data.info.mean, data.info.std)
    place_learner(cfg, learner, context)
    trainer = build_trainer(cfg, context, learner, data, out_dir, log)
    description = [
        f"{cfg.method.name} {cfg.model.arch} K={len(trainer.modules)} on {data.info.name} "
        f"({data.train.num_images} train / {data.test.num_images} test images) on {context.device}"
        + where(cfg, context),
        f"modules: {describe_split(learner.backbone, [m.part_ids for m in trainer.modules])}",
    ]
    if getattr(learner.method, "leaps_source", None):
        description.append(describe_leaps(cfg, learner.method.leaps_source))
    return Run(trainer, log, description)


def where(cfg: Config, context: ParallelContext) -> str:
    """The run log's words on the processes of a multi-process run."""
    if context.mode == "data":
        return f", rank 0 of {context.num_shards} (data parallel; the image counts are per rank)"
    if context.mode == "modules":
        return f", {context.group.world_size} pipeline stages"
    if context.mode == "hybrid":
        return (
            f", {context.num_shards} data replicas x {cfg.system.pipeline_stages} pipeline stages (the image counts "
            "are per replica)"
        )
    return ""
