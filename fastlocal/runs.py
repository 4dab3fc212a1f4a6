"""Run directories of `python -m fastlocal.train`, read back: where they are, how far they got, their config,
summary and model.

A run directory holds config.toml (the resolved config), metrics.jsonl, summary.json (written when the last
epoch is done) and checkpoint.pt (written after every epoch), so a run is
- finished: summary.json is there;
- interrupted: a checkpoint but no summary.json (``python -m fastlocal.train --resume DIR`` continues it);
- new: neither (it has not finished an epoch, or was never started).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastlocal.config import Config, UserError, build_config
from fastlocal.engine import CHECKPOINT_NAME

CONFIG_NAME = "config.toml"
SUMMARY_NAME = "summary.json"


def run_state(path: str | Path) -> str:
    """finished, interrupted or new (see the module docstring)."""
    path = Path(path)
    if (path / SUMMARY_NAME).is_file():
        return "finished"
    if (path / CHECKPOINT_NAME).is_file():
        return "interrupted"
    return "new"


def find_runs(roots: list[str | Path]) -> list[Path]:
    """Every run directory (one holding config.toml) at or below each root, sorted, each once."""
    found: dict[Path, None] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"{root} is not a directory; pass run directories or folders that hold them")
        for config in sorted(root.rglob(CONFIG_NAME)):
            found[config.parent] = None
    return list(found)


def read_config(path: str | Path) -> Config:
    """The resolved config a run was trained with."""
    from fastlocal.methods import METHODS

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{path} has no {CONFIG_NAME}; it is not a fastlocal.train run directory")
    return build_config(path / CONFIG_NAME, [], METHODS)


def read_summary(path: str | Path) -> dict | None:
    """summary.json of a finished run, None before it finishes."""
    summary = Path(path) / SUMMARY_NAME
    if not summary.is_file():
        return None
    try:
        return json.loads(summary.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {summary}: {err}; it is corrupt or not written by fastlocal") from None


def trained_run(path: str | Path) -> Config:
    """The config of a run directory that has a checkpoint; a UserError that says what is missing otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run directory {path} does not exist; pass the --out directory of a fastlocal.train run")
    cfg = read_config(path)
    if not (path / CHECKPOINT_NAME).is_file():
        raise UserError(
            f"{path} has no {CHECKPOINT_NAME}; the run has not finished an epoch yet (train it, or pass "
            "another run directory)"
        )
    return cfg


def load_backbone(path: str | Path, num_classes: int, image_size: int, device: torch.device):
    """(config, backbone) of a run directory: the backbone built from its config for `num_classes` classes at
    `image_size` pixels, with the checkpoint's weights, on `device`, in eval mode. The backbone alone is the
    trained network: evaluation is its plain forward (the heads and EMA copies only train)."""
    from fastlocal.engine import read_checkpoint
    from fastlocal.models import build_backbone

    cfg = trained_run(path)
    checkpoint = Path(path) / CHECKPOINT_NAME
    backbone = build_backbone(cfg.model.arch, num_classes, image_size, cfg.model.zero_init_residual)
    state = read_checkpoint(checkpoint)  # weights_only: a checkpoint never runs code
    try:
        backbone.load_state_dict(state["backbone"])
    except (RuntimeError, KeyError) as err:  # a foreign or edited file: say so, do not crash
        raise UserError(
            f"cannot read the model in {checkpoint}: {str(err)[:300]}; it was not written for the config beside it"
        ) from None
    return cfg, backbone.to(device).eval()
