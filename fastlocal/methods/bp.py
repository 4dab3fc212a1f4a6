"""End-to-end backprop (docs/method.md#methods): one module, the final head's cross-entropy."""

from __future__ import annotations

from fastlocal.heads import classification_loss
from fastlocal.methods.base import LocalMethod, register_method


@register_method("bp")
class BP(LocalMethod):
    def __init__(self, backbone, modules):
        assert len(modules) == 1, "bp trains one module (fastlocal.config.validate checks method.num_modules)"
        super().__init__(backbone, modules)

    def module_loss(self, i, own, cascade, batch):
        return classification_loss(self.backbone.head, own, batch.y, self.kernels)

    def loss_parameters(self, i):
        return [p for p in self.backbone.head.parameters() if p.requires_grad]
