"""A training run with the Triton kernels (CPU interpreter here, CUDA on a GPU) follows the
reference run's losses step for step."""

import pytest
import torch
from builders import short_mlaan_run

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _exact(exact_cuda_math):
    """Both runs must differ only by the kernels (see tests/conftest.py)."""


def train_losses(kernels: str):
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def use_kernels(backbone, method):
        method.kernels = kernels

    losses, method = short_mlaan_run(device, ["method.head=0c1f", f"system.kernels={kernels}"], use_kernels)
    return losses, [t.detach().cpu().clone() for t in method.ema_tensors()[0]]


def test_triton_run_follows_reference_run():
    reference, ema_ref = train_losses("reference")
    fused, ema_fused = train_losses("triton")
    assert fused == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert len(ema_ref) == len(ema_fused) > 0
    for a, b in zip(ema_ref, ema_fused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
