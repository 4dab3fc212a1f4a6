"""DGL and InfoPro (docs/method.md#methods): every module but the last trains on its own local objective;
its input is detached, so nothing else reaches it. They differ only in the objective."""

from __future__ import annotations

from torch import nn

from fastlocal.heads import classification_loss
from fastlocal.methods.base import LocalMethod, register_method
from fastlocal.methods.objectives import ObjectiveOptions, build_objective, warn_untrained


class GreedyLocal(LocalMethod):
    base = "dgl"

    def __init__(self, backbone, modules, objective: ObjectiveOptions):
        super().__init__(backbone, modules)
        final_channels = backbone.part_info[-1].out_channels
        objectives = [
            build_objective(
                objective,
                self.module_out_info(i).out_channels,
                i,
                self.num_modules,
                backbone.num_classes,
                final_channels,
                backbone.input_size,
                num_tokens=self.module_out_info(i).out_size if self.module_out_info(i).tokens else 0,
            )
            for i in range(self.num_modules - 1)
        ]
        warn_untrained(
            [i for i, o in enumerate(objectives) if o is None], f"infopro.weights = {objective.infopro.weights}"
        )
        # Keyed by module index; a module whose objective has only zero weights has none.
        self.objectives = nn.ModuleDict({str(i): o for i, o in enumerate(objectives) if o is not None})

    @classmethod
    def from_config(cls, cfg, backbone, modules):
        head = "1c2f" if cfg.method.head == "auto" else cfg.method.head
        return cls(backbone, modules, ObjectiveOptions(cls.base, head, cfg.method, cfg.infopro))

    def module_loss(self, i, own, cascade, batch):
        if i == self.num_modules - 1:
            return classification_loss(self.backbone.head, own, batch.y, self.kernels)
        key = str(i)
        return self.run_objective(self.objectives[key], own, batch) if key in self.objectives else None

    def loss_parameters(self, i):
        if i == self.num_modules - 1:
            return [p for p in self.backbone.head.parameters() if p.requires_grad]
        key = str(i)
        return [p for p in self.objectives[key].parameters() if p.requires_grad] if key in self.objectives else []


@register_method("dgl")
class DGL(GreedyLocal):
    base = "dgl"


@register_method("infopro")
class InfoPro(GreedyLocal):
    base = "infopro"
