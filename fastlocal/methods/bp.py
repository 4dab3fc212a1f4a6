"""End-to-end backprop (docs/method.md#methods): one module, the final head's cross-entropy."""

from __future__ import annotations

from fastlocal.config import ConfigError
from fastlocal.heads import classification_loss
from fastlocal.methods.base import LocalMethod, register_method


@register_method("bp")
class BP(LocalMethod):
    def __init__(self, cfg, backbone, modules):
        if len(modules) != 1:
            raise ConfigError(
                f"method.name = bp trains end to end, so method.num_modules must be 1 (got {len(modules)}); "
                "use method.name=dgl for K local modules"
            )
        super().__init__(cfg, backbone, modules)

    def module_loss(self, i, own, cascade, batch):
        return classification_loss(self.backbone.head, own, batch.y, self.kernels)
