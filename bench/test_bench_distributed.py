"""Data-parallel communication of a training step: the bytes all-reduced per step and per local module, and
on CUDA the exposed communication, the time from the end of the last module's flush (before its all-reduce)
to the point the optimizer step can run (every all-reduce done, the averages written back); the rest of
the communication overlapped the later modules' compute.

    python -m pytest bench/test_bench_distributed.py --benchmark-only --benchmark-json=OUT.json
    torchrun --nproc_per_node=8 -m pytest bench/test_bench_distributed.py --benchmark-only --benchmark-json=OUT.json

Without torchrun the step runs in a process group of one: the byte counts are exact, the time is the cost of
launching and waiting for the collectives with nothing on the wire. Under torchrun every rank runs the
cases (each with the sizes of --bench-mode as its per-rank batch; see bench/common.py); rank 0's
JSON is the one to read. Nothing here asserts a time.
"""

from __future__ import annotations

import os
import statistics
import tempfile

import pytest
import torch
import torch.distributed as dist
from common import bench_device, bench_mode, build, case_info, check_budget, sizes, step_cases

from fastlocal.parallel import data as data_parallel
from fastlocal.parallel import group as parallel_group
from fastlocal.schedule import local_train_step

MODE = bench_mode()
DEVICE = bench_device(MODE)
# Per backbone: BP, and DGL and MLAAN at their largest K (the most modules: the most, and smallest, all-reduces).
CASES = [
    case
    for case in step_cases(MODE)
    if case.label == "bp"
    or (
        case.label in ("dgl", "mlaan")
        and case.num_modules
        == max(c.num_modules for c in step_cases(MODE) if c.arch == case.arch and c.label == case.label)
    )
]
SUITE = "fastlocal-data-parallel"


@pytest.fixture(scope="module")
def process_group():
    """torchrun's process group, or one of a single process."""
    global DEVICE
    created = not dist.is_initialized()
    if created and parallel_group.launched_by_torchrun():
        _, DEVICE = parallel_group.init_data_parallel(DEVICE)
    elif created:
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    yield dist.get_world_size()
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_data_parallel_step(benchmark, case, process_group):
    check_budget()
    built = build(case, DEVICE)
    averager = data_parallel.GradientAverager(built.modules, built.method, built.backbone)
    last = len(built.modules) - 1
    cuda = DEVICE.type == "cuda"
    exposed_ms: list[float] = []
    events = {}

    def after_flush(j: int) -> None:
        if cuda and j == last:  # before the last module's all-reduce, which nothing can overlap
            events["flushed"] = torch.cuda.Event(enable_timing=True)
            events["flushed"].record()
        averager.after_flush(j)

    def step() -> None:
        built.optimizer.zero_grad(set_to_none=True)
        local_train_step(built.modules, built.method, built.batch, after_flush=after_flush)
        averager.finish()
        if cuda:
            reduced = torch.cuda.Event(enable_timing=True)
            reduced.record()
        built.optimizer.step()
        if cuda:
            torch.cuda.synchronize(DEVICE)
            exposed_ms.append(events["flushed"].elapsed_time(reduced))

    for _ in range(sizes(MODE).warmup_steps):
        step()
    exposed_ms.clear()
    benchmark.group = f"data parallel {case.arch} {case.input_size}px batch {case.batch} per rank"
    benchmark.pedantic(step, rounds=sizes(MODE).rounds, warmup_rounds=0, iterations=1)
    per_module = averager.bytes_per_module()
    benchmark.extra_info.update(case_info(case, built, MODE, SUITE))
    benchmark.extra_info.update(
        {
            "world_size": process_group,
            "allreduce_bytes_per_step": sum(per_module),
            "allreduce_bytes_per_module": per_module,
            "exposed_communication_ms": statistics.median(exposed_ms) if exposed_ms else None,
        }
    )
    assert sum(per_module) == 4 * built.num_parameters  # every trainable fp32 parameter, once per step
