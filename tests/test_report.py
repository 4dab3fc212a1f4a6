"""`python -m fastlocal.report`: run directories against the paper's rows: seeds averaged, recipe differences
flagged, unknown and unfinished runs listed. The paper's numbers here are typed from its tables."""

import csv
import io
import json
from pathlib import Path

import pytest
from builders import TINY_RUN
from test_configs import CONFIGS, PAPER, declared_rows

from fastlocal import report, train
from fastlocal.config import build_config, to_dict, to_toml
from fastlocal.methods import METHODS
from fastlocal.paper import build_report, paper_rows

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H200"


def fake_run(folder: Path, config: str, accuracy: float | None, *overrides: str, device: str = GPU) -> Path:
    """A run directory as fastlocal.train leaves it (config.toml, summary.json), without training."""
    cfg = build_config(ROOT / "configs" / config if config else None, list(overrides), METHODS)
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(to_toml(cfg))
    if accuracy is not None:
        summary = {"final_test_acc": accuracy, "epochs": cfg.train.epochs, "device": device, "world_size": 1}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def line(result, table, method, **where):
    found = [
        r
        for r in result["rows"]
        if r["table"] == table and r["method"] == method and all(r[k] == v for k, v in where.items())
    ]
    assert len(found) == 1, (table, method, where, [(r["table"], r["method"]) for r in result["rows"]])
    return found[0]


def test_rows_seeds_flags_and_other_runs(tmp_path):
    for seed, accuracy in enumerate((93.5, 93.7, 93.9)):
        fake_run(tmp_path / f"mlaan{seed}", "dgl_mlaan_resnet32_k15_cifar10.toml", accuracy, f"system.seed={seed}")
    fake_run(tmp_path / "mlaan300", "dgl_mlaan_resnet32_k15_cifar10_300ep.toml", 92.0)
    fake_run(tmp_path / "bp", "bp_resnet32_cifar10.toml", 93.0)
    fake_run(tmp_path / "bp_bf16", "bp_resnet32_cifar10.toml", 90.0, "system.precision=bf16", "train.epochs=10")
    dgl = fake_run(tmp_path / "dgl", "dgl_resnet32_k16_cifar10.toml", 86.0)
    (dgl / "evaluation-stl10").mkdir()
    (dgl / "evaluation-stl10" / "evaluation.json").write_text(
        json.dumps({"dataset": {"source": "stl10", "max_test": 0}, "accuracy": 33.0})
    )
    fake_run(tmp_path / "in34", "imagenet_mlaan_resnet34.toml", 74.0)
    fake_run(tmp_path / "small", "", 50.0, "model.arch=resnet20")
    fake_run(tmp_path / "unfinished", "dgl_resnet32_k8_cifar10.toml", None)
    result = build_report([tmp_path])

    table1 = line(result, "Table 1", "DGL+MLAAN", dataset="CIFAR-10", K="K=16")
    assert table1["paper"] == 6.36
    assert table1["measured_mean"] == pytest.approx(6.3) and table1["measured_std"] == pytest.approx(0.2)
    assert table1["n"] == 3 and table1["seeds"] == [0, 1, 2]
    assert table1["difference"] == pytest.approx(-0.06) and table1["recipe"] == "paper"
    assert table1["differences"] == []
    table4 = line(result, "Table 4", "MLM+LAM")
    assert table4["paper"] == 6.36 and table4["n"] == 3
    # 300 epochs is Table 5's row only; 400 epochs is not Table 5's DGL+MLAAN row.
    table5 = line(result, "Table 5", "DGL+MLAAN", architecture="ResNet-32")
    assert (table5["paper"], table5["measured_mean"], table5["n"], table5["recipe"]) == (7.79, 8.0, 1, "paper")
    # One recipe per line: the bf16 10-epoch BP run is not averaged with the paper-recipe one, and is flagged.
    bp = [r for r in result["rows"] if r["table"] == "Table 1" and r["method"] == "BP"]
    assert sorted((r["recipe"], r["measured_mean"]) for r in bp) == [("differs", 10.0), ("paper", 7.0)]
    flagged = next(r for r in bp if r["recipe"] == "differs")
    assert any("precision bf16" in d for d in flagged["differences"])
    assert any("train.epochs 10 (paper 400)" in d for d in flagged["differences"])
    assert all(r["paper"] == 6.37 for r in bp)
    table6 = line(result, "Table 6", "DGL", architecture="ResNet-32")
    assert (table6["paper"], table6["measured_mean"]) == (31.95, 33.0)
    assert line(result, "Table 5", "DGL", architecture="ResNet-32")["paper"] == 14.08
    table2 = line(result, "Table 2", "MLAAN", architecture="ResNet-34")
    assert (table2["paper"], table2["measured_mean"], table2["K"]) == (25.31, 26.0, "K=17")
    assert "paper top-5 7.88 (not measured)" in table2["differences"]

    others = {Path(o["run"]).name: o["why"] for o in result["other_runs"]}
    assert set(others) == {"small", "unfinished"}
    assert "resnet20" in others["small"] and "unfinished" in others["unfinished"]


def test_a_tiny_real_run_is_flagged_and_the_cli_writes_both_formats(tmp_path, capsys):
    out = tmp_path / "runs" / "none"
    args = [
        *(a for a in TINY_RUN if "arch" not in a),
        "--config",
        str(ROOT / "configs" / "ablation_none_resnet32_k16_cifar10.toml"),
    ]
    small = ["--data.max_train=40", "--data.max_test=20", "--train.batch_size=20", "--train.epochs=1"]
    assert train.main([*args, *small, "--system.device=cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    assert report.main([str(tmp_path / "runs"), "--tables", "4"]) == 0
    markdown = capsys.readouterr().out
    (row,) = [r for r in markdown.splitlines() if r.startswith("| Table 4")]
    assert "| none | K=16 |" in row and "| 14.08 |" in row and "(n=1)" in row
    assert "NOT the paper's recipe" in row and "train.epochs 1 (paper 400)" in row
    assert "train images 40 of the bundled subset (paper 50000)" in row and "device CPU" in row
    assert report.main([str(tmp_path / "runs"), "--format", "csv", "--out", str(tmp_path / "r.csv")]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert {r["table"] for r in rows} == {"Table 1", "Table 4", "Table 5"}  # DGL "K=16" is in three tables
    assert all(r["recipe"] == "differs" and r["runs"] == str(out) for r in rows)


@pytest.mark.parametrize("args, message", [(["missing"], "missing is not a directory"), (["--tables", "3", "."], "3")])
def test_errors(args, message, capsys):
    assert report.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastlocal: error:") and message in err


def test_each_config_is_the_rows_its_header_declares():
    """The report's matching, against the headers (which test_configs checks against the typed tables): each
    config is the rows it declares, and a row more only where another config that declares it is the same."""
    configs = {path: to_dict(build_config(path, (), METHODS)) for path in CONFIGS}
    declared_by = {}
    for path in CONFIGS:
        for row in declared_rows(path):
            declared_by.setdefault(row[:5], []).append(configs[path])
    every = set()
    for path in CONFIGS:
        declared = {row[:5] for row in declared_rows(path) if row[0] != "Table 6"}
        rows, why = paper_rows(build_config(path, (), METHODS))
        found = set()
        for row in rows:
            method = row.method
            if row.table == "Table 5":  # the headers name Table 5's rows with their epochs
                method = f"{row.method}, {row.epochs} epochs"
            key = (row.table, row.dataset, row.arch, method, row.k_label)
            number = PAPER[key]
            assert row.number == (number[0] if isinstance(number, tuple) else number)
            found.add(key)
        assert declared <= found, (path.name, why)
        for key in found - declared:
            assert configs[path] in declared_by[key], (path.name, key)
        every |= found
    assert every == {key for key in PAPER if key[0] != "Table 6"}
