"""Where a process sits in a multi-device run and what it holds: the (data, pipe) device mesh, a pipeline stage,
the stages' module ranges, the partition of the modules into stages by cost, and which stage owns each tensor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastlocal.config import ConfigError
from fastlocal.split import LocalModule, balanced_groups


def stage_ranges(sizes: Sequence[int]) -> list[range]:
    """Module indices of each stage from the stages' module counts."""
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


def partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Module counts of contiguous stages that minimise the largest stage cost."""
    if num_stages > len(costs):
        raise ConfigError(
            f"{num_stages} pipeline stages need at least as many local modules, but "
            f"method.num_modules = {len(costs)}; raise method.num_modules or start fewer processes"
        )
    return [len(group) for group in balanced_groups(list(costs), num_stages)]


def module_of_tensors(modules: Sequence[LocalModule], method: nn.Module) -> dict[int, int]:
    """id(tensor) -> the module whose stage holds it, for every parameter and buffer of the modules and of the
    method's per-module parts (`nn.ModuleDict` entries keyed by the module index); the rest (the backbone's
    final head) belongs to the last module."""
    owner: dict[int, int] = {}
    last = len(modules) - 1
    for j, module in enumerate(modules):
        for tensor in module.state_dict(keep_vars=True).values():
            owner[id(tensor)] = j
    for child in method.children():
        if isinstance(child, nn.ModuleDict):
            for key, part in child.items():
                if key.isdigit():
                    for tensor in part.state_dict(keep_vars=True).values():
                        owner.setdefault(id(tensor), min(int(key), last))
    return owner


# -- the (data, pipeline) device mesh ------------------------------------------------------------------------
@dataclass(frozen=True)
class Mesh:
    """Where this process sits among D data replicas x S pipeline stages: stage k of its replica is global rank
    `pipe_ranks[k]`. `data_group` holds the D ranks of this process's stage (None: one replica), `pipe_group`
    its replica's S stages (None: every rank)."""

    replica: int
    num_replicas: int
    pipe_ranks: tuple[int, ...]
    data_group: dist.ProcessGroup | None = None
    pipe_group: dist.ProcessGroup | None = None

    @property
    def num_stages(self) -> int:
        return len(self.pipe_ranks)


def pipeline_mesh(world_size: int) -> Mesh:
    """`system.parallel = modules`: one replica, stage k is rank k."""
    return Mesh(0, 1, tuple(range(world_size)))


def hybrid_replicas(world_size: int, num_stages: int) -> int:
    """D = W / S data replicas, or a ConfigError naming W and S."""
    if num_stages < 1 or world_size % num_stages:
        raise ConfigError(
            f"system.pipeline_stages = {num_stages} must divide the number of processes, {world_size} (torchrun's "
            f"--nproc_per_node times its nodes): the mesh is (W / S data replicas) x (S stages); choose S from "
            f"{[s for s in range(1, world_size + 1) if world_size % s == 0]} or start a multiple of {num_stages} "
            "processes"
        )
    return world_size // num_stages


def hybrid_mesh(num_stages: int, device: torch.device) -> Mesh:
    """`system.parallel = hybrid`: the (data, pipe) mesh over every rank, pipe innermost (rank = replica * S +
    stage), so the stages of a replica sit on neighbouring ranks (one node, the fast link) and the gradient
    all-reduces cross replicas. torch.distributed.device_mesh.init_device_mesh builds the groups (gloo and NCCL
    alike)."""
    from torch.distributed.device_mesh import init_device_mesh

    replicas = hybrid_replicas(dist.get_world_size(), num_stages)
    mesh = init_device_mesh(device.type, (replicas, num_stages), mesh_dim_names=("data", "pipe"))
    pipe_group = mesh.get_group("pipe")
    return Mesh(
        replica=mesh.get_local_rank("data"),
        num_replicas=replicas,
        pipe_ranks=tuple(dist.get_process_group_ranks(pipe_group)),
        data_group=mesh.get_group("data"),
        pipe_group=pipe_group,
    )


@dataclass(frozen=True)
class Stage:
    rank: int
    """The stage's index in its pipeline (0 first)."""
    num_stages: int
    modules: range
    """The global indices of the local modules this stage holds."""
    ranks: tuple[int, ...] = ()
    """The global ranks of the pipeline's stages, first stage first (empty: stage k is rank k)."""

    def peer(self, k: int) -> int:
        """The global rank of stage k of this pipeline."""
        return self.ranks[k] if self.ranks else k

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.num_stages - 1
