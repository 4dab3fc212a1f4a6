"""Every shipped config validates, and every config that declares a paper row is that row.

The paper's numbers and the K-label mapping are typed here from the paper's Tables 1, 2, 4, 5 and 6 (as
docs/method.md quotes them), not read from the code. A config's first lines may declare several rows
(`# paper: table | dataset | arch | row | K label | number`): the Table 1 DGL runs are Table 5's 400-epoch
rows, and six CIFAR-10 runs are the checkpoints Table 6 tests on STL-10."""

from pathlib import Path

import pytest

from fastlocal.build import data_shape, plan
from fastlocal.config import build_config
from fastlocal.methods import METHODS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))

# Table 1, test error (%): dataset -> method -> (R32 K=8, R32 K=16, R110 K=32, R110 K=55).
TABLE_1 = {
    "CIFAR-10": {
        "DGL": (11.63, 14.08, 12.51, 14.45),
        "DGL+MLAAN": (6.25, 6.36, 5.38, 5.42),
        "InfoPro": (11.51, 12.93, 12.26, 13.22),
        "InfoPro+MLAAN": (6.37, 6.37, 5.41, 5.60),
        "MLAAN": (6.36, 6.51, 5.41, 6.02),
    },
    "STL-10": {
        "DGL": (25.05, 27.14, 25.67, 28.16),
        "DGL+MLAAN": (19.35, 19.02, 19.54, 19.66),
        "InfoPro": (27.32, 29.28, 28.58, 29.20),
        "InfoPro+MLAAN": (19.21, 19.21, 19.51, 19.24),
        "MLAAN": (19.34, 19.96, 20.46, 19.66),
    },
    "SVHN": {
        "DGL": (4.83, 5.05, 5.12, 5.36),
        "DGL+MLAAN": (2.79, 2.73, 2.78, 2.90),
        "InfoPro": (5.61, 5.97, 5.89, 6.11),
        "InfoPro+MLAAN": (2.97, 2.95, 2.87, 2.90),
        "MLAAN": (2.85, 2.82, 2.79, 2.89),
    },
}
TABLE_1_COLUMNS = (("ResNet-32", "K=8"), ("ResNet-32", "K=16"), ("ResNet-110", "K=32"), ("ResNet-110", "K=55"))
# Table 1's BP rows: dataset -> (ResNet-32, ResNet-110).
TABLE_1_BP = {"CIFAR-10": (6.37, 5.42), "STL-10": (19.35, 19.67), "SVHN": (2.99, 2.92)}

# (table, dataset, arch, row, K label) -> the paper's number: test error (%), (top-1, top-5) error for Table 2,
# STL-10 test accuracy (%) for Table 6.
PAPER = {
    **{
        ("Table 1", dataset, arch, row, k_label): number
        for dataset, rows in TABLE_1.items()
        for row, numbers in rows.items()
        for (arch, k_label), number in zip(TABLE_1_COLUMNS, numbers, strict=True)
    },
    **{
        ("Table 1", dataset, arch, "BP", "K=1"): number
        for dataset, numbers in TABLE_1_BP.items()
        for arch, number in zip(("ResNet-32", "ResNet-110"), numbers, strict=True)
    },
    ("Table 2", "ImageNet", "ResNet-34", "DGL", "K=17"): (39.93, 15.58),
    ("Table 2", "ImageNet", "ResNet-34", "BP", "K=1"): (25.38, 7.90),
    ("Table 2", "ImageNet", "ResNet-34", "MLAAN", "K=17"): (25.31, 7.88),
    ("Table 2", "ImageNet", "ResNet-101", "DGL", "K=34"): (35.58, 13.71),
    ("Table 2", "ImageNet", "ResNet-101", "BP", "K=1"): (22.03, 5.93),
    ("Table 2", "ImageNet", "ResNet-101", "MLAAN", "K=34"): (21.69, 5.72),
    ("Table 2", "ImageNet", "ResNet-152", "DGL", "K=51"): (35.80, 14.15),
    ("Table 2", "ImageNet", "ResNet-152", "BP", "K=1"): (21.60, 5.92),
    ("Table 2", "ImageNet", "ResNet-152", "MLAAN", "K=51"): (21.34, 5.74),
    ("Table 4", "CIFAR-10", "ResNet-32", "none", "K=16"): 14.08,
    ("Table 4", "CIFAR-10", "ResNet-32", "MLM only", "K=16"): 8.46,
    ("Table 4", "CIFAR-10", "ResNet-32", "LAM only", "K=16"): 7.64,
    ("Table 4", "CIFAR-10", "ResNet-32", "MLM+LAM", "K=16"): 6.36,
    ("Table 5", "CIFAR-10", "ResNet-32", "DGL, 400 epochs", "K=16"): 14.08,
    ("Table 5", "CIFAR-10", "ResNet-110", "DGL, 400 epochs", "K=55"): 14.45,
    ("Table 5", "CIFAR-10", "ResNet-32", "DGL+MLAAN, 300 epochs", "K=16"): 7.79,
    ("Table 5", "CIFAR-10", "ResNet-110", "DGL+MLAAN, 300 epochs", "K=55"): 6.98,
    ("Table 6", "CIFAR-10 -> STL-10", "ResNet-32", "BP", "K=1"): 35.98,
    ("Table 6", "CIFAR-10 -> STL-10", "ResNet-32", "DGL", "K=16"): 31.95,
    ("Table 6", "CIFAR-10 -> STL-10", "ResNet-32", "DGL+MLAAN", "K=16"): 37.65,
    ("Table 6", "CIFAR-10 -> STL-10", "ResNet-110", "BP", "K=1"): 36.78,
    ("Table 6", "CIFAR-10 -> STL-10", "ResNet-110", "DGL", "K=55"): 33.16,
    ("Table 6", "CIFAR-10 -> STL-10", "ResNet-110", "DGL+MLAAN", "K=55"): 40.26,
}
# Table 5's rows: (row, epochs).
TABLE_5_ROWS = {"DGL, 400 epochs": ("DGL", 400), "DGL+MLAAN, 300 epochs": ("DGL+MLAAN", 300)}
ARCHS = {
    "ResNet-32": "resnet32",
    "ResNet-110": "resnet110",
    "ResNet-34": "resnet34",
    "ResNet-101": "resnet101",
    "ResNet-152": "resnet152",
}
SOURCES = {
    "CIFAR-10": "cifar10",
    "SVHN": "svhn",
    "STL-10": "stl10",
    "ImageNet": "imagefolder",
    "CIFAR-10 -> STL-10": "cifar10",
}
# dataset -> (epochs, batch, peak LR) of the recipe.
RECIPES = {
    "CIFAR-10": (400, 1024, 0.8),
    "SVHN": (400, 1024, 0.8),
    "STL-10": (400, 128, 0.1),
    "ImageNet": (150, 128, 0.05),
    "CIFAR-10 -> STL-10": (400, 1024, 0.8),  # Table 6: checkpoints of the CIFAR-10 recipe
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


def declared_rows(path: Path) -> list[tuple[str, ...]]:
    """The (table, dataset, arch, row, K label, number) of each `# paper:` line at the top of `path`."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.startswith("# paper: "):
            break
        rows.append(tuple(f.strip() for f in line.removeprefix("# paper: ").split("|")))
    return rows


def declared_number(table: str, number: str):
    """The number a header states, as PAPER holds it."""
    if table == "Table 2":  # "top-1 / top-5 error 25.31 / 7.88"
        top1, top5 = number.split()[-3], number.split()[-1]
        return float(top1), float(top5)
    return float(number.split()[-1])


def test_the_configs_declare_exactly_the_typed_rows():
    rows = [row[:5] for path in CONFIGS for row in declared_rows(path)]
    extra = sorted(set(rows) - set(PAPER))
    assert not extra, f"configs declare rows the paper does not have: {extra}"
    missing = sorted(set(PAPER) - set(rows))
    assert not missing, f"paper rows without a config: {missing}"
    assert sorted({row[3] for row in rows if row[0] == "Table 5"}) == sorted(TABLE_5_ROWS)
    assert len({row for row in rows if row[0] == "Table 5"}) == 4


def test_no_header_leaves_its_number_out():
    for path in CONFIGS:
        for line in path.read_text().splitlines()[:8]:
            assert "not transcribed" not in line, path.name


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_its_paper_rows(path):
    cfg = build_config(path, (), METHODS)
    rows = declared_rows(path)
    if not rows:
        assert path.stem.startswith("short_"), "every config but the short recipe declares its paper rows"
        return
    for table, dataset, arch_name, row_name, k_label, number in rows:
        assert declared_number(table, number) == PAPER[(table, dataset, arch_name, row_name, k_label)], number
        epochs_expected = RECIPES[dataset][0]
        if table == "Table 5":
            row_name, epochs_expected = TABLE_5_ROWS[row_name]
        arch = ARCHS[arch_name]
        assert cfg.model.arch == arch
        assert cfg.data.source == SOURCES[dataset]
        _, batch, lr = RECIPES[dataset]
        assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (epochs_expected, batch, lr)
        name, head, base, window, lam = ROWS[row_name]
        assert cfg.method.name == name
        if name == "bp":
            assert cfg.method.num_modules == 1
            continue
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
