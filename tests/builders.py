"""Shared test builders: a backbone, its split and a method from a few config overrides."""

import torch

from fastlocal.config import build_config
from fastlocal.methods import METHODS, build_method
from fastlocal.models import build_backbone
from fastlocal.split import split_backbone


def build(method: str, arch: str, k: int, overrides=(), dtype=torch.float64, seed: int = 0, input_size: int = 32):
    """(cfg, backbone, modules, method) with `overrides` as 'section.key=value' strings."""
    items = [f"method.name={method}", f"method.num_modules={k}", f"model.arch={arch}", *overrides]
    cfg = build_config(None, items, METHODS)
    torch.manual_seed(seed)
    backbone = build_backbone(arch, 10, input_size)
    modules = split_backbone(backbone, k, cfg.method.stem_separate)
    built = build_method(cfg, backbone, modules)
    backbone.to(dtype)
    built.to(dtype)
    return cfg, backbone, modules, built
