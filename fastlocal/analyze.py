"""`python -m fastlocal.analyze`: the MLAAN paper's analyses on trained run directories.

For every part of the backbone (the stem and each block: they exist for every method and K, so runs with
different K compare position by position) it computes, from one pass of each run's model over the data:
- a linear probe on the frozen, globally average-pooled part output (trained on a training subset,
  accuracy on a test subset): the paper's layer-wise linear separability (Figure 5);
- linear CKA of every part output of each run against every part output of the reference run on the same
  test images, by the minibatch estimator (`fastlocal.analysis.cka`): Figure 6;
- channel-mean activation maps of a few fixed test images at every part: Figure 4.
It writes analysis.json and PNG figures (docs/analysis.md describes both).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlocal.config import Config, UserError, exits_2_on_user_error, resolve_num_modules, to_dict

USAGE_EXAMPLES = """examples:
  python -m fastlocal.analyze runs/dgl runs/mlaan --reference runs/bp --out analysis/
  python -m fastlocal.analyze runs/mlaan --test-images 10000 --train-images 0 --out analysis/   # full splits
"""

SUBSET_SEED = 0
"""The test and training subsets are a fixed function of (this seed, split size, N): the same images for
every run of a dataset."""


@dataclass(eq=False)  # compared by identity
class LoadedRun:
    """One run directory, its model on the device in eval mode and its data."""

    path: Path
    label: str
    cfg: Config
    backbone: torch.nn.Module
    modules: list[list[int]]
    """Part numbers of each local module (part 0 = stem, part p = block p-1)."""
    data: object
    """The run's `fastlocal.data.DataBundle`."""

    @property
    def module_outputs(self) -> list[int]:
        """The part whose output is each module's output (the last part of each module)."""
        return [parts[-1] for parts in self.modules]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastlocal.analyze",
        description="Layer-wise linear separability, CKA similarity to a reference (BP) run and feature maps "
        "of trained runs, per backbone part, as analysis.json and PNG figures.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by fastlocal.train")
    parser.add_argument(
        "--reference",
        metavar="BP_RUN_DIR",
        help="the run every other run is compared with by CKA (usually BP); without it, no CKA",
    )
    parser.add_argument("--out", required=True, help="directory for analysis.json and the figures")
    parser.add_argument(
        "--test-images",
        type=int,
        default=2000,
        help="test images for the probes' accuracy, CKA and maps (default 2000; 0 = all)",
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=10000,
        help="training images (not augmented) the probes are trained on (default 10000; 0 = all)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=250,
        help="images per forward and per CKA minibatch; CKA memory grows with its square (default 250)",
    )
    parser.add_argument(
        "--cka-features",
        choices=("flat", "pooled"),
        default="flat",
        help="CKA on the whole part output, flattened (default, as the paper), or on its spatial average",
    )
    parser.add_argument("--map-images", type=int, default=3, help="test images shown as feature maps (default 3)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cuda", "cpu"),
        help="auto (default: CUDA when available), cuda or cpu",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("test_images", "train_images"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0 (0 = the whole split)")
    if args.batch_size < 4:
        raise UserError(f"--batch-size must be at least 4 (the unbiased HSIC needs 4 images), got {args.batch_size}")
    if args.map_images < 0:
        raise UserError("--map-images must be >= 0")
    return args


def prepare_out_dir(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; give a directory (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {path}: cannot create the directory ({err.strerror}); choose another --out") from None
    return path


def load_run(run_dir: str | Path, device: torch.device, data_cache: dict) -> LoadedRun:
    """Config, model and data of a run directory. Runs with the same data config share one data bundle."""
    from fastlocal.data import build_data
    from fastlocal.runs import load_backbone, trained_run
    from fastlocal.split import split_parts

    path = Path(run_dir)
    cfg = trained_run(path)
    key = json.dumps(to_dict(cfg.data), sort_keys=True)
    if key not in data_cache:
        data_cache[key] = build_data(
            cfg.data,
            batch_size=cfg.train.batch_size,
            eval_batch_size=cfg.train.eval_batch_size,
            device=device,
            seed=cfg.system.seed,
            progress=False,
        )
    data = data_cache[key]
    if not hasattr(data.test, "images"):
        raise UserError(
            f"{path}: data.loader = {cfg.data.loader} streams its images; the analysis needs the "
            "dataset in memory (data.loader=device, the default for small images)"
        )
    _, backbone = load_backbone(path, data.info.num_classes, data.info.image_size, device)
    modules = split_parts(
        backbone, resolve_num_modules(cfg.method), cfg.method.stem_separate, cfg.method.split, cfg.model.arch
    )
    return LoadedRun(path, path.name, cfg, backbone, modules, data)


def check_same_backbone(runs: list[LoadedRun]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.backbone.part_info != first.backbone.part_info:
            raise UserError(
                f"{run.path} uses model.arch = {run.cfg.model.arch} at {run.data.info.image_size} pixels and "
                f"{first.path} model.arch = {first.cfg.model.arch} at {first.data.info.image_size} pixels: the "
                "analysis compares runs part by part, so every run needs the same backbone; analyse them separately"
            )


def fixed_subset(num_items: int, count: int, device: torch.device) -> torch.Tensor:
    """`count` indices (all when 0 or more than there are), drawn without replacement, sorted; the same for
    every call with the same arguments (a class-sorted split still gives every class)."""
    if count == 0 or count >= num_items:
        return torch.arange(num_items, device=device)
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(num_items, generator=generator)[:count].sort().values.to(device)


def disambiguate_labels(runs: list[LoadedRun]) -> None:
    names = [run.label for run in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = str(run.path)


@torch.no_grad()
def part_outputs(backbone, x: torch.Tensor):
    """Yields the output of each part (stem, then every block) for a batch x: (B, 3, H, W)."""
    for part in backbone.parts:
        x = part(x)
        yield x


def same_images(models: list[LoadedRun], test_index: torch.Tensor, train_index: torch.Tensor) -> None:
    """Every run is probed and compared on the same images: stop if their data differ."""
    first = models[0]
    for run in models[1:]:
        for name, split, index in (("test", "test", test_index), ("training", "train", train_index)):
            mine, theirs = getattr(run.data, split), getattr(first.data, split)
            if not (
                mine.num_images == theirs.num_images
                and torch.equal(mine.images[index], theirs.images[index])
                and torch.equal(mine.labels[index], theirs.labels[index])
            ):
                raise UserError(
                    f"{run.path} and {first.path} have different {name} images (check data.source, "
                    f"data.root, data.max_{split}); analyse them separately"
                )


def minibatches(index: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive slices of `index`; a last slice of fewer than 4 joins the one before (the unbiased HSIC
    needs 4 images per minibatch)."""
    batches = [index[i : i + batch_size] for i in range(0, len(index), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 4:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@dataclass
class Features:
    """What one pass of a run's model leaves: pooled part outputs (for the probes), feature maps."""

    train: list[list[torch.Tensor]]
    """Per part, the (B, C) spatial means of each training minibatch."""
    test: list[list[torch.Tensor]]
    maps: list[torch.Tensor] | None = None
    """Per part, the channel means (M, H, W) of the feature-map images, on the CPU."""


def extract(
    models: list[LoadedRun],
    reference: LoadedRun | None,
    test_index: torch.Tensor,
    train_index: torch.Tensor,
    map_index: torch.Tensor,
    batch_size: int,
    cka_features: str,
    progress: bool,
) -> tuple[dict[int, Features], dict[int, object]]:
    """One pass of every model over the images. Returns Features and, for each run other than the
    reference (when there is one), its MinibatchCKA against the reference, both keyed by id(run)."""
    from tqdm.auto import tqdm

    from fastlocal.analysis.cka import MinibatchCKA, gram_matrix

    num_parts = len(models[0].backbone.parts)
    device = test_index.device
    features = {id(run): Features([[] for _ in range(num_parts)], [[] for _ in range(num_parts)]) for run in models}
    cka = {
        id(run): MinibatchCKA(num_parts, num_parts, device)
        for run in models
        if reference is not None and run is not reference
    }
    test_batches, train_batches = minibatches(test_index, batch_size), minibatches(train_index, batch_size)
    bar = tqdm(
        total=(len(test_batches) + len(train_batches)) * len(models),
        desc="features",
        unit="batch",
        disable=not progress,
    )
    for index in test_batches:
        grams = {}  # the Gram matrices of this minibatch only: CKA memory is bounded by the minibatch size
        for run in models:
            x = run.data.test.normalize(run.data.test.images[index])
            run_grams = []
            for p, out in enumerate(part_outputs(run.backbone, x)):
                features[id(run)].test[p].append(out.mean((2, 3)))
                if cka:
                    run_grams.append(gram_matrix(out if cka_features == "flat" else out.mean((2, 3))))
            if cka:
                grams[id(run)] = torch.stack(run_grams)
            bar.update(1)
        for key, accumulator in cka.items():
            accumulator.update(grams[key], grams[id(reference)])
    for index in train_batches:
        for run in models:
            x = run.data.train.normalize(run.data.train.images[index])
            for p, out in enumerate(part_outputs(run.backbone, x)):
                features[id(run)].train[p].append(out.mean((2, 3)))
            bar.update(1)
    bar.close()
    if len(map_index):
        for run in models:
            x = run.data.test.normalize(run.data.test.images[map_index])
            features[id(run)].maps = [out.mean(1).cpu() for out in part_outputs(run.backbone, x)]
    return features, cka


def analyze(
    runs: list[LoadedRun],
    reference: LoadedRun | None,
    *,
    test_images: int,
    train_images: int,
    batch_size: int,
    cka_features: str,
    map_images: int,
    device: torch.device,
    progress: bool = True,
) -> dict:
    """Everything but the figures: per-run probe accuracies, CKA matrices and feature maps (tensors)."""
    from tqdm.auto import tqdm

    from fastlocal.analysis.probe import linear_probe

    models = runs + ([reference] if reference is not None and reference not in runs else [])
    test_split, train_split = models[0].data.test, models[0].data.train
    test_index = fixed_subset(test_split.num_images, test_images, device)
    train_index = fixed_subset(train_split.num_images, train_images, device)
    if test_index.numel() < 4:
        raise UserError(f"the test split has {test_split.num_images} images; the analysis needs at least 4")
    same_images(models, test_index, train_index)
    # Evenly spaced over the test subset: a class-sorted split still shows several classes.
    map_index = test_index[torch.linspace(0, len(test_index) - 1, min(map_images, len(test_index))).long()]
    features, cka = extract(models, reference, test_index, train_index, map_index, batch_size, cka_features, progress)

    test_labels, train_labels = test_split.labels[test_index], train_split.labels[train_index]
    num_classes = models[0].data.info.num_classes
    num_parts = len(models[0].backbone.parts)
    bar = tqdm(total=len(models) * num_parts, desc="linear probes", unit="part", disable=not progress)
    results = []
    for run in models:
        accuracies = {"train_acc": [], "test_acc": []}
        for p in range(num_parts):
            probe = linear_probe(
                torch.cat(features[id(run)].train[p]),
                train_labels,
                torch.cat(features[id(run)].test[p]),
                test_labels,
                num_classes,
            )
            accuracies["train_acc"].append(probe.train_acc)
            accuracies["test_acc"].append(probe.test_acc)
            bar.update(1)
        entry = {
            "label": run.label,
            "path": str(run.path),
            "method": run.cfg.method.name,
            "arch": run.cfg.model.arch,
            "num_modules": len(run.modules),
            "modules": run.modules,
            "module_outputs": run.module_outputs,
            "is_reference": run is reference,
            "analysed": run in runs,
            "linear_probe": accuracies,
            "feature_maps": features[id(run)].maps,
        }
        summary = run.path / "summary.json"
        if summary.is_file():
            entry["final_test_acc"] = json.loads(summary.read_text()).get("final_test_acc")
        if id(run) in cka:
            matrix = cka[id(run)].value().cpu()
            entry["cka_with_reference"] = {
                "matrix": matrix.tolist(),
                "diagonal": matrix.diagonal().tolist(),
                "mean_diagonal": matrix.diagonal().mean().item(),
            }
        results.append(entry)
    bar.close()
    return {
        "parts": [info.name for info in models[0].backbone.part_info],
        "settings": {
            "test_images": len(test_index),
            "train_images": len(train_index),
            "batch_size": batch_size,
            "cka_features": cka_features,
            "cka_batches": len(minibatches(test_index, batch_size)),
            "map_images": map_index.tolist(),
            "device": str(device),
            "reference": str(reference.path) if reference is not None else None,
            "dataset": models[0].data.info.name,
        },
        "runs": results,
        "map_inputs": test_split.images[map_index].cpu() if map_images else None,
    }


@exits_2_on_user_error
def main(argv: list[str] | None = None) -> int:
    from fastlocal.build import resolve_device

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = prepare_out_dir(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available; use --device auto or cpu")
    device = resolve_device(args.device)
    start = time.perf_counter()
    data_cache: dict = {}
    runs = [load_run(path, device, data_cache) for path in dict.fromkeys(args.runs)]
    reference = None
    if args.reference:
        same = [run for run in runs if run.path.resolve() == Path(args.reference).resolve()]
        reference = same[0] if same else load_run(args.reference, device, data_cache)
    models = runs + ([reference] if reference is not None and reference not in runs else [])
    check_same_backbone(models)
    disambiguate_labels(models)
    result = analyze(
        runs,
        reference,
        test_images=args.test_images,
        train_images=args.train_images,
        batch_size=args.batch_size,
        cka_features=args.cka_features,
        map_images=args.map_images,
        device=device,
        progress=not args.no_progress,
    )
    figures = write_figures(result, out)
    result["settings"]["seconds"] = time.perf_counter() - start
    write_json(result, figures, out / "analysis.json")
    print(f"wrote {out / 'analysis.json'}" + "".join(f", {out / name}" for name in figures))
    return 0


def write_figures(result: dict, out: Path) -> list[str]:
    """The PNG figures; none, with a message, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(
            "fastlocal.analyze: matplotlib is not installed, so no figures were drawn (analysis.json has "
            "every number); pip install 'fastlocal[analysis]'",
            file=sys.stderr,
        )
        return []
    matplotlib.use("Agg")
    from fastlocal.analysis.figures import draw_all

    return draw_all(result, out)


def write_json(result: dict, figures: list[str], path: Path) -> None:
    runs = [{key: value for key, value in run.items() if key != "feature_maps"} for run in result["runs"]]
    document = {"parts": result["parts"], "settings": result["settings"], "runs": runs, "figures": figures}
    path.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
