"""Shared pieces of the step and memory benchmarks: size modes, cases, builders, the timed step, memory.

Size modes, chosen by ``--bench-mode`` (default ``gpu`` when CUDA is available, else ``cpu``):

- ``gpu``: the paper's sizes: batch 1024 at 32x32 for the CIFAR ResNets, ImageNet ResNet-34 at batch 32
  and 224x224; several timed rounds after an untimed warm-up (cudnn.benchmark autotuning happens there).
- ``cpu``: the same cases at a small batch (8 for CIFAR sizes, 2 for ImageNet at 224x224), three timed
  rounds per case after the untimed memory step (which doubles as the warm-up), one intra-op thread
  unless ``--bench-threads`` says otherwise; the whole suite runs in minutes.
- ``smoke``: tiny archs (ResNet-20 at 16x16 for the CIFAR cases, ResNet-18 at 32x32 for the ImageNet
  ones), batch 2: it checks in seconds that the harness still runs (CI: ``--benchmark-disable``).

A case is one training step as a user runs it: ``optimizer.zero_grad``, ``local_train_step`` (forward and
backward of the local schedule), ``optimizer.step``, on random inputs already on the device (data
loading is not measured). The device is synchronised inside the timed function.

Memory, per device convention:

- CUDA: ``max_memory_allocated`` (the headline figure), ``max_memory_reserved`` and the process total
  from NVML (the convention of the paper's Table 3), for one step after the cache was emptied.
- CPU: the bytes of tensors saved for backward alive at the peak of one step
  (``fastlocal.measure.SavedTensorAccountant``; parameters and buffers are not counted). This is the
  activation memory local learning saves. The inputs that ``system.recompute`` keeps are saved through
  autograd too, so they are counted (``python -m fastlocal.plan --memory`` adds parameters, gradients,
  optimizer state and EMA copies).

Ratios to BP come from one session: the BP case of the same backbone, batch and input size records its
figures in a module-level cache as it runs; a case whose BP was deselected measures it lazily, once.

The other options (``--bench-rounds``, ``--bench-threads``, ``--bench-kernels``, ``--bench-budget-s``,
``--bench-data``) are pytest options, defined and explained in bench/conftest.py.
"""

from __future__ import annotations

import functools
import gc
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from fastlocal.bench.report import METHOD_ORDER, ratio
from fastlocal.config import CIFAR_ARCHS, build_config
from fastlocal.measure import SavedTensorAccountant, cuda_peak, device_name, parameter_storages, reset_peak
from fastlocal.methods import METHODS, Batch, build_method
from fastlocal.models import build_backbone
from fastlocal.optim import build_optimizer, step_parameters
from fastlocal.recompute import set_recompute
from fastlocal.schedule import forward_context_for, local_train_step
from fastlocal.split import split_backbone

MODES = ("smoke", "cpu", "gpu")
SESSION_START = time.monotonic()
HAS_CUDA = torch.cuda.is_available()
CIFAR_MEAN_STD = ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Residual blocks per backbone (the split's K limit is this, +1 with method.stem_separate).
NUM_BLOCKS = {
    "resnet20": 9,
    "resnet32": 15,
    "resnet44": 21,
    "resnet56": 27,
    "resnet110": 54,
    "resnet18": 8,
    "resnet34": 16,
    "resnet50": 16,
    "resnet101": 33,
    "resnet152": 50,
}


@dataclass(frozen=True)
class Options:
    """The suite's pytest options (bench/conftest.py), read once when pytest starts."""

    mode: str = "gpu" if HAS_CUDA else "cpu"
    rounds: int | None = None
    threads: int | None = None
    kernels: str = "auto"
    budget_s: float | None = None
    data: str | None = None


OPTIONS = Options()  # replaced by bench/conftest.py's pytest_configure


def bench_mode() -> str:
    return OPTIONS.mode


@dataclass(frozen=True)
class Sizes:
    cifar_batch: int
    cifar_size: int
    imagenet_batch: int
    imagenet_size: int
    warmup_steps: int
    """Untimed steps before the memory step (which is itself untimed)."""
    rounds: int
    """Timed steps per case; the reported time is their median."""
    sweep_batches: tuple[int, ...]
    sweep_rounds: int
    arch_for: dict
    """Paper arch -> the arch actually run (smoke mode shrinks them)."""


SIZES = {
    "gpu": Sizes(
        cifar_batch=1024,
        cifar_size=32,
        imagenet_batch=32,
        imagenet_size=224,
        warmup_steps=2,
        rounds=7,
        sweep_batches=(128, 256, 512, 1024),
        sweep_rounds=3,
        arch_for={},
    ),
    "cpu": Sizes(
        cifar_batch=8,
        cifar_size=32,
        imagenet_batch=2,
        imagenet_size=224,
        warmup_steps=0,
        rounds=3,
        sweep_batches=(2, 4, 8, 16),
        sweep_rounds=2,
        arch_for={},
    ),
    "smoke": Sizes(
        cifar_batch=2,
        cifar_size=16,
        imagenet_batch=2,
        imagenet_size=32,
        warmup_steps=0,
        rounds=1,
        sweep_batches=(2,),
        sweep_rounds=1,
        arch_for={"resnet32": "resnet20", "resnet110": "resnet20", "resnet34": "resnet18"},
    ),
}


def sizes(mode: str) -> Sizes:
    return SIZES[mode] if OPTIONS.rounds is None else replace(SIZES[mode], rounds=OPTIONS.rounds)


def bench_device(mode: str) -> torch.device:
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    if OPTIONS.threads:
        torch.set_num_threads(OPTIONS.threads)
    elif device.type == "cpu":
        # One intra-op thread: at the CPU modes' small batches more threads buy little, and on a shared
        # machine they cost a lot (2 OpenMP threads on 2 busy cores made steps 10x slower and erratic).
        torch.set_num_threads(1)
    if device.type == "cuda":
        # The conditions of the authors' measurement (docs/method.md#the-authors-code-measured): fp32 with
        # TF32, cudnn autotuning.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return device


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------

METHOD_LABELS = METHOD_ORDER  # the report orders its tables by them

# The exact memory options of a method, by label (docs/usage.md#memory-options): `-heads`, `-modules`, `-all`
# are system.recompute; `-lowest` adds system.fused_optimizer_step to recompute=all. bp-checkpoint is BP with
# system.recompute=modules (per-block checkpointing).
OPTION_ITEMS = {
    "checkpoint": ["system.recompute=modules"],
    "heads": ["system.recompute=heads"],
    "modules": ["system.recompute=modules"],
    "all": ["system.recompute=all"],
    "lowest": ["system.recompute=all", "system.fused_optimizer_step=true"],
}


def MLAAN_OPTIONS(num_modules: int) -> list[tuple[str, int]]:  # noqa: N802 (reads as a constant in the grid)
    return [(f"mlaan-{option}", num_modules) for option in ("heads", "modules", "all", "lowest")]


# (paper arch, [(label, K), ...]): the paper's K ("K=16" of ResNet-32 is DGL/InfoPro K=16 with the stem
# separate and MLAAN K=15; "K=55" of ResNet-110 is K=54; ImageNet ResNet-34 "K=17" is K=16:
# docs/method.md#splits-and-leap-tables)
# and a few others, so memory can be plotted against K.
STEP_GRID = (
    (
        "resnet32",
        [
            ("bp", 1),
            ("bp-checkpoint", 1),
            ("bp-bf16", 1),
            ("dgl", 2),
            ("dgl", 4),
            ("dgl", 8),
            ("dgl", 16),
            ("infopro", 8),
            ("infopro", 16),
            ("mlaan", 4),
            ("mlaan", 8),
            ("mlaan", 15),
            ("dgl+mlaan", 8),
            ("dgl+mlaan", 15),
            *MLAAN_OPTIONS(15),
        ],
    ),
    (
        "resnet110",
        [
            ("bp", 1),
            ("bp-checkpoint", 1),
            ("bp-bf16", 1),
            ("dgl", 4),
            ("dgl", 16),
            ("dgl", 32),
            ("dgl", 54),
            ("infopro", 32),
            ("infopro", 54),
            ("mlaan", 16),
            ("mlaan", 32),
            ("mlaan", 54),
            ("dgl+mlaan", 32),
            ("dgl+mlaan", 54),
            *MLAAN_OPTIONS(54),
        ],
    ),
    (
        "resnet34",
        [
            ("bp", 1),
            ("bp-checkpoint", 1),
            ("bp-bf16", 1),
            ("dgl", 4),
            ("dgl", 16),
            ("mlaan", 4),
            ("mlaan", 16),
            *MLAAN_OPTIONS(16),
        ],
    ),
)


@dataclass(frozen=True)
class Case:
    label: str
    """One of METHOD_LABELS."""
    arch: str
    """The arch actually run."""
    num_modules: int
    batch: int
    input_size: int
    paper_arch: str
    """The arch of the paper's row this case stands for (differs from `arch` in smoke mode)."""

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.label}-K{self.num_modules}-b{self.batch}"

    @property
    def variant(self) -> str:
        """bf16, or a memory option of OPTION_ITEMS (checkpoint, heads, modules, all, lowest), or ""."""
        if self.label == "bp-bf16":
            return "bf16"
        base, _, option = self.label.rpartition("-")
        return option if base and option in OPTION_ITEMS else ""

    @property
    def base_label(self) -> str:
        """The method's label without its memory option (mlaan-all -> mlaan)."""
        return self.label[: -len(self.variant) - 1] if self.variant else self.label

    @property
    def is_bp(self) -> bool:
        return self.label == "bp"

    @property
    def imagenet(self) -> bool:
        return self.arch not in CIFAR_ARCHS

    @property
    def num_classes(self) -> int:
        return 1000 if self.imagenet else 10

    @property
    def stem_separate(self) -> bool:
        return self.num_modules > NUM_BLOCKS[self.arch]

    @property
    def dtype(self) -> str:
        return "bfloat16 autocast" if self.variant == "bf16" else "float32"

    def config_items(self) -> list[str]:
        base = "bp" if self.label == "bp-bf16" else self.base_label
        name = {"dgl+mlaan": "mlaan"}.get(base, base)
        items = [
            f"model.arch={self.arch}",
            f"method.name={name}",
            f"method.num_modules={self.num_modules}",
            f"train.batch_size={self.batch}",
        ]
        if self.stem_separate:
            items.append("method.stem_separate=true")
        items += OPTION_ITEMS.get(self.variant, [])
        if base == "dgl+mlaan":
            items.append("method.head=1c2f")
        if name == "mlaan" and self.imagenet:
            # The ImageNet reference: window 3, final loss weights (wx + wy, wy) (docs/method.md#recipes).
            items += ["mlaan.window=3", "mlaan.final_weights=1.0,0.999"]
        return items

    def bp_case(self) -> Case:
        return Case("bp", self.arch, 1, self.batch, self.input_size, self.paper_arch)


def _shrunk_modules(num_modules: int, paper_arch: str, arch: str) -> int:
    """K for a smoke-mode arch: the same role (1, all blocks, stem separate) or at most the block count."""
    paper_blocks, blocks = NUM_BLOCKS[paper_arch], NUM_BLOCKS[arch]
    if num_modules == 1 or paper_blocks == blocks:
        return num_modules
    if num_modules > paper_blocks:
        return blocks + 1
    if num_modules == paper_blocks:
        return blocks
    return min(num_modules, blocks - 1)


def step_cases(mode: str) -> list[Case]:
    size = sizes(mode)
    cases, seen = [], set()
    for paper_arch, grid in STEP_GRID:
        arch = size.arch_for.get(paper_arch, paper_arch)
        imagenet = arch not in CIFAR_ARCHS
        batch = size.imagenet_batch if imagenet else size.cifar_batch
        input_size = size.imagenet_size if imagenet else size.cifar_size
        for label, num_modules in grid:
            case = Case(label, arch, _shrunk_modules(num_modules, paper_arch, arch), batch, input_size, paper_arch)
            if case.id not in seen:  # smoke mode maps several paper cases onto one
                seen.add(case.id)
                cases.append(case)
    return cases


# ------------------------------------------------------------------------------------------------
# Building and running a case
# ------------------------------------------------------------------------------------------------


@dataclass
class Built:
    case: Case
    device: torch.device
    backbone: nn.Module
    modules: list
    method: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Batch
    kernels: str
    num_parameters: int
    fused_step: bool = False


def kernel_backend(device: torch.device, variant: str) -> str:
    requested = OPTIONS.kernels
    if variant == "bf16":
        # The fused Triton aux loss is a custom op that autocast does not cast into; BP in bf16 is
        # measured as users run it today: eager PyTorch under autocast.
        return "reference"
    try:
        from fastlocal.kernels import resolve_backend
    except ImportError:  # a fastlocal without the kernels package
        return "reference"
    try:
        return resolve_backend(requested, device)
    except ValueError as err:
        raise pytest.UsageError(f"--bench-kernels={requested}: {err}") from None


def build(case: Case, device: torch.device, seed: int = 0, extra_items: tuple[str, ...] = ()) -> Built:
    """Backbone, split, method, SGD optimizer and one random batch of `case`, on `device`; `extra_items`
    are further 'section.key=value' config overrides."""
    cfg = build_config(None, [*case.config_items(), *extra_items], METHODS)
    torch.manual_seed(seed)
    backbone = build_backbone(case.arch, case.num_classes, case.input_size)
    modules = split_backbone(backbone, case.num_modules, cfg.method.stem_separate, cfg.method.split, case.arch)
    method = build_method(cfg, backbone, modules)
    set_recompute(modules, method, cfg.system.recompute)
    kernels = kernel_backend(device, case.variant)
    method.kernels = kernels
    backbone.to(device)
    method.to(device)
    params = [p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad]
    optimizer = build_optimizer(params, cfg, device)
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(case.batch, 3, case.input_size, case.input_size, generator=generator).to(device)
    y = torch.randint(0, case.num_classes, (case.batch,), generator=generator).to(device)
    mean, std = IMAGENET_MEAN_STD if case.imagenet else CIFAR_MEAN_STD
    return Built(
        case,
        device,
        backbone,
        modules,
        method,
        optimizer,
        Batch(x, y, mean, std),
        kernels,
        sum(p.numel() for p in params),
        cfg.system.fused_optimizer_step,
    )


def make_step(built: Built) -> Callable[[], None]:
    """One training step; synchronises the device before returning so a timer around it is honest."""
    modules, method, optimizer, batch, device = built.modules, built.method, built.optimizer, built.batch, built.device
    # Autocast wraps the forwards and loss computations only, as the engine does for system.precision=bf16.
    forward_context = forward_context_for(device, "bf16" if built.case.variant == "bf16" else "fp32")

    fused = functools.partial(step_parameters, optimizer) if built.fused_step else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        local_train_step(modules, method, batch, forward_context, step_parameters=fused)
        if fused is None:
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def free_device_memory(device: torch.device) -> None:
    """Drop what earlier cases left in the caching allocator, so each case's reserved peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_memory(built: Built, step: Callable[[], None]) -> dict:
    """Peak memory of one step, by the device's convention; `peak_bytes` is the headline figure."""
    device = built.device
    if device.type == "cuda":
        free_device_memory(device)
        reset_peak(device)
        step()
        peak = cuda_peak(device)
        if peak["process_total_bytes"] is None:
            # No NVML (pynvml missing): the whole device's used memory, which on a dedicated GPU is
            # this process plus the driver's share.
            free, total = torch.cuda.mem_get_info(device)
            peak["device_used_bytes"] = total - free
        peak["peak_bytes"] = peak["max_allocated_bytes"]
        peak["convention"] = "CUDA max_memory_allocated"
        return peak
    with SavedTensorAccountant(ignore=parameter_storages(built.backbone, built.method)) as acct:
        step()
    return {
        "kind": "cpu_saved_tensors",
        "peak_saved_bytes": acct.peak_bytes,
        "peak_bytes": acct.peak_bytes,
        "convention": "CPU bytes saved for backward at the peak (fastlocal.measure)",
    }


def time_steps(step: Callable[[], None], rounds: int) -> float:
    """Median seconds of `rounds` steps (for a BP reference measured outside pytest-benchmark)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark_median(benchmark) -> float | None:
    """The median seconds pytest-benchmark measured (None under --benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


# ------------------------------------------------------------------------------------------------
# BP references and ratios
# ------------------------------------------------------------------------------------------------

_BP_REFERENCE: dict[tuple, dict] = {}


def _bp_key(case: Case, device: torch.device) -> tuple:
    return (device.type, case.arch, case.batch, case.input_size)


def record_bp_reference(case: Case, device: torch.device, median_s: float | None, memory: dict) -> None:
    assert case.is_bp
    _BP_REFERENCE[_bp_key(case, device)] = {"median_s": median_s, "memory": memory, "source": case.id}


def bp_reference(case: Case, device: torch.device, mode: str, need_time: bool = True) -> dict:
    """BP's figures at the case's backbone, batch and input size, from this session: the BP case's own
    when it ran, else measured here once (warm-up, memory step, then the same number of timed rounds)."""
    key = _bp_key(case, device)
    cached = _BP_REFERENCE.get(key)
    if cached is not None and (cached["median_s"] is not None or not need_time):
        return cached
    bp = case.bp_case()
    free_device_memory(device)
    built = build(bp, device)
    step = make_step(built)
    for _ in range(sizes(mode).warmup_steps):
        step()
    memory = measure_memory(built, step)
    median_s = time_steps(step, sizes(mode).rounds) if need_time else None
    del built, step
    free_device_memory(device)
    _BP_REFERENCE[key] = {"median_s": median_s, "memory": memory, "source": f"{bp.id} (measured for the ratios)"}
    return _BP_REFERENCE[key]


def figures(case: Case, median_s: float | None, memory: dict, reference: dict) -> dict:
    """The numbers of a case for extra_info: time, throughput, memory and the ratios to BP."""
    ref_memory = reference["memory"]
    out = {
        "median_step_ms": None if median_s is None else round(median_s * 1e3, 3),
        "images_per_second": None if not median_s else round(case.batch / median_s, 2),
        "memory": memory,
        "peak_memory_bytes": memory["peak_bytes"],
        "memory_convention": memory["convention"],
        "bp_reference": reference["source"],
        "bp_median_step_ms": None if reference["median_s"] is None else round(reference["median_s"] * 1e3, 3),
        "bp_peak_memory_bytes": ref_memory["peak_bytes"],
        "time_ratio_vs_bp": ratio(median_s, reference["median_s"]),
        "memory_ratio_vs_bp": ratio(memory["peak_bytes"], ref_memory["peak_bytes"]),
    }
    if memory["kind"] == "cuda":
        out["reserved_ratio_vs_bp"] = ratio(memory["max_reserved_bytes"], ref_memory["max_reserved_bytes"])
        if memory.get("process_total_bytes") and ref_memory.get("process_total_bytes"):
            out["process_ratio_vs_bp"] = ratio(memory["process_total_bytes"], ref_memory["process_total_bytes"])
    return out


# ------------------------------------------------------------------------------------------------
# Environment for extra_info
# ------------------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, mode: str | None = None) -> dict:
    """Device and versions for extra_info, the same in every benchmark: what a reader needs to know which
    machine a number came from."""
    info = {
        "mode": mode or OPTIONS.mode,
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "python": platform.python_version(),
        "num_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        conv = getattr(torch.backends.cudnn, "conv", None)
        info["cudnn_conv_fp32_precision"] = getattr(conv, "fp32_precision", None)
    return info


def case_info(case: Case, built: Built, mode: str, suite: str) -> dict:
    return {
        "suite": suite,
        "case": case.id,
        "method": case.label,
        "variant": case.variant or "none",
        "arch": case.arch,
        "paper_arch": case.paper_arch,
        "input_size": case.input_size,
        "num_classes": case.num_classes,
        "batch": case.batch,
        "K": case.num_modules,
        "stem_separate": case.stem_separate,
        "dtype": case.dtype,
        "config": case.config_items(),
        "kernels": built.kernels,
        "num_parameters": built.num_parameters,
        **environment(built.device, mode),
    }


def check_budget() -> None:
    elapsed = time.monotonic() - SESSION_START
    if OPTIONS.budget_s is not None and elapsed > OPTIONS.budget_s:
        pytest.skip(f"--bench-budget-s={OPTIONS.budget_s:g} spent ({elapsed:.0f} s since the suite was collected)")


def run_case(
    benchmark, case: Case, device: torch.device, mode: str, rounds: int, group: str, suite: str = "fastlocal-steps"
) -> dict:
    """Build, warm up (untimed), measure memory (untimed), time `rounds` steps; fill extra_info
    (`suite` tells fastlocal.bench.report which table the row belongs to). Returns the figures."""
    check_budget()
    free_device_memory(device)
    built = build(case, device)
    step = make_step(built)
    benchmark.group = group
    benchmark.extra_info.update(case_info(case, built, mode, suite))
    for _ in range(sizes(mode).warmup_steps):
        step()
    memory = measure_memory(built, step)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0, iterations=1)
    median_s = benchmark_median(benchmark)
    if case.is_bp:
        record_bp_reference(case, device, median_s, memory)
    del built, step
    reference = bp_reference(case, device, mode, need_time=median_s is not None)
    result = figures(case, median_s, memory, reference)
    benchmark.extra_info.update(result)
    return result
