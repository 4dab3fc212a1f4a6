"""Data-parallel local learning on torch.distributed (launched by torchrun).

Every rank holds the whole model and trains on its shard of each batch (`train.batch_size` is the global
batch). Local learning needs its own gradient averaging: a DDP wrapper per module fires a module's
all-reduce when autograd first finishes it, but MLAAN's cascade adds to module i-1's gradient later
(after module i's loss), so the replicas would drift apart without an error. Here the schedule tells
when a module's gradients are final: `local_train_step(..., after_flush=averager.after_flush)` calls
:meth:`GradientAverager.after_flush` once module j has had its weight VJP (docs/method.md#the-single-forward-schedule),
which starts one asynchronous all-reduce of module j's gradients, so the communication overlaps the
later modules' compute; :meth:`GradientAverager.finish` waits for all of them before the optimizer step.

Which parameters belong to which module's all-reduce:

- module j's backbone parts (`LocalModule.trainable_parameters`): written only by flush(j);
- a method's per-module parts (heads, decoders, LAMs: the entries of the method's `nn.ModuleDict`s keyed
  by the module index i): written only by module i's loss backward, which runs before flush(i);
- anything else (the backbone's final head, which module K-1's loss trains): with the last module,
  whose flush is the step's last.

A check on every step (the gradient tensors' identity and version counter) raises if a parameter's
gradient changed after its all-reduce was started, so a method that breaks this rule fails loudly.

Rules that keep every rank's model identical:

- the initial weights and buffers are broadcast from rank 0 (:func:`broadcast_from_rank0`);
- gradients are averaged (sum, then divided by the world size; a parameter without a gradient adds
  zeros, so every rank calls the same collectives in the same order, and keeps no gradient);
- the EMA copies of MLAAN's LAMs follow the live weights, which are identical, so they are too;
- batch-norm batch statistics are per rank (`system.sync_batch_norm = true` synchronises them on CUDA);
  the running statistics are *averaged* across ranks before every evaluation and checkpoint
  (:func:`average_buffers`), so evaluation and checkpoints do not depend on which rank wrote them.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from fastlocal.config import Config, ConfigError
from fastlocal.parallel.group import waiting_for
from fastlocal.split import LocalModule


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """`train.batch_size` is the global batch: each rank takes an equal share."""
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size = {batch_size} is the global batch and must split evenly over the "
            f"{world_size} processes; choose a multiple of {world_size} (e.g. "
            f"{(batch_size // world_size + 1) * world_size}) or another process count"
        )
    return batch_size // world_size


def check_options(cfg: Config, device: torch.device) -> None:
    """Options that data parallelism rules out or changes."""
    if cfg.system.sync_batch_norm and device.type != "cuda":
        raise ConfigError(
            "system.sync_batch_norm = true needs CUDA devices (torch.nn.SyncBatchNorm runs on CUDA "
            f"only) but this run is on {device.type}; set system.sync_batch_norm=false"
        )
    if cfg.system.cuda_graphs == "true":
        warnings.warn(
            "system.cuda_graphs = true is not supported with data parallelism yet (the all-reduces run "
            "eagerly); training without CUDA graphs",
            stacklevel=2,
        )


def use_sync_batch_norm(*roots: nn.Module) -> int:
    """Replace every batch norm under `roots` by torch.nn.SyncBatchNorm, in place (the parameter and buffer
    tensors are kept, so module splits and EMA lists stay valid). Returns how many were replaced."""
    count = 0
    for root in roots:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                    setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                    count += 1
    return count


def _state_tensors(*roots: nn.Module) -> list[torch.Tensor]:
    seen, tensors = set(), []
    for root in roots:
        for tensor in root.state_dict(keep_vars=True).values():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensors.append(tensor)
    return tensors


@torch.no_grad()
def broadcast_from_rank0(*roots: nn.Module) -> None:
    """Every parameter and buffer of `roots` (EMA copies included) takes rank 0's value."""
    for tensor in _state_tensors(*roots):
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def average_buffers(*roots: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Floating-point buffers (batch-norm running statistics) take the mean over the ranks of `group` (default:
    all); integer buffers (the batch counters) are equal on those ranks already."""
    buffers = [b for root in roots for b in root.buffers() if b.is_floating_point()]
    world = dist.get_world_size(group)
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        same = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in same])
        with waiting_for("every rank's batch-norm running statistics (their mean, at an epoch's end)"):
            dist.all_reduce(flat, group=group)
        flat.div_(world)
        for b, chunk in zip(same, flat.split([b.numel() for b in same])):
            b.copy_(chunk.view_as(b))


def gather_buffers(*roots: nn.Module) -> list[list[torch.Tensor]] | None:
    """Every rank's floating-point buffers of `roots` (batch-norm running statistics, which differ between ranks
    until :func:`average_buffers`), as CPU tensors in `roots`' buffer order, on rank 0 (None on the others)."""
    mine = [b.detach().cpu() for root in roots for b in root.buffers() if b.is_floating_point()]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    with waiting_for("every rank's batch-norm running statistics (a step checkpoint)"):
        dist.gather_object(mine, gathered, dst=0)
    return gathered


@torch.no_grad()
def load_buffers(values: list[torch.Tensor], *roots: nn.Module) -> None:
    """The inverse of one rank's part of :func:`gather_buffers`."""
    buffers = [b for root in roots for b in root.buffers() if b.is_floating_point()]
    if len(buffers) != len(values):
        raise ValueError(f"{len(values)} saved buffers for the {len(buffers)} of this model")
    for buffer, value in zip(buffers, values):
        buffer.copy_(value)


def module_parameter_groups(
    modules: list[LocalModule], method: nn.Module, backbone: nn.Module
) -> list[list[nn.Parameter]]:
    """The trainable parameters whose gradients are final once module j is flushed, per module j (see the
    module docstring); every trainable parameter of backbone and method is in exactly one group."""
    last = len(modules) - 1
    owner: dict[int, int] = {}
    for j, module in enumerate(modules):
        for p in module.trainable_parameters:
            owner[id(p)] = j
    for child in method.children():
        if isinstance(child, nn.ModuleDict):
            for key, part in child.items():
                if key.isdigit():  # keyed by the index of the module whose loss trains it
                    for p in part.parameters():
                        owner.setdefault(id(p), min(int(key), last))
    groups: list[list[nn.Parameter]] = [[] for _ in modules]
    seen = set()
    for p in (*backbone.parameters(), *method.parameters()):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            groups[owner.get(id(p), last)].append(p)
    return groups


class GradientAverager:
    """Averages each module's gradients across the ranks of `group` (default: all; the hybrid mesh: the data
    replicas of one pipeline stage), one asynchronous flat all-reduce per module and dtype, started when the
    module is flushed (`after_flush`), awaited by `finish` before the optimizer step."""

    def __init__(
        self,
        modules: list[LocalModule],
        method: nn.Module,
        backbone: nn.Module,
        world_size: int | None = None,
        group: dist.ProcessGroup | None = None,
    ):
        self.groups = module_parameter_groups(modules, method, backbone)
        self.group = group
        self.world_size = dist.get_world_size(group) if world_size is None else world_size
        self._pending: list[tuple[list[nn.Parameter], torch.Tensor, object, list]] = []

    def bytes_per_module(self) -> list[int]:
        """Bytes each module's all-reduce carries per step (what a rank sends into the collective)."""
        return [sum(p.numel() * p.element_size() for p in group) for group in self.groups]

    def after_flush(self, j: int) -> None:
        group = self.groups[j]
        for dtype in sorted({p.dtype for p in group}, key=str):
            params = [p for p in group if p.dtype == dtype]
            # A parameter without a gradient adds zeros: the collectives are the same on every rank.
            flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params])
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._pending.append((params, flat, work, [_grad_stamp(p) for p in params]))

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for every all-reduce of the step and write the averaged gradients back."""
        pending, self._pending = self._pending, []
        for params, flat, work, stamps in pending:
            for p, stamp in zip(params, stamps):
                if _grad_stamp(p) != stamp:
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} got gradient after its module's "
                        "all-reduce started; its owner module is wrong for data parallelism "
                        "(see module_parameter_groups)"
                    )
            with waiting_for("every rank's gradients (the all-reduce before the optimizer step)"):
                work.wait()
            flat.div_(self.world_size)
            for p, chunk in zip(params, flat.split([p.numel() for p in params])):
                if p.grad is not None:
                    p.grad.copy_(chunk.view_as(p.grad))


def _grad_stamp(p: nn.Parameter) -> tuple[int, int] | None:
    return None if p.grad is None else (id(p.grad), p.grad._version)
