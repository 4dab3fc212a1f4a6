"""The MLAAN paper's reported numbers (Zhang et al., AAAI 2025: Tables 1, 2, 4, 5 and 6) and recipes, and run
directories measured against them: which paper rows a run is, every way its recipe differs from the paper's,
and the mean and spread over seeds (what `python -m fastlocal.report` prints).

A run is a row when its method, heads, cascade, K and split are the row's (docs/usage.md#the-papers-rows-as-
options) on the row's dataset and architecture; everything else (epochs, images, batch, optimizer, precision,
device, MLAAN's weights) is recipe, compared with the paper's and listed where it differs, so a run that is
not the paper's recipe is never shown as a reproduction without saying so.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fastlocal.config import Config, UserError, resolve_num_modules


@dataclass(frozen=True)
class PaperRow:
    table: str
    dataset: str  # CIFAR-10, SVHN, STL-10, ImageNet; Table 6: "CIFAR-10 -> STL-10"
    arch: str  # ResNet-32 ...
    method: str  # BP, DGL, InfoPro, DGL+MLAAN, InfoPro+MLAAN, MLAAN; Table 4: none, MLM only, LAM only, MLM+LAM
    k_label: str  # the paper's label: K=1, K=8, K=16, K=32, K=55, K=17, K=34, K=51
    number: float  # test error %; Table 2: top-1 error %; Table 6: STL-10 test accuracy %
    epochs: int
    top5: float | None = None  # Table 2's top-5 error (fastlocal measures top-1 only)

    @property
    def metric(self) -> str:
        return {"Table 2": "top-1 error %", "Table 6": "STL-10 accuracy %"}.get(self.table, "test error %")


def _table_1() -> list[PaperRow]:
    # dataset -> method -> (ResNet-32 K=8, "K=16", ResNet-110 K=32, "K=55"), test error %.
    numbers = {
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
    bp = {"CIFAR-10": (6.37, 5.42), "STL-10": (19.35, 19.67), "SVHN": (2.99, 2.92)}
    columns = (("ResNet-32", "K=8"), ("ResNet-32", "K=16"), ("ResNet-110", "K=32"), ("ResNet-110", "K=55"))
    rows = []
    for dataset, methods in numbers.items():
        rows += [PaperRow("Table 1", dataset, "ResNet-32", "BP", "K=1", bp[dataset][0], 400)]
        rows += [PaperRow("Table 1", dataset, "ResNet-110", "BP", "K=1", bp[dataset][1], 400)]
        for method, values in methods.items():
            for (arch, k_label), value in zip(columns, values, strict=True):
                rows.append(PaperRow("Table 1", dataset, arch, method, k_label, value, 400))
    return rows


def _table_2() -> list[PaperRow]:
    # arch, K label -> method -> (top-1, top-5) error %, ImageNet validation.
    numbers = {
        ("ResNet-34", "K=17"): {"DGL": (39.93, 15.58), "BP": (25.38, 7.90), "MLAAN": (25.31, 7.88)},
        ("ResNet-101", "K=34"): {"DGL": (35.58, 13.71), "BP": (22.03, 5.93), "MLAAN": (21.69, 5.72)},
        ("ResNet-152", "K=51"): {"DGL": (35.80, 14.15), "BP": (21.60, 5.92), "MLAAN": (21.34, 5.74)},
    }
    return [
        PaperRow("Table 2", "ImageNet", arch, method, "K=1" if method == "BP" else k_label, top1, 150, top5)
        for (arch, k_label), methods in numbers.items()
        for method, (top1, top5) in methods.items()
    ]


PAPER_ROWS: list[PaperRow] = [
    *_table_1(),
    *_table_2(),
    PaperRow("Table 4", "CIFAR-10", "ResNet-32", "none", "K=16", 14.08, 400),
    PaperRow("Table 4", "CIFAR-10", "ResNet-32", "MLM only", "K=16", 8.46, 400),
    PaperRow("Table 4", "CIFAR-10", "ResNet-32", "LAM only", "K=16", 7.64, 400),
    PaperRow("Table 4", "CIFAR-10", "ResNet-32", "MLM+LAM", "K=16", 6.36, 400),
    PaperRow("Table 5", "CIFAR-10", "ResNet-32", "DGL", "K=16", 14.08, 400),
    PaperRow("Table 5", "CIFAR-10", "ResNet-110", "DGL", "K=55", 14.45, 400),
    PaperRow("Table 5", "CIFAR-10", "ResNet-32", "DGL+MLAAN", "K=16", 7.79, 300),
    PaperRow("Table 5", "CIFAR-10", "ResNet-110", "DGL+MLAAN", "K=55", 6.98, 300),
    PaperRow("Table 6", "CIFAR-10 -> STL-10", "ResNet-32", "BP", "K=1", 35.98, 400),
    PaperRow("Table 6", "CIFAR-10 -> STL-10", "ResNet-32", "DGL", "K=16", 31.95, 400),
    PaperRow("Table 6", "CIFAR-10 -> STL-10", "ResNet-32", "DGL+MLAAN", "K=16", 37.65, 400),
    PaperRow("Table 6", "CIFAR-10 -> STL-10", "ResNet-110", "BP", "K=1", 36.78, 400),
    PaperRow("Table 6", "CIFAR-10 -> STL-10", "ResNet-110", "DGL", "K=55", 33.16, 400),
    PaperRow("Table 6", "CIFAR-10 -> STL-10", "ResNet-110", "DGL+MLAAN", "K=55", 40.26, 400),
]
# Table 4's rows are DGL+MLAAN ablations ("none" is DGL): the method each stands for.
ABLATIONS = {"none": "DGL", "MLM only": "MLM only", "LAM only": "LAM only", "MLM+LAM": "DGL+MLAAN"}

ARCHS = {"resnet32": "ResNet-32", "resnet110": "ResNet-110", "resnet34": "ResNet-34"}
ARCHS |= {"resnet101": "ResNet-101", "resnet152": "ResNet-152"}
IMAGENET = ("ResNet-34", "ResNet-101", "ResNet-152")
# (arch, K label) -> (K, stem_separate) of the DGL/InfoPro rows and of the MLAAN rows (docs/method.md).
K_LABELS = {
    ("ResNet-32", "K=8"): ((8, False), (8, False)),
    ("ResNet-32", "K=16"): ((16, True), (15, False)),
    ("ResNet-110", "K=32"): ((32, False), (32, False)),
    ("ResNet-110", "K=55"): ((54, False), (54, False)),
    ("ResNet-34", "K=17"): ((16, False), (16, False)),
    ("ResNet-101", "K=34"): ((33, False), (33, False)),
    ("ResNet-152", "K=51"): ((50, False), (50, False)),
}
# Images in the full splits (the paper trains and tests on all of them).
TRAIN_IMAGES = {"CIFAR-10": 50_000, "SVHN": 73_257, "STL-10": 5_000, "ImageNet": 1_281_167}
TEST_IMAGES = {"CIFAR-10": 10_000, "SVHN": 26_032, "STL-10": 8_000, "ImageNet": 50_000}
BUNDLED_IMAGES = (10_000, 2_000)  # the CIFAR-10 subset shipped in the package: (train, test)


def recipe(dataset: str, epochs: int) -> dict[str, object]:
    """The paper's recipe (docs/method.md#recipes) as config values: 'section.key' -> value."""
    cifar_like = dataset in ("CIFAR-10", "SVHN")
    batch, lr = (1024, 0.8) if cifar_like else (128, 0.1) if dataset == "STL-10" else (128, 0.05)
    return {
        "train.epochs": epochs,
        "train.batch_size": batch,
        "optim.lr": lr,
        "optim.schedule": "cosine_epoch" if dataset == "ImageNet" else "ref",
        "optim.momentum": 0.9,
        "optim.nesterov": True,
        "optim.weight_decay": 1e-4,
        "system.precision": "fp32",
        "method.head_hidden": 128,
        "method.head_widen": 1,
    }


def mlaan_recipe(dataset: str) -> dict[str, object]:
    return {
        "mlaan.wx": 0.001,
        "mlaan.wy": 0.999,
        "mlaan.ema_momentum": 0.995,
        "mlaan.ema_scope": "all",
        "mlaan.lam_mode": "copies",
        "mlaan.final_weights": (1.0, 0.999) if dataset == "ImageNet" else (1.0, 1.0),
    }


INFOPRO_RECIPE = {"infopro.weights": (5.0, 0.5, 0.0, 0.0), "infopro.label_loss": "ce"}
NORMALIZE = {"CIFAR-10": "cifar10", "SVHN": "half", "STL-10": "half", "ImageNet": "imagenet"}


def value(cfg: Config, path: str):
    section, key = path.split(".")
    found = getattr(getattr(cfg, section), key)
    return tuple(found) if isinstance(found, list) else found


def dataset_of(cfg: Config) -> str | None:
    """The paper's dataset a run trained on (bundled is the CIFAR-10 subset; an image folder is ImageNet
    for the ImageNet ResNets), or None."""
    source, arch = cfg.data.source, ARCHS.get(cfg.model.arch)
    if source in ("cifar10", "bundled"):
        return "CIFAR-10"
    if source == "imagefolder":
        return "ImageNet" if arch in IMAGENET else None
    return {"svhn": "SVHN", "stl10": "STL-10"}[source]


def method_of(cfg: Config, dataset: str) -> tuple[str | None, str]:
    """(the paper's method label of the run, or None, and why not)."""
    name = cfg.method.name
    if name == "bp":
        return "BP", ""
    if name in ("dgl", "infopro"):
        head = "1c2f" if cfg.method.head == "auto" else cfg.method.head
        if head != "1c2f":
            return None, f"{name} with method.head = {head} (the paper's {name} rows use 1c2f)"
        return {"dgl": "DGL", "infopro": "InfoPro"}[name], ""
    if name != "mlaan":
        return None, f"method.name = {name} is none of the paper's methods"
    base, window, lam = cfg.mlaan.base, cfg.mlaan.window, cfg.mlaan.lam
    head = cfg.method.head if cfg.method.head != "auto" else "0c1f" if base == "dgl" else "1c2f"
    paper_window = 3 if dataset == "ImageNet" else 2
    if base == "dgl" and head == "0c1f" and window == paper_window and lam:
        return "MLAAN", ""
    if head != "1c2f" or dataset == "ImageNet":
        return None, f"mlaan on {base} with {head} heads, window {window}, lam {lam}: no paper row"
    if base == "infopro" and window == 2 and lam:
        return "InfoPro+MLAAN", ""
    if base == "dgl" and (window, lam) in ((2, True), (2, False), (1, True)):
        return {(2, True): "DGL+MLAAN", (2, False): "MLM only", (1, True): "LAM only"}[(window, lam)], ""
    return None, f"mlaan on {base} with window {window}, lam {lam}: no paper row"


def k_label_of(cfg: Config, arch: str, method: str) -> tuple[str | None, str]:
    """(the paper's K label of the run, or None, and why not)."""
    k, stem_separate, split = resolve_num_modules(cfg.method), cfg.method.stem_separate, cfg.method.split
    if method == "BP":
        return ("K=1", "") if k == 1 else (None, f"bp with K = {k}")
    local_mlaan = method not in ("DGL", "InfoPro")
    for (label_arch, label), (plain, mlaan) in K_LABELS.items():
        if label_arch == arch and (k, stem_separate) == (mlaan if local_mlaan else plain):
            # The uniform split is the authors' except for ResNet-110 K=32, which needs their split.
            if split == "balanced" or (split == "uniform" and (arch, label) == ("ResNet-110", "K=32")):
                return None, f"{arch} K={k} with method.split = {split} (the paper's is the authors' split)"
            return label, ""
    return None, f"{arch} K={k}{' with the stem separate' if stem_separate else ''} is none of the paper's K labels"


def differences(cfg: Config, summary: dict, row: PaperRow, dataset: str) -> list[str]:
    """Every way the run's recipe differs from the paper's for `row` (empty: the paper's recipe)."""
    expected = recipe(dataset, row.epochs)
    if cfg.method.name == "mlaan":
        expected |= mlaan_recipe(dataset)
    if cfg.method.name == "infopro" or (cfg.method.name == "mlaan" and cfg.mlaan.base == "infopro"):
        expected |= INFOPRO_RECIPE
    found = []
    for path, paper in expected.items():
        mine = value(cfg, path)
        if mine != paper:
            found.append(f"{path} {_show(mine)} (paper {_show(paper)})")
    if summary.get("epochs") not in (None, cfg.train.epochs):
        found.append(f"trained {summary['epochs']} of {cfg.train.epochs} epochs")
    for split, full, bundled in (("train", TRAIN_IMAGES, 0), ("test", TEST_IMAGES, 1)):
        limit = getattr(cfg.data, f"max_{split}")
        available = BUNDLED_IMAGES[bundled] if cfg.data.source == "bundled" else full[dataset]
        used = min(limit, available) if limit else available
        if used != full[dataset]:
            where = " of the bundled subset" if cfg.data.source == "bundled" else ""
            found.append(f"{split} images {used}{where} (paper {full[dataset]})")
    if cfg.data.normalize not in ("auto", NORMALIZE[dataset]):
        found.append(f"data.normalize {cfg.data.normalize} (paper {NORMALIZE[dataset]})")
    for key, auto in (("pad", -1), ("pad_mode", "auto"), ("flip", "auto")):
        if getattr(cfg.data, key) != auto:
            found.append(f"data.{key} {getattr(cfg.data, key)} (paper: the dataset's recipe)")
    if cfg.model.zero_init_residual:
        found.append("model.zero_init_residual true (paper false)")
    if summary.get("leaps") == "generated":
        found.append("generated leap lists (paper: the authors' tables)")
    # summary.json names the GPU, or the CPU with its thread count (older runs: "cpu (...)").
    device = str(summary.get("device") or "")
    if cfg.system.device == "cpu" or device.startswith("cpu") or device.endswith(("thread", "threads")):
        found.append(f"device CPU{f' ({device})' if device else ''} (paper GPUs)")
    if (summary.get("world_size") or 1) > 1:
        found.append(f"data parallel over {summary['world_size']} processes (batch norm per process)")
    return found


def _show(x) -> str:
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, tuple):
        return "(" + ", ".join(_show(v) for v in x) + ")"
    return f"{x:g}" if isinstance(x, float) else str(x)


def paper_rows(cfg: Config) -> tuple[list[PaperRow], str]:
    """The Table 1, 2, 4 and 5 rows a run is (several when tables share a setting) and, when none, why.
    Table 5's 300-epoch rows and the 400-epoch rows of the same setting are told apart by train.epochs: a run
    with neither epoch count is shown under all of them, each with its epochs flagged."""
    dataset = dataset_of(cfg)
    arch = ARCHS.get(cfg.model.arch)
    if dataset is None or arch is None:
        why = f"model.arch = {cfg.model.arch}" if arch is None else f"data.source = {cfg.data.source}"
        return (
            [],
            f"{why}: not one of the paper's (ResNet-32/110 on CIFAR-10, SVHN, STL-10; ResNet-34/101/152 on ImageNet)",
        )
    method, why = method_of(cfg, dataset)
    if method is None:
        return [], why
    k_label, why = k_label_of(cfg, arch, method)
    if k_label is None:
        return [], why
    matches = [
        row
        for row in PAPER_ROWS
        if row.table in ("Table 1", "Table 2", "Table 5")
        and (row.dataset, row.arch, row.method, row.k_label) == (dataset, arch, method, k_label)
    ] + [
        row
        for row in PAPER_ROWS
        if row.table == "Table 4"
        and (row.dataset, row.arch, ABLATIONS[row.method], row.k_label) == (dataset, arch, method, k_label)
    ]
    if not matches:
        return [], f"{method} {arch} {k_label} on {dataset}: the paper reports no such row"
    exact = [row for row in matches if row.epochs == cfg.train.epochs]
    return exact or matches, ""


def table_6_row(cfg: Config, evaluation: dict) -> PaperRow | None:
    """The Table 6 row of an evaluation (fastlocal.evaluate) of a CIFAR-10 run on STL-10's test set."""
    if evaluation.get("dataset", {}).get("source") != "stl10" or dataset_of(cfg) != "CIFAR-10":
        return None
    arch = ARCHS.get(cfg.model.arch)
    method, _ = method_of(cfg, "CIFAR-10")
    if arch is None or method is None:
        return None
    k_label, _ = k_label_of(cfg, arch, method)
    for row in PAPER_ROWS:
        if row.table == "Table 6" and (row.arch, row.method, row.k_label) == (arch, method, k_label):
            return row
    return None


@dataclass
class ReportLine:
    row: PaperRow
    flags: tuple[str, ...]
    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over the seeds (None for one run)."""
        if len(self.values) < 2:
            return None
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (len(self.values) - 1))

    def as_dict(self) -> dict:
        notes = list(self.flags)
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            notes.append(f"seed {', '.join(map(str, repeated))} more than once")
        if self.row.top5 is not None:
            notes.append(f"paper top-5 {self.row.top5:g} (not measured)")
        return {
            "table": self.row.table,
            "dataset": self.row.dataset,
            "architecture": self.row.arch,
            "method": self.row.method,
            "K": self.row.k_label,
            "metric": self.row.metric,
            "paper": self.row.number,
            "measured_mean": round(self.mean, 4),
            "measured_std": None if self.std is None else round(self.std, 4),
            "n": len(self.values),
            "difference": round(self.mean - self.row.number, 4),
            "seeds": sorted(self.seeds),
            "recipe": "paper" if not self.flags else "differs",
            "differences": notes,
            "runs": self.runs,
        }


def build_report(roots: list[str | Path], tables: list[str] | None = None) -> dict:
    """Every run directory under `roots` against the paper: {"rows": [...], "other_runs": [...]}. Runs of one
    paper row with the same recipe differences share a line (their seeds averaged); a recipe that differs
    gets a line of its own. Runs that are no paper row, unfinished or unreadable are listed in other_runs."""
    from fastlocal.runs import find_runs, read_config, read_summary

    lines: dict[tuple, ReportLine] = {}
    others = []

    def add(row: PaperRow, flags: list[str], measured: float, cfg: Config, path: Path) -> None:
        if tables and row.table not in tables:
            return
        line = lines.setdefault((row, tuple(flags)), ReportLine(row, tuple(flags)))
        line.values.append(measured)
        line.seeds.append(cfg.system.seed)
        line.runs.append(str(path))

    for path in find_runs(roots):
        try:
            cfg = read_config(path)
            summary = read_summary(path)
        except UserError as err:
            others.append({"run": str(path), "why": f"unreadable: {err}"})
            continue
        described = {"method": cfg.method.name, "arch": cfg.model.arch, "K": resolve_num_modules(cfg.method)}
        described |= {"data": cfg.data.source, "epochs": cfg.train.epochs, "seed": cfg.system.seed}
        if summary is None or summary.get("final_test_acc") is None:
            others.append({"run": str(path), "why": "unfinished (no summary.json)", **described})
            continue
        rows, why = paper_rows(cfg)
        if not rows:
            others.append({"run": str(path), "why": why, "final_test_acc": summary["final_test_acc"], **described})
        for row in rows:
            add(row, differences(cfg, summary, row, dataset_of(cfg)), 100.0 - summary["final_test_acc"], cfg, path)
        for evaluation_file in sorted(path.glob("evaluation-*/evaluation.json")):
            evaluation = json.loads(evaluation_file.read_text())
            row = table_6_row(cfg, evaluation)
            if row is not None and evaluation.get("accuracy") is not None:
                flags = differences(cfg, summary, row, "CIFAR-10")
                if evaluation.get("dataset", {}).get("max_test"):
                    flags.append(f"STL-10 test images limited to {evaluation['dataset']['max_test']} (paper 8000)")
                add(row, flags, evaluation["accuracy"], cfg, path)
    order = {row: i for i, row in enumerate(PAPER_ROWS)}
    ordered = sorted(lines.values(), key=lambda line: (order[line.row], line.flags))
    return {"rows": [line.as_dict() for line in ordered], "other_runs": others}


COLUMNS = ("table", "dataset", "architecture", "method", "K", "metric", "paper", "measured", "difference")


def _measured(row: dict) -> str:
    spread = "" if row["measured_std"] is None else f" +- {row['measured_std']:.2f}"
    return f"{row['measured_mean']:.2f}{spread} (n={row['n']})"


def to_markdown(report: dict) -> str:
    out = ["| " + " | ".join(COLUMNS) + " | recipe vs the paper's |", "|" + "---|" * (len(COLUMNS) + 1)]
    for row in report["rows"]:
        recipe_note = "the paper's recipe" if not row["differences"] else "; ".join(row["differences"])
        if row["recipe"] == "differs":
            recipe_note = "NOT the paper's recipe: " + recipe_note
        cells = [row[c] for c in COLUMNS[:6]] + [f"{row['paper']:g}", _measured(row), f"{row['difference']:+.2f}"]
        out.append("| " + " | ".join(map(str, cells)) + f" | {recipe_note} |")
    if not report["rows"]:
        out.append("| " + " | ".join("-" for _ in COLUMNS) + " | no run is a paper row |")
    if report["other_runs"]:
        out += ["", "Runs that are no paper row (not in the table above):", ""]
        for other in report["other_runs"]:
            details = ", ".join(f"{k} {v}" for k, v in other.items() if k not in ("run", "why"))
            out.append(f"- {other['run']}: {other['why']}" + (f" ({details})" if details else ""))
    return "\n".join(out) + "\n"


def to_csv(report: dict) -> str:
    keys = [*COLUMNS[:7], "measured_mean", "measured_std", "n", "difference", "seeds", "recipe", "differences", "runs"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(keys)
    for row in report["rows"]:
        writer.writerow(["; ".join(map(str, row[k])) if isinstance(row[k], list) else row[k] for k in keys])
    for other in report["other_runs"]:  # no paper row: its reason in "differences", its directory in "runs"
        writer.writerow(["no paper row"] + [""] * (len(keys) - 3) + [other["why"], other["run"]])
    return buffer.getvalue()
