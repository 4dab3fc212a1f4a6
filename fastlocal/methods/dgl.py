"""DGL, greedy supervised local learning (SPEC 3.2): every module but the last trains on the
cross-entropy of its own auxiliary head; its input is detached, so nothing else reaches it."""

from __future__ import annotations

from torch import nn

from fastlocal.heads import build_head, classification_loss
from fastlocal.methods.base import LocalMethod, register_method


@register_method("dgl")
class DGL(LocalMethod):
    def __init__(self, cfg, backbone, modules):
        super().__init__(cfg, backbone, modules)
        final_channels = backbone.part_info[-1].out_channels
        self.heads = nn.ModuleList(
            build_head(cfg.method.head, self.module_out_info(i).out_channels, backbone.num_classes,
                       final_channels, cfg.method.head_hidden, cfg.method.head_widen)
            for i in range(self.num_modules - 1)
        )

    def module_loss(self, i, own, cascade, batch):
        head = self.backbone.head if i == self.num_modules - 1 else self.heads[i]
        return classification_loss(head, own, batch.y, self.kernels)
