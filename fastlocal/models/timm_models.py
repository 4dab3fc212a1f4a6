"""Cut timm classification models into a stem, ordered blocks and a head (`fastlocal.adapt` calls this for
any model whose class lives in `timm`).

A timm family is recognised by its class name and the attributes its `forward_features` and `forward_head`
read (timm 1.0). The parts share the model's parameters, and composed they compute exactly the model's
forward (tested for each family):

- ResNet (ResNet, ResNet-D/-T, ResNeXt, SE-ResNet): stem = conv1, bn1, act1, maxpool; a block per block of
  layer1..4; head = global_pool, fc;
- ConvNeXt: stem; a block per block (a stage's first includes its downsampling); head = norm_pre, head;
- EfficientNet: stem = conv_stem, bn1; a block per block, then conv_head + bn2; head = global_pool, classifier;
- RegNet: stem; a block per block of s1..s4; head = final_conv, head;
- VisionTransformer (ViT, DeiT): stem = patch_embed, class/register tokens, pos_embed, norm_pre; a block per
  block (tokens, (B, N, D)); head = norm, the pooling, fc_norm, head;
- SwinTransformer: stem = patch_embed; a block per block (a stage's first includes its patch merging);
  head = norm, head.

timm's Swin passes channels-last feature maps (B, H, W, C) between its blocks; the parts here take and
return (B, C, H, W) (a permutation on each side of every block, exact), which is what fastlocal's heads read.

Nothing here imports timm: a model built by timm brings its classes with it.
"""

from __future__ import annotations

import torch
from torch import nn

from fastlocal.config import ConfigError

# The attributes each family's forward reads, by timm class name.
TIMM_LAYOUTS = {
    "ResNet": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4", "global_pool", "fc"),
    "ConvNeXt": ("stem", "stages", "norm_pre", "head"),
    "EfficientNet": ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier"),
    "RegNet": ("stem", "s1", "s2", "s3", "s4", "final_conv", "head"),
    "VisionTransformer": (
        "patch_embed",
        "cls_token",
        "pos_embed",
        "pos_drop",
        "patch_drop",
        "norm_pre",
        "blocks",
        "norm",
        "fc_norm",
        "head_drop",
        "head",
    ),
    "SwinTransformer": ("patch_embed", "layers", "norm", "head"),
}


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def timm_parts(model: nn.Module):
    """(stem, blocks, block_ids, head) of a supported timm model; ConfigError naming what is missing."""
    name = type(model).__name__
    if name not in TIMM_LAYOUTS or any(not hasattr(model, a) for a in TIMM_LAYOUTS[name]):
        closest, attrs = max(
            TIMM_LAYOUTS.items(), key=lambda item: (item[0] == name, sum(hasattr(model, a) for a in item[1]))
        )
        missing = [a for a in attrs if not hasattr(model, a)]
        why = (
            f"the closest, {closest}, needs the attribute(s) {', '.join(missing)}"
            if missing
            else f"it has {closest}'s attributes but is another class, whose forward fastlocal does not know"
        )
        raise ConfigError(
            f"timm's {name} cannot be cut into parts (a stem, an ordered sequence of blocks and a head): it is "
            f"none of the timm families fastlocal knows ({', '.join(TIMM_LAYOUTS)}); {why}. Build the "
            "backbone from its parts instead: fastlocal.Backbone(stem, blocks, None, head, input_size)"
        )
    if getattr(model, "grad_checkpointing", False):
        raise ConfigError(
            f"timm's {name} has gradient checkpointing on; local learning frees each module's graph itself: "
            "call model.set_grad_checkpointing(False)"
        )
    return {
        "ResNet": _resnet,
        "ConvNeXt": _convnext,
        "EfficientNet": _efficientnet,
        "RegNet": _regnet,
        "VisionTransformer": _vit,
        "SwinTransformer": _swin,
    }[name](model)


def _numbered(stages) -> tuple[list[nn.Module], list[tuple[int, int]]]:
    blocks, block_ids = [], []
    for stage, stage_blocks in enumerate(stages):
        for index, block in enumerate(stage_blocks):
            blocks.append(block)
            block_ids.append((stage, index))
    return blocks, block_ids


def _with_first(first: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """A stage's blocks, its downsampling layer (first) run as part of its first block."""
    if isinstance(first, nn.Identity) or not blocks:
        return blocks
    return [nn.Sequential(first, blocks[0]), *blocks[1:]]


class PoolDropClassifier(nn.Module):
    """timm's forward_head of ResNet and EfficientNet: global pool, dropout at the model's drop rate, classifier."""

    def __init__(self, global_pool: nn.Module, classifier: nn.Module, drop_rate: float):
        super().__init__()
        self.global_pool, self.classifier, self.drop_rate = global_pool, classifier, float(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)


def _resnet(net: nn.Module):
    stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
    blocks, block_ids = _numbered([net.layer1, net.layer2, net.layer3, net.layer4])
    return stem, blocks, block_ids, PoolDropClassifier(net.global_pool, net.fc, net.drop_rate)


def _convnext(net: nn.Module):
    blocks, block_ids = _numbered([_with_first(s.downsample, list(s.blocks)) for s in net.stages])
    return net.stem, blocks, block_ids, nn.Sequential(net.norm_pre, net.head)


def _efficientnet(net: nn.Module):
    stages = [list(stage) for stage in net.blocks]
    stages.append([nn.Sequential(net.conv_head, net.bn2)])  # the last 1x1 conv, a block of its own
    blocks, block_ids = _numbered(stages)
    head = PoolDropClassifier(net.global_pool, net.classifier, net.drop_rate)
    return nn.Sequential(net.conv_stem, net.bn1), blocks, block_ids, head


def _regnet(net: nn.Module):
    blocks, block_ids = _numbered([list(s.children()) for s in (net.s1, net.s2, net.s3, net.s4)])
    return net.stem, blocks, block_ids, nn.Sequential(net.final_conv, net.head)


class TimmViTStem(nn.Module):
    """Patches -> tokens, class and register tokens prepended, position embedding added (timm's
    `_pos_embed`, at the fixed image size), patch dropout, pre-norm."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        if vit.dynamic_img_size:
            raise ConfigError(
                "timm's VisionTransformer with dynamic_img_size=True resamples its position embedding for each "
                "input size inside its forward, which fastlocal's stem does not do; build it with "
                "dynamic_img_size=False and img_size set to the input size"
            )
        self.patch_embed = vit.patch_embed
        self.cls_token, self.reg_token, self.pos_embed = vit.cls_token, vit.reg_token, vit.pos_embed
        self.no_embed_class = vit.no_embed_class
        self.pos_drop, self.patch_drop, self.norm_pre = vit.pos_drop, vit.patch_drop, vit.norm_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is None:
            x = torch.cat([*prefix, x], dim=1)
        elif self.no_embed_class:  # the position embedding covers the patches only
            x = torch.cat([*prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


class TimmViTHead(nn.Module):
    """timm's ViT after the blocks: the final norm, the pooling of the tokens, fc_norm, dropout, classifier."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.norm, self.attn_pool, self.fc_norm = vit.norm, vit.attn_pool, vit.fc_norm
        self.head_drop, self.head = vit.head_drop, vit.head
        self.pool_type, self.num_prefix_tokens = vit.global_pool, vit.num_prefix_tokens
        self.include_prefix = getattr(vit, "pool_include_prefix", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)  # (B, N, D)
        if self.attn_pool is not None:
            x = self.attn_pool(x if self.include_prefix else x[:, self.num_prefix_tokens :])
        elif self.pool_type == "token":
            x = x[:, 0]
        elif self.pool_type:
            x = x if self.include_prefix else x[:, self.num_prefix_tokens :]
            if self.pool_type == "avg":
                x = x.mean(dim=1)
            elif self.pool_type == "max":
                x = x.amax(dim=1)
            elif self.pool_type == "avgmax":
                x = 0.5 * (x.amax(dim=1) + x.mean(dim=1))
            else:
                raise ConfigError(f"timm's VisionTransformer pooling {self.pool_type!r} is not one fastlocal knows")
        return self.head(self.head_drop(self.fc_norm(x)))


def _vit(vit: nn.Module):
    blocks = list(vit.blocks)
    return TimmViTStem(vit), blocks, [(0, i) for i in range(len(blocks))], TimmViTHead(vit)


class ChannelsFirst(nn.Module):
    """A module on channels-last maps (B, H, W, C), run on channels-first maps (B, C, H, W)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelsLastHead(nn.Module):
    """Swin's norm and head, which read (B, H, W, C), on (B, C, H, W)."""

    def __init__(self, norm: nn.Module, head: nn.Module):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x.permute(0, 2, 3, 1)))


class ChannelsFirstStem(nn.Module):
    """Swin's patch embedding, its (B, H, W, C) output as (B, C, H, W)."""

    def __init__(self, patch_embed: nn.Module):
        super().__init__()
        self.patch_embed = patch_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x).permute(0, 3, 1, 2)


def _swin(net: nn.Module):
    stages = [[ChannelsFirst(b) for b in _with_first(s.downsample, list(s.blocks))] for s in net.layers]
    blocks, block_ids = _numbered(stages)
    return ChannelsFirstStem(net.patch_embed), blocks, block_ids, ChannelsLastHead(net.norm, net.head)


# timm modules whose model classes take the image size (`img_size`): their position embeddings or attention
# windows are sized for it.
TAKES_IMAGE_SIZE = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.swin_transformer")


def timm_model(name: str, num_classes: int, input_size: int) -> nn.Module:
    """timm.create_model(name), randomly initialised (pretrained=False: nothing is downloaded)."""
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f"model.arch = 'timm:{name}' needs timm, which is not installed: pip install 'fastlocal[timm]'"
        ) from None
    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(f"model.arch = 'timm:{name}': timm has no model {name!r}; see timm.list_models()")
    entrypoint = timm.models.model_entrypoint(name.split(".")[0])
    kwargs = {"img_size": input_size} if entrypoint.__module__ in TAKES_IMAGE_SIZE else {}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
