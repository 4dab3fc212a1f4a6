"""A trained backbone's weights under the keys of the model class it was built from.

A run's checkpoint holds the backbone's state as fastlocal's `Backbone` names it (stem, blocks.N, head); the
auxiliary heads, LAMs and EMA copies are the method's, so they are not in it. `source_state_dict` renames
the backbone's entries to the model's own keys (a torchvision or timm model: `Backbone.source_keys`, recorded
by `fastlocal.adapt`), so the model's class loads them with no missing or unexpected key. fastlocal's CIFAR
ResNets and a factory's own `Backbone` are their own class: their keys stay.
"""

from __future__ import annotations

import torch

from fastlocal.config import UserError
from fastlocal.models import build_backbone
from fastlocal.models.backbone import Backbone


def source_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The backbone's state under its model class's keys (detached, contiguous CPU copies)."""
    state = backbone.state_dict()
    unused = getattr(backbone, "source_unused", [])
    if unused:
        raise UserError(
            f"{backbone.source_class} has entries its parts never use ({', '.join(unused[:5])}), so the trained "
            "weights would not fill it; export the backbone's own state (Backbone.state_dict()) instead"
        )
    keys = getattr(backbone, "source_keys", None)
    if keys is not None:
        state = {model_key: state[backbone_key] for model_key, backbone_key in keys.items()}
    # Contiguous copies: safetensors stores neither channels_last strides nor tensors sharing storage.
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state.items()}


def exported_state_dict(arch: str, backbone_state: dict, num_classes: int, input_size: int) -> dict:
    """A checkpoint's backbone state (`checkpoint["backbone"]`) of a model.arch = `arch` run, under the keys of
    the model class: the backbone is rebuilt (randomly initialised, nothing downloaded), loaded, renamed."""
    backbone = build_backbone(arch, num_classes, input_size)
    dtypes = {v.dtype for v in backbone_state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # keep the checkpoint's precision (float64 in fastlocal's exactness tests)
        backbone.to(dtypes.pop())
    try:
        backbone.load_state_dict(backbone_state)
    except RuntimeError as err:
        raise UserError(
            f"the checkpoint's backbone does not fit model.arch = {arch!r} with {num_classes} classes at "
            f"{input_size}x{input_size} ({str(err)[:300]})"
        ) from None
    return source_state_dict(backbone)
