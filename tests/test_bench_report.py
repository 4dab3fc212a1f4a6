"""fastlocal.bench.report on a small synthetic pytest-benchmark JSON, and on bad files."""

import json
from pathlib import Path

import pytest

from fastlocal.bench import report

MIB = 2**20


def bench_entry(method, k, median_s, peak_mib, arch="resnet110", batch=8, sweep=False, device="cpu"):
    info = {
        "suite": "fastlocal-memory-sweep" if sweep else "fastlocal-steps",
        "case": f"{arch}-{method}-K{k}-b{batch}",
        "method": method,
        "arch": arch,
        "input_size": 32,
        "batch": batch,
        "K": k,
        "device": "Test CPU, 2 threads" if device == "cpu" else "Test GPU",
        "device_type": device,
        "torch": "2.x",
        "triton": "3.x",
        "mode": "cpu",
        "peak_memory_bytes": int(peak_mib * MIB),
        # Deliberately wrong: the report must recompute ratios from the BP row of the file.
        "time_ratio_vs_bp": 99.0,
        "memory_ratio_vs_bp": 99.0,
        "memory": {"kind": "cpu_saved_tensors" if device == "cpu" else "cuda", "peak_bytes": int(peak_mib * MIB)},
    }
    if device == "cuda":
        info["memory"].update(
            max_allocated_bytes=int(peak_mib * MIB),
            max_reserved_bytes=int(2 * peak_mib * MIB),
            process_total_bytes=int(3 * peak_mib * MIB),
        )
    return {
        "name": f"test_step[{info['case']}]",
        "group": "g",
        "extra_info": info,
        "stats": {"median": median_s, "iqr": 0.0, "rounds": 3},
    }


def write_json(path, benchmarks):
    path.write_text(
        json.dumps(
            {
                "machine_info": {"node": "host", "system": "Linux", "python_version": "3.11"},
                "datetime": "2030-01-01T00:00:00",
                "benchmarks": benchmarks,
            }
        )
    )
    return path


def table_rows(text):
    """Markdown table rows keyed by (case, K) -> list of cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| resnet") and len(cells) >= 9:
            rows[(cells[0], cells[3], cells[2])] = cells
    return rows


def test_report_table_ratios_and_plots(tmp_path):
    results = write_json(
        tmp_path / "results.json",
        [
            bench_entry("bp", 1, 0.200, 64.0),
            bench_entry("dgl", 54, 0.500, 3.2),
            bench_entry("mlaan", 54, 1.000, 16.0),
            bench_entry("bp-checkpoint", 1, 0.300, 16.0),
            bench_entry("bp", 1, 0.050, 16.0, batch=2, sweep=True),
            bench_entry("mlaan", 54, 0.250, 2.4, batch=2, sweep=True),
            {
                "name": "test_ema[triton]",
                "group": "ema",
                "extra_info": {"device": "cpu"},
                "stats": {"median": 2e-5, "iqr": 1e-6, "rounds": 10},
            },
            # Another suite's row that happens to name a `case`: listed apart, not parsed as a step.
            {
                "name": "test_loader[torch]",
                "group": None,
                "extra_info": {"case": "torch"},
                "stats": {"median": 0.0123, "iqr": 0.001, "rounds": 5},
            },
        ],
    )
    out = tmp_path / "out"
    assert report.main([str(results), "--out", str(out)]) == 0
    text = (out / "bench.md").read_text()
    rows = table_rows(text)
    # case, device, batch, K, median ms, images/s, peak MiB, time vs BP, memory vs BP
    assert rows[("resnet110 bp", "1", "8")][4:] == ["200", "40", "64.0", "1.00", "1.00"]
    assert rows[("resnet110 dgl", "54", "8")][4:] == ["500", "16", "3.20", "2.50", "0.050"]
    assert rows[("resnet110 mlaan", "54", "8")][4:] == ["1000", "8", "16.0", "5.00", "0.25"]
    assert rows[("resnet110 bp-checkpoint", "1", "8")][4:] == ["300", "26.7", "16.0", "1.50", "0.25"]
    # The sweep's rows are compared with the sweep's BP at their own batch.
    assert rows[("resnet110 mlaan", "54", "2")][4:] == ["250", "8", "2.40", "5.00", "0.15"]
    assert "Test CPU, 2 threads" in text and "torch 2.x" in text
    assert "| test_ema[triton] | ema | 20 us | 1 us | 10 |" in text
    assert "| test_loader[torch] | - | 12.3 ms | 1 ms | 5 |" in text
    for name in ("memory_vs_k.png", "step_time.png", "memory_vs_batch.png", "time_vs_memory.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, name


def test_report_keeps_session_ratios_without_a_bp_row(tmp_path):
    entry = bench_entry("dgl", 54, 0.5, 3.2)
    entry["extra_info"].update(time_ratio_vs_bp=2.5, memory_ratio_vs_bp=0.05)
    results = write_json(tmp_path / "r.json", [entry])
    assert report.main([str(results)]) == 0  # --out defaults to the JSON's folder
    cells = table_rows((tmp_path / "bench.md").read_text())[("resnet110 dgl", "54", "8")]
    assert cells[-2:] == ["2.50", "0.050"]


def test_report_compares_cuda_rows_with_the_paper(tmp_path):
    results = write_json(
        tmp_path / "gpu.json",
        [
            bench_entry("bp", 1, 0.1698, 8.0 * 1024, batch=1024, device="cuda"),
            bench_entry("mlaan", 54, 0.5, 1.5 * 1024, batch=1024, device="cuda"),
        ],
    )
    assert report.main([str(results), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "bench.md").read_text()
    assert "reserved MiB" in text and "process MiB" in text
    assert "Table 3" in text
    line = next(line for line in text.splitlines() if line.startswith("| resnet110 mlaan | 54 |"))
    # step ms, authors' ms, allocated GiB, authors' GiB, reserved GiB, process GiB, Table 3 GB
    assert line.split("|")[3:10] == [" 500 ", " 776.1 ", " 1.50 ", " 1.92 ", " 3.00 ", " 4.50 ", " 2.76 "]


def test_report_merges_several_files(tmp_path):
    first = write_json(tmp_path / "steps.json", [bench_entry("bp", 1, 0.2, 64.0)])
    second = write_json(tmp_path / "more.json", [bench_entry("dgl", 54, 0.5, 3.2)])
    assert report.main([str(first), str(second), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "bench.md").read_text()
    assert table_rows(text)[("resnet110 dgl", "54", "8")][-2:] == ["2.50", "0.050"]
    assert "steps.json more.json" in text


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        ("{not json", "not valid JSON (line 1"),
        ("[1, 2]", "no 'benchmarks' list"),
        ('{"benchmarks": []}', "holds no benchmarks"),
        (
            '{"benchmarks": [{"name": "x", "extra_info": {"suite": "fastlocal-steps", "case": "c"}, '
            '"stats": {"median": 1}}]}',
            "lacks 'method'",
        ),
    ],
)
def test_report_bad_files_fail_clearly(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    assert report.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "bench.md").exists()


def test_report_names_the_analysis_extra_without_matplotlib(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    results = write_json(tmp_path / "r.json", [bench_entry("bp", 1, 0.2, 64.0)])
    assert report.main([str(results), "--out", str(tmp_path)]) == 2
    assert "pip install 'fastlocal[analysis]'" in capsys.readouterr().err


def test_report_without_plots_writes_only_the_table(tmp_path):
    from fastlocal.bench.report import write_report

    source = sorted((Path(__file__).resolve().parents[1] / "docs" / "bench").glob("cpu-summary.json"))
    if not source:
        pytest.skip("docs/bench/cpu-summary.json is not in this checkout")
    written = write_report(source[0], tmp_path, plots=False)
    assert [p.name for p in written] == ["bench.md"] and "| case |" in written[0].read_text()


def _kernel_bench(median_s, **info):
    return {"name": "x", "stats": {"median": median_s}, "extra_info": info}


def test_kernel_choices_pick_the_fastest_launch_shape_and_compare_the_convolution(tmp_path):
    benchmarks = [
        _kernel_bench(20e-6, shape="stage1", launch_shape="default"),
        _kernel_bench(15e-6, shape="stage1", launch_shape="partials_tile4096"),
        _kernel_bench(9e-6, shape="stage3", launch_shape="default"),
        _kernel_bench(12e-6, shape="stage3", launch_shape="partials_tile2048"),
        _kernel_bench(60e-6, shape="stage1", implementation="eager", timing="graph", conv_pixels=128),
        _kernel_bench(40e-6, shape="stage1", implementation="triton", timing="graph", conv_pixels=128),
        _kernel_bench(30e-6, shape="stage1", implementation="triton", timing="graph", conv_pixels=256),
        _kernel_bench(1.0, shape="stage1", timing="graph"),  # another benchmark: ignored
    ]
    path = write_json(tmp_path / "kernels.json", benchmarks)
    assert report.main([str(path), "--no-plots"]) == 0
    out = (tmp_path / "bench.md").read_text()
    assert "| stage1 | 20.0 | partials_tile4096 | 15.0 | 1.33 |" in out
    assert "| stage3 | 9.0 | default | 9.0 | 1.00 |" in out
    assert "| stage1 | graph | 60.0 | 256 pixels | 30.0 | 2.00 |" in out


def test_fast_path_rows_get_their_own_table(tmp_path):
    info = {
        "suite": "fastlocal-fast-path",
        "case": "resnet20-mlaan-K8-bf16-cl",
        "median_step_ms": 12.5,
        "time_ratio_vs_fastest_bp": 3.2,
        "memory_ratio_vs_bp_same_precision": 0.45,
        "device": "Test CPU",
    }
    path = write_json(
        tmp_path / "fast.json", [{"name": "test_bench_fast_path[x]", "extra_info": info, "stats": {"median": 0.0125}}]
    )
    assert report.main([str(path), "--no-plots"]) == 0
    text = (tmp_path / "bench.md").read_text()
    assert "| resnet20-mlaan-K8-bf16-cl | 12.5 | 3.2 | - | - | 0.45 |" in text
    assert "Other benchmarks" not in text  # listed once, in its own table


def test_ratio():
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(1.0, 3.0) == 0.3333
    assert report.ratio(None, 2.0) is None and report.ratio(1.0, 0) is None and report.ratio(1.0, None) is None


def test_pareto_front_keeps_the_points_nothing_beats_in_both():
    points = [(1.0, 1.0), (1.7, 0.36), (4.6, 0.5), (7.0, 0.25), (2.0, 0.4), (7.5, 0.30)]
    assert report.pareto_front(points) == [(1.0, 1.0), (1.7, 0.36), (7.0, 0.25)]
