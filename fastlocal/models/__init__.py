"""Backbones as stem + ordered blocks + head. No losses and no backward here (methods own those)."""

from fastlocal.config import CIFAR_ARCHS, IMAGENET_ARCHS, ConfigError
from fastlocal.models.backbone import Backbone, PartInfo

__all__ = ["Backbone", "PartInfo", "build_backbone"]


def build_backbone(arch: str, num_classes: int, input_size: int, zero_init_residual: bool = False) -> Backbone:
    """The backbone `model.arch` names: a CIFAR or ImageNet ResNet of fastlocal's, or an adapted model
    (torchvision:<name>, timm:<name>, package.module:factory)."""
    if arch in CIFAR_ARCHS:
        from fastlocal.models.cifar_resnet import cifar_resnet

        return cifar_resnet(arch, num_classes, input_size)
    if arch in IMAGENET_ARCHS:
        from fastlocal.models.imagenet_resnet import imagenet_resnet

        return imagenet_resnet(arch, num_classes, input_size, zero_init_residual)
    if ":" in arch:
        from fastlocal.models.adapters import from_arch

        return from_arch(arch, num_classes, input_size)
    raise ConfigError(
        f"model.arch = {arch!r} is not valid; choose one of: {', '.join(CIFAR_ARCHS + IMAGENET_ARCHS)}, "
        "torchvision:<name>, timm:<name> or package.module:factory"
    )
