"""Local modules on different CPU cores, measured (bench/pipeline_cores.py under pytest-benchmark): each stage one
process pinned to its own core against the same method and model on one core; the measured and the predicted
speed-ups of every case go to the benchmark's extra_info.

    python -m pytest bench/test_bench_pipeline_cores.py --bench-mode=cpu --benchmark-json=OUT.json   # idle machine
    python -m pytest bench/test_bench_pipeline_cores.py --bench-mode=smoke                             # the harness

--bench-mode=smoke runs the quick size, DGL only, once (minutes); cpu runs every case at the full size,
3 alternated runs of each kind (about an hour on 2 cores). Nothing here asserts a speed-up: the goals are read
from an idle machine (docs/pipeline.md#measured-on-cpu-cores).
"""

from __future__ import annotations

import json
import os

import pipeline_cores
import pytest
import torch
from common import bench_mode, environment

MODE = bench_mode()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to pin 2 stages to")
def test_pipeline_on_two_cores(benchmark, tmp_path):
    args = ["--out", str(tmp_path / "cores")]
    args += ["--quick", "--cases", "dgl", "--repeats", "1"] if MODE == "smoke" else ["--repeats", "3"]
    code = benchmark.pedantic(pipeline_cores.main, args=(args,), rounds=1, iterations=1)
    assert code == 0
    cases = json.loads((tmp_path / "cores" / "pipeline_cores.json").read_text())
    run = json.loads((tmp_path / "cores" / "pipeline_cores_run.json").read_text())
    benchmark.extra_info.update(cases=cases, run=run, **environment(torch.device("cpu"), MODE))
    assert {c["case"] for c in cases} and all(c["measured_speedup"] > 0 for c in cases)
