"""The GPU fast path (issue: bf16, channels_last, CUDA graphs, fused batch norm, CUDA streams) against
fastlocal's own fastest BP and the authors' fp32 step times (docs/method.md#the-authors-code-measured), in
one run.

Variants of one training step (zero_grad, local forward/backward, EMA, optimizer step), named by parts:
`fp32` / `bf16-cl` (bf16 autocast + channels_last), `graph` (the step replayed from a CUDA graph), `fbn`
(system.fused_batch_norm: the blocks' batch norms fused with ReLU and add, Triton), `streams`
(system.cuda_streams); `all` is fbn + streams. BP runs first in each backbone, so every MLAAN row carries its
ratio to the fastest BP variant measured before it (`time_ratio_vs_fastest_bp`), to BP's `bf16-cl-graph`
(`time_ratio_vs_bp_graph`: the issue's "bf16 + channels_last + graph" BP, before fastlocal's own kernels)
and to the authors' step (`speedup_vs_authors`). Graph, fbn and streams variants need CUDA; on CPU (small
batch) only the eager ones run. Memory is measured on the eager variants (a graph's pool hides its
allocations).

    python -m pytest bench/test_bench_fast_path.py --benchmark-only --benchmark-json=fast.json
    python -m fastlocal.bench.report fast.json --no-plots       # its table in bench.md
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from common import (
    Case,
    bench_device,
    bench_mode,
    build,
    check_budget,
    environment,
    free_device_memory,
    measure_memory,
    sizes,
)

from fastlocal.bench.report import ratio
from fastlocal.config import build_config
from fastlocal.graphs import GraphedStep
from fastlocal.methods import METHODS, Batch
from fastlocal.models.cifar_resnet import use_fused_batch_norm
from fastlocal.optim import build_optimizer
from fastlocal.schedule import forward_context_for, local_train_step

# docs/method.md#the-authors-code-measured: the authors' code on one H100, fp32/TF32, batch 1024 (ms per step).
AUTHORS_STEP_MS = {
    ("resnet32", "bp"): 50.4,
    ("resnet32", "mlaan"): 202.4,
    ("resnet110", "bp"): 169.8,
    ("resnet110", "mlaan"): 776.1,
}
CASES = [("resnet32", "bp", 1), ("resnet32", "mlaan", 15), ("resnet110", "bp", 1), ("resnet110", "mlaan", 54)]


@dataclass(frozen=True)
class Variant:
    precision: str
    channels_last: bool = False
    graph: bool = False
    fused_bn: bool = False
    streams: bool = False
    mlaan_only: bool = False
    """Streams change nothing in BP (one module, one loss): measured for MLAAN only."""

    @property
    def needs_cuda(self) -> bool:
        return self.graph or self.fused_bn or self.streams


VARIANTS = {
    "fp32": Variant("fp32"),
    "fp32-graph-all": Variant("fp32", graph=True, fused_bn=True, streams=True, mlaan_only=True),
    "bf16-cl": Variant("bf16", True),
    "bf16-cl-graph": Variant("bf16", True, graph=True),
    "bf16-cl-graph-fbn": Variant("bf16", True, graph=True, fused_bn=True),
    "bf16-cl-graph-all": Variant("bf16", True, graph=True, fused_bn=True, streams=True, mlaan_only=True),
}
# (The earlier `fp32-graph` and `bf16-cl-graph-fbn-pair` variants are gone: the H200 run of
# docs/bench/gpu/fast-path-h200.md showed what they add, 3 % and nothing; so is LAM pair fusion itself.
# The Triton convolution's variants moved with it to experimental/triton_conv/.)
MODE = bench_mode()
DEVICE = bench_device(MODE)
FASTEST_BP: dict[str, float] = {}  # paper arch -> fastest BP median seconds in this session
BP_GRAPH_VARIANT = "bf16-cl-graph"
BP_GRAPH: dict[str, float] = {}  # paper arch -> BP's bf16-cl-graph median seconds in this session
BP_MEMORY: dict[tuple[str, str], int] = {}  # (paper arch, precision) -> BP peak bytes


def fast_step(built, variant: Variant):
    """One step of `built` in a variant; the device is synchronised before it returns."""
    device = built.device
    precision, channels_last, graph = variant.precision, variant.channels_last, variant.graph
    if variant.fused_bn:
        assert use_fused_batch_norm([built.backbone, built.method], "triton") > 0
    side_stream = torch.cuda.Stream(device) if variant.streams else None
    if channels_last:
        built.backbone.to(memory_format=torch.channels_last)
        built.method.to(memory_format=torch.channels_last)
    x = built.batch.x.contiguous(memory_format=torch.channels_last) if channels_last else built.batch.x
    y, mean, std = built.batch.y, built.batch.mean, built.batch.std
    cfg = build_config(None, built.case.config_items(), METHODS)
    params = [p for p in (*built.backbone.parameters(), *built.method.parameters()) if p.requires_grad]
    optimizer = build_optimizer(params, cfg, device, lr_on_device=graph)
    context = forward_context_for(device, precision, cache_casts=not graph)

    def step_without_zero_grad(xs, ys):
        loss = local_train_step(built.modules, built.method, Batch(xs, ys, mean, std), context, side_stream=side_stream)
        optimizer.step()
        return loss

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)

    runner = GraphedStep(step_without_zero_grad, zero_grad) if graph else None

    def step():
        if runner is not None:
            runner(x, y)
        else:
            zero_grad()
            step_without_zero_grad(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def _variant_param(name: str):
    """Graph, fbn and streams variants need CUDA; fbn also compiled Triton kernels (conftest.py's markers)."""
    spec = VARIANTS[name]
    marks = [pytest.mark.gpu] if spec.needs_cuda else []
    if spec.fused_bn:
        marks.append(pytest.mark.triton(compiled=True))
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("variant", [_variant_param(name) for name in VARIANTS])
@pytest.mark.parametrize("paper_arch,label,num_modules", CASES, ids=[f"{a}-{m}-K{k}" for a, m, k in CASES])
def test_bench_fast_path(benchmark, paper_arch, label, num_modules, variant):
    spec = VARIANTS[variant]
    if spec.mlaan_only and label != "mlaan":
        pytest.skip("streams change nothing in BP")
    check_budget()
    size = sizes(MODE)
    arch = size.arch_for.get(paper_arch, paper_arch)
    if arch != paper_arch:
        num_modules = min(num_modules, 8)
    case = Case(label, arch, num_modules, size.cifar_batch, size.cifar_size, paper_arch)
    free_device_memory(DEVICE)
    built = build(case, DEVICE)
    step = fast_step(built, spec)
    precision, graph = spec.precision, spec.graph
    for _ in range(max(size.warmup_steps, 4 if graph else 0)):  # graph: 3 warm-up steps, then the capture
        step()
    memory = None if graph else measure_memory(built, step)  # the graph's pool hides its allocations
    benchmark.group = f"fast path {paper_arch}"
    benchmark.pedantic(step, rounds=size.rounds, warmup_rounds=0, iterations=1)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None
    info = {
        "suite": "fastlocal-fast-path",
        "case": f"{arch}-{label}-K{num_modules}-{variant}",
        "variant": variant,
        "method": label,
        "arch": arch,
        "K": num_modules,
        "batch": case.batch,
        "precision": precision,
        "channels_last": spec.channels_last,
        "cuda_graph": graph,
        "fused_batch_norm": spec.fused_bn,
        "cuda_streams": spec.streams,
        **environment(DEVICE, MODE),
    }
    if median is not None:
        info["median_step_ms"] = round(median * 1e3, 3)
        if label == "bp":
            FASTEST_BP[paper_arch] = min(FASTEST_BP.get(paper_arch, median), median)
            if variant == BP_GRAPH_VARIANT:
                BP_GRAPH[paper_arch] = median
        else:
            info["time_ratio_vs_fastest_bp"] = ratio(median, FASTEST_BP.get(paper_arch))
            info["time_ratio_vs_bp_graph"] = ratio(median, BP_GRAPH.get(paper_arch))
        if MODE == "gpu":
            info["speedup_vs_authors"] = ratio(AUTHORS_STEP_MS[(paper_arch, label)], median * 1e3)
    if memory is not None:
        info["peak_memory_bytes"] = memory["peak_bytes"]
        if label == "bp":
            BP_MEMORY[(paper_arch, precision)] = memory["peak_bytes"]
        else:
            bp_bytes = BP_MEMORY.get((paper_arch, precision))
            info["memory_ratio_vs_bp_same_precision"] = ratio(memory["peak_bytes"], bp_bytes)
    benchmark.extra_info.update(info)
