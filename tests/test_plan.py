"""`python -m fastlocal.plan`: the JSON it prints, with parameter counts computed here by hand."""

import json

import pytest

from fastlocal.plan import main


def run_plan(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def basic_block(c_in: int, c_out: int) -> int:
    """Parameters of a CIFAR BasicBlock: two 3x3 convs (no bias), two BNs, a 1x1 conv + BN shortcut when
    the shape changes."""
    shortcut = c_in * c_out + 2 * c_out if c_in != c_out else 0
    return 9 * c_in * c_out + 9 * c_out * c_out + 2 * (2 * c_out) + shortcut


def cifar_resnet(n: int, classes: int = 10) -> int:
    stem = 9 * 3 * 16 + 2 * 16
    blocks = sum(basic_block(c_in, c) + (n - 1) * basic_block(c, c) for c_in, c in ((16, 16), (16, 32), (32, 64)))
    return stem + blocks + 64 * classes + classes


def test_bp_resnet32_counts(capsys):
    out = run_plan(capsys, "--method.name=bp", "--method.num_modules=1", "--model.arch=resnet32")
    assert cifar_resnet(5) == 466906  # the well-known ResNet-32 count, as a check on the hand formula
    assert out["trainable_parameters"] == cifar_resnet(5) and out["frozen_parameters"] == 0
    assert out["modules"] == [["stem"] + [f"{s}.{i}" for s in range(3) for i in range(5)]]
    assert out["leaps"] == {} and out["leaps_source"] is None


def test_mlaan_resnet20_k3_modules_leaps_and_counts(capsys):
    out = run_plan(
        capsys,
        "--method.name=mlaan",
        "--method.num_modules=3",
        "--model.arch=resnet20",
        "--method.head=0c1f",
        "--mlaan.window=2",
    )
    # 10 parts into 3 contiguous groups, larger first: 4, 3, 3.
    assert out["modules"] == [["stem", "0.0", "0.1", "0.2"], ["1.0", "1.1", "1.2"], ["2.0", "2.1", "2.2"]]
    # W=2: only module 1 has a head; its leap list reaches the last stage and ends at its last block.
    assert out["leaps"] == {"1": ["2.0", "2.1", "2.2"]} and out["leaps_source"] == "generated"
    backbone = cifar_resnet(3)
    gx = 32 * 10 + 10  # GAP + Linear on module 1's 32 channels
    gy = 64 * 10 + 10  # GAP + Linear after the LAM, 64 channels
    aug = basic_block(32, 64) + 2 * basic_block(64, 64)  # trainable copies of 2.0, 2.1, 2.2
    ema = basic_block(32, 64)  # the frozen copy of 2.0
    assert out["trainable_parameters"] == backbone + gx + gy + aug
    assert out["frozen_parameters"] == ema


def test_resnet110_k32_config_gets_the_authors_split_and_preset(capsys):
    out = run_plan(capsys, "--config", "configs/mlaan_resnet110_k32_cifar10.toml")
    assert out["leaps_source"] == "preset"
    assert out["modules"][0] == ["stem", "0.0", "0.1"] and out["modules"][-1] == ["2.16", "2.17"]
    assert out["leaps"]["1"] == ["1.0", "2.0", "2.2", "2.17"] and out["leaps"]["30"] == ["2.17"]


@pytest.mark.parametrize(
    "arch,k,module,leaps", [("resnet34", 16, "13", ["3.1", "3.1", "3.2"]), ("resnet101", 33, "31", ["3.1", "3.2"])]
)
def test_imagenet_configs_plan_with_the_authors_tables(capsys, arch, k, module, leaps):
    out = run_plan(
        capsys, "--config", f"configs/imagenet_mlaan_{arch}.toml", "--num-classes", "1000", "--image-size", "64"
    )
    assert len(out["modules"]) == k and out["leaps_source"] == "preset" and out["leaps"][module] == leaps


@pytest.mark.parametrize("source", ["svhn", "stl10"])
def test_svhn_and_stl10_configs_plan_without_data(capsys, source):
    out = run_plan(capsys, "--config", f"configs/mlaan_resnet32_k15_{source}.toml", "--data.root=/nonexistent")
    assert len(out["modules"]) == 15 and out["leaps_source"] == "preset"


def test_errors_exit_2_without_a_traceback(capsys):
    assert (
        main(
            [
                "--method.name=mlaan",
                "--method.num_modules=8",
                "--model.arch=resnet32",
                "--method.split=balanced",
                "--mlaan.leaps=reference",
            ]
        )
        == 2
    )
    assert "mlaan.leaps = reference" in capsys.readouterr().err
    assert main(["--data.source=imagefolder", "--data.root=/nonexistent", "--data.image_size=32"]) == 2
    assert "--num-classes" in capsys.readouterr().err
