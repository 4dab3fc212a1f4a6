"""MLAAN = MLM (the cascade window W) + LAM (leap augmented heads with EMA), on a DGL or InfoPro base.

docs/method.md#methods. For a module i with a head (W-1 <= i <= K-2):

    L_i = wx * Gx_i(a_i)  +  wy * Gy_i(LAM_i(a_i))

The engine passes a_i twice: `own` (the independent term: module i only) and `cascade` (the cascaded
term: it travels down to module i-W+1). LAM_i(z) = Aug_i[1:](Aug_i[0](z) + EMA_i[0](z)), with Aug_i
trainable copies of the leap blocks and EMA_i[0] a frozen copy of the first one that follows the live
block by an exponential moving average, once per step, before the optimizer step.

Only what the math uses is built: modules 0..W-2 have no head, and EMA_i[1:] does not exist.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastlocal.config import MLAANConfig
from fastlocal.heads import classification_loss
from fastlocal.methods.base import LocalMethod, register_method
from fastlocal.methods.leaps import leap_lists
from fastlocal.methods.objectives import ObjectiveOptions, build_objective, objective_is_zero, warn_untrained


class LeapAugmentedModule(nn.Module):
    """LAM_i: trainable copies of the leap blocks, plus a frozen EMA copy of the first, summed after it.

    `literal` (experimental, the paper's eq. 6-7): one trainable copy per leap block and no separate EMA
    copy; the EMA pulls the trainable copies themselves toward the live blocks. Order: the EMA runs before
    the optimizer step (the copy moves toward the live block's pre-step weight, then takes its own SGD
    step), where eq. 6-7 read SGD then EMA. Either order is defensible; this one keeps a single EMA point
    per step for both modes (the `copies` mode's target is the pre-step weight too), so the two modes
    differ only in which tensors the EMA moves."""

    def __init__(self, live_blocks: list[nn.Module], literal: bool = False):
        super().__init__()
        self.literal = literal
        self.aug = nn.ModuleList(copy.deepcopy(b) for b in live_blocks)
        self.ema_first = None
        if not literal:
            self.ema_first = copy.deepcopy(live_blocks[0]).requires_grad_(False)
        # The live blocks are the backbone's; keep them out of this module's parameters and state.
        object.__setattr__(self, "live_blocks", live_blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self._first(z)
        for block in self.aug[1:]:
            z = block(z)
        return z

    def _first(self, z: torch.Tensor) -> torch.Tensor:
        return self.aug[0](z) if self.ema_first is None else self.aug[0](z) + self.ema_first(z)

    def segments(self) -> list:
        """The forward as a chain of (callable, modules) for fastlocal.recompute: the summed first block,
        then each further copy."""
        first = [self.aug[0]] if self.ema_first is None else [self.aug[0], self.ema_first]
        return [(self._first, first)] + [(block, [block]) for block in self.aug[1:]]

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA tensors, the live tensors they follow): parameters only."""
        if self.literal:
            targets = [p for block in self.aug for p in block.parameters()]
            live = [p for block in self.live_blocks for p in block.parameters()]
        else:
            targets = list(self.ema_first.parameters())
            live = list(self.live_blocks[0].parameters())
        return targets, live


@register_method("mlaan")
class MLAAN(LocalMethod):
    """`mlaan`: the [mlaan] section; `objective`: how the base objective (mlaan.base) is built; `arch`: the
    backbone's name, under which the authors' leap tables are looked up."""

    def __init__(self, backbone, modules, mlaan: MLAANConfig, objective: ObjectiveOptions, arch: str):
        super().__init__(backbone, modules)
        self.window = mlaan.window
        self.wx, self.wy = mlaan.wx, mlaan.wy
        self.c_own, self.c_prop = mlaan.final_weights
        num_modules = self.num_modules
        final_channels = backbone.part_info[-1].out_channels
        self.head_modules = list(range(mlaan.window - 1, num_modules - 1))
        module_parts = [m.part_ids for m in modules]

        def base_objective(info, i: int):  # the base objective on features described by PartInfo `info`
            return build_objective(
                objective,
                info.out_channels,
                i,
                num_modules,
                backbone.num_classes,
                final_channels,
                backbone.input_size,
                info.out_size if info.tokens else 0,
            )

        # A module whose base objective has only zero weights (InfoPro) has no loss: no heads, no LAM.
        self.loss_modules = [i for i in self.head_modules if not objective_is_zero(objective, i, num_modules)]
        warn_untrained(
            self.untrained_modules(),
            f"infopro.weights = {objective.infopro.weights}, mlaan.window = "
            f"{self.window}, mlaan.wx = {self.wx}, mlaan.wy = {self.wy}, mlaan.final_weights = "
            f"{mlaan.final_weights}",
        )
        leaps, self.leaps_source = {}, None
        if mlaan.lam and self.loss_modules:
            leaps, self.leaps_source = leap_lists(backbone, arch, module_parts, self.loss_modules, mlaan.leaps)
        self.leap_parts = leaps
        own, lams, cascaded = {}, {}, {}
        for i in self.loss_modules:
            info = self.module_out_info(i)
            own[str(i)] = base_objective(info, i)
            if mlaan.lam:
                blocks = [backbone.parts[p] for p in leaps[i]]
                lams[str(i)] = LeapAugmentedModule(blocks, mlaan.lam_mode == "literal")
                info = backbone.part_info[leaps[i][-1]]
            cascaded[str(i)] = base_objective(info, i)
        self.own_objectives = nn.ModuleDict(own)
        self.cascaded_objectives = nn.ModuleDict(cascaded)
        self.lams = nn.ModuleDict(lams)
        # Cached once: .to() and load_state_dict() keep parameter identities, so the lists stay valid.
        self._ema_targets, self._ema_live = self._ema_tensor_lists(mlaan.ema_scope)
        self.ema_momentum = mlaan.ema_momentum

    @classmethod
    def from_config(cls, cfg, backbone, modules):
        head = cfg.method.head
        if head == "auto":  # the paper's "MLAAN" row: GAP + Linear heads on a DGL base; InfoPro's stays 1c2f
            head = "0c1f" if cfg.mlaan.base == "dgl" else "1c2f"
        objective = ObjectiveOptions(cfg.mlaan.base, head, cfg.method, cfg.infopro)
        return cls(backbone, modules, cfg.mlaan, objective, cfg.model.arch)

    def untrained_modules(self) -> list[int]:
        """Modules no loss with a nonzero weight reaches: a local loss at module i reaches i (independent
        term) and i-W+1..i (cascaded term); the final loss reaches K-W..K-1 (docs/method.md#methods)."""
        reached = set()
        for i in self.loss_modules:
            if self.wx:
                reached.add(i)
            if self.wy:
                reached.update(range(max(0, i - self.window + 1), i + 1))
        last = self.num_modules - 1
        if self.c_own:
            reached.add(last)
        if self.c_prop:
            reached.update(range(max(0, last - self.window + 1), last + 1))
        return [i for i in range(self.num_modules) if i not in reached]

    def extra_state_summary(self) -> dict:
        return {"leaps": self.leaps_source} if self.leaps_source else {}

    def _ema_tensor_lists(self, scope: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys = list(self.lams.keys())
        if scope == "last":  # the CIFAR reference moves only the last LAM's EMA copy
            keys = keys[-1:]
        targets, live = [], []
        self._ema_by_loss = {}
        for key in keys:
            t, lv = self.lams[key].ema_pairs()
            self._ema_by_loss[int(key)] = (t, lv)
            targets += t
            live += lv
        return targets, live

    def ema_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA tensors, the live tensors they follow) that one step's EMA update moves."""
        return self._ema_targets, self._ema_live

    def module_loss(self, i, own, cascade, batch):
        if i == self.num_modules - 1:
            head = self.backbone.head
            loss = self.c_prop * classification_loss(head, cascade, batch.y, self.kernels)
            if self.c_own != self.c_prop:  # the last module's own share beyond what travels down
                loss = loss + (self.c_own - self.c_prop) * classification_loss(head, own, batch.y, self.kernels)
            return loss
        key = str(i)
        if key not in self.own_objectives:
            return None  # modules 0..W-2 learn only through later windows
        lam = self.lams[key] if key in self.lams else None
        return self.wx * self.run_objective(self.own_objectives[key], own, batch) + self.wy * self.run_objective(
            self.cascaded_objectives[key], cascade, batch, lam
        )

    def loss_parameters(self, i):
        if i == self.num_modules - 1:
            return [p for p in self.backbone.head.parameters() if p.requires_grad]
        key = str(i)
        parts = [d[key] for d in (self.own_objectives, self.cascaded_objectives, self.lams) if key in d]
        return [p for part in parts for p in part.parameters() if p.requires_grad]

    def ema_pairs_of_loss(self, i):
        return self._ema_by_loss.get(i, ([], []))

    @torch.no_grad()
    def before_optimizer_step(self):
        self.update_ema(self._ema_targets, self._ema_live)

    @torch.no_grad()
    def update_ema(self, targets: list[torch.Tensor], live: list[torch.Tensor]) -> None:
        """ema <- m * ema + (1 - m) * live for these pairs (a subset of `ema_tensors()`)."""
        if targets:
            from fastlocal.kernels import ema_update_

            ema_update_(targets, live, self.ema_momentum, backend=self.kernels)
