"""ImageNet ResNets built from torchvision's definitions, cut into stem + blocks + head."""

from __future__ import annotations

from fastlocal.models.adapters import adapt
from fastlocal.models.backbone import Backbone


def imagenet_resnet(arch: str, num_classes: int, input_size: int = 224, zero_init_residual: bool = False) -> Backbone:
    import torchvision

    net = getattr(torchvision.models, arch)(
        weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
    )
    return adapt(net, input_size)
