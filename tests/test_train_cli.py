"""`python -m fastlocal.train`: run directory, exact resume, and one clear message per bad input."""

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import TINY_RUN
from PIL import Image

import fastlocal.engine as engine
from fastlocal.train import main

TINY = TINY_RUN


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_directory_files(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        [*TINY, "--method.name=dgl", "--method.num_modules=3", "--train.epochs=2", "--out", out], capsys
    )
    assert code == 0, err
    assert (out / "config.toml").is_file() and (out / "checkpoint.pt").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"epoch", "lr", "train_loss", "test_acc", "epoch_seconds", "images_per_second"}
        assert math.isfinite(r["train_loss"]) and 0 <= r["test_acc"] <= 100 and r["images_per_second"] > 0
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "method",
        "arch",
        "num_modules",
        "epochs",
        "final_test_acc",
        "best_test_acc",
        "num_parameters",
        "train_seconds",
        "images_per_second",
        "peak_memory",
        "device",
        "torch_version",
    ):
        assert key in summary
    assert summary["method"] == "dgl" and summary["num_modules"] == 3 and summary["epochs"] == 2
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    assert summary["peak_memory"]["peak_saved_bytes"] > 0
    assert "final test accuracy" in stdout


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["backbone"]


@pytest.mark.parametrize(
    "method", [["--method.name=dgl", "--method.num_modules=3"], ["--method.name=mlaan", "--method.num_modules=4"]]
)
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, capsys, monkeypatch, method):
    args = [*TINY, *method, "--train.epochs=3"]
    assert run_cli([*args, "--out", tmp_path / "whole"], capsys)[0] == 0

    original = engine.Trainer.train_epoch

    def interrupt_in_third_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(engine.Trainer, "train_epoch", interrupt_in_third_epoch)
    code, _, err = run_cli([*args, "--out", tmp_path / "cut"], capsys)
    assert code == 130 and "--resume" in err
    monkeypatch.setattr(engine.Trainer, "train_epoch", original)
    code, stdout, err = run_cli(["--resume", tmp_path / "cut"], capsys)
    assert code == 0, err
    assert "resuming" in stdout
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_from_a_step_checkpoint_continues_mid_epoch(tmp_path, capsys, monkeypatch):
    """4 steps an epoch, a step checkpoint every 3: stopped before step 4 of epoch 2, the run resumes at step 4
    (not at the epoch's start) and ends with the uninterrupted run's weights, statistics, momentum and loss."""
    args = [*TINY, "--method.name=mlaan", "--method.num_modules=3", "--train.epochs=2", "--train.checkpoint_every=3"]
    assert run_cli([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    original, calls = engine.Trainer.eager_step, []

    def stop_at_the_eighth_step(self, x, y):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(engine.Trainer, "eager_step", stop_at_the_eighth_step)
    assert run_cli([*args, "--out", tmp_path / "cut"], capsys)[0] == 130
    monkeypatch.setattr(engine.Trainer, "eager_step", original)
    mid = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert mid["state"]["mid_epoch"]["step"] == 3
    # The data order's position holds for as many shards as wrote it: another count is refused.
    (tmp_path / "sharded").mkdir()
    mid["state"]["mid_epoch"]["data_shards"] = 2
    torch.save(mid, tmp_path / "sharded" / "checkpoint.pt")
    code, _, err = run_cli(["--resume", tmp_path / "sharded"], capsys)
    assert code == 2 and "sharded over 2 processes" in err and "Traceback" not in err, err
    code, stdout, err = run_cli(["--resume", tmp_path / "cut"], capsys)
    assert code == 0, err
    assert "resuming" in stdout and "after step 3 of epoch 2" in stdout
    whole, cut = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("whole", "cut"))
    for part in ("backbone", "method"):
        for name, value in whole[part].items():
            assert torch.equal(value, cut[part][name]), (part, name)
    for index, state in whole["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], cut["optimizer"]["state"][index]["momentum_buffer"]), index
    losses = [
        [json.loads(line)["train_loss"] for line in (tmp_path / run / "metrics.jsonl").open()]
        for run in ("whole", "cut")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)


def expect_user_error(args, capsys, *fragments):
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("fastlocal: error:")
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_unknown_key(capsys):
    expect_user_error(["--method.nmae=3"], capsys, "unknown config key 'method.nmae'", "valid keys in [method]")


def test_wrong_type(capsys):
    expect_user_error(["--train.epochs=many"], capsys, "train.epochs must be an integer")


def test_k_out_of_range(capsys, tmp_path):
    expect_user_error(
        [*TINY, "--method.name=dgl", "--method.num_modules=99", "--out", tmp_path],
        capsys,
        "method.num_modules = 99 is not possible",
        "between 1 and 9",
    )


def test_bp_with_several_modules(capsys, tmp_path):
    expect_user_error(
        [*TINY, "--method.name=bp", "--method.num_modules=3", "--out", tmp_path], capsys, "method.num_modules must be 1"
    )


def test_bad_override_syntax(capsys):
    expect_user_error(["stray"], capsys, "unexpected argument 'stray'")


def test_missing_data(capsys, tmp_path):
    expect_user_error(
        ["--data.source=imagefolder", f"--data.root={tmp_path / 'nowhere'}", "--out", tmp_path / "r"], capsys, "nowhere"
    )


def test_cifar10_offline_message_says_how_to_point_at_a_local_copy(capsys, tmp_path):
    expect_user_error(
        ["--data.source=cifar10", f"--data.root={tmp_path}", "--out", tmp_path / "r"], capsys, "data.root"
    )


def write_image_tar(path: Path, corrupt_one=False, layout=("train", "test")):
    with tarfile.open(path, "w:gz") as tar:
        for split in layout:
            for label in ("cat", "dog"):
                for k in range(3):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((8, 8, 3), 40 * k, dtype=np.uint8)).save(buf, format="PNG")
                    data = buf.getvalue()
                    if corrupt_one and split == "train" and label == "dog" and k == 1:
                        data = b"not an image at all"
                    info = tarfile.TarInfo(f"imgs/{split}/{label}/{k}.png")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def archive_run(archive, tmp_path) -> list:
    """The CLI arguments of a run reading the image-folder archive `archive` (run and cache under tmp_path)."""
    return [
        "--data.source=imagefolder",
        f"--data.root={archive}",
        "--out",
        tmp_path / "r",
        f"--data.cache_dir={tmp_path / 'cache'}",
    ]


def test_truncated_archive(capsys, tmp_path):
    archive = tmp_path / "data.tar.gz"
    write_image_tar(archive)
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    expect_user_error(archive_run(archive, tmp_path), capsys, "data.tar.gz")


def test_unreadable_image(capsys, tmp_path):
    archive = tmp_path / "data.tar.gz"
    write_image_tar(archive, corrupt_one=True)
    expect_user_error(archive_run(archive, tmp_path), capsys, "1.png", "data.on_bad_image=skip")


def test_wrong_folder_layout(capsys, tmp_path):
    archive = tmp_path / "data.tar.gz"
    write_image_tar(archive, layout=("training",))
    expect_user_error(archive_run(archive, tmp_path), capsys, "train")


def test_non_finite_loss_stops_within_the_check_interval_and_keeps_the_last_good_checkpoint(
    capsys, tmp_path, monkeypatch
):
    # 400 images in batches of 10: 40 steps an epoch, so the check at step 21 is the one that must see it.
    original = engine.Trainer.step_without_zero_grad
    calls = {"n": 0}

    def diverge_at_step_3_of_epoch_2(self, x, y):
        loss = original(self, x, y)
        calls["n"] += 1
        return loss * math.nan if calls["n"] == 40 + 3 else loss

    monkeypatch.setattr(engine.Trainer, "step_without_zero_grad", diverge_at_step_3_of_epoch_2)
    out = tmp_path / "run"
    tiny = [a for a in TINY if "max_train" not in a and "batch_size" not in a]
    expect_user_error(
        [
            *tiny,
            "--data.max_train=400",
            "--train.batch_size=10",
            "--log.measure_memory=false",
            "--method.name=bp",
            "--train.epochs=3",
            "--out",
            out,
        ],
        capsys,
        "at step 3/40 of epoch 2 (seen at step 21)",
        "optim.lr",
        "checkpoint of epoch 1",
    )
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1
    assert not engine.non_finite_tensors(ckpt)


def test_real_divergence_is_reported(capsys, tmp_path):
    expect_user_error(
        [*TINY, "--method.name=bp", "--optim.lr=1e30", "--train.epochs=1", "--out", tmp_path / "r"],
        capsys,
        "the run diverged",
    )


def test_resume_errors(capsys, tmp_path):
    expect_user_error(["--resume", tmp_path], capsys, "no checkpoint.pt")
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    (tmp_path / "config.toml").write_text(
        '[method]\nname = "dgl"\nnum_modules = 2\n[data]\nmax_train = 100\n'
        'max_test = 50\n[model]\narch = "resnet20"\n[log]\nprogress = false\n'
    )
    expect_user_error(["--resume", tmp_path], capsys, "cannot read checkpoint", "corrupt")


def test_out_directory_with_a_run_is_not_overwritten(capsys, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    expect_user_error(["--out", tmp_path], capsys, "already holds a run", "--resume")


def test_module_entry_point_runs_as_a_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastlocal.train", "--method.nmae=1"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "unknown config key" in proc.stderr and "Traceback" not in proc.stderr


def test_show_config_prints_every_section(capsys):
    code, out, _ = run_cli(["--method.name=dgl", "--show-config"], capsys)
    assert code == 0
    for section in ("[data]", "[model]", "[method]", "[infopro]", "[mlaan]", "[optim]", "[train]", "[system]"):
        assert section in out
    assert 'name = "dgl"' in out


@pytest.mark.parametrize("arch,k,source", [("resnet20", 4, "generated"), ("resnet32", 8, "preset")])
def test_mlaan_run_says_where_its_leap_lists_came_from(tmp_path, capsys, arch, k, source):
    args = [
        *TINY,
        "--data.max_train=50",
        f"--model.arch={arch}",
        "--method.name=mlaan",
        f"--method.num_modules={k}",
        "--train.epochs=1",
        "--out",
        tmp_path / "run",
    ]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert f"leap lists: {source}" in stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["leaps"] == source
