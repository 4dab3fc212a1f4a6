"""What tests/ and bench/ share: the markers that say what a test needs, and their skips.

- ``@pytest.mark.gpu``: skipped without a CUDA device; ``gpu(devices=2)`` without two.
- ``@pytest.mark.no_gpu``: checks what happens without CUDA (the fallbacks); skipped where CUDA exists.
- ``@pytest.mark.triton``: the Triton kernels must be able to run: triton installed, and a CUDA device or
  the CPU interpreter (``TRITON_INTERPRET=1``, which tests/conftest.py sets on a machine without CUDA).
  ``triton(compiled=True)``: compiled kernels on a CUDA device, not the interpreter (CUDA graphs,
  host-synchronisation checks).
- ``@pytest.mark.dali``: needs NVIDIA DALI (``pip install 'fastlocal[dali]'``).
- ``@pytest.mark.slow``: trains for more than a few seconds (``-m "not slow"`` leaves them out).

Each skip says what is missing. The conditions are read when a test starts, so a test that sets
``TRITON_INTERPRET`` itself is judged by the value it found. This file sits at the repository root, so
pytest also puts the root on ``sys.path``: ``pytest bench`` imports this checkout's fastlocal uninstalled.
"""

import importlib.util
import os

import pytest
import torch

MARKERS = (
    "gpu(devices=1): needs that many CUDA devices (skipped without them)",
    "no_gpu: checks the behaviour without a CUDA device (skipped where there is one)",
    "triton(compiled=False): needs runnable Triton kernels: CUDA, or TRITON_INTERPRET=1 unless compiled=True",
    "dali: needs NVIDIA DALI (pip install 'fastlocal[dali]')",
    "slow: a test that trains for more than a few seconds",
)


def pytest_configure(config):
    for line in MARKERS:
        config.addinivalue_line("markers", line)


def _installed(module: str) -> bool:
    parent = module.rpartition(".")[0]
    return (not parent or importlib.util.find_spec(parent) is not None) and importlib.util.find_spec(module) is not None


def triton_missing(compiled: bool = False) -> str | None:
    """Why the Triton kernels cannot run here (None when they can)."""
    if not _installed("triton"):
        return "needs triton (pip install 'fastlocal[triton]')"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if compiled and (interpreted or not torch.cuda.is_available()):
        return "needs compiled Triton kernels on a CUDA device (TRITON_INTERPRET unset)"
    if not torch.cuda.is_available() and not interpreted:
        return "needs a CUDA device, or TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter"
    return None


def pytest_runtest_setup(item):
    for mark in item.iter_markers("gpu"):
        devices = mark.kwargs.get("devices", 1)
        if torch.cuda.device_count() < devices:
            pytest.skip("needs a CUDA device" if devices == 1 else f"needs {devices} CUDA devices")
    if item.get_closest_marker("no_gpu") and torch.cuda.is_available():
        pytest.skip("checks the fallback without a CUDA device")
    for mark in item.iter_markers("triton"):
        reason = triton_missing(mark.kwargs.get("compiled", False))
        if reason:
            pytest.skip(reason)
    if item.get_closest_marker("dali") and not _installed("nvidia.dali"):
        pytest.skip("needs NVIDIA DALI (pip install 'fastlocal[dali]')")
