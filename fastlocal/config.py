"""Run configuration: dataclasses grouped by section, TOML files, ``--section.key=value`` overrides.

Every field has a default, so an empty config is the quick start. A field's annotation says what is
valid: ``Literal[...]`` lists its choices, ``Annotated[int, Min(1)]`` gives its minimum; :func:`validate`
reads them and checks what depends on several fields, raising :class:`ConfigError` (a :class:`UserError`)
whose message says what is valid. Validation never changes the config: "auto" values are resolved where
they are used (:func:`resolve_num_modules`, the methods' heads).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import tomllib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

if typing.TYPE_CHECKING:
    import torch


class UserError(Exception):
    """A problem with the user's input (config, data, paths): reported without a traceback."""


def exits_2_on_user_error(main: typing.Callable[..., int]) -> typing.Callable[..., int]:
    """A front end's `main(argv) -> exit code`, with a `UserError` printed as one line on stderr (what is wrong
    and how to fix it) and exit code 2, argparse's code for bad input, instead of a traceback."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"fastlocal: error: {err}", file=sys.stderr)
            return 2

    return wrapped


class ConfigError(UserError, ValueError):
    """An invalid configuration value or key."""


@dataclass(frozen=True)
class Min:
    """Annotation metadata of a numeric field: its smallest valid value (``Annotated[int, Min(1)]``)."""

    value: float


Switch = Literal["auto", "true", "false"]
"""An option that is on where it has been shown to help (auto), or forced on or off."""


@dataclass
class DataConfig:
    source: Literal["bundled", "cifar10", "svhn", "stl10", "imagefolder"] = "bundled"
    """Dataset: bundled (a CIFAR-10 subset shipped in the package), cifar10, svhn, stl10, imagefolder.
    cifar10 reads CIFAR's python-pickle batch files, and unpickling can run code: it trusts the files in
    data.root (use ones you downloaded from the CIFAR site or through torchvision)."""
    root: str = ""
    """Where the dataset lives: the folder holding torchvision's files for cifar10/svhn/stl10 (never
    downloaded: copy them there), or for imagefolder a folder or .tar/.tar.gz archive holding
    train/<class>/* and test/<class>/*."""
    max_train: Annotated[int, Min(0)] = 0
    """Use only the first N training images, class-balanced (0 = all)."""
    max_test: Annotated[int, Min(0)] = 0
    """Use only the first N test images, class-balanced (0 = all)."""
    image_size: Annotated[int, Min(0)] = 0
    """imagefolder only: resize every image to this square size (0 = keep; all must then match)."""
    normalize: Literal["auto", "cifar10", "half", "imagenet", "dataset"] = "auto"
    """auto (per source, docs/method.md#recipes), cifar10, half (mean=std=0.5), imagenet, dataset (train stats)."""
    pad: Annotated[int, Min(-1)] = -1
    """Random-crop padding in pixels (-1 = per source: CIFAR 4, SVHN 2, STL-10 4, imagefolder size/8)."""
    pad_mode: Literal["auto", "reflect", "constant"] = "auto"
    """Padding for the random crop: auto (per source), reflect, constant (zeros)."""
    flip: Literal["auto", "on", "off"] = "auto"
    """Random horizontal flip: auto (per source; off for SVHN), on, off."""
    on_bad_image: Literal["error", "skip"] = "error"
    """An unreadable image in an imagefolder: error (stop and name it) or skip (warn and leave it out)."""
    cache_dir: str = ""
    """Where decoded uint8 caches and extracted archives go ('' = $FASTLOCAL_CACHE or ~/.cache/fastlocal)."""
    loader: Literal["auto", "device", "torch", "dali"] = "auto"
    """How batches are made: device (the whole dataset as uint8 on the device, augmented there), torch (PIL
    decoding in DataLoader workers), dali (NVIDIA DALI, JPEG decoding on the GPU; pip install 'fastlocal[dali]'),
    or auto: device for cifar10/svhn/stl10/bundled and image folders of small images, torch for image folders
    whose images are >= 128 px (data.image_size, or the first image's shorter side when image_size = 0)."""
    crop_size: Annotated[int, Min(1)] = 224
    """torch/dali loaders: the square crop in pixels (RandomResizedCrop for training, center crop for
    evaluation)."""
    resize_size: Annotated[int, Min(1)] = 256
    """torch/dali loaders: evaluation resizes the shorter side to this, then center-crops crop_size."""
    num_workers: Annotated[int, Min(0)] = 4
    """torch loader: DataLoader worker processes (0 = decode in the main process); dali: CPU threads; also
    the threads that check or decode images up front."""
    dali_decoder: Literal["auto", "mixed", "cpu"] = "auto"
    """dali loader: where JPEGs are decoded: auto (mixed on CUDA, cpu otherwise), mixed (nvJPEG on the GPU),
    cpu."""


@dataclass
class ModelConfig:
    arch: str = "resnet20"
    """resnet20/32/44/56/110 (32x32 inputs), resnet18/34/50/101/152 (ImageNet-style), torchvision:<name> (a
    torchvision classification model cut into stem + blocks + head, randomly initialised: ResNet, Wide-ResNet,
    ResNeXt, VGG-BN, ConvNeXt, MobileNetV3, EfficientNet, ViT; docs/any_model.md), timm:<name> (a timm model,
    pretrained=False: ResNet/ResNet-D, ConvNeXt, EfficientNet, RegNet, ViT/DeiT, Swin; pip install
    'fastlocal[timm]'), or package.module:factory (a function of num_classes and input_size returning a
    fastlocal.Backbone or such a model)."""
    zero_init_residual: bool = False
    """Zero-initialise the last BN of every residual branch (ImageNet ResNets)."""


@dataclass
class MethodConfig:
    name: str = "mlaan"
    """Training method: bp, dgl, infopro, mlaan, or one registered with fastlocal.methods.register_method
    (validate checks it against that registry)."""
    num_modules: Annotated[int, Min(0)] = 0
    """K, the number of gradient-isolated local modules; 0 = the method's default (1 for bp, 4 for the
    others: resolve_num_modules). bp needs 1, except with system.parallel = modules, where K places the
    stage boundaries of pipelined backprop (the same split a local method with this K trains)."""
    split: Literal["uniform", "balanced", "reference"] = "uniform"
    """How blocks are grouped: uniform (contiguous groups, larger first), balanced (by saved activation
    bytes), or reference (the authors' split for this arch and K; an error where they wrote none). uniform
    equals the authors' split everywhere they wrote one except ResNet-110 K=32."""
    stem_separate: bool = False
    """Make the stem a module of its own (the paper's DGL/InfoPro 'K=16' for ResNet-32)."""
    head: Literal["auto", "0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f"] = "auto"
    """Auxiliary classifier head: 0c1f, 0c2f, 1c1f, 1c2f, 1c3f, 2c2f (docs/method.md#heads-and-decoders);
    auto = 1c2f for dgl and infopro, 0c1f (GAP + Linear, the paper's "MLAAN" row) for mlaan on dgl, 1c2f for
    mlaan on infopro (each method resolves it)."""
    head_hidden: Annotated[int, Min(1)] = 128
    """Hidden width d of the auxiliary heads' Linear layers."""
    head_widen: Annotated[int, Min(1)] = 1
    """Widen factor w of the auxiliary heads' convolutions."""


@dataclass
class InfoProConfig:
    """InfoPro's local loss (docs/method.md#methods), also the base of InfoPro + MLAAN."""

    weights: tuple[float, ...] = (5.0, 0.5, 0.0, 1.0)
    """(ixx_1, ixy_1, ixx_2, ixy_2): reconstruction and label weights at the first and last local module,
    interpolated by module index. The MLAAN paper's runs used (5, 0.5, 0, 0), which gives module K-2 no
    local loss: plain InfoPro (and MLAAN with window 1) then never trains it (a warning says so), while
    MLAAN with window >= 2 trains it through the final loss. This default trains every module."""
    label_loss: Literal["ce", "supcon"] = "ce"
    """ce (a 1c2f classifier) or supcon (supervised contrastive, temperature 0.07)."""
    decoder_widen: Annotated[int, Min(1)] = 1
    """Width factor w of the decoder (12w hidden channels)."""


@dataclass
class MLAANConfig:
    """MLAAN = MLM cascade + LAM leap heads, on top of a base local method (docs/method.md#methods)."""

    base: Literal["dgl", "infopro"] = "dgl"
    """The base local method whose objective MLAAN augments: dgl or infopro."""
    window: Annotated[int, Min(1)] = 2
    """Cascade window W: the cascaded loss of module i reaches modules i-W+1..i (1 = no cascade)."""
    wx: Annotated[float, Min(0)] = 0.001
    """Weight of the independent term (module i only)."""
    wy: Annotated[float, Min(0)] = 0.999
    """Weight of the cascaded term (through the LAM when lam is on)."""
    lam: bool = True
    """Leap augmented modules on the cascaded term (off = 'MLM only' ablation)."""
    leaps: Literal["auto", "reference", "generated"] = "auto"
    """Leap lists: auto (the authors' table when this run's split is the one it was written for, else
    generated), reference (that table, or an error), generated. The run log and summary.json say which."""
    lam_mode: Literal["copies", "literal"] = "copies"
    """copies (the reference: a trainable copy plus a frozen EMA copy of the first leap block) or
    literal (EXPERIMENTAL: the paper's eq. 6-7, one trainable copy per leap block pulled by EMA; the EMA
    runs before the SGD step, where eq. 6-7 read SGD then EMA)."""
    ema_momentum: float = 0.995
    """Momentum m in [0, 1] of the LAM's EMA copies: ema = m * ema + (1 - m) * live, once per step."""
    ema_scope: Literal["all", "last"] = "all"
    """all (the paper) or last (only the last LAM's EMA moves: reproduces the CIFAR reference's bug)."""
    final_weights: tuple[float, ...] = (1.0, 1.0)
    """(c_own, c_prop): the final loss's weight on the last module and on the modules below it;
    (1, 1) in the CIFAR reference, (wx + wy, wy) in the ImageNet reference."""


@dataclass
class OptimConfig:
    lr: float = 0.1
    """Peak learning rate (> 0)."""
    momentum: Annotated[float, Min(0)] = 0.9
    """SGD momentum, in [0, 1)."""
    nesterov: bool = True
    """Nesterov momentum (needs momentum > 0)."""
    weight_decay: Annotated[float, Min(0)] = 1e-4
    """Weight decay on all parameters, as in the reference."""
    schedule: Literal["cosine", "ref", "cosine_epoch"] = "cosine"
    """cosine (per-iteration linear warmup then cosine), ref (the reference's CIFAR per-epoch rule with its
    10-epoch warmup), or cosine_epoch (the ImageNet reference: 0.5*lr*(1+cos(pi*epoch/E)), epoch from 0)."""
    warmup_epochs: Annotated[float, Min(0)] = 1.0
    """Linear warmup length for the cosine schedule, in epochs (may be fractional)."""


@dataclass
class TrainConfig:
    epochs: Annotated[int, Min(1)] = 4
    """Training epochs (the LR schedule's length)."""
    batch_size: Annotated[int, Min(1)] = 128
    """Training batch size; with data parallelism the global batch, split evenly over the processes."""
    eval_batch_size: Annotated[int, Min(1)] = 512
    """Evaluation batch size (no effect on the results)."""
    drop_last: bool = False
    """Drop the last partial training batch of each epoch."""
    checkpoint_every: Annotated[int, Min(0)] = 0
    """Also write the checkpoint every this many steps inside an epoch, with the position in the epoch's data
    order (0 = only at the end of every epoch). --resume, or a group torchrun restarts, then continues from
    that step and ends with the same weights as an uninterrupted run. A step checkpoint costs what an epoch's
    costs (a pipeline gathers its stages' weights on rank 0); not with system.parallel = hybrid, nor with
    pipeline.cascade = stale or pipeline.ema_every > 1 (they carry messages from one step into the next)."""


@dataclass
class SystemConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (cuda when available), cpu, cuda."""
    seed: int = 0
    """Seed of the model initialisation and of the data order and augmentation."""
    num_threads: Annotated[int, Min(0)] = 0
    """CPU threads for torch (0 = torch's default; at most the machine's CPU count)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 (autocast forwards; fp32 master weights, loss, optimizer and EMA arithmetic)."""
    channels_last: bool = False
    """Store activations and convolution weights channels-last (NHWC), faster on tensor-core GPUs."""
    cuda_graphs: Switch = "auto"
    """Capture the whole training step in a CUDA graph and replay it: auto (on with a CUDA device, where it
    was measured to help: docs/bench/gpu), true, false. A partial last batch runs eagerly; a failed capture
    warns and trains eagerly; true without CUDA warns."""
    cuda_streams: Switch = "auto"
    """Run each module's loss (heads, LAM, decoders; forward and backward) on a second CUDA stream while the
    next module runs forward: auto (on with a CUDA device), true, false. Bitwise the same gradients;
    memory: at most one more module graph and one more loss graph alive; true without CUDA warns."""
    kernels: Literal["auto", "triton", "reference"] = "auto"
    """auto (Triton kernels on CUDA, PyTorch elsewhere), triton (forced; on CPU only under
    TRITON_INTERPRET=1), reference (PyTorch everywhere)."""
    fused_batch_norm: Switch = "auto"
    """Run each residual block's batch norms fused with the ReLU and residual add after them (Triton; CIFAR
    ResNets): auto (on where system.kernels resolves to Triton on a CUDA device), true, false. Same math,
    fewer memory passes; true without the Triton kernels warns."""
    parallel: Literal["auto", "none", "data", "modules", "hybrid"] = "auto"
    """How several processes share the training: auto (data under torchrun, none otherwise), none (one
    process), data (data parallel: `torchrun --nproc_per_node=N -m fastlocal.train ...`; every rank holds the
    model and trains on its shard of each global batch of train.batch_size; each module's gradients are
    averaged across ranks as soon as the module is flushed), modules (pipeline: `torchrun --nproc_per_node=S
    -m fastlocal.train ... --system.parallel=modules` puts contiguous groups of local modules on S stages,
    one device each, which train at the same time: docs/pipeline.md), hybrid (both: `torchrun
    --nproc_per_node=W ... --system.parallel=hybrid --system.pipeline_stages=S` runs W/S data replicas of an
    S-stage pipeline on a (data, pipeline) device mesh; train.batch_size is the global batch, each stage's
    gradients are averaged over the replicas holding it: docs/pipeline.md#data-x-pipeline-hybrid)."""
    sync_batch_norm: bool = False
    """Data parallel, CUDA only: batch norm computes its batch statistics over the global batch
    (torch.nn.SyncBatchNorm) instead of per rank. Either way the running statistics are averaged across
    ranks before every evaluation and checkpoint."""
    recompute: Literal["none", "heads", "modules", "all"] = "none"
    """Trade time for activation memory, exactly (docs/usage.md#memory-options): none (keep every graph until
    its VJP), heads (the auxiliary heads, decoders and LAM copies keep only each block's input and recompute
    their forward, block by block, for their backward), modules (the backbone's local modules do so: a module
    keeps its blocks' inputs and recomputes each block for MLAAN's cascade and its weight VJP; for bp this is
    per-block gradient checkpointing), all (both: the lowest-memory exact setting). Batch-norm running
    statistics move once per step however often a block is recomputed."""
    fused_optimizer_step: bool = False
    """Step the optimizer inside the backward schedule: a local module's parameters as soon as its weight VJP
    ran, a loss's heads as soon as its backward ran, and free their gradients at once, so gradients of the
    whole model never coexist (the same update: docs/usage.md#memory-options). MLAAN's EMA reads each live
    weight before its update. One device, one process, no CUDA graphs (a ValueError says so otherwise)."""
    dist_timeout: Annotated[float, Min(1)] = 600.0
    """Multi-process runs: the seconds a rank waits for another (a collective, a pipeline message) before it
    ends the job with an error naming the rank that stopped answering and what it waited for; never a silent
    hang. Raise it above the longest pause of any one rank (rank 0 writing a large checkpoint)."""
    pipeline_stages: Annotated[int, Min(0)] = 0
    """system.parallel = hybrid: the pipeline stages S of the (data, pipeline) device mesh; it must divide the
    number of processes W, which gives W/S data replicas. The other modes ignore it (so a hybrid run resumes
    with --system.parallel=modules or none as it is)."""


@dataclass
class PipelineConfig:
    """system.parallel = modules: local modules on different devices (docs/pipeline.md)."""

    cascade: Literal["exact", "stale"] = "exact"
    """MLAAN, a cascaded loss whose window crosses a stage boundary: exact (the earlier stage waits for the
    cotangent the later stage sends back; equals the one-device step), or stale (it does not wait, and
    applies that cotangent one step late, Features Replay style, recomputing its last W-1 modules' forward
    from the input it kept; a deviation from the method: docs/pipeline.md)."""
    ema_every: Annotated[int, Min(1)] = 1
    """MLAAN, a LAM's EMA copy of a block another stage owns: the owner sends the live weights every this
    many steps P. 1 is exact (the receiver waits for them before its optimizer step); P > 1 sends without
    waiting and the receiver moves the copy with momentum m^P toward the weights sent P steps earlier."""
    stage_sizes: tuple[int, ...] = ()
    """How many local modules each stage holds, first stage first (they must sum to method.num_modules);
    () = partition by each module's cost measured on this device at the start of the run."""
    micro_batches: Annotated[int, Min(1)] = 4
    """method.name = bp (pipelined backprop, Schedule1F1B): each batch runs through the stages as this many
    equal micro-batches (at least one per stage; train.batch_size must divide by it); the gradient is their
    mean and batch norm normalises each micro-batch (docs/pipeline.md#the-pipelined-bp-baseline)."""


@dataclass
class LogConfig:
    progress: bool = True
    """Show progress bars."""
    measure_memory: bool = True
    """Record the peak memory of a training step (CPU: saved-tensor accounting of the first step)."""
    tensorboard: bool = False
    """Write TensorBoard event files to DIR/tensorboard: each module's loss, the total loss, test accuracy, LR,
    images/s and peak memory (fastlocal/tensorboard.py; pip install 'fastlocal[tensorboard]')."""


@dataclass
class Config:
    """A run's whole configuration: one section per TOML table."""

    data: DataConfig = field(default_factory=DataConfig)
    """The dataset, its augmentation and how batches are made."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """The training method, the split into local modules and the auxiliary heads."""
    infopro: InfoProConfig = field(default_factory=InfoProConfig)
    """InfoPro's objective (method infopro, or mlaan with base infopro)."""
    mlaan: MLAANConfig = field(default_factory=MLAANConfig)
    """MLAAN's cascade and LAM heads."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """SGD and the learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Epochs and batch sizes."""
    system: SystemConfig = field(default_factory=SystemConfig)
    """Device, precision, kernels and parallelism."""
    log: LogConfig = field(default_factory=LogConfig)
    """What is shown and measured."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Local modules on several devices (system.parallel = modules)."""


DEFAULT_NUM_MODULES = 4
CIFAR_ARCHS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def resolve_num_modules(method: MethodConfig) -> int:
    """K: method.num_modules, or the method's default when it is 0 (1 for bp, DEFAULT_NUM_MODULES otherwise)."""
    if method.num_modules:
        return method.num_modules
    return 1 if method.name == "bp" else DEFAULT_NUM_MODULES


def section_names(cfg: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def _field_types(section_obj) -> dict[str, typing.Any]:
    """Each field's annotation, its Annotated metadata kept."""
    hints = typing.get_type_hints(type(section_obj), include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_obj)}


def _unannotated(annotation):
    """Annotated[T, ...] -> T."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation


def field_choices(annotation) -> tuple[str, ...] | None:
    """The valid values of a Literal[...] field, None for any other."""
    annotation = _unannotated(annotation)
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def field_minimum(annotation) -> float | None:
    """The Min(...) of an Annotated field, None without one."""
    if typing.get_origin(annotation) is not Annotated:
        return None
    return next((m.value for m in annotation.__metadata__ if isinstance(m, Min)), None)


def _convert(key: str, value, expected: type):
    """Turn a TOML value or command-line string into `expected`, or raise ConfigError."""
    expected = _unannotated(expected)
    if field_choices(expected) is not None:
        expected = str  # a Literal of strings: its choices are checked by validate
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if expected is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if expected is str:
        if isinstance(value, str):
            return value.lower() if value.lower() in ("true", "false") else value
        if isinstance(value, bool):  # a TOML boolean for an auto/true/false switch
            return "true" if value else "false"
        raise ConfigError(f"{key} must be a string, got {value!r}")
    origin = typing.get_origin(expected)
    if origin is tuple:
        item_type = typing.get_args(expected)[0]
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_convert(key, v.strip() if isinstance(v, str) else v, item_type) for v in value)
    raise AssertionError(f"unsupported config field type {expected} for {key}")


def set_value(cfg: Config, dotted_key: str, value) -> None:
    """Set `section.key` on `cfg` from a TOML value or a command-line string."""
    section, _, key = dotted_key.partition(".")
    if section not in section_names(cfg) or not key:
        raise ConfigError(
            f"unknown config key {dotted_key!r}: keys look like section.key, with section one of "
            f"{', '.join(section_names(cfg))}"
        )
    section_obj = getattr(cfg, section)
    types = _field_types(section_obj)
    if key not in types:
        raise ConfigError(f"unknown config key {dotted_key!r}; valid keys in [{section}]: {', '.join(sorted(types))}")
    setattr(section_obj, key, _convert(dotted_key, value, types[key]))


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass an existing .toml file to --config")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None


# Keys older versions wrote into config.toml and checkpoints; none changed the math (beyond summation
# order), so a saved run that names one still resumes: the key is ignored with a warning.
REMOVED_KEYS = {
    "data.download": "datasets are never downloaded; copy the files into data.root",
    "mlaan.fuse_pair": "the LAM pair fusion measured no gain and was removed",
    "system.triton_conv": "the Triton convolution moved to experimental/triton_conv/",
}


def apply_mapping(cfg: Config, mapping: dict, origin: str) -> None:
    """Apply a nested {section: {key: value}} mapping (a TOML document) to `cfg`."""
    for section, values in mapping.items():
        if not isinstance(values, dict):
            raise ConfigError(
                f"{origin}: top-level key {section!r} must be a [section] table; sections are "
                f"{', '.join(section_names(cfg))}"
            )
        for key, value in values.items():
            if f"{section}.{key}" in REMOVED_KEYS:
                warnings.warn(
                    f"{origin}: {section}.{key} is ignored ({REMOVED_KEYS[f'{section}.{key}']})", stacklevel=2
                )
                continue
            set_value(cfg, f"{section}.{key}", value)


def validate(cfg: Config, method_names: typing.Iterable[str] | None = None) -> Config:
    """Check every field (its Literal choices, its Min, and the rules that tie fields together) and return
    `cfg` unchanged; raise ConfigError naming the field and what is valid. `method_names`: the valid
    method.name values (the CLIs pass the registry, fastlocal.methods.METHODS); without them method.name is
    checked where the method is built (fastlocal.methods.build_method), so this file needs no method."""
    method_choices = None if method_names is None else tuple(sorted(method_names))
    for section in section_names(cfg):
        section_obj = getattr(cfg, section)
        for name, annotation in _field_types(section_obj).items():
            key, value = f"{section}.{name}", getattr(section_obj, name)
            choices = method_choices if key == "method.name" else field_choices(annotation)
            if choices is not None and value not in choices:
                raise ConfigError(f"{key} = {value!r} is not valid; choose one of: {', '.join(choices)}")
            minimum = field_minimum(annotation)
            if minimum is not None and value < minimum:
                raise ConfigError(f"{key} = {value!r} is too small; it must be at least {minimum:g}")
    check_finite(cfg)
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr = {cfg.optim.lr} is not valid; it must be a positive number")
    if not cfg.optim.momentum < 1:
        raise ConfigError(
            f"optim.momentum = {cfg.optim.momentum} is not valid; it must be in [0, 1) "
            "(1 or more never forgets a gradient and diverges)"
        )
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ConfigError("optim.nesterov = true needs optim.momentum > 0; set optim.momentum or optim.nesterov=false")
    cpus = os.cpu_count() or 1
    if cfg.system.num_threads > cpus:
        raise ConfigError(
            f"system.num_threads = {cfg.system.num_threads} is more than this machine's {cpus} CPUs; "
            f"use 0 (torch's default) or a number from 1 to {cpus}"
        )
    arch_prefix, colon, arch_name = cfg.model.arch.partition(":")
    if cfg.model.arch not in CIFAR_ARCHS + IMAGENET_ARCHS and not (colon and arch_prefix and arch_name):
        raise ConfigError(
            f"model.arch = {cfg.model.arch!r} is not valid; choose one of: "
            f"{', '.join(CIFAR_ARCHS + IMAGENET_ARCHS)}, or torchvision:<name> (e.g. "
            "torchvision:vgg11_bn), timm:<name> (e.g. timm:convnext_atto), or package.module:factory"
        )
    _validate_data(cfg.data, cfg.system.device)
    num_modules = resolve_num_modules(cfg.method)
    if cfg.method.name == "bp" and num_modules != 1 and cfg.system.parallel != "modules":
        raise ConfigError(
            f"method.name = bp trains end to end, so method.num_modules must be 1 (got {num_modules}); "
            "use method.name=dgl for K local modules (with system.parallel=modules, K cuts the backbone "
            "for pipelined backprop; to resume such a run on one device add --method.num_modules=1)"
        )
    if (
        cfg.method.name == "bp"
        and cfg.system.parallel == "modules"
        and cfg.train.batch_size % cfg.pipeline.micro_batches
    ):
        raise ConfigError(
            f"train.batch_size = {cfg.train.batch_size} does not split into pipeline.micro_batches = "
            f"{cfg.pipeline.micro_batches} equal micro-batches; choose a batch size divisible by it, or another "
            "pipeline.micro_batches"
        )
    if len(cfg.infopro.weights) != 4 or min(cfg.infopro.weights) < 0:
        raise ConfigError(
            f"infopro.weights = {list(cfg.infopro.weights)} is not valid; give four weights >= 0: "
            "[ixx_1, ixy_1, ixx_2, ixy_2]"
        )
    if cfg.method.name == "mlaan" and cfg.mlaan.window >= num_modules:
        raise ConfigError(
            f"mlaan.window = {cfg.mlaan.window} with method.num_modules = {num_modules}: a window of K or "
            "more lets the last loss reach every module, so no local heads are built and this is plain BP; use "
            f"mlaan.window from 1 to {num_modules - 1}, or method.name=bp"
        )
    if len(cfg.mlaan.final_weights) != 2:
        raise ConfigError(f"mlaan.final_weights = {list(cfg.mlaan.final_weights)} is not valid; give [c_own, c_prop]")
    if not 0 <= cfg.mlaan.ema_momentum <= 1:
        raise ConfigError(f"mlaan.ema_momentum = {cfg.mlaan.ema_momentum} is not valid; it must be in [0, 1]")
    if cfg.system.sync_batch_norm and cfg.system.fused_batch_norm == "true":
        raise ConfigError(
            "system.sync_batch_norm = true and system.fused_batch_norm = true do not combine (the fused "
            "kernel computes per-rank statistics); set system.fused_batch_norm=false or auto"
        )
    if cfg.system.parallel == "hybrid" and cfg.method.name == "bp":
        raise ConfigError(
            "system.parallel = hybrid trains local modules; pipelined backprop runs with system.parallel=modules "
            "(or data-parallel bp with system.parallel=data)"
        )
    if cfg.system.parallel == "hybrid" and cfg.system.pipeline_stages == 0:
        raise ConfigError(
            "system.parallel = hybrid needs the pipeline's stage count: set system.pipeline_stages=S, a divisor "
            "of the number of processes W (W/S data replicas of an S-stage pipeline)"
        )
    if cfg.system.fused_optimizer_step and (
        cfg.system.parallel in ("data", "modules", "hybrid") or cfg.system.cuda_graphs == "true"
    ):
        raise ConfigError(
            "system.fused_optimizer_step = true runs on one device in one process, eagerly (not with "
            f"system.parallel = {cfg.system.parallel}, system.cuda_graphs = {cfg.system.cuda_graphs}); set "
            "system.fused_optimizer_step=false, or system.parallel=none and system.cuda_graphs=auto or false"
        )
    if cfg.pipeline.stage_sizes and (
        min(cfg.pipeline.stage_sizes) < 1 or sum(cfg.pipeline.stage_sizes) != resolve_num_modules(cfg.method)
    ):
        raise ConfigError(
            f"pipeline.stage_sizes = {list(cfg.pipeline.stage_sizes)} must be positive module counts "
            f"summing to K = {resolve_num_modules(cfg.method)}; or [] to partition by cost"
        )
    return cfg


def _validate_data(data: DataConfig, device: str) -> None:
    """The data options that depend on each other."""
    if data.source == "imagefolder" and not data.root:
        raise ConfigError(
            "data.source = imagefolder needs data.root: a folder or .tar/.tar.gz archive holding "
            "train/<class>/* and test/<class>/*"
        )
    if data.resize_size < data.crop_size:
        raise ConfigError(
            f"data.resize_size = {data.resize_size} is smaller than data.crop_size = {data.crop_size}; evaluation "
            f"resizes the shorter side to resize_size and then center-crops crop_size, so set resize_size >= "
            f"crop_size (ImageNet: 256 and 224)"
        )
    if data.loader in ("torch", "dali") and data.source not in ("imagefolder", "bundled"):
        raise ConfigError(
            f"data.loader = {data.loader} reads image folders (data.source = imagefolder or bundled), not "
            f"{data.source}; use data.loader=device (or auto) for {data.source}"
        )
    if data.dali_decoder == "mixed" and (data.loader != "dali" or device == "cpu"):
        raise ConfigError(
            f"data.dali_decoder = mixed decodes JPEGs on the GPU with DALI, but data.loader = {data.loader} and "
            f"system.device = {device}; set data.loader=dali and system.device=cuda (or auto on a GPU machine), "
            f"or data.dali_decoder=auto"
        )


def check_finite(cfg: Config) -> None:
    """Every number must be finite: inf or nan in an option only ever ends in a diverged or crashed run."""
    for section in section_names(cfg):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ConfigError(f"{section}.{key} = {value!r} is not valid; it must be a finite number")


def build_config(
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    method_names: typing.Iterable[str] | None = None,
) -> Config:
    """Defaults, then the TOML file, then `section.key=value` overrides, then validation."""
    cfg = Config()
    if config_file is not None:
        apply_mapping(cfg, load_toml(config_file), str(config_file))
    apply_overrides(cfg, overrides)
    return validate(cfg, method_names)


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        set_value(cfg, key.strip().removeprefix("--"), value.strip())


# What `--resume` may change: keys that do not change what the epochs already run computed, and
# train.epochs (which changes the LR schedule of the remaining epochs; the CLI says so).
# system.parallel, system.pipeline_stages and pipeline.stage_sizes too: a run moves between one device, a pipeline
# and a hybrid mesh (the pipeline gives the single-device weights), and its checkpoint has the single-device format
# every way.
# For bp, method.num_modules and pipeline.micro_batches too (RESUME_OVERRIDABLE_BP): K only cuts a pipeline's stages,
# and the micro-batches change only how the later steps normalise, as moving bp onto one device does.
RESUME_OVERRIDABLE = (
    "log.progress",
    "log.measure_memory",
    "data.cache_dir",
    "train.epochs",
    "system.parallel",
    "system.pipeline_stages",
    "pipeline.stage_sizes",
)
RESUME_OVERRIDABLE_BP = ("method.num_modules", "pipeline.micro_batches")


def resume_config(
    saved: dict, overrides: typing.Sequence[str], method_names: typing.Iterable[str] | None = None
) -> Config:
    """The config of a resumed run: the one saved in its checkpoint, with `overrides` allowed only for the keys
    in RESUME_OVERRIDABLE (and RESUME_OVERRIDABLE_BP for bp); any other difference is a ConfigError that lists
    the keys."""
    before = from_dict(saved, method_names)
    cfg = from_dict(saved, method_names)
    apply_overrides(cfg, overrides)
    validate(cfg, method_names)
    old, new = _flat(before), _flat(cfg)
    allowed = RESUME_OVERRIDABLE + (RESUME_OVERRIDABLE_BP if cfg.method.name == "bp" else ())
    changed = [key for key in new if new[key] != old[key] and key not in allowed]
    if changed:
        listed = "; ".join(f"{key} = {old[key]!r} in the run, {new[key]!r} asked" for key in changed)
        raise ConfigError(
            f"--resume continues a run with the config it was trained with, but {listed}. Only "
            f"{', '.join(allowed)} may change on resume; to train with other values, "
            "start a new run: --config RUN/config.toml --out NEW_DIR with your overrides"
        )
    return cfg


def _flat(cfg: Config) -> dict:
    return {f"{section}.{key}": value for section, values in to_dict(cfg).items() for key, value in values.items()}


def parse_overrides(args: typing.Sequence[str]) -> list[str]:
    """Command-line `--section.key=value` (or `--section.key value`) items as `section.key=value` strings."""
    overrides, i = [], 0
    while i < len(args):
        item = args[i]
        if not item.startswith("--") or "." not in item.split("=")[0]:
            raise UserError(
                f"unexpected argument {item!r}; config overrides look like --section.key=value "
                "(run with --help for the options)"
            )
        if "=" in item:
            overrides.append(item[2:])
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            overrides.append(f"{item[2:]}={args[i + 1]}")
            i += 2
        else:
            raise UserError(f"override {item!r} has no value; write {item}=VALUE")
    return overrides


def cuda_option_on(option: str, setting: str, device: torch.device, instead: str) -> bool:
    """Whether a CUDA-only auto | true | false option is on for `device`: auto and true mean on with CUDA;
    true elsewhere warns, saying what happens `instead`."""
    if setting == "false":
        return False
    if device.type != "cuda":
        if setting == "true":
            warnings.warn(
                f"{option}=true needs a CUDA device, but the run is on {device}; {instead} (set "
                f"{option}=false or auto to silence this)",
                stacklevel=3,
            )
        return False
    return True


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(mapping: dict, method_names: typing.Iterable[str] | None = None) -> Config:
    cfg = Config()
    apply_mapping(cfg, mapping, "saved config")
    return validate(cfg, method_names)


def to_toml(cfg: Config) -> str:
    """Write `cfg` as TOML (only the scalar and list types the schema uses)."""

    def fmt(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return repr(value)

    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {fmt(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
