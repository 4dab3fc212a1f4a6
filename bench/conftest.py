"""The benchmark suite's options (``python -m pytest bench --help`` lists them under "fastlocal bench").

    python -m pytest bench --bench-mode=smoke --benchmark-disable     # CI: the harness runs, nothing timed
    python -m pytest bench --bench-mode=gpu --bench-budget-s=250 --benchmark-only --benchmark-json=OUT.json

The options are read once, when pytest starts, into ``common.OPTIONS`` (the benchmark files size their
cases from it when pytest collects them). The markers (``gpu``, ``triton``, ``dali``) are the tests' ones,
from conftest.py at the repository root.
"""

import argparse

import common
import pytest
import torch


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


def pytest_addoption(parser):
    group = parser.getgroup("fastlocal bench")
    group.addoption(
        "--bench-mode",
        choices=common.MODES,
        default=None,
        help="case sizes: gpu (the paper's), cpu (small batches), smoke (tiny, seconds); "
        "default gpu with CUDA, else cpu",
    )
    group.addoption(
        "--bench-rounds", type=_positive_int, default=None, help="timed rounds per case (default: per mode)"
    )
    group.addoption(
        "--bench-threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads (default 1 on CPU, torch's default on CUDA)",
    )
    group.addoption(
        "--bench-kernels",
        choices=("auto", "reference", "triton"),
        default="auto",
        help="the methods' kernel backend (system.kernels)",
    )
    group.addoption(
        "--bench-budget-s",
        type=_seconds,
        default=None,
        help="soft time budget: cases that would start later are skipped, so the run ends normally",
    )
    group.addoption(
        "--bench-data", default=None, help="image folder or archive for the loader benchmark (default: synthetic JPEGs)"
    )


def pytest_configure(config):
    mode = config.getoption("--bench-mode") or ("gpu" if torch.cuda.is_available() else "cpu")
    if mode == "gpu" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-mode=gpu needs a CUDA device; use --bench-mode=cpu or smoke")
    common.OPTIONS = common.Options(
        mode=mode,
        rounds=config.getoption("--bench-rounds"),
        threads=config.getoption("--bench-threads"),
        kernels=config.getoption("--bench-kernels"),
        budget_s=config.getoption("--bench-budget-s"),
        data=config.getoption("--bench-data"),
    )
