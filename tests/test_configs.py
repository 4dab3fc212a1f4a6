"""Every shipped config validates, and every config that declares a paper row is that row.

The paper's numbers and the K-label mapping are typed here from the paper's Tables 1, 2 and 4 (as
docs/method.md quotes them), not read from the code."""

from pathlib import Path

import pytest

from fastlocal.build import data_shape, plan
from fastlocal.config import build_config
from fastlocal.methods import METHODS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))

# (table, dataset, arch, row, K label) -> the paper's test error (None: the number is not transcribed).
PAPER = {
    ("Table 1", "CIFAR-10", "ResNet-32", "BP", "K=1"): 6.37,
    ("Table 1", "CIFAR-10", "ResNet-32", "DGL", "K=8"): 11.63,
    ("Table 1", "CIFAR-10", "ResNet-32", "DGL", "K=16"): 14.08,
    ("Table 1", "CIFAR-10", "ResNet-32", "DGL+MLAAN", "K=8"): 6.25,
    ("Table 1", "CIFAR-10", "ResNet-32", "DGL+MLAAN", "K=16"): 6.36,
    ("Table 1", "CIFAR-10", "ResNet-32", "InfoPro", "K=8"): 11.51,
    ("Table 1", "CIFAR-10", "ResNet-32", "InfoPro", "K=16"): 12.93,
    ("Table 1", "CIFAR-10", "ResNet-32", "InfoPro+MLAAN", "K=8"): 6.37,
    ("Table 1", "CIFAR-10", "ResNet-32", "InfoPro+MLAAN", "K=16"): 6.37,
    ("Table 1", "CIFAR-10", "ResNet-32", "MLAAN", "K=8"): 6.36,
    ("Table 1", "CIFAR-10", "ResNet-32", "MLAAN", "K=16"): 6.51,
    ("Table 1", "CIFAR-10", "ResNet-110", "BP", "K=1"): 5.42,
    ("Table 1", "CIFAR-10", "ResNet-110", "DGL", "K=32"): 12.51,
    ("Table 1", "CIFAR-10", "ResNet-110", "DGL", "K=55"): 14.45,
    ("Table 1", "CIFAR-10", "ResNet-110", "DGL+MLAAN", "K=32"): 5.38,
    ("Table 1", "CIFAR-10", "ResNet-110", "DGL+MLAAN", "K=55"): 5.42,
    ("Table 1", "CIFAR-10", "ResNet-110", "MLAAN", "K=32"): 5.41,
    ("Table 1", "CIFAR-10", "ResNet-110", "MLAAN", "K=55"): 6.02,
    ("Table 2", "ImageNet", "ResNet-34", "BP", "K=1"): 25.38,
    ("Table 2", "ImageNet", "ResNet-34", "MLAAN", "K=17"): 25.31,
    ("Table 2", "ImageNet", "ResNet-101", "BP", "K=1"): 22.03,
    ("Table 2", "ImageNet", "ResNet-101", "MLAAN", "K=34"): 21.69,
    ("Table 2", "ImageNet", "ResNet-152", "BP", "K=1"): 21.60,
    ("Table 2", "ImageNet", "ResNet-152", "MLAAN", "K=51"): 21.34,
    ("Table 4", "CIFAR-10", "ResNet-32", "none", "K=16"): 14.08,
    ("Table 4", "CIFAR-10", "ResNet-32", "MLM only", "K=16"): 8.46,
    ("Table 4", "CIFAR-10", "ResNet-32", "LAM only", "K=16"): 7.64,
    ("Table 4", "CIFAR-10", "ResNet-32", "MLM+LAM", "K=16"): 6.36,
}
ARCHS = {
    "ResNet-32": "resnet32",
    "ResNet-110": "resnet110",
    "ResNet-34": "resnet34",
    "ResNet-101": "resnet101",
    "ResNet-152": "resnet152",
}
SOURCES = {"CIFAR-10": "cifar10", "SVHN": "svhn", "STL-10": "stl10", "ImageNet": "imagefolder"}
# dataset -> (epochs, batch, peak LR) of the recipe.
RECIPES = {
    "CIFAR-10": (400, 1024, 0.8),
    "SVHN": (400, 1024, 0.8),
    "STL-10": (400, 128, 0.1),
    "ImageNet": (150, 128, 0.05),
}
# (arch, paper's K label, MLAAN row?) -> (K, stem separate, split).
K_MAP = {
    ("resnet32", "K=8", False): (8, False, "uniform"),
    ("resnet32", "K=8", True): (8, False, "uniform"),
    ("resnet32", "K=16", False): (16, True, "uniform"),
    ("resnet32", "K=16", True): (15, False, "uniform"),
    ("resnet110", "K=32", False): (32, False, "reference"),
    ("resnet110", "K=32", True): (32, False, "reference"),
    ("resnet110", "K=55", False): (54, False, "uniform"),
    ("resnet110", "K=55", True): (54, False, "uniform"),
    ("resnet34", "K=17", False): (16, False, "uniform"),
    ("resnet34", "K=17", True): (16, False, "uniform"),
    ("resnet101", "K=34", False): (33, False, "uniform"),
    ("resnet101", "K=34", True): (33, False, "uniform"),
    ("resnet152", "K=51", False): (50, False, "uniform"),
    ("resnet152", "K=51", True): (50, False, "uniform"),
}
# row -> (method.name, method.head, mlaan.base, mlaan.window, mlaan.lam); None where it does not apply.
ROWS = {
    "BP": ("bp", None, None, None, None),
    "DGL": ("dgl", "1c2f", None, None, None),
    "InfoPro": ("infopro", "1c2f", None, None, None),
    "DGL+MLAAN": ("mlaan", "1c2f", "dgl", 2, True),
    "InfoPro+MLAAN": ("mlaan", "1c2f", "infopro", 2, True),
    "MLAAN": ("mlaan", "0c1f", "dgl", 2, True),
    "none": ("dgl", "1c2f", None, None, None),
    "MLM only": ("mlaan", "1c2f", "dgl", 2, False),
    "LAM only": ("mlaan", "1c2f", "dgl", 1, True),
    "MLM+LAM": ("mlaan", "1c2f", "dgl", 2, True),
}


def declared_row(path: Path):
    first = path.read_text().splitlines()[0]
    if not first.startswith("# paper: "):
        return None
    table, dataset, arch, row, k_label, number = [f.strip() for f in first.removeprefix("# paper: ").split("|")]
    return table, dataset, arch, row, k_label, number


def test_there_are_configs_for_every_typed_row_and_svhn_stl10():
    rows = {declared_row(p)[:5] for p in CONFIGS if declared_row(p)}
    assert set(PAPER) <= rows
    for dataset in ("SVHN", "STL-10"):
        assert {r[3] for r in rows if r[1] == dataset} >= {
            "BP",
            "DGL",
            "InfoPro",
            "DGL+MLAAN",
            "InfoPro+MLAAN",
            "MLAAN",
        }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_its_paper_row(path):
    cfg = build_config(path, (), METHODS)
    row = declared_row(path)
    if row is None:
        assert path.stem.startswith("short_"), "every config but the short recipe declares its paper row"
        return
    table, dataset, arch_name, row_name, k_label, number = row
    if table == "Table 5":  # the 300-epoch rows: DGL+MLAAN at 300 epochs
        row_name, epochs_expected = "DGL+MLAAN", 300
        key = None
    else:
        key = (table, dataset, arch_name, row_name, k_label)
        epochs_expected = RECIPES[dataset][0]
    expected_number = PAPER.get(key)
    if expected_number is None:
        assert "not transcribed" in number
    else:
        assert float(number.split()[-1]) == expected_number, (number, expected_number)
    arch = ARCHS[arch_name]
    assert cfg.model.arch == arch
    assert cfg.data.source == SOURCES[dataset]
    epochs, batch, lr = RECIPES[dataset]
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (epochs_expected, batch, lr)
    name, head, base, window, lam = ROWS[row_name]
    assert cfg.method.name == name
    if name == "bp":
        assert cfg.method.num_modules == 1
        return
    assert cfg.method.head == head
    k, stem_separate, split = K_MAP[(arch, k_label, name == "mlaan")]
    assert (cfg.method.num_modules, cfg.method.stem_separate, cfg.method.split) == (k, stem_separate, split)
    if name == "mlaan":
        expected_window = 3 if dataset == "ImageNet" else window
        assert (cfg.mlaan.base, cfg.mlaan.window, cfg.mlaan.lam) == (base, expected_window, lam)
        assert (cfg.mlaan.wx, cfg.mlaan.wy, cfg.mlaan.ema_momentum) == (0.001, 0.999, 0.995)


@pytest.mark.filterwarnings("ignore:local module")
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_plans(path):
    """Every config builds its model, split and method (image folders at 32 px with 10 classes: the modules
    and leap lists depend on the block order and shapes only)."""
    cfg = build_config(path, (), METHODS)
    known = (10, 32) if cfg.data.source == "imagefolder" else (0, 0)
    result = plan(cfg, *data_shape(cfg.data, cfg.model.arch, *known))
    assert len(result["modules"]) == cfg.method.num_modules
    if cfg.method.name == "mlaan" and cfg.mlaan.lam:
        expected = (
            "preset"
            if (cfg.model.arch, cfg.method.num_modules)
            in {
                ("resnet32", 8),
                ("resnet32", 15),
                ("resnet110", 32),
                ("resnet110", 54),
                ("resnet34", 16),
                ("resnet101", 33),
            }
            else "generated"
        )
        assert result["leaps_source"] == expected
