"""fastlocal.export: a run's backbone under its model class's keys, loadable by that class, same logits."""

import importlib.util
import sys

import pytest
import torch
from test_any_model import FAMILIES, NEEDS_TIMM, SIZE

from fastlocal.export import export_run, main
from fastlocal.models.cifar_resnet import cifar_resnet
from fastlocal.models.export import exported_state_dict

NEEDS_SAFETENSORS = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None, reason="needs safetensors: pip install 'fastlocal[safetensors]'"
)


def _factory(family):
    def build(num_classes, input_size):
        assert (num_classes, input_size) == (10, SIZE)
        return FAMILIES[family]()

    return build


# model.arch = test_export:build_<family>: each test family as a `package.module:factory`.
for _family in FAMILIES:
    globals()[f"build_{_family}"] = _factory(_family)


def original_model(arch: str) -> torch.nn.Module:
    """A fresh instance of the class `arch` builds (another initialisation)."""
    torch.manual_seed(1)
    if arch == "resnet20":
        return cifar_resnet("resnet20", 10, SIZE)
    return FAMILIES[arch.removeprefix("test_export:build_")]()


@torch.no_grad()
def trained_like(backbone):
    """Every floating-point weight and statistic scaled by its own random factor: values no fresh model has."""
    for tensor in backbone.state_dict().values():
        if tensor.is_floating_point():
            tensor.mul_(1 + 0.5 * torch.rand_like(tensor))


# Every family but VGG-BN (132M parameters, 13 s here; its cut shares the features + classifier path).
ARCHS = ["resnet20"] + [
    pytest.param(f"test_export:build_{f}", marks=NEEDS_TIMM) if f.startswith("timm_") else f"test_export:build_{f}"
    for f in FAMILIES
    if f != "vgg11_bn"
]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_into_the_model_class_with_the_same_logits(arch):
    import fastlocal

    torch.manual_seed(0)
    backbone = fastlocal.build_backbone(arch, 10, SIZE)
    trained_like(backbone)
    exported = exported_state_dict(arch, backbone.state_dict(), 10, SIZE)
    model = original_model(arch)
    assert set(exported) == set(model.state_dict())
    result = model.load_state_dict(exported)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), backbone(x), rtol=0, atol=0)


def train_tiny(arch: str, out) -> None:
    from fastlocal.train import main as train

    args = ["--data.source=bundled", "--data.max_train=40", "--data.max_test=20", f"--model.arch={arch}"]
    args += ["--method.name=mlaan", "--method.num_modules=3", "--train.epochs=1", "--train.batch_size=20"]
    assert train([*args, "--log.progress=false", "--system.num_threads=1", "--out", str(out)]) == 0


@NEEDS_SAFETENSORS
@pytest.mark.parametrize("arch", ["torchvision:resnet18", pytest.param("timm:resnet10t", marks=NEEDS_TIMM)])
def test_cli_exports_a_run_both_formats(arch, tmp_path, capsys):
    import safetensors.torch

    import fastlocal
    from fastlocal.engine import read_checkpoint

    train_tiny(arch, tmp_path / "run")
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "w.safetensors")]) == 0
    assert main([str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "w.pt")]) == 0
    if arch.startswith("torchvision:"):
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
    else:
        import timm

        model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    weights = safetensors.torch.load_file(tmp_path / "w.safetensors")
    as_state_dict = torch.load(tmp_path / "w.pt", weights_only=True)
    assert weights.keys() == as_state_dict.keys() == model.state_dict().keys()  # no head, LAM or EMA entry
    assert all(torch.equal(weights[k], as_state_dict[k]) for k in weights)
    model.load_state_dict(weights)
    # fastlocal's evaluation forward: the backbone built from the run's config with the checkpoint's weights.
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["method"]  # the run had auxiliary heads and LAMs; the export left them out
    backbone = fastlocal.build_backbone(arch, 10, SIZE)
    backbone.load_state_dict(checkpoint["backbone"])
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), backbone.eval()(x), rtol=0, atol=0)


def test_export_errors_name_the_fix(tmp_path, capsys, monkeypatch):
    assert main([str(tmp_path), "--out", str(tmp_path / "w.pt")]) == 2
    assert "no checkpoint.pt there" in capsys.readouterr().err
    train_tiny("resnet20", tmp_path / "run")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` fail
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fastlocal[safetensors]'" in err and "Traceback" not in err
    state, arch = export_run(tmp_path / "run")  # fastlocal's own CIFAR ResNet: its Backbone keys
    assert arch == "resnet20" and cifar_resnet("resnet20", 10, SIZE).load_state_dict(state)
