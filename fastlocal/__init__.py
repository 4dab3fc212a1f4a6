"""fastlocal: supervised local learning (BP, DGL, InfoPro, MLAAN) for PyTorch.

The Python API (docs/any_model.md): `Backbone(stem, blocks, None, head, input_size)` describes a network
as a stem and an ordered list of blocks; `adapt(model, input_size)` cuts a supported torchvision model
(ResNet, Wide-ResNet, ResNeXt, VGG-BN, ConvNeXt, MobileNetV3, EfficientNet, ViT) or timm model (ResNet,
ConvNeXt, EfficientNet, RegNet, ViT/DeiT, Swin) into one;
`LocalLearner(backbone, method, num_modules, **options)` trains it with local learning in your own loop
(`learner.step(x, y)` then your optimizer's step; `learner(x)` to evaluate).
"""

from fastlocal.config import ConfigError, UserError
from fastlocal.learner import LocalLearner
from fastlocal.models import Backbone, PartInfo, build_backbone
from fastlocal.models.adapters import adapt

__version__ = "0.1.0"

__all__ = ["Backbone", "ConfigError", "LocalLearner", "PartInfo", "UserError", "adapt", "build_backbone"]
