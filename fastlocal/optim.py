"""The optimizer and the learning-rate schedule of a run (SGD with Nesterov momentum; docs/method.md#recipes)."""

from __future__ import annotations

import math
import weakref

import torch

from fastlocal.config import Config


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: Config, device: torch.device | None = None, lr_on_device: bool = False
) -> torch.optim.SGD:
    """SGD with Nesterov momentum and weight decay on all parameters. One fused kernel for the whole
    update on CUDA, the multi-tensor (foreach) path elsewhere; `lr_on_device` keeps the LR in a device
    tensor (a CUDA graph reads it; `set_learning_rate` fills it)."""
    fused = device is not None and device.type == "cuda"
    lr = torch.tensor(cfg.optim.lr, device=device) if lr_on_device else cfg.optim.lr
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
        weight_decay=cfg.optim.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )


def learning_rate(cfg: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """The LR for a step. `ref`: the reference's CIFAR per-epoch rule (docs/method.md#recipes, e = epoch + 1);
    `cosine_epoch`: the ImageNet reference's per-epoch cosine (epoch from 0);
    `cosine`: per-iteration linear warmup then cosine decay to 0."""
    lr0, epochs = cfg.optim.lr, cfg.train.epochs
    if cfg.optim.schedule == "cosine_epoch":
        return 0.5 * lr0 * (1 + math.cos(math.pi * epoch / epochs))
    if cfg.optim.schedule == "ref":
        e = epoch + 1
        cosine = 0.5 * lr0 * (1 + math.cos(math.pi * e / epochs))
        return cosine * (e - 1) / 10 + 0.01 * (11 - e) / 10 if e <= 10 else cosine
    step = epoch * steps_per_epoch + step_in_epoch
    total = epochs * steps_per_epoch
    warmup = min(round(cfg.optim.warmup_epochs * steps_per_epoch), total - 1)
    if step < warmup:
        return lr0 * (step + 1) / warmup
    return 0.5 * lr0 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the LR of every group: in place when it is a device tensor (a captured graph reads it)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


_GROUP_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_parameters(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """`optimizer.step()` for `params` only (system.fused_optimizer_step): each parameter gets the update a
    whole step would give it (SGD's update is per parameter), from its group's settings and its own state."""
    groups = optimizer.param_groups
    group_of = _GROUP_OF.get(optimizer)
    if group_of is None or len(group_of) != sum(len(g["params"]) for g in groups):
        group_of = {id(p): index for index, g in enumerate(groups) for p in g["params"]}
        _GROUP_OF[optimizer] = group_of
    chosen: dict[int, list[torch.Tensor]] = {}
    for p in params:
        chosen.setdefault(group_of[id(p)], []).append(p)
    optimizer.param_groups = [{**groups[index], "params": ps} for index, ps in sorted(chosen.items())]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups
