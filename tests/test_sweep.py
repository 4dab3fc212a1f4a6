"""`python -m fastlocal.sweep`: config x seed run directories, skipped when finished, resumed when
interrupted, one run per GPU at a time; its errors."""

import json
from pathlib import Path

import pytest

from fastlocal import sweep

# Two tiny experiments on the bundled subset (seconds each on one CPU thread).
CONFIGS = {"dgl_k2": '[method]\nname = "dgl"\nnum_modules = 2\n', "bp": '[method]\nname = "bp"\n'}
TINY = [
    "--model.arch=resnet20",
    "--data.source=bundled",
    "--data.max_train=40",
    "--data.max_test=20",
    "--train.epochs=1",
    "--train.batch_size=20",
    "--log.progress=false",
    "--system.num_threads=1",
    "--system.device=cpu",
]


def write_configs(folder: Path) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for name, text in CONFIGS.items():
        (folder / f"{name}.toml").write_text(text)
        paths.append(folder / f"{name}.toml")
    return paths


def run_sweep(args, capsys, expect=0):
    """The sweep CLI in this process (its runs are train CLI processes); its captured output."""
    code = sweep.main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == expect, captured.out[-2000:] + captured.err[-2000:]
    return captured


def test_every_config_and_seed_runs_once_per_gpu_then_is_skipped_or_resumed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    configs = write_configs(tmp_path / "configs")
    out = tmp_path / "sweep"
    # Two pretend GPUs (the runs are on the CPU): one run on each at a time.
    result = run_sweep([*configs, "--seeds", "0,1", "--out", out, "--gpus", "7,8", *TINY], capsys)
    assert "4 runs" in result.out and "all 4 runs finished" in result.out
    gpus = set()
    for config in configs:
        for seed in (0, 1):
            run = out / config.stem / f"seed{seed}"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["epochs"] == 1
            assert f"seed = {seed}\n" in (run / "config.toml").read_text()
            log = (run / "train.log").read_text()
            gpus |= {gpu for gpu in ("7", "8") if f"CUDA_VISIBLE_DEVICES={gpu})" in log}
    assert gpus == {"7", "8"}
    # Seeds change the run: the two seeds of a config start from different weights.
    losses = [(out / "dgl_k2" / f"seed{s}" / "metrics.jsonl").read_text() for s in (0, 1)]
    assert json.loads(losses[0])["train_loss"] != json.loads(losses[1])["train_loss"]

    # Again: nothing runs. With one summary.json gone (an interrupted run): that run alone resumes.
    finished = out / "bp" / "seed1"
    before = (finished / "checkpoint.pt").stat().st_mtime_ns
    (out / "dgl_k2" / "seed0" / "summary.json").unlink()
    result = run_sweep([*configs, "--seeds", "0,1", "--out", out, "--gpus", "none", *TINY], capsys)
    assert result.out.count("skip ") == 3
    assert "resume dgl_k2 seed 0" in result.out
    assert (out / "dgl_k2" / "seed0" / "summary.json").is_file()
    assert (finished / "checkpoint.pt").stat().st_mtime_ns == before
    assert "--resume" in (out / "dgl_k2" / "seed0" / "train.log").read_text()

    listing = run_sweep([*configs, "--seeds", "0,1", "--out", out, "--list", *TINY], capsys).out
    assert [line.split("\t")[:2] for line in listing.splitlines()] == [[str(i), "finished"] for i in range(1, 5)]

    # The same folder with another recipe is refused, not mixed in.
    other = [a for a in TINY if "epochs" not in a] + ["--train.epochs=2"]
    result = run_sweep([*configs, "--seeds", "0,1", "--out", out, *other], capsys, expect=2)
    assert "already holds a run of another config" in result.err and "train.epochs" in result.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.toml", "--out", "o"], "config missing.toml does not exist"),
        (["{c}", "--out", "o", "--system.seed=3"], "--system.seed is set by --seeds"),
        (["{c}", "--out", "o", "--seeds", "a,b"], "--seeds a,b: give integers"),
        (["{c}", "--out", "o", "--task", "5"], "--task 5: the sweep has runs 1 to 1"),
        (["{c}", "--out", "o", "--train.epochs=0"], "train.epochs"),
    ],
)
def test_errors(tmp_path, capsys, args, message):
    config = write_configs(tmp_path)[0]
    code = sweep.main([a.format(c=config) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fastlocal: error:") and message in err, err
