"""Cut library classification models into a :class:`Backbone` (stem + ordered blocks + head).

`adapt(model, input_size)` recognises a model by the attributes its family's forward uses:

- ResNet, Wide-ResNet, ResNeXt (torchvision ``ResNet``): stem = conv1/bn1/relu/maxpool, a block per
  residual block of layer1..layer4, head = GAP + fc;
- ``features`` + ``avgpool`` + ``classifier`` (VGG-BN, ConvNeXt, MobileNetV3, EfficientNet): stem =
  the first layer(s) of ``features``, a block per residual/inverted-residual block (VGG: per conv-BN-ReLU,
  with the max-pool after it), head = the model's own pooling and classifier;
- VisionTransformer: stem = patch projection + class token + position embedding, a block per encoder
  block (token features, (B, N, D)), head = the final LayerNorm, the class token, the classifier.

timm models: `fastlocal.models.timm_models`.

The parts share the model's parameters: nothing is copied or re-initialised. `from_arch` builds
``torchvision:<name>`` (always ``weights=None``: fastlocal downloads nothing), ``timm:<name>``
(``pretrained=False``) or calls a user's ``package.module:factory``.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from fastlocal.config import ConfigError
from fastlocal.heads import GapLinear
from fastlocal.models.backbone import Backbone

# Attributes each recognised layout reads; the first layout a model has all of is used.
LAYOUTS = {
    "ResNet (torchvision ResNet, Wide-ResNet, ResNeXt)": (
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "fc",
    ),
    "VisionTransformer": ("conv_proj", "class_token", "encoder", "heads"),
    "features + avgpool + classifier (VGG-BN, ConvNeXt, MobileNetV3, EfficientNet)": (
        "features",
        "avgpool",
        "classifier",
    ),
}


def adapt(model: nn.Module, input_size: int) -> Backbone:
    """The Backbone view of a supported library model (shares its parameters); ConfigError naming what is
    missing for any other model."""
    if isinstance(model, Backbone):
        return model
    if type(model).__module__.startswith("timm."):
        from fastlocal.models.timm_models import timm_parts

        return with_source_keys(Backbone(*timm_parts(model), input_size), model)
    layout = next((name for name, attrs in LAYOUTS.items() if all(hasattr(model, a) for a in attrs)), None)
    if layout is None:
        closest, attrs = max(LAYOUTS.items(), key=lambda item: sum(hasattr(model, a) for a in item[1]))
        missing = [a for a in attrs if not hasattr(model, a)]
        raise ConfigError(
            f"{type(model).__name__} cannot be cut into parts (a stem, an ordered sequence of blocks and a head): "
            f"it matches none of the layouts fastlocal knows ({'; '.join(LAYOUTS)}); the closest, {closest}, "
            f"needs the attribute(s) {', '.join(missing)}. Build the backbone from your parts instead: "
            "fastlocal.Backbone(stem, blocks, None, head, input_size)"
        )
    if layout.startswith("ResNet"):
        stem, blocks, block_ids, head = _resnet_parts(model)
    elif layout == "VisionTransformer":
        stem, blocks, block_ids, head = _vit_parts(model, input_size)
    else:
        stem, blocks, block_ids, head = _features_parts(model)
    return with_source_keys(Backbone(stem, blocks, block_ids, head, input_size), model)


def with_source_keys(backbone: Backbone, model: nn.Module) -> Backbone:
    """Record, on the backbone, the model's own state_dict key of each of its entries (`source_keys`:
    model key -> backbone key, matched by tensor identity; the parts share the model's tensors), and the
    model's class, so that trained weights can be exported under the model's keys (`fastlocal.export`)."""
    backbone_keys = {id(t): k for k, t in backbone.state_dict(keep_vars=True).items()}
    model_state = model.state_dict(keep_vars=True)
    backbone.source_keys = {k: backbone_keys[id(t)] for k, t in model_state.items() if id(t) in backbone_keys}
    backbone.source_unused = [k for k, t in model_state.items() if id(t) not in backbone_keys]
    backbone.source_class = f"{type(model).__module__}.{type(model).__qualname__}"
    return backbone


def _resnet_parts(net: nn.Module):
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    blocks, block_ids = [], []
    for stage, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
        for index, block in enumerate(layer):
            blocks.append(block)
            block_ids.append((stage, index))
    head = GapLinear(net.fc.in_features, net.fc.out_features)
    head.fc = net.fc
    return stem, blocks, block_ids, head


class PoolClassifier(nn.Module):
    """The model's own head: its pooling, a flatten where its forward has one, its classifier."""

    def __init__(self, avgpool: nn.Module, classifier: nn.Module, flatten: bool):
        super().__init__()
        self.avgpool, self.classifier, self.flatten = avgpool, classifier, flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1) if self.flatten else x)


def _is_block_sequence(module: nn.Module) -> bool:
    """A stage: a Sequential of blocks (modules with children of their own), not a Sequential of layers."""
    children = list(module.children())
    return (
        isinstance(module, nn.Sequential)
        and len(children) > 1
        and all(len(list(c.children())) > 0 and not isinstance(c, nn.Sequential) for c in children)
    )


def _features_parts(net: nn.Module):
    from torchvision.models import VGG, ConvNeXt

    features = list(net.features.children())
    if isinstance(net, VGG):
        stem_and_blocks = _vgg_units(features)
        (stem, _), rest = stem_and_blocks[0], stem_and_blocks[1:]
        blocks, block_ids = [b for b, _ in rest], [i for _, i in rest]
    else:
        # features[0] is the stem; later items are single blocks or stages (Sequentials of blocks). A layer that
        # is neither (ConvNeXt's downsampling LayerNorm + conv) opens the next stage's first block.
        stem, blocks, block_ids, pending = features[0], [], [], []
        stage, index = 0, 0
        for item in features[1:]:
            if isinstance(net, ConvNeXt) and not _is_block_sequence(item):
                pending.append(item)
                continue
            if _is_block_sequence(item) and index > 0:  # a stage of its own after single blocks
                stage, index = stage + 1, 0
            for block in list(item.children()) if _is_block_sequence(item) else [item]:
                if pending:
                    block, pending = nn.Sequential(*pending, block), []
                blocks.append(block)
                block_ids.append((stage, index))
                index += 1
            if _is_block_sequence(item):
                stage, index = stage + 1, 0
        if pending:
            blocks.append(nn.Sequential(*pending))
            block_ids.append((stage, index))
    head = PoolClassifier(net.avgpool, net.classifier, flatten=not isinstance(net, ConvNeXt))
    return stem, blocks, block_ids, head


def _vgg_units(features: list[nn.Module]) -> list[tuple[nn.Module, tuple[int, int]]]:
    """VGG's flat feature list as conv(-BN)-ReLU units, each with the max-pool that follows it."""
    units, current, stage, index = [], [], 0, 0
    for layer in features:
        if isinstance(layer, nn.Conv2d) and current:
            units.append((nn.Sequential(*current), (stage, index)))
            current, index = [], index + 1
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            units.append((nn.Sequential(*current), (stage, index)))
            current, stage, index = [], stage + 1, 0
    if current:
        units.append((nn.Sequential(*current), (stage, index)))
    return units


class ViTStem(nn.Module):
    """Patches -> tokens, class token prepended, position embedding added (torchvision's forward up to the
    encoder's blocks)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViTHead(nn.Module):
    """Final LayerNorm, the class token, the classifier."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.ln, self.heads = vit.encoder.ln, vit.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.ln(x)[:, 0])


def _vit_parts(vit: nn.Module, input_size: int):
    if getattr(vit, "image_size", input_size) != input_size:
        raise ConfigError(
            f"the VisionTransformer was built for {vit.image_size}x{vit.image_size} images but the "
            f"input size is {input_size}; build it with image_size={input_size}"
        )
    blocks = list(vit.encoder.layers)
    return ViTStem(vit), blocks, [(0, i) for i in range(len(blocks))], ViTHead(vit)


def from_arch(arch: str, num_classes: int, input_size: int) -> Backbone:
    """`torchvision:<name>` or `package.module:factory` (model.arch) as a Backbone."""
    prefix, _, name = arch.partition(":")
    if not prefix or not name:
        raise ConfigError(
            f"model.arch = {arch!r} is not valid; write torchvision:<name>, timm:<name> or package.module:factory"
        )
    if prefix == "torchvision":
        return adapt(torchvision_model(name, num_classes, input_size), input_size)
    if prefix == "timm":
        from fastlocal.models.timm_models import timm_model

        return adapt(timm_model(name, num_classes, input_size), input_size)
    try:
        module = importlib.import_module(prefix)
    except ImportError as err:
        raise ConfigError(
            f"model.arch = {arch!r}: cannot import {prefix!r} ({err}); put its folder on PYTHONPATH"
        ) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"model.arch = {arch!r}: module {prefix!r} has no function {name!r}")
    try:
        model = factory(num_classes=num_classes, input_size=input_size)
    except TypeError as err:
        raise ConfigError(
            f"model.arch = {arch!r}: the factory must accept the keyword arguments num_classes and input_size ({err})"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.arch = {arch!r}: the factory returned a {type(model).__name__}; return a "
            "fastlocal.Backbone or a supported library model"
        )
    backbone = adapt(model, input_size)
    if backbone.num_classes != num_classes:
        raise ConfigError(
            f"model.arch = {arch!r}: the factory's model has {backbone.num_classes} classes but the "
            f"data set has {num_classes}"
        )
    return backbone


def torchvision_model(name: str, num_classes: int, input_size: int) -> nn.Module:
    """torchvision.models.<name>, randomly initialised (weights=None)."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"model.arch = 'torchvision:{name}': torchvision has no classification model {name!r}; "
            "see torchvision.models.list_models()"
        )
    kwargs = {"image_size": input_size} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
