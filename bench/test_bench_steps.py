"""Training-step time and peak memory per method x backbone x K, beside BP, BP with per-block gradient
checkpointing and BP in bf16 at the same batch; every case also records its ratios to BP of the same
backbone, batch and input size measured in this session.

    python -m pytest bench/test_bench_steps.py --benchmark-only --benchmark-json=RESULTS.json
    python -m fastlocal.bench.report RESULTS.json --out DIR

Sizes follow --bench-mode (gpu, cpu, smoke: see bench/common.py). Nothing here asserts a time.
"""

from __future__ import annotations

import pytest
from common import bench_device, bench_mode, run_case, sizes, step_cases

MODE = bench_mode()
DEVICE = bench_device(MODE)
CASES = step_cases(MODE)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_step(benchmark, case):
    group = f"step {case.arch} {case.input_size}px batch {case.batch}"
    result = run_case(benchmark, case, DEVICE, MODE, sizes(MODE).rounds, group)
    assert result["peak_memory_bytes"] > 0
