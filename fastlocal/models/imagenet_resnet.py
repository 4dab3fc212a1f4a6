"""ImageNet ResNets built from torchvision's definitions, cut into stem + blocks + head."""

from __future__ import annotations

from torch import nn

from fastlocal.heads import GapLinear
from fastlocal.models.backbone import Backbone


def imagenet_resnet(arch: str, num_classes: int, input_size: int = 224, zero_init_residual: bool = False) -> Backbone:
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes,
                                             zero_init_residual=zero_init_residual)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    blocks, block_ids = [], []
    for stage, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
        for index, block in enumerate(layer):
            blocks.append(block)
            block_ids.append((stage, index))
    head = GapLinear(net.fc.in_features, num_classes)
    head.fc = net.fc
    return Backbone(stem, blocks, block_ids, head, input_size, num_classes)
