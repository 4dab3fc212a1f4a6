"""A trained run's network on a test set: its own (the number of its summary.json) or another dataset's.

On another dataset (the paper's Table 6: CIFAR-10 checkpoints tested on STL-10, no fine-tuning):
- classes are matched by name, through CLASS_ALIASES (STL-10's car is CIFAR-10's automobile); images of a
  class the run does not know are left out and counted; the prediction is the argmax over all the run's
  classes, so a run class the dataset lacks (CIFAR-10's frog on STL-10) is a possible wrong answer;
- images are resized once to the run's input size (bilinear with antialiasing, the whole image, no crop),
  rounded to uint8 as if stored at that size, and normalised as the run's training images were (the run's
  mean and std, not the other dataset's recipe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastlocal.config import Config, DataConfig, UserError

# Each class name -> the names that mean the same class in another dataset. Names are compared lowercased,
# with '_' and '-' read as spaces.
CLASS_ALIASES: dict[str, tuple[str, ...]] = {
    "automobile": ("car",),  # CIFAR-10 automobile = STL-10 car
    "airplane": ("aeroplane", "plane"),
}
# The class names, in label order, of the sources whose classes are fixed (torchvision's names; SVHN's are
# its digits), so a run's classes are known without its dataset on the machine.
SOURCE_CLASSES: dict[str, tuple[str, ...]] = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "bundled": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "stl10": ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
    "svhn": tuple(str(digit) for digit in range(10)),
}
RESIZE = "bilinear, antialiased (torch.nn.functional.interpolate), the whole image, rounded to uint8"


def canonical(name: str) -> str:
    """A class name as it is compared: lowercased, '_'/'-' as spaces, an alias replaced by its class."""
    name = " ".join(name.lower().replace("_", " ").replace("-", " ").split())
    for main, aliases in CLASS_ALIASES.items():
        if name in aliases:
            return main
    return name


def match_classes(run_classes: list[str], data_classes: list[str]) -> list[int | None]:
    """For each class of the data, the run's class of the same name (via CLASS_ALIASES), or None."""
    by_name = {canonical(name): index for index, name in enumerate(run_classes)}
    return [by_name.get(canonical(name)) for name in data_classes]


@dataclass
class RunInput:
    """What a run's network expects: its classes in label order, its square input size and normalisation."""

    class_names: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def run_input(data: DataConfig, arch: str, recorded_size: int = 0) -> RunInput:
    """The classes, input size and normalisation of a run of `arch` trained on `data`: the size its checkpoint
    records (`recorded_size`), else the config's (fastlocal.build.data_shape); an image folder's class names
    from its folders; only data.normalize = dataset (and an image folder kept at its own size) reads images."""
    from fastlocal.build import data_shape
    from fastlocal.data import NORMALIZATIONS, RECIPES, read_splits, resolve_info, root_folder, sources

    folder = None
    if data.source in SOURCE_CLASSES:
        class_names = list(SOURCE_CLASSES[data.source])
    else:
        folder = sources.list_imagefolder(root_folder(data), cache=sources.cache_dir(data.cache_dir), progress=False)
        class_names = list(folder.class_names)
    image_size = recorded_size
    if not image_size:
        try:
            image_size = data_shape(data, arch, len(class_names))[1]
        except UserError:  # an image folder kept at its own size: its images' size
            first = next(names[0] for names in folder.files["train"] if names)
            image_size = sources.shorter_side(folder.base / first)
    normalize = RECIPES[data.source][3] if data.normalize == "auto" else data.normalize
    if normalize == "dataset":  # the training images' statistics: the run's training set is needed
        info = resolve_info(data, read_splits(data, progress=False))
        mean, std = info.mean, info.std
    else:
        mean, std = NORMALIZATIONS[normalize]
    return RunInput(class_names, int(image_size), tuple(mean), tuple(std))


def resize_images(images: np.ndarray, size: int, batch: int = 500) -> torch.Tensor:
    """uint8 (N, 3, H, H) -> uint8 (N, 3, size, size), per RESIZE."""
    import torch.nn.functional as F

    tensor = torch.from_numpy(images)
    if images.shape[2] == size:
        return tensor
    out = []
    for start in range(0, len(tensor), batch):
        x = tensor[start : start + batch].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else torch.empty(0, 3, size, size, dtype=torch.uint8)


@torch.no_grad()
def predict(backbone: torch.nn.Module, loader, cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, true label) of every image of `loader`, on the CPU, with the run's precision and
    memory format (the forward fastlocal.train evaluates with)."""
    from fastlocal.schedule import forward_context_for

    forward_context = forward_context_for(device, cfg.system.precision)
    predictions, labels = [], []
    for x, y in loader:
        if cfg.system.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with forward_context():
            predictions.append(backbone(x).argmax(1).cpu())
        labels.append(y.cpu())
    return torch.cat(predictions), torch.cat(labels)


def evaluate_run(
    run_dir: str | Path, data: DataConfig | None, device: torch.device, *, batch_size: int = 500, progress=False
) -> dict:
    """Accuracy, per-class accuracy and confusion matrix of the run in `run_dir` on its own test set (`data`
    None) or on the test split of `data`. The result is JSON-ready (docs/reproduce.md, Table 6)."""
    from fastlocal.data import DeviceLoader, build_data, read_splits
    from fastlocal.engine import read_checkpoint
    from fastlocal.runs import CHECKPOINT_NAME, load_backbone, read_summary, trained_run

    cfg = trained_run(run_dir)
    recorded = read_checkpoint(Path(run_dir) / CHECKPOINT_NAME)["state"].get("input_size", 0)
    expected = run_input(cfg.data, cfg.model.arch, recorded)
    if data is None:  # the run's own test set, through the loader training evaluated with
        bundle = build_data(
            cfg.data,
            batch_size=cfg.train.batch_size,
            eval_batch_size=batch_size,
            device=device,
            seed=cfg.system.seed,
            progress=progress,
        )
        _, backbone = load_backbone(run_dir, bundle.info.num_classes, bundle.info.image_size, device)
        predictions, labels = predict(backbone, bundle.test, cfg, device)
        data_classes, matched = list(bundle.info.class_names), list(range(bundle.info.num_classes))
        run_classes = data_classes
        dataset = {"source": cfg.data.source, "root": cfg.data.root, "own_test_set": True}
        image_size = {"run": bundle.info.image_size, "data": bundle.info.image_size, "resize": "none"}
        left_out: dict[str, int] = {}
    else:
        test = read_splits(data, progress=progress)["test"]
        height, width = test.images.shape[2:]
        if height != width:
            raise UserError(
                f"{data.source} test images are {width}x{height}, not square, so they cannot be resized to the "
                f"run's {expected.image_size}x{expected.image_size} input without distorting them; set "
                "data.image_size=N (image folders) to make them square"
            )
        run_classes, data_classes = expected.class_names, list(test.class_names)
        matched = match_classes(run_classes, data_classes)
        if all(m is None for m in matched):
            raise UserError(
                f"no class of {data.source} ({', '.join(data_classes)}) matches a class of the run "
                f"({', '.join(run_classes)}), by name or through fastlocal.evaluation.CLASS_ALIASES; the "
                "accuracy would be meaningless. Evaluate on a dataset that shares classes with the run"
            )
        lookup = np.array([-1 if m is None else m for m in matched])
        run_labels = lookup[test.labels]
        keep = np.flatnonzero(run_labels >= 0)
        left_out = {name: int((test.labels == k).sum()) for k, name in enumerate(data_classes) if matched[k] is None}
        images = resize_images(np.ascontiguousarray(test.images[keep]), expected.image_size).to(device)
        loader = DeviceLoader(
            images,
            torch.from_numpy(run_labels[keep]).to(device),
            batch_size,
            train=False,
            mean=expected.mean,
            std=expected.std,
        )
        _, backbone = load_backbone(run_dir, len(run_classes), expected.image_size, device)
        predictions, labels = predict(backbone, loader, cfg, device)
        dataset = {**dataclasses.asdict(data), "own_test_set": False}
        resize = "none" if height == expected.image_size else RESIZE
        image_size = {"run": expected.image_size, "data": int(height), "resize": resize}
    num_run = len(run_classes)
    confusion = torch.bincount(labels * num_run + predictions, minlength=num_run * num_run).view(num_run, num_run)
    correct = int((predictions == labels).sum())
    per_class = {}
    for k, name in enumerate(data_classes):
        if matched[k] is None:
            continue
        row = confusion[matched[k]]
        count = int(row.sum())
        per_class[name] = {
            "run_class": run_classes[matched[k]],
            "images": count,
            "accuracy": 100.0 * int(row[matched[k]]) / count if count else None,
        }
    truth_rows = sorted({m for m in matched if m is not None})
    summary = read_summary(run_dir)
    return {
        "run": str(run_dir),
        "method": cfg.method.name,
        "arch": cfg.model.arch,
        "trained_on": cfg.data.source,
        "dataset": dataset,
        "split": "test",
        "accuracy": 100.0 * correct / len(labels) if len(labels) else None,
        "images": len(labels),
        "images_left_out": sum(left_out.values()),
        "left_out_classes": left_out,
        "per_class": per_class,
        "run_classes_not_in_data": [run_classes[r] for r in range(num_run) if r not in truth_rows],
        "image_size": image_size,
        "normalization": {"mean": list(expected.mean), "std": list(expected.std), "from": "the run's training data"},
        "confusion": {
            "rows": [run_classes[r] for r in truth_rows],
            "columns": list(run_classes),
            "counts": confusion[truth_rows].tolist(),
            "note": "rows: true class (the run's name for it), columns: predicted class",
        },
        "summary_final_test_acc": summary.get("final_test_acc") if summary else None,
        "device": str(device),
    }


def draw_confusion(result: dict, path: Path) -> None:
    """The confusion matrix as a PNG (rows normalised to the share of each true class). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(result["confusion"]["counts"], dtype=float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    rows, columns = result["confusion"]["rows"], result["confusion"]["columns"]
    figure, axes = plt.subplots(figsize=(1 + 0.55 * len(columns), 1 + 0.5 * len(rows)))
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(columns)), columns, rotation=60, ha="right")
    axes.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(columns)):
            if counts[i, j]:
                colour = "white" if shares[i, j] > 0.5 else "black"
                axes.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, color=colour)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    source = result["dataset"]["source"]
    axes.set_title(f"{result['method']} {result['arch']} on {source}: {result['accuracy']:.2f}% ", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def describe(result: dict) -> str:
    """A few lines for the terminal."""
    data = result["dataset"]
    lines = [
        f"{result['method']} {result['arch']} (trained on {result['trained_on']}) on the {data['source']} test set: "
        f"accuracy {result['accuracy']:.2f}% on {result['images']} images"
    ]
    if data["own_test_set"] and result["summary_final_test_acc"] is not None:
        lines.append(f"  summary.json's final test accuracy: {result['summary_final_test_acc']:.2f}%")
    if not data["own_test_set"]:
        size = result["image_size"]
        lines.append(f"  images {size['data']}x{size['data']} -> {size['run']}x{size['run']} ({size['resize']})")
        left = result["left_out_classes"]
        if left:
            lines.append(
                f"  left out: {result['images_left_out']} images of classes the run does not know "
                f"({', '.join(f'{k} {v}' for k, v in left.items())})"
            )
        if result["run_classes_not_in_data"]:
            lines.append(f"  run classes never the truth here: {', '.join(result['run_classes_not_in_data'])}")
    for name, entry in result["per_class"].items():
        same = "" if entry["run_class"] == name else f" (= {entry['run_class']})"
        accuracy = "-" if entry["accuracy"] is None else f"{entry['accuracy']:.2f}%"
        lines.append(f"  {name}{same}: {accuracy} of {entry['images']}")
    return "\n".join(lines)
