"""Backbones as stem + ordered blocks + head. No losses and no backward here (methods own those)."""

from fastlocal.models.backbone import Backbone, PartInfo, build_backbone

__all__ = ["Backbone", "PartInfo", "build_backbone"]
