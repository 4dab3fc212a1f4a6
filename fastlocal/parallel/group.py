"""The process group of a multi-process run (torchrun's env:// rendezvous): which parallel mode a run is in,
joining and leaving the group, and the few collectives the trainer needs, each a no-op in one process."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastlocal.config import UserError

BACKEND = "cpu:gloo,cuda:nccl"
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
"""How long a rank waits in a collective for the others: a rank that died or hangs brings the job down
with an error after at most this long (torchrun usually ends it sooner, when the failed rank exits)."""
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes the run directory and logs."""
        return self.rank == 0


def silent_log(*args, **kwargs) -> None:
    """The log of the ranks other than 0."""


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def resolve_parallel(parallel: str) -> str:
    """system.parallel -> "data", "modules", "hybrid" or "none": auto is data parallel under torchrun."""
    torchrun = launched_by_torchrun()
    if parallel == "auto":
        return "data" if torchrun else "none"
    if parallel == "modules" and not (torchrun and int(os.environ["WORLD_SIZE"]) > 1):
        raise UserError(
            "system.parallel = modules puts the local modules on several processes, one stage each, "
            "started by torchrun, e.g. torchrun --nproc_per_node=2 -m fastlocal.train --config FILE "
            "--system.parallel=modules; use system.parallel=none (or auto) for one process"
        )
    if parallel == "hybrid" and not (torchrun and int(os.environ["WORLD_SIZE"]) > 1):
        raise UserError(
            "system.parallel = hybrid runs data replicas of a pipeline on several processes started by "
            "torchrun, e.g. torchrun --nproc_per_node=4 -m fastlocal.train --config FILE "
            "--system.parallel=hybrid --system.pipeline_stages=2; use system.parallel=none (or auto) for one process"
        )
    if parallel == "data" and not torchrun:
        raise UserError(
            "system.parallel = data needs several processes started by torchrun, e.g. "
            "torchrun --nproc_per_node=2 -m fastlocal.train --config FILE; use system.parallel=none "
            "(or auto) for one process"
        )
    if parallel == "none" and torchrun and int(os.environ["WORLD_SIZE"]) > 1:
        raise UserError(
            f"system.parallel = none, but torchrun started {os.environ['WORLD_SIZE']} processes, which "
            "would each train their own copy into the same run directory; use system.parallel=data "
            "(or auto), or start one process"
        )
    return parallel


def init_data_parallel(
    device: torch.device, timeout: timedelta = COLLECTIVE_TIMEOUT
) -> tuple[DataParallel, torch.device]:
    """Join the process group torchrun set up (env:// rendezvous). On CUDA each process takes the GPU of
    its local rank. Returns the rank's description and its device."""
    parallel = DataParallel(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        if parallel.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {parallel.local_rank} has no GPU: this node has "
                f"{torch.cuda.device_count()}; start at most that many processes per node"
            )
        device = torch.device("cuda", parallel.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # NCCL for CUDA tensors where there are GPUs; gloo for CPU tensors (and a CPU-only torch build).
        dist.init_process_group(BACKEND if torch.cuda.is_available() else "gloo", timeout=timeout)
    return parallel, device


def close() -> None:
    """Leave the process group. Trainers sit in reference cycles (bound methods), so a pipeline's communication
    handles can outlive the group until the interpreter exits, where freeing them can abort the process
    ("terminate called without an active exception"): seen once in CI on a 3-stage gloo test, and in 3 of 35
    runs of it when all ranks left at once after a barrier; with this collection first, in none of 60 such
    runs (nor in 60 without the barrier)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Every rank waits for the others (after rank 0 wrote a checkpoint: no rank moves on and reads it first);
    nothing without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over ranks (a copy); unchanged without a process group."""
    total = values.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return total


def min_across_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` over ranks (the number of steps every rank can run); `value` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())
