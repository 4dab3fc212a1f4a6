"""Fixtures of the tests; the markers that gate them (gpu, triton, dali, slow) are in ../conftest.py."""

import os

import pytest
import torch

# Triton kernels run in the CPU interpreter when there is no GPU; the variable must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory):
    """Decoded-image caches go to a temporary folder, not the user's ~/.cache."""
    previous = os.environ.get("FASTLOCAL_CACHE")
    os.environ["FASTLOCAL_CACHE"] = str(tmp_path_factory.mktemp("fastlocal-cache"))
    yield
    if previous is None:
        os.environ.pop("FASTLOCAL_CACHE", None)
    else:
        os.environ["FASTLOCAL_CACHE"] = previous


@pytest.fixture
def exact_cuda_math():
    """No TF32 (1e-3 relative per convolution) and no autotuning (two runs could pick different
    convolution algorithms): two runs of the same step on CUDA pick the same kernels."""
    saved = (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    yield
    (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    ) = saved
