"""The method contract and registry.

The engine runs one forward per module. After module i's forward it hands the method two detached
copies of the output a_i, both leaves that require grad:

- `own`:     terms computed from it train module i alone (and the heads they pass through);
- `cascade`: terms computed from it train module i and, for a method with `window` W > 1, the W-1
             modules below it (MLAAN's cascade; docs/method.md#the-single-forward-schedule).

`module_loss(i, own, cascade, batch)` returns the scalar loss of module i (None when module i has no
loss). The last module's loss is the final head's; its value is what the engine logs as train_loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastlocal.config import Config, ConfigError
from fastlocal.models import Backbone
from fastlocal.split import LocalModule


@dataclass
class Batch:
    x: torch.Tensor
    """Normalised images (B, 3, H, W)."""
    y: torch.Tensor
    """Labels (B,)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def images01(self) -> torch.Tensor:
        """The input de-normalised to [0, 1] (InfoPro's reconstruction target)."""
        mean = _channel_constants(tuple(self.mean), self.x.device, self.x.dtype)
        std = _channel_constants(tuple(self.std), self.x.device, self.x.dtype)
        return (self.x * std + mean).clamp_(0, 1)


@functools.lru_cache(maxsize=32)
def _channel_constants(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, C, 1, 1) constants made once per device and dtype: a host-to-device copy on every step would
    stall the host (and cannot be captured in a CUDA graph)."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


class LocalMethod(nn.Module):
    """Base class: holds the backbone (not as a submodule: the engine owns it) and the split.

    A method's constructor takes the backbone, the split and the options it reads (config sections, or
    values resolved from them); `from_config` picks those out of a run's Config."""

    window: int = 1
    """How many modules a cascaded loss reaches (1: DGL-style full isolation)."""

    def __init__(self, backbone: Backbone, modules: list[LocalModule]):
        super().__init__()
        self.num_modules = len(modules)
        self.kernels = "reference"
        # Plain attributes, so the method's state_dict holds its own parameters only.
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "local_modules", modules)

    @classmethod
    def from_config(cls, cfg: Config, backbone: Backbone, modules: list[LocalModule]) -> LocalMethod:
        """The method with the options `cfg` (validated) gives it."""
        return cls(backbone, modules)

    def module_out_info(self, i: int):
        """PartInfo of module i's output (its last part)."""
        return self.backbone.part_info[self.local_modules[i].part_ids[-1]]

    def module_loss(self, i: int, own: torch.Tensor, cascade: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        raise NotImplementedError

    recompute_heads: bool = False
    """Run the local objectives (and LAM copies) keeping only each block's input (system.recompute)."""

    def run_objective(self, objective: nn.Module, features: torch.Tensor, batch: Batch, lam=None) -> torch.Tensor:
        """objective(lam(features)) (lam: a chain with `segments()`, or None), a scalar loss; with
        `recompute_heads` each block of the LAM and the objective keep only their input and are recomputed
        for the backward (fastlocal.recompute)."""
        if not self.recompute_heads:
            return objective(features if lam is None else lam(features), batch, self.kernels)
        from fastlocal.recompute import run_chain

        segments = [] if lam is None else lam.segments()
        segments.append((lambda z: objective(z, batch, self.kernels), [objective]))
        return run_chain(segments, features)

    def loss_parameters(self, i: int) -> list[torch.Tensor]:
        """The method's trainable parameters that only module i's loss trains: their gradients are final
        once that loss's backward ran (system.fused_optimizer_step steps them then). Parameters no loss
        claims are stepped at the end of the step."""
        return []

    def update_ema(self, targets: list[torch.Tensor], live: list[torch.Tensor]) -> None:
        """Move these EMA tensors toward these live ones (methods with EMA copies override it)."""

    def ema_pairs_of_loss(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA tensors, the live tensors they follow) of the copies only module i's loss reads."""
        return [], []

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Called once per step after all gradients are in, before optimizer.step() (EMA goes here)."""

    def extra_state_summary(self) -> dict:
        return {}


METHODS: dict[str, type[LocalMethod]] = {}


def register_method(name: str) -> Callable[[type[LocalMethod]], type[LocalMethod]]:
    def decorator(cls: type[LocalMethod]) -> type[LocalMethod]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = cls
        cls.method_name = name
        return cls

    return decorator


def build_method(cfg: Config, backbone: Backbone, modules: list[LocalModule]) -> LocalMethod:
    """The method `cfg` names, on the split `modules`."""
    if cfg.method.name not in METHODS:
        raise ConfigError(
            f"method.name = {cfg.method.name!r} is not valid; choose one of: {', '.join(sorted(METHODS))}"
        )
    return METHODS[cfg.method.name].from_config(cfg, backbone, modules)
