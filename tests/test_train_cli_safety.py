"""`python -m fastlocal.train` under hostile or unlucky conditions: a checkpoint carrying code, divergence,
resume with changed options, two writers, bad paths, a full disk, Ctrl-C and SIGTERM, degenerate MLAAN options.

Most tests run the CLI on the bundled subset with a tiny ResNet-20; the ones about processes (code execution,
locks, signals) run it in a subprocess."""

import ast
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import TINY_RUN

import fastlocal.engine as engine
from fastlocal.train import LOCK_NAME, main

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_RUN, "--method.name=dgl", "--method.num_modules=2"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def expect_user_error(args, capsys, *fragments):
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("fastlocal: error:"), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def cli_process(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "fastlocal.train", *map(str, args)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 1-epoch run; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*TINY, "--train.epochs=1", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# 1. A checkpoint cannot run code -------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint holds: a call made while unpickling
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_checkpoint_carrying_a_payload_is_refused_and_nothing_runs(run_copy, tmp_path):
    marker = tmp_path / "payload_ran"
    ckpt = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    ckpt["state"]["note"] = Payload(marker)
    torch.save(ckpt, run_copy / "checkpoint.pt")
    proc = cli_process(["--resume", run_copy])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "refusing to load" in err and "exec" in err and "Traceback" not in err, err
    assert not marker.exists()


def test_every_torch_load_in_the_repo_uses_weights_only():
    unsafe = []
    for path in [
        *REPO.glob("fastlocal/**/*.py"),
        *REPO.glob("tests/*.py"),
        *REPO.glob("bench/**/*.py"),
        *REPO.glob("scripts/**/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if flags.get("weights_only") != "True":
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not unsafe, unsafe


# 2. Divergence: caught at the step, never checkpointed; non-finite options --------------------------------------
def test_a_checkpoint_with_a_non_finite_tensor_is_never_written(capsys, tmp_path, monkeypatch):
    original = engine.Trainer.train_epoch

    def blow_up_a_running_var_in_epoch_2(self, epoch):  # the loss stays finite, as with optim.lr=1e6
        row = original(self, epoch)
        if epoch == 1:
            self.backbone.parts[1].bn1.running_var.fill_(float("inf"))
        return row

    monkeypatch.setattr(engine.Trainer, "train_epoch", blow_up_a_running_var_in_epoch_2)
    out = tmp_path / "run"
    expect_user_error(
        [*TINY, "--train.epochs=3", "--out", out],
        capsys,
        "after epoch 2",
        "hold inf or nan (first: backbone.",
        "running_var",
        "checkpoint of epoch 1",
    )
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1 and not engine.non_finite_tensors(ckpt)
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize(
    "option",
    [
        "optim.lr=inf",
        "optim.momentum=nan",
        "optim.warmup_epochs=inf",
        "optim.warmup_epochs=nan",
        "optim.weight_decay=-1",
        "optim.momentum=1.5",
        "mlaan.wx=nan",
        "infopro.weights=5,nan,0,1",
        "system.num_threads=100000",
    ],
)
def test_non_finite_or_nonsensical_options_are_config_errors(capsys, tmp_path, option):
    # data.root names nothing: the option must be rejected before any data is looked for.
    expect_user_error(
        ["--data.source=imagefolder", "--data.root=/nowhere", f"--{option}", "--out", tmp_path / "r"],
        capsys,
        option.split("=")[0],
    )


# 3. Resume takes the checkpoint's config ---------------------------------------------------------------------------
def test_resume_refuses_options_that_change_the_run(run_copy, capsys, tmp_path):
    (run_copy / "checkpoint.pt.tmp").write_bytes(b"left by a process killed mid-write")
    before = (run_copy / "checkpoint.pt").read_bytes(), (run_copy / "config.toml").read_text()
    expect_user_error(
        ["--resume", run_copy, "--optim.lr=0.05", "--data.max_train=60"],
        capsys,
        "optim.lr = 0.1 in the run, 0.05 asked",
        "data.max_train = 100 in the run, 60 asked",
        "train.epochs",
    )
    for option in ("--method.num_modules=3", "--model.arch=resnet32"):
        expect_user_error(["--resume", run_copy, option], capsys, option[2:].split("=")[0])
    expect_user_error(["--resume", run_copy, "--out", tmp_path / "other"], capsys, "drop --config and --out")
    expect_user_error(["--resume", run_copy, "--config", run_copy / "config.toml"], capsys, "drop --config")
    assert ((run_copy / "checkpoint.pt").read_bytes(), (run_copy / "config.toml").read_text()) == before
    assert not (tmp_path / "other").exists()
    assert not list(run_copy.glob("*.tmp"))  # the stale .tmp was removed once the directory was locked


def test_resume_show_config_prints_the_checkpoints_config(run_copy, capsys):
    (run_copy / "config.toml").write_text("")  # config.toml is for people; the checkpoint holds the truth
    before = (run_copy / "checkpoint.pt").read_bytes()
    code, out, err = run_cli(["--resume", run_copy, "--show-config", "--train.epochs=5"], capsys)
    assert code == 0, err
    assert 'name = "dgl"' in out and "num_modules = 2" in out and "epochs = 5" in out
    assert (run_copy / "checkpoint.pt").read_bytes() == before


def test_resume_may_train_longer_and_says_the_schedule_changes(run_copy, capsys):
    code, _, err = run_cli(["--resume", run_copy, "--train.epochs=2", "--log.measure_memory=false"], capsys)
    assert code == 0, err
    assert "train.epochs changed from 1 to 2" in err and "LR schedule" in err
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "epochs = 2" in (run_copy / "config.toml").read_text()
    assert torch.load(run_copy / "checkpoint.pt", weights_only=True)["config"]["train"]["epochs"] == 2


# 4. One writer per run directory -----------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(run_copy, capsys):
    with (run_copy / LOCK_NAME).open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        proc = cli_process(["--resume", run_copy])
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and f"process {os.getpid()} is training in it" in err, err
        assert "Traceback" not in err
        expect_user_error([*TINY, "--out", run_copy], capsys, "is in use")  # a fresh run into it, too


# 5. Bad paths and a full disk -------------------------------------------------------------------------------------
def test_a_torchrun_restart_continues_its_run_but_a_fresh_command_or_another_config_is_refused(
    run_copy, capsys, monkeypatch
):
    expect_user_error([*TINY, "--train.epochs=1", "--out", run_copy], capsys, "already holds a run")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun --max-restarts sets in a restarted group
    code, out, err = run_cli([*TINY, "--train.epochs=1", "--out", run_copy], capsys)
    assert code == 0 and "torchrun restart 1: the run continues from its last checkpoint" in out, err
    expect_user_error([*TINY, "--train.epochs=2", "--out", run_copy], capsys, "another config", "--resume")


def test_out_that_is_a_file_or_below_one(capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    no_data = ["--data.source=imagefolder", "--data.root=/nowhere"]  # the path is checked before the data
    expect_user_error([*no_data, "--out", a_file], capsys, "cannot use", "a_file", "--out")
    expect_user_error([*no_data, "--out", a_file / "run"], capsys, "cannot use", "--out")


def test_a_full_disk_while_saving_is_a_message_and_leaves_no_tmp(capsys, tmp_path, monkeypatch):
    def disk_fills(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_fills)
    out = tmp_path / "run"
    expect_user_error(
        [*TINY, "--train.epochs=1", "--log.measure_memory=false", "--out", out],
        capsys,
        "cannot write",
        "checkpoint.pt",
        os.strerror(errno.ENOSPC),
        "Free space",
    )
    assert not (out / "checkpoint.pt").exists() and not list(out.glob("*.tmp"))


# 6. Ctrl-C and SIGTERM ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_first_step_stops_the_run(capsys, tmp_path, monkeypatch, signum):
    original = engine.Trainer.eager_step

    def signalled(self, x, y):  # the first step runs under the CPU saved-tensor accounting
        os.kill(os.getpid(), signum)
        return original(self, x, y)

    def before_the_run(signum, frame):  # not Python's default: the test holds however pytest was started
        raise AssertionError("the run's own handler should have caught the signal")

    monkeypatch.setattr(engine.Trainer, "eager_step", signalled)
    out = tmp_path / "run"
    started_with = signal.signal(signum, before_the_run)  # e.g. SIG_IGN for SIGINT under nohup or `&`
    try:
        code, _, err = run_cli([*TINY, "--train.epochs=2", "--out", out], capsys)
        after = signal.getsignal(signum)
    finally:
        signal.signal(signum, started_with)
    assert code == 130, err
    assert f"--resume {out}" in err and signal.Signals(signum).name in err and "Traceback" not in err
    assert not (out / "checkpoint.pt").exists() and not list(out.glob("*.tmp"))
    assert after is before_the_run  # the handler that was there before the run is back


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_a_training_process_stops_it_with_the_resume_hint(tmp_path, signum):
    out = tmp_path / "run"
    proc = cli_process([*TINY, "--train.epochs=1000", "--log.measure_memory=false", "--out", out])
    for line in proc.stdout:
        if line.startswith("epoch 1/"):
            break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"--resume {out}" in err and "Traceback" not in err and "Exception ignored" not in err, err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 1 <= ckpt["state"]["epoch"] < 1000


# 7. Degenerate MLAAN options -------------------------------------------------------------------------------------
def test_mlaan_window_of_k_or_more_is_an_error(capsys, tmp_path):
    expect_user_error(
        [*TINY, "--method.name=mlaan", "--mlaan.window=2", "--out", tmp_path / "r"],
        capsys,
        "mlaan.window = 2 with method.num_modules = 2",
        "plain BP",
    )


def test_reference_leaps_with_a_separate_stem_names_the_cause(capsys, tmp_path):
    expect_user_error(
        [
            *TINY,
            "--method.name=mlaan",
            "--method.num_modules=4",
            "--method.stem_separate=true",
            "--mlaan.leaps=reference",
            "--out",
            tmp_path / "r",
        ],
        capsys,
        "method.stem_separate = true",
        "method.stem_separate=false",
    )
