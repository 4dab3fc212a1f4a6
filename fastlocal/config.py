"""Run configuration: dataclasses grouped by section, TOML files, ``--section.key=value`` overrides.

Every field has a default, so an empty config is the quick start. Validation raises
:class:`ConfigError` (a :class:`UserError`) whose message says what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

if typing.TYPE_CHECKING:
    import torch


class UserError(Exception):
    """A problem with the user's input (config, data, paths): reported without a traceback."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value or key."""


@dataclass
class DataConfig:
    source: str = "bundled"
    """Dataset: bundled (a CIFAR-10 subset shipped in the package), cifar10, svhn, stl10, imagefolder.
    cifar10 reads CIFAR's python-pickle batch files, and unpickling can run code: it trusts the files in
    data.root (use ones you downloaded from the CIFAR site or through torchvision)."""
    root: str = ""
    """Where the dataset lives: the folder holding torchvision's files for cifar10/svhn/stl10 (never
    downloaded: copy them there), or for imagefolder a folder or .tar/.tar.gz archive holding
    train/<class>/* and test/<class>/*."""
    max_train: int = 0
    """Use only the first N training images, class-balanced (0 = all)."""
    max_test: int = 0
    """Use only the first N test images, class-balanced (0 = all)."""
    image_size: int = 0
    """imagefolder only: resize every image to this square size (0 = keep; all must then match)."""
    normalize: str = "auto"
    """auto (per source, docs/method.md#recipes), cifar10, half (mean=std=0.5), imagenet, dataset (train stats)."""
    pad: int = -1
    """Random-crop padding in pixels (-1 = per source: CIFAR 4, SVHN 2, STL-10 4, imagefolder size/8)."""
    pad_mode: str = "auto"
    """Padding for the random crop: auto (per source), reflect, constant (zeros)."""
    flip: str = "auto"
    """Random horizontal flip: auto (per source; off for SVHN), on, off."""
    on_bad_image: str = "error"
    """An unreadable image in an imagefolder: error (stop and name it) or skip (warn and leave it out)."""
    cache_dir: str = ""
    """Where decoded uint8 caches and extracted archives go ('' = $FASTLOCAL_CACHE or ~/.cache/fastlocal)."""
    loader: str = "auto"
    """How batches are made: device (the whole dataset as uint8 on the device, augmented there), torch (PIL
    decoding in DataLoader workers), dali (NVIDIA DALI, JPEG decoding on the GPU; pip install 'fastlocal[dali]'),
    or auto: device for cifar10/svhn/stl10/bundled and image folders of small images, torch for image folders
    whose images are >= 128 px (data.image_size, or the first image's shorter side when image_size = 0)."""
    crop_size: int = 224
    """torch/dali loaders: the square crop in pixels (RandomResizedCrop for training, center crop for
    evaluation)."""
    resize_size: int = 256
    """torch/dali loaders: evaluation resizes the shorter side to this, then center-crops crop_size."""
    num_workers: int = 4
    """torch loader: DataLoader worker processes (0 = decode in the main process); dali: CPU threads; also
    the threads that check or decode images up front."""
    dali_decoder: str = "auto"
    """dali loader: where JPEGs are decoded: auto (mixed on CUDA, cpu otherwise), mixed (nvJPEG on the GPU),
    cpu."""


def validate_data(data: DataConfig, device: str) -> None:
    """The data options that depend on each other (single values are checked by CHOICES and MINIMUMS)."""
    if data.pad < -1:
        raise ConfigError(f"data.pad = {data.pad} is not valid; use -1 (per source) or a padding >= 0")
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


@dataclass
class ModelConfig:
    arch: str = "resnet20"
    """resnet20/32/44/56/110 (32x32 inputs), resnet18/34/50/101/152 (ImageNet-style), torchvision:<name> (a
    torchvision classification model cut into stem + blocks + head, randomly initialised: ResNet, Wide-ResNet,
    ResNeXt, VGG-BN, ConvNeXt, MobileNetV3, EfficientNet, ViT; docs/any_model.md), or package.module:factory (a
    function of num_classes and input_size returning a fastlocal.Backbone or such a model)."""
    zero_init_residual: bool = False
    """Zero-initialise the last BN of every residual branch (ImageNet ResNets)."""


@dataclass
class MethodConfig:
    name: str = "mlaan"
    """Training method: bp, dgl, infopro, mlaan."""
    num_modules: int = 0
    """K, the number of gradient-isolated local modules (bp needs 1); 0 = the method's default
    (1 for bp, 4 for the others)."""
    split: str = "uniform"
    """How blocks are grouped: uniform (contiguous groups, larger first), balanced (by saved activation
    bytes), or reference (the authors' split for this arch and K; an error where they wrote none). uniform
    equals the authors' split everywhere they wrote one except ResNet-110 K=32."""
    stem_separate: bool = False
    """Make the stem a module of its own (the paper's DGL/InfoPro 'K=16' for ResNet-32)."""
    head: str = "auto"
    """Auxiliary classifier head: 0c1f, 0c2f, 1c1f, 1c2f, 1c3f, 2c2f (docs/method.md#heads-and-decoders);
    auto = 1c2f for dgl and infopro, 0c1f (GAP + Linear, the paper's "MLAAN" row) for mlaan."""
    head_hidden: int = 128
    """Hidden width d of the auxiliary heads' Linear layers."""
    head_widen: int = 1
    """Widen factor w of the auxiliary heads' convolutions."""


@dataclass
class InfoProConfig:
    """InfoPro's local loss (docs/method.md#methods), also the base of InfoPro + MLAAN."""

    weights: tuple[float, ...] = (5.0, 0.5, 0.0, 1.0)
    """(ixx_1, ixy_1, ixx_2, ixy_2): reconstruction and label weights at the first and last local module,
    interpolated by module index. The MLAAN paper's runs used (5, 0.5, 0, 0), which gives module K-2 no
    local loss: plain InfoPro (and MLAAN with window 1) then never trains it (a warning says so), while
    MLAAN with window >= 2 trains it through the final loss. This default trains every module."""
    label_loss: str = "ce"
    """ce (a 1c2f classifier) or supcon (supervised contrastive, temperature 0.07)."""
    decoder_widen: int = 1
    """Width factor w of the decoder (12w hidden channels)."""


@dataclass
class MLAANConfig:
    """MLAAN = MLM cascade + LAM leap heads, on top of a base local method (docs/method.md#methods)."""

    base: str = "dgl"
    """The base local method whose objective MLAAN augments: dgl or infopro."""
    window: int = 2
    """Cascade window W: the cascaded loss of module i reaches modules i-W+1..i (1 = no cascade)."""
    wx: float = 0.001
    """Weight of the independent term (module i only)."""
    wy: float = 0.999
    """Weight of the cascaded term (through the LAM when lam is on)."""
    lam: bool = True
    """Leap augmented modules on the cascaded term (off = 'MLM only' ablation)."""
    leaps: str = "auto"
    """Leap lists: auto (the authors' table when this run's split is the one it was written for, else
    generated), reference (that table, or an error), generated. The run log and summary.json say which."""
    lam_mode: str = "copies"
    """copies (the reference: a trainable copy plus a frozen EMA copy of the first leap block) or
    literal (EXPERIMENTAL: the paper's eq. 6-7, one trainable copy per leap block pulled by EMA; the EMA
    runs before the SGD step, where eq. 6-7 read SGD then EMA)."""
    ema_momentum: float = 0.995
    ema_scope: str = "all"
    """all (the paper) or last (only the last LAM's EMA moves: reproduces the CIFAR reference's bug)."""
    final_weights: tuple[float, ...] = (1.0, 1.0)
    """(c_own, c_prop): the final loss's weight on the last module and on the modules below it;
    (1, 1) in the CIFAR reference, (wx + wy, wy) in the ImageNet reference."""


@dataclass
class OptimConfig:
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    """Weight decay on all parameters, as in the reference."""
    schedule: str = "cosine"
    """cosine (per-iteration linear warmup then cosine), ref (the reference's CIFAR per-epoch rule with its
    10-epoch warmup), or cosine_epoch (the ImageNet reference: 0.5*lr*(1+cos(pi*epoch/E)), epoch from 0)."""
    warmup_epochs: float = 1.0
    """Linear warmup length for the cosine schedule, in epochs (may be fractional)."""


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 128
    eval_batch_size: int = 512
    drop_last: bool = False
    """Drop the last partial training batch of each epoch."""


@dataclass
class SystemConfig:
    device: str = "auto"
    """auto (cuda when available), cpu, cuda."""
    seed: int = 0
    num_threads: int = 0
    """CPU threads for torch (0 = torch's default; at most the machine's CPU count)."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast forwards; fp32 master weights, loss, optimizer and EMA arithmetic)."""
    channels_last: bool = False
    """Store activations and convolution weights channels-last (NHWC), faster on tensor-core GPUs."""
    cuda_graphs: str = "auto"
    """Capture the whole training step in a CUDA graph and replay it: auto (on with a CUDA device, where it
    was measured to help: docs/bench/gpu), true, false. A partial last batch runs eagerly; a failed capture
    warns and trains eagerly; true without CUDA warns."""
    cuda_streams: str = "auto"
    """Run each module's loss (heads, LAM, decoders; forward and backward) on a second CUDA stream while the
    next module runs forward: auto (on with a CUDA device), true, false. Bitwise the same gradients;
    memory: at most one more module graph and one more loss graph alive; true without CUDA warns."""
    kernels: str = "auto"
    """auto (Triton kernels on CUDA, PyTorch elsewhere), triton (forced; on CPU only under
    TRITON_INTERPRET=1), reference (PyTorch everywhere)."""
    fused_batch_norm: str = "auto"
    """Run each residual block's batch norms fused with the ReLU and residual add after them (Triton; CIFAR
    ResNets): auto (on where system.kernels resolves to Triton on a CUDA device), true, false. Same math,
    fewer memory passes; true without the Triton kernels warns."""
    parallel: str = "auto"
    """How several processes share the training: auto (data under torchrun, none otherwise), none (one
    process), data (data parallel: `torchrun --nproc_per_node=N -m fastlocal.train ...`; every rank holds the
    model and trains on its shard of each global batch of train.batch_size; each module's gradients are
    averaged across ranks as soon as the module is flushed), modules (pipeline: `torchrun --nproc_per_node=S
    -m fastlocal.train ... --system.parallel=modules` puts contiguous groups of local modules on S stages,
    one device each, which train at the same time: docs/pipeline.md). hybrid (data x pipeline) is not
    implemented yet."""
    sync_batch_norm: bool = False
    """Data parallel, CUDA only: batch norm computes its batch statistics over the global batch
    (torch.nn.SyncBatchNorm) instead of per rank. Either way the running statistics are averaged across
    ranks before every evaluation and checkpoint."""
    pipeline_stages: int = 0
    """system.parallel = hybrid: the pipeline stages of the (data, pipeline) device mesh (0 = every process
    is a stage). Not used yet: hybrid is not implemented."""


@dataclass
class PipelineConfig:
    """system.parallel = modules: local modules on different devices (docs/pipeline.md)."""

    cascade: str = "exact"
    """MLAAN, a cascaded loss whose window crosses a stage boundary: exact (the earlier stage waits for the
    cotangent the later stage sends back; equals the one-device step), or stale (it does not wait, and
    applies that cotangent one step late, Features Replay style, recomputing its last W-1 modules' forward
    from the input it kept; a deviation from the method: docs/pipeline.md)."""
    ema_every: int = 1
    """MLAAN, a LAM's EMA copy of a block another stage owns: the owner sends the live weights every this
    many steps P. 1 is exact (the receiver waits for them before its optimizer step); P > 1 sends without
    waiting and the receiver moves the copy with momentum m^P toward the weights sent P steps earlier."""
    stage_sizes: tuple[int, ...] = ()
    """How many local modules each stage holds, first stage first (they must sum to method.num_modules);
    () = partition by each module's cost measured on this device at the start of the run."""


@dataclass
class LogConfig:
    progress: bool = True
    """Show progress bars."""
    measure_memory: bool = True
    """Record the peak memory of a training step (CPU: saved-tensor accounting of the first step)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    infopro: InfoProConfig = field(default_factory=InfoProConfig)
    mlaan: MLAANConfig = field(default_factory=MLAANConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    log: LogConfig = field(default_factory=LogConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


DEFAULT_NUM_MODULES = 4
CIFAR_ARCHS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# An option that is on where it has been shown to help ("auto"), or forced on or off.
SWITCH = ("auto", "true", "false")

# Fields whose value must be one of a fixed set; methods may extend "method.name" when registered.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("bundled", "cifar10", "svhn", "stl10", "imagefolder"),
    "data.normalize": ("auto", "cifar10", "half", "imagenet", "dataset"),
    "data.pad_mode": ("auto", "reflect", "constant"),
    "data.flip": ("auto", "on", "off"),
    "data.on_bad_image": ("error", "skip"),
    "data.loader": ("auto", "device", "torch", "dali"),
    "data.dali_decoder": ("auto", "mixed", "cpu"),
    "method.split": ("uniform", "balanced", "reference"),
    "method.head": ("auto", "0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f"),
    "infopro.label_loss": ("ce", "supcon"),
    "mlaan.base": ("dgl", "infopro"),
    "mlaan.leaps": ("auto", "reference", "generated"),
    "mlaan.lam_mode": ("copies", "literal"),
    "mlaan.ema_scope": ("all", "last"),
    "optim.schedule": ("cosine", "ref", "cosine_epoch"),
    "system.device": ("auto", "cpu", "cuda"),
    "system.kernels": ("auto", "triton", "reference"),
    "system.precision": ("fp32", "bf16"),
    "system.cuda_graphs": SWITCH,
    "system.cuda_streams": SWITCH,
    "system.fused_batch_norm": SWITCH,
    "system.parallel": ("auto", "none", "data", "modules", "hybrid"),
    "pipeline.cascade": ("exact", "stale"),
}

# name -> (minimum, inclusive?) for numeric fields.
MINIMUMS: dict[str, float] = {
    "data.max_train": 0,
    "data.max_test": 0,
    "data.image_size": 0,
    "data.crop_size": 1,
    "data.resize_size": 1,
    "data.num_workers": 0,
    "method.num_modules": 0,
    "method.head_hidden": 1,
    "method.head_widen": 1,
    "infopro.decoder_widen": 1,
    "mlaan.window": 1,
    "mlaan.wx": 0,
    "mlaan.wy": 0,
    "optim.momentum": 0,
    "optim.weight_decay": 0,
    "optim.warmup_epochs": 0,
    "train.epochs": 1,
    "train.batch_size": 1,
    "train.eval_batch_size": 1,
    "system.num_threads": 0,
    "system.pipeline_stages": 0,
    "pipeline.ema_every": 1,
}


def section_names(cfg: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def _field_types(section_obj) -> dict[str, type]:
    hints = typing.get_type_hints(type(section_obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(section_obj)}


def _convert(key: str, value, expected: type):
    """Turn a TOML value or command-line string into `expected`, or raise ConfigError."""
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
        raise ConfigError(
            f"unknown config key {dotted_key!r}; valid keys in [{section}]: {', '.join(sorted(types))}"
        )
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
                warnings.warn(f"{origin}: {section}.{key} is ignored ({REMOVED_KEYS[f'{section}.{key}']})",
                              stacklevel=2)
                continue
            set_value(cfg, f"{section}.{key}", value)


def validate(cfg: Config, method_names: typing.Iterable[str] | None = None) -> Config:
    """Check every field; raise ConfigError naming the field and what is valid."""
    choices = dict(CHOICES)
    if method_names is not None:
        choices["method.name"] = tuple(sorted(method_names))
    for section in section_names(cfg):
        section_obj = getattr(cfg, section)
        for f in dataclasses.fields(section_obj):
            key = f"{section}.{f.name}"
            value = getattr(section_obj, f.name)
            if key in choices and value not in choices[key]:
                raise ConfigError(f"{key} = {value!r} is not valid; choose one of: {', '.join(choices[key])}")
            if key in MINIMUMS and value < MINIMUMS[key]:
                raise ConfigError(f"{key} = {value!r} is too small; it must be at least {MINIMUMS[key]:g}")
    check_finite(cfg)
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr = {cfg.optim.lr} is not valid; it must be a positive number")
    if not cfg.optim.momentum < 1:
        raise ConfigError(f"optim.momentum = {cfg.optim.momentum} is not valid; it must be in [0, 1) "
                          "(1 or more never forgets a gradient and diverges)")
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ConfigError("optim.nesterov = true needs optim.momentum > 0; set optim.momentum or optim.nesterov=false")
    cpus = os.cpu_count() or 1
    if cfg.system.num_threads > cpus:
        raise ConfigError(f"system.num_threads = {cfg.system.num_threads} is more than this machine's {cpus} CPUs; "
                          f"use 0 (torch's default) or a number from 1 to {cpus}")
    arch_prefix, colon, arch_name = cfg.model.arch.partition(":")
    if cfg.model.arch not in CIFAR_ARCHS + IMAGENET_ARCHS and not (colon and arch_prefix and arch_name):
        raise ConfigError(f"model.arch = {cfg.model.arch!r} is not valid; choose one of: "
                          f"{', '.join(CIFAR_ARCHS + IMAGENET_ARCHS)}, or torchvision:<name> (e.g. "
                          "torchvision:vgg11_bn), or package.module:factory")
    if cfg.data.source == "imagefolder" and not cfg.data.root:
        raise ConfigError(
            "data.source = imagefolder needs data.root: a folder or .tar/.tar.gz archive holding "
            "train/<class>/* and test/<class>/*"
        )
    validate_data(cfg.data, cfg.system.device)
    if cfg.method.num_modules == 0:
        cfg.method.num_modules = 1 if cfg.method.name == "bp" else DEFAULT_NUM_MODULES
    if len(cfg.infopro.weights) != 4 or min(cfg.infopro.weights) < 0:
        raise ConfigError(f"infopro.weights = {list(cfg.infopro.weights)} is not valid; give four weights >= 0: "
                          "[ixx_1, ixy_1, ixx_2, ixy_2]")
    if cfg.method.name == "mlaan" and cfg.mlaan.window >= cfg.method.num_modules:
        raise ConfigError(
            f"mlaan.window = {cfg.mlaan.window} with method.num_modules = {cfg.method.num_modules}: a window of K or "
            "more lets the last loss reach every module, so no local heads are built and this is plain BP; use "
            f"mlaan.window from 1 to {cfg.method.num_modules - 1}, or method.name=bp")
    if len(cfg.mlaan.final_weights) != 2:
        raise ConfigError(f"mlaan.final_weights = {list(cfg.mlaan.final_weights)} is not valid; give [c_own, c_prop]")
    if not 0 <= cfg.mlaan.ema_momentum <= 1:
        raise ConfigError(f"mlaan.ema_momentum = {cfg.mlaan.ema_momentum} is not valid; it must be in [0, 1]")
    if cfg.system.parallel == "hybrid":
        raise ConfigError("system.parallel = hybrid (data x pipeline parallel) is not implemented yet; use "
                          "system.parallel=modules (pipeline) or data under torchrun, or none")
    if cfg.pipeline.stage_sizes and (min(cfg.pipeline.stage_sizes) < 1
                                     or sum(cfg.pipeline.stage_sizes) != cfg.method.num_modules):
        raise ConfigError(f"pipeline.stage_sizes = {list(cfg.pipeline.stage_sizes)} must be positive module counts "
                          f"summing to method.num_modules = {cfg.method.num_modules}; or [] to partition by cost")
    return cfg


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
# system.parallel and pipeline.stage_sizes too: a run moves between one device and a pipeline (the pipeline gives
# the single-device weights), and its checkpoint has the single-device format either way.
RESUME_OVERRIDABLE = ("log.progress", "log.measure_memory", "data.cache_dir", "train.epochs", "system.parallel",
                      "pipeline.stage_sizes")


def resume_config(saved: dict, overrides: typing.Sequence[str],
                  method_names: typing.Iterable[str] | None = None) -> Config:
    """The config of a resumed run: the one saved in its checkpoint, with `overrides` allowed only for the keys
    in RESUME_OVERRIDABLE; any other difference is a ConfigError that lists the keys."""
    before = from_dict(saved, method_names)
    cfg = from_dict(saved, method_names)
    apply_overrides(cfg, overrides)
    validate(cfg, method_names)
    old, new = _flat(before), _flat(cfg)
    changed = [key for key in new if new[key] != old[key] and key not in RESUME_OVERRIDABLE]
    if changed:
        listed = "; ".join(f"{key} = {old[key]!r} in the run, {new[key]!r} asked" for key in changed)
        raise ConfigError(f"--resume continues a run with the config it was trained with, but {listed}. Only "
                          f"{', '.join(RESUME_OVERRIDABLE)} may change on resume; to train with other values, "
                          "start a new run: --config RUN/config.toml --out NEW_DIR with your overrides")
    return cfg


def _flat(cfg: Config) -> dict:
    return {f"{section}.{key}": value for section, values in to_dict(cfg).items() for key, value in values.items()}


def parse_overrides(args: typing.Sequence[str]) -> list[str]:
    """Command-line `--section.key=value` (or `--section.key value`) items as `section.key=value` strings."""
    overrides, i = [], 0
    while i < len(args):
        item = args[i]
        if not item.startswith("--") or "." not in item.split("=")[0]:
            raise UserError(f"unexpected argument {item!r}; config overrides look like --section.key=value "
                            "(run with --help for the options)")
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
            warnings.warn(f"{option}=true needs a CUDA device, but the run is on {device}; {instead} (set "
                          f"{option}=false or auto to silence this)", stacklevel=3)
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
