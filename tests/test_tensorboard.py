"""log.tensorboard: the event files of a run, read back with TensorBoard's own reader."""

import importlib.util
import json
import sys

import pytest

from fastlocal.train import main

NEEDS_TENSORBOARD = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard: pip install 'fastlocal[tensorboard]'"
)
ARGS = [
    "--data.source=bundled",
    "--data.max_train=40",
    "--data.max_test=20",
    "--method.name=mlaan",
    "--method.num_modules=3",  # window 2: module 0 has no loss of its own
    "--train.epochs=2",
    "--train.batch_size=20",  # 2 steps an epoch
    "--log.progress=false",
    "--log.tensorboard=true",
    "--system.num_threads=1",
]


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@NEEDS_TENSORBOARD
def test_tensorboard_events_hold_each_modules_loss_accuracy_lr_speed_and_memory(tmp_path, capsys):
    assert main([*ARGS, "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert set(scalars) == {
        "train/lr",
        "loss/module_1",
        "loss/module_2",
        "loss/total",
        "loss/train",
        "test/accuracy",
        "speed/images_per_second",
        "memory/peak_saved_mib",
    }
    assert [step for step, _ in scalars["train/lr"]] == [0, 1, 2, 3]
    approx = lambda values: pytest.approx(values, rel=1e-6)  # event files hold float32
    assert [lr for step, lr in scalars["train/lr"] if step in (1, 3)] == approx([r["lr"] for r in rows])
    assert [step for step, _ in scalars["test/accuracy"]] == [1, 3]  # an epoch's last step
    assert [v for _, v in scalars["test/accuracy"]] == approx([r["test_acc"] for r in rows])
    assert [v for _, v in scalars["speed/images_per_second"]] == approx([r["images_per_second"] for r in rows])
    # The last module's loss is the train_loss of metrics.jsonl; the total is the sum of the modules' losses.
    assert [v for _, v in scalars["loss/module_2"]] == approx([r["train_loss"] for r in rows])
    assert [v for _, v in scalars["loss/train"]] == approx([r["train_loss"] for r in rows])
    module_1, module_2 = ([v for _, v in scalars[f"loss/module_{i}"]] for i in (1, 2))
    assert [v for _, v in scalars["loss/total"]] == approx([a + b for a, b in zip(module_1, module_2)])
    assert module_1 != module_2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    peak_mib = summary["peak_memory"]["peak_saved_bytes"] / 2**20
    assert [v for _, v in scalars["memory/peak_saved_mib"]] == approx([peak_mib, peak_mib])


def test_tensorboard_without_tensorboard_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    assert main([*ARGS, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fastlocal[tensorboard]'" in err and "Traceback" not in err
