"""Every shipped config loads, validates, and builds its model, split and method."""

from pathlib import Path

import pytest
import torch

from fastlocal.config import build_config
from fastlocal.methods import METHODS, build_method
from fastlocal.models import build_backbone
from fastlocal.split import split_backbone

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 28


@pytest.mark.filterwarnings("ignore:local module")
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds(path):
    cfg = build_config(path, (), METHODS)
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.arch, 10, 32)
    modules = split_backbone(backbone, cfg.method.num_modules, cfg.method.stem_separate, cfg.method.split)
    build_method(cfg, backbone, modules)
    assert len(modules) == cfg.method.num_modules
