"""Any model: the LocalLearner API, the torchvision adapters, model.arch factories, token features."""

import functools
import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import LossScaler
from torch import nn

import fastlocal
from fastlocal.config import ConfigError, build_config
from fastlocal.methods import METHODS, Batch
from fastlocal.methods.leaps import check_leaps
from fastlocal.methods.objectives import Decoder
from fastlocal.schedule import local_train_step
from fastlocal.split import part_saved_bytes, split_parts

SIZE = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        image_size=SIZE, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    # torchvision zero-initialises the classifier, so no gradient would pass through it into the blocks.
    nn.init.normal_(vit.heads.head.weight, std=0.02)
    return vit


def tiny_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], stochastic_depth_prob=0.0, num_classes=10)


def tiny_resnet(**kwargs) -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, **kwargs)


def torchvision_model(name: str) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=10)


def timm_model(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def tiny_timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def tiny_timm_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=SIZE,
        patch_size=4,
        window_size=2,
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 1, 2, 2),
        num_classes=10,
    )


# Small members of each family the adapters know, at 32x32 (timm_*: timm's, skipped without timm).
FAMILIES = {
    "resnet18": lambda: torchvision_model("resnet18"),
    "resnext": lambda: tiny_resnet(groups=4, width_per_group=4),
    "wide_resnet": lambda: tiny_resnet(width_per_group=128),
    "vgg11_bn": lambda: torchvision_model("vgg11_bn"),
    "convnext": tiny_convnext,
    "mobilenet_v3_small": lambda: torchvision_model("mobilenet_v3_small"),
    "efficientnet_b0": lambda: torchvision_model("efficientnet_b0"),
    "vit": tiny_vit,
    "timm_resnet_d": lambda: timm_model("test_resnet"),  # deep stem, average-pool shortcut (ResNet-D)
    "timm_resnet18": lambda: timm_model("resnet18"),
    "timm_convnext": lambda: timm_model("test_convnext"),
    "timm_efficientnet": lambda: timm_model("test_efficientnet"),
    "timm_regnet": lambda: timm_model("regnetx_002"),
    "timm_vit": tiny_timm_vit,
    "timm_deit": lambda: timm_model("deit_tiny_patch16_224", img_size=SIZE),
    "timm_swin": tiny_timm_swin,
}
TRAINED = [
    "resnet18",
    "resnext",
    "vgg11_bn",
    "convnext",
    "mobilenet_v3_small",
    "vit",
    "timm_resnet_d",
    "timm_convnext",
    "timm_efficientnet",
    "timm_regnet",
    "timm_vit",
    "timm_swin",
]
NEEDS_TIMM = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="needs timm: pip install 'fastlocal[timm]'"
)


def families(names) -> list:
    """pytest parameters: the timm families skipped (with the reason) when timm is not installed."""
    return [pytest.param(name, marks=NEEDS_TIMM) if name.startswith("timm_") else name for name in names]


@functools.cache
def backbone_of(family: str) -> fastlocal.Backbone:
    torch.manual_seed(0)
    return fastlocal.adapt(FAMILIES[family](), SIZE)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (n,), generator=g)


def clear_grads(learner):
    for p in learner.parameters():
        p.grad = None


def is_nonzero(module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.trainable_parameters)


@pytest.mark.parametrize("family", families(FAMILIES))
def test_family_adapts_into_parts_that_compose_to_the_model(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    backbone = fastlocal.adapt(model, SIZE).eval()
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model(x))  # the cut changes nothing: same parameters, same math
    assert {id(p) for p in backbone.parameters()} == {id(p) for p in model.parameters()}
    for k in (2, 3, len(backbone.blocks)):
        groups = split_parts(backbone, k)
        assert len(groups) == k and [p for g in groups for p in g] == list(range(len(backbone.parts)))


@pytest.mark.parametrize("family", families(TRAINED))
@pytest.mark.parametrize(
    "method,k,options",
    [("bp", 1, {}), ("dgl", 3, {}), ("infopro", 3, {}), ("mlaan", 3, {}), ("mlaan", 3, {"base": "infopro"})],
)
def test_one_training_step_trains_every_module(family, method, k, options):
    backbone = backbone_of(family)
    learner = fastlocal.LocalLearner(backbone, method, k, mean=MEAN, std=STD, **options)
    clear_grads(learner)
    x, y = batch()
    loss = learner.step(x, y)
    assert torch.isfinite(loss)
    for i, module in enumerate(learner.local_modules):
        assert is_nonzero(module), f"module {i} got no gradient"
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.trainable_parameters)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.01)
    optimizer.step()
    clear_grads(learner)


@pytest.mark.parametrize("family", families(TRAINED))
@pytest.mark.parametrize("method,window", [("dgl", 1), ("infopro", 1), ("mlaan", 2)])
def test_each_loss_reaches_exactly_the_modules_its_window_allows(family, method, window):
    k = 3
    learner = fastlocal.LocalLearner(backbone_of(family), method, k, mean=MEAN, std=STD)
    assert learner.method.window == window
    x, y = batch()
    reached_any = []
    for probe in range(k):
        if method == "mlaan" and probe < window - 1:
            continue  # MLAAN's modules 0..W-2 have no loss of their own
        # Every other loss is multiplied by 0: a module gets a non-zero gradient only from the probed loss.
        scales = [1.0 if i == probe else 0.0 for i in range(k)]
        clear_grads(learner)
        torch.manual_seed(0)
        local_train_step(learner.local_modules, LossScaler(learner.method, scales), Batch(x, y, MEAN, STD))
        reached = [j for j, module in enumerate(learner.local_modules) if is_nonzero(module)]
        assert reached == list(range(max(0, probe - window + 1), probe + 1)), f"loss {probe}"
        reached_any += reached
    assert sorted(set(reached_any)) == list(range(k))
    clear_grads(learner)


def test_vit_heads_pool_tokens_and_leap_lists_copy_later_encoder_blocks():
    backbone = backbone_of("vit")
    assert all(info.tokens and info.shape == (1 + 16, 32) for info in backbone.part_info)
    learner = fastlocal.LocalLearner(backbone, "mlaan", 3, window=1)
    for i, parts in learner.method.leap_parts.items():
        last = learner.local_modules[i].part_ids[-1]
        assert parts and all(p > last for p in parts) and parts[-1] == len(backbone.parts) - 1
        lam = learner.method.lams[str(i)]
        assert [type(b) for b in lam.aug] == [type(backbone.parts[p]) for p in parts]
        assert lam.aug[0] is not backbone.parts[parts[0]]  # a copy, not the live block


def test_leap_lists_are_shape_checked():
    backbone = backbone_of("mobilenet_v3_small")
    last = 1  # block 0.0: 16 channels at 8x8; block 0.2 takes 24 channels at 4x4
    check_leaps(backbone, last, [2, 3])
    with pytest.raises(ConfigError, match="expects input of shape"):
        check_leaps(backbone, last, [3])
    learner = fastlocal.LocalLearner(backbone, "mlaan", 4, leaps="generated")
    assert learner.method.leap_parts  # generated and checked for every module with a head


def test_balanced_split_balances_the_measured_memory():
    backbone = backbone_of("mobilenet_v3_small")
    costs = part_saved_bytes(backbone)
    items = [costs[0] + costs[1], *costs[2:]]  # the stem always shares module 0 with block 0

    def largest_module(groups):
        return max(sum(costs[p] for p in g) for g in groups)

    for k in (2, 3, 4):
        balanced, uniform = split_parts(backbone, k, strategy="balanced"), split_parts(backbone, k)
        assert largest_module(balanced) <= largest_module(uniform)
        # No contiguous split into k groups has a smaller largest group (brute force over the cut points).
        best = min(
            max(sum(items[a:b]) for a, b in zip((0, *cuts), (*cuts, len(items))))
            for cuts in itertools.combinations(range(1, len(items)), k - 1)
        )
        assert largest_module(balanced) == best


def test_infopro_decoder_lays_patch_tokens_out_as_their_image_grid():
    decoder = Decoder(in_channels=2, image_size=4, num_tokens=1 + 4)
    tokens = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 2)  # token t has value t; token 0 is the class token
    grid = tokens[:, 1:].transpose(1, 2).reshape(1, 2, 2, 2)
    assert grid[0, 0].tolist() == [[1.0, 2.0], [3.0, 4.0]]  # patches in row-major order, the class token dropped
    seen = {}
    decoder.conv1.register_forward_pre_hook(lambda m, inputs: seen.update(x=inputs[0]))
    decoder(tokens)
    torch.testing.assert_close(
        seen["x"], torch.nn.functional.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=True)
    )
    Decoder(in_channels=2, image_size=4, num_tokens=9 + 2)  # a class and a distillation token: fine
    with pytest.raises(ConfigError, match="sequence of 15 tokens"):
        Decoder(in_channels=2, image_size=4, num_tokens=15)  # 3x3 patches + 6 leading tokens: not a grid


def tiny_backbone_factory(num_classes: int, input_size: int) -> fastlocal.Backbone:
    """A `package.module:factory` for model.arch (this test module is importable under pytest)."""
    blocks = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(3)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    return fastlocal.Backbone(nn.Conv2d(3, 8, 3, padding=1), blocks, None, head, input_size)


def test_model_arch_takes_torchvision_names_and_factories():
    for arch in ("torchvision:mobilenet_v3_small", "test_any_model:tiny_backbone_factory"):
        cfg = build_config(None, [f"model.arch={arch}", "method.num_modules=3"], METHODS)
        backbone = fastlocal.build_backbone(cfg.model.arch, 10, SIZE)
        learner = fastlocal.LocalLearner.from_config(cfg, backbone, MEAN, STD)
        assert learner.num_modules == 3 and backbone.num_classes == 10
    vit = fastlocal.build_backbone("torchvision:vit_b_16", 10, SIZE)  # image_size follows the input size
    assert vit.part_info[0].shape == (1 + 4, 768)


@pytest.mark.parametrize(
    "arch,message",
    [
        ("torchvision:no_such_net", "torchvision has no classification model 'no_such_net'"),
        ("no_such_package.models:build", "cannot import 'no_such_package.models'"),
        ("test_any_model:missing", "has no function 'missing'"),
        ("test_any_model:SIZE", "has no function 'SIZE'"),
        ("torchvision:", "model.arch = 'torchvision:' is not valid"),
    ],
)
def test_bad_model_arch_says_what_is_wrong(arch, message):
    with pytest.raises(ConfigError, match=message):
        cfg = build_config(None, [f"model.arch={arch}"], METHODS)
        fastlocal.build_backbone(cfg.model.arch, 10, SIZE)


def test_a_model_that_cannot_be_cut_names_what_is_missing():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 10))
    with pytest.raises(ConfigError, match="needs the attribute"):
        fastlocal.adapt(model, SIZE)
    from torchvision.models import squeezenet1_0

    with pytest.raises(ConfigError, match=r"SqueezeNet cannot be cut.*needs the attribute\(s\) avgpool"):
        fastlocal.adapt(squeezenet1_0(weights=None), SIZE)


def test_api_errors_say_what_is_wrong():
    backbone = backbone_of("resnext")  # stem + 4 blocks
    with pytest.raises(ConfigError, match="it has 4 blocks, so K must be between 1 and 4"):
        fastlocal.LocalLearner(backbone, "dgl", 5)
    with pytest.raises(ConfigError, match="method.name = 'sgd' is not valid"):
        fastlocal.LocalLearner(backbone, "sgd", 2)
    with pytest.raises(ConfigError, match="unknown option 'windw'"):
        fastlocal.LocalLearner(backbone, "mlaan", 2, windw=2)
    with pytest.raises(ConfigError, match="method 'dgl' does not use it"):
        fastlocal.LocalLearner(backbone, "dgl", 2, window=2)
    with pytest.raises(ConfigError, match="needs a fastlocal.Backbone"):
        fastlocal.LocalLearner(torchvision_model("resnet18"), "dgl", 2)
    with pytest.raises(ConfigError, match=r"step takes images \(batch, 3, 32, 32\)"):
        fastlocal.LocalLearner(backbone, "dgl", 2).step(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    blocks = [nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)]
    with pytest.raises(ConfigError, match=r"block 0.1 fails on an input of shape \(1, 8, 32, 32\)"):
        fastlocal.Backbone(nn.Conv2d(3, 8, 3, padding=1), blocks, None, nn.Flatten(), SIZE)
    with pytest.raises(ConfigError, match="head must return logits"):
        fastlocal.Backbone(nn.Conv2d(3, 8, 3, padding=1), blocks[:1], None, nn.Identity(), SIZE)


def test_learner_state_holds_each_tensor_once_and_evaluates_with_the_plain_forward():
    backbone = backbone_of("vit")
    learner = fastlocal.LocalLearner(backbone, "mlaan", 3)
    keys = list(learner.state_dict())
    assert all(k.startswith(("backbone.", "method.")) for k in keys)
    assert len({learner.state_dict()[k].data_ptr() for k in keys if k.startswith("backbone.")}) == len(
        backbone.state_dict()
    )
    x, _ = batch()
    learner.eval()
    with torch.no_grad():
        torch.testing.assert_close(learner(x), backbone(x))


@pytest.mark.slow
def test_local_methods_save_activation_memory_at_native_input_sizes():
    """ResNet-50 and ViT-B/16 at 224x224, CPU saved-tensor accounting of one step (scripts/any_model_memory.py
    prints the full table)."""
    from fastlocal.measure import step_saved_bytes

    for arch, n in (("torchvision:resnet50", 2), ("torchvision:vit_b_16", 1)):
        torch.manual_seed(0)
        backbone = fastlocal.build_backbone(arch, 10, 224)
        x, y = torch.randn(n, 3, 224, 224), torch.randint(0, 10, (n,))
        peak = {}
        for method, k, options in (("bp", 1, {}), ("dgl", 4, {"split": "balanced"}), ("mlaan", 4, {})):
            peak[method] = step_saved_bytes(fastlocal.LocalLearner(backbone, method, k, **options), x, y)
            for p in backbone.parameters():
                p.grad = None
        # DGL K=4 with balanced modules holds about a quarter of the activations (one module's, plus its head's)
        # instead of all of them; MLAAN's window 2 holds two modules' graphs plus the LAM's copies.
        assert peak["dgl"] < 0.5 * peak["bp"], (arch, peak)
        assert peak["mlaan"] < peak["bp"], (arch, peak)


@pytest.mark.slow
def test_own_model_example_trains(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "own_model.py"
    # One thread: on shared CI cores two OpenMP threads waiting for each other made it 2-3x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3
    accuracy = float(lines[-1].rsplit(" ", 1)[1].rstrip("%"))
    assert accuracy > 20.0  # 10 classes: chance is 10%


@pytest.mark.parametrize("arch", ["torchvision:mobilenet_v3_small", "test_any_model:tiny_backbone_factory"])
def test_cli_trains_a_library_model_and_a_factory(arch, tmp_path, capsys):
    import json

    from fastlocal.train import main

    args = [
        "--data.source=bundled",
        "--data.max_train=40",
        "--data.max_test=20",
        f"--model.arch={arch}",
        "--method.name=mlaan",
        "--method.num_modules=3",
        "--train.epochs=1",
        "--train.batch_size=20",
        "--log.progress=false",
        "--system.num_threads=1",
        "--out",
        str(tmp_path / "run"),
    ]
    code = main(args)
    _, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["arch"] == arch and summary["num_modules"] == 3


def test_cli_reports_a_bad_model_without_a_traceback(tmp_path, capsys):
    from fastlocal.train import main

    code = main(
        [
            "--data.source=bundled",
            "--data.max_train=40",
            "--data.max_test=20",
            "--model.arch=torchvision:squeezenet1_0",
            "--log.progress=false",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    _, err = capsys.readouterr()
    assert code == 2 and "SqueezeNet cannot be cut" in err and "Traceback" not in err


# timm models at the sizes people train, built by name as model.arch builds them.
TIMM_NAMES = [
    "resnet10t",
    "resnet18d",
    "convnext_atto",
    "efficientnet_b0",
    "regnetx_002",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
]


@NEEDS_TIMM
def test_model_arch_builds_timm_models_without_the_network(monkeypatch):
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("this test allows no network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in TIMM_NAMES:
        torch.manual_seed(0)
        backbone = fastlocal.build_backbone(f"timm:{name}", 10, SIZE)
        assert backbone.num_classes == 10 and len(backbone.blocks) >= 4, name
        assert not backbone.source_unused, name  # every tensor of the model is in a part
    assert not attempts


def test_timm_arch_without_timm_names_the_extra(monkeypatch, tmp_path, capsys):
    from fastlocal.train import main

    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(ConfigError, match=r"needs timm, which is not installed: pip install 'fastlocal\[timm\]'"):
        fastlocal.build_backbone("timm:resnet18", 10, SIZE)
    args = ["--data.source=bundled", "--data.max_train=20", "--data.max_test=20", "--model.arch=timm:resnet18"]
    code = main([*args, "--log.progress=false", "--out", str(tmp_path / "run")])
    _, err = capsys.readouterr()
    assert code == 2 and "pip install 'fastlocal[timm]'" in err and "Traceback" not in err


@NEEDS_TIMM
@pytest.mark.parametrize(
    "name,message",
    [
        ("no_such_net", "timm has no model 'no_such_net'"),
        (
            "mobilenetv3_small_050",
            r"MobileNetV3 cannot be cut.*the closest, EfficientNet, needs the attribute\(s\) bn2",
        ),
        ("deit_tiny_distilled_patch16_224", "VisionTransformerDistilled cannot be cut.*another class"),
    ],
)
def test_timm_models_fastlocal_cannot_cut_say_why(name, message):
    with pytest.raises(ConfigError, match=message):
        fastlocal.build_backbone(f"timm:{name}", 10, SIZE)


def test_importing_fastlocal_imports_no_optional_package():
    code = (
        "import sys, fastlocal, fastlocal.engine, fastlocal.export, fastlocal.models.timm_models; "
        "loaded = [m for m in ('timm', 'tensorboard', 'safetensors', 'triton', 'nvidia.dali') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True)
