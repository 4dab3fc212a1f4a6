"""`python -m fastlocal.evaluate`: a run's checkpoint on its own test set (the accuracy of its summary.json)
and on another dataset (classes by name, images resized), and its errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import TINY_RUN
from PIL import Image

from fastlocal import evaluate, train
from fastlocal.evaluation import match_classes

# Typed from the paper's recipe (CIFAR-10 normalisation) and torchvision's CIFAR-10 class order.
CIFAR_MEAN = torch.tensor([125.3, 123.0, 113.9]) / 255
CIFAR_STD = torch.tensor([63.0, 62.1, 66.7]) / 255
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


@pytest.fixture(scope="module")
def bp_run(tmp_path_factory):
    """A BP ResNet-20 run on 400 bundled CIFAR-10 images, 2 epochs (better than chance, not constant)."""
    out = tmp_path_factory.mktemp("runs") / "bp"
    args = [a for a in TINY_RUN if "max_train" not in a and "max_test" not in a]
    code = train.main(
        [*args, "--data.max_train=400", "--data.max_test=100", "--method.name=bp", "--train.epochs=2"]
        + ["--optim.lr=0.05", "--system.device=cpu", "--out", str(out)]
    )
    assert code == 0
    return out


def write_image_folder(root, classes, size=(96, 96), per_class=8, seed=0):
    """train/<class>/*.png and test/<class>/*.png: smooth random colour fields (noise upsampled from 6x6)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
                coarse.resize(size, Image.Resampling.BICUBIC).save(folder / f"{i}.png")
    return root


def run_evaluate(args, capsys, expect=0):
    code = evaluate.main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == expect, captured.err
    return captured


def test_own_test_set_gives_the_accuracy_of_summary_json(bp_run, capsys, tmp_path):
    run_evaluate([bp_run, "--out", tmp_path / "own", "--no-progress", "--device", "cpu"], capsys)
    result = json.loads((tmp_path / "own" / "evaluation.json").read_text())
    summary = json.loads((bp_run / "summary.json").read_text())
    assert result["accuracy"] == summary["final_test_acc"]
    assert result["images"] == 100 and result["images_left_out"] == 0
    assert sorted(result["per_class"]) == sorted(CIFAR_CLASSES)
    assert all(entry["images"] == 10 for entry in result["per_class"].values())
    counts = np.array(result["confusion"]["counts"])
    assert counts.shape == (10, 10) and counts.sum() == 100
    assert 100 * np.trace(counts) / 100 == pytest.approx(result["accuracy"])
    assert (tmp_path / "own" / "confusion.png").stat().st_size > 0


def test_another_dataset_matches_classes_by_name_and_resizes(bp_run, capsys, tmp_path):
    folder = write_image_folder(tmp_path / "stl", STL_CLASSES)
    captured = run_evaluate(
        [bp_run, "--data.source=imagefolder", f"--data.root={folder}", "--out", tmp_path / "e", "--no-progress"]
        + ["--device", "cpu"],
        capsys,
    )
    assert "car (= automobile)" in captured.out and "monkey 8" in captured.out
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert result["left_out_classes"] == {"monkey": 8} and result["images_left_out"] == 8
    assert result["images"] == 72
    assert result["per_class"]["car"]["run_class"] == "automobile"
    assert sorted(result["per_class"]) == sorted(set(STL_CLASSES) - {"monkey"})
    assert result["run_classes_not_in_data"] == ["frog"]
    assert (result["image_size"]["run"], result["image_size"]["data"]) == (32, 96)
    assert (tmp_path / "e" / "confusion.png").is_file()

    # The same accuracy computed here: the checkpoint's network, each 96 px test image resized to 32 px
    # (antialiased bilinear, rounded), normalised with CIFAR-10's mean and std, labels mapped by name.
    from fastlocal.models import build_backbone

    backbone = build_backbone("resnet20", 10, 32)
    backbone.load_state_dict(torch.load(bp_run / "checkpoint.pt", weights_only=True)["backbone"])
    backbone.eval()
    correct = total = 0
    for name in STL_CLASSES:
        if name == "monkey":
            continue
        truth = CIFAR_CLASSES.index("automobile" if name == "car" else name)
        for path in sorted((folder / "test" / name).iterdir()):
            x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float()
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True).round().clamp(0, 255)
            x = (x / 255 - CIFAR_MEAN[:, None, None]) / CIFAR_STD[:, None, None]
            with torch.no_grad():
                correct += int(backbone(x).argmax(1).item() == truth)
            total += 1
    assert total == 72
    assert result["accuracy"] == pytest.approx(100 * correct / total)


def test_class_names_match_through_the_aliases():
    assert match_classes(CIFAR_CLASSES, STL_CLASSES) == [0, 2, 1, 3, 4, 5, 7, None, 8, 9]
    assert match_classes(CIFAR_CLASSES, ["Car", "aeroplane", "FROG", "sea-lion"]) == [1, 0, 6, None]


def test_errors(bp_run, capsys, tmp_path):
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "config.toml").write_text((bp_run / "config.toml").read_text())
    captured = run_evaluate([tmp_path / "untrained"], capsys, expect=2)
    assert "fastlocal: error:" in captured.err and "no checkpoint.pt" in captured.err

    other = write_image_folder(tmp_path / "other", ["apple", "pear"], per_class=1)
    captured = run_evaluate([bp_run, "--data.source=imagefolder", f"--data.root={other}"], capsys, expect=2)
    assert "no class of imagefolder (apple, pear) matches a class of the run" in captured.err

    wide = write_image_folder(tmp_path / "wide", ["cat", "dog"], size=(40, 30), per_class=1)
    captured = run_evaluate([bp_run, "--data.source=imagefolder", f"--data.root={wide}"], capsys, expect=2)
    assert "40x30, not square" in captured.err

    captured = run_evaluate([bp_run, "--train.epochs=3"], capsys, expect=2)
    assert "only data.* options" in captured.err
    assert "Traceback" not in captured.err
