"""A training run with the Triton kernels (CPU interpreter here, CUDA on a GPU) follows the
reference run's losses step for step."""

import os

import pytest
import torch

from fastlocal.config import build_config
from fastlocal.engine import build_optimizer, local_train_step
from fastlocal.methods import METHODS, Batch, build_method
from fastlocal.models import build_backbone
from fastlocal.split import split_backbone

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py on CPU)",
)


@pytest.fixture(autouse=True)
def _exact(exact_cuda_math):
    """Both runs must differ only by the kernels (see tests/conftest.py)."""


def train_losses(kernels: str, steps: int = 3):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = build_config(None, ["method.name=mlaan", "method.num_modules=3", "model.arch=resnet20",
                              "method.head=0c1f", f"system.kernels={kernels}"], METHODS)
    torch.manual_seed(0)
    backbone = build_backbone("resnet20", 10, 16)
    modules = split_backbone(backbone, 3)
    method = build_method(cfg, backbone, modules)
    method.kernels = kernels
    backbone.to(device)
    method.to(device)
    params = [p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(6, 3, 16, 16, generator=g).to(device)
        y = torch.randint(0, 10, (6,), generator=g).to(device)
        optimizer.zero_grad()
        losses.append(local_train_step(modules, method, Batch(x, y, (0.5,) * 3, (0.5,) * 3)).item())
        optimizer.step()
    ema = [t.detach().cpu().clone() for t in method.ema_tensors()[0]]
    return losses, ema


def test_triton_run_follows_reference_run():
    reference, ema_ref = train_losses("reference")
    fused, ema_fused = train_losses("triton")
    assert fused == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert len(ema_ref) == len(ema_fused) > 0
    for a, b in zip(ema_ref, ema_fused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
