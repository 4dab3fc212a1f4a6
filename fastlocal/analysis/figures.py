"""The analysis figures (matplotlib, which the caller has imported and set to the Agg backend).

Each run's module outputs (the parts where a gradient-isolated module ends) are marked: filled markers on
its curves, white lines on its CKA heatmap, a bold title on its feature maps.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

MAX_MAP_COLUMNS = 12
"""At most this many parts shown as feature maps (evenly spaced over the module outputs of all runs)."""


def run_title(run: dict) -> str:
    return f"{run['label']} ({run['method']}, K={run['num_modules']})"


def draw_all(result: dict, out: Path) -> list[str]:
    """Writes the figures into `out`; returns their file names."""
    names = [linear_separability(result, out / "linear_separability.png")]
    if any("cka_with_reference" in run for run in result["runs"]):
        names.append(cka_figure(result, out / "cka.png"))
    if result["settings"]["map_images"]:
        names.append(feature_maps(result, out / "feature_maps.png"))
    return names


def linear_separability(result: dict, path: Path) -> str:
    parts = result["parts"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(parts) + 2), 4))
    positions = np.arange(len(parts))
    for run in result["runs"]:
        accuracy = np.array(run["linear_probe"]["test_acc"])
        (line,) = ax.plot(positions, accuracy, label=run_title(run), lw=1.5)
        ends = run["module_outputs"]
        ax.plot(positions[ends], accuracy[ends], "o", color=line.get_color(), ms=5)
    settings = result["settings"]
    ax.set_xticks(positions, parts, rotation=90, fontsize=7)
    ax.set_xlabel("backbone part (filled markers: module outputs)")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_title(
        f"Layer-wise linear separability ({settings['train_images']} train / {settings['test_images']} test images)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def cka_figure(result: dict, path: Path) -> str:
    parts = result["parts"]
    compared = [run for run in result["runs"] if "cka_with_reference" in run]
    reference = next(run for run in result["runs"] if run["is_reference"])
    fig, axes = plt.subplots(
        1,
        len(compared) + 1,
        figsize=(4.2 * len(compared) + 5, 4.2),
        layout="constrained",
        gridspec_kw={"width_ratios": [1] * len(compared) + [1.3]},
    )
    ticks = np.arange(len(parts))
    image = None
    for ax, run in zip(axes, compared):
        matrix = np.array(run["cka_with_reference"]["matrix"])
        image = ax.imshow(matrix, origin="lower", vmin=0, vmax=1, cmap="magma")
        for end in run["module_outputs"][:-1]:
            ax.axhline(end + 0.5, color="white", lw=0.6)
        for end in reference["module_outputs"][:-1]:
            ax.axvline(end + 0.5, color="white", lw=0.6)
        ax.set_xticks(ticks, parts, rotation=90, fontsize=5)
        ax.set_yticks(ticks, parts, fontsize=5)
        ax.set_xlabel(f"{reference['label']} part", fontsize=8)
        ax.set_ylabel(f"{run['label']} part", fontsize=8)
        ax.set_title(run_title(run), fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[len(compared) - 1], fraction=0.05, label="linear CKA")
    ax = axes[-1]
    for run in compared:
        diagonal = np.array(run["cka_with_reference"]["diagonal"])
        mean = run["cka_with_reference"]["mean_diagonal"]
        (line,) = ax.plot(ticks, diagonal, label=f"{run['label']}: mean {mean:.3f}", lw=1.5)
        ends = run["module_outputs"]
        ax.plot(ticks[ends], diagonal[ends], "o", color=line.get_color(), ms=4)
    ax.set_xticks(ticks, parts, rotation=90, fontsize=6)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"CKA with {reference['label']}, same part")
    ax.set_title(
        f"Same-part CKA ({result['settings']['cka_features']} features, "
        f"{result['settings']['test_images']} test images)",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def map_columns(result: dict) -> list[int]:
    """The parts shown: every module output of any run, at most MAX_MAP_COLUMNS of them, evenly spaced."""
    ends = sorted({p for run in result["runs"] for p in run["module_outputs"]})
    if len(ends) > MAX_MAP_COLUMNS:
        ends = [ends[round(i)] for i in np.linspace(0, len(ends) - 1, MAX_MAP_COLUMNS)]
    return ends


def feature_maps(result: dict, path: Path) -> str:
    parts, runs = result["parts"], result["runs"]
    columns = map_columns(result)
    inputs = result["map_inputs"].permute(0, 2, 3, 1).numpy()  # uint8 (M, H, W, 3)
    rows = [(m, run) for m in range(len(inputs)) for run in runs]
    fig, axes = plt.subplots(
        len(rows), len(columns) + 1, squeeze=False, figsize=(1.2 * (len(columns) + 1) + 1.5, 1.25 * len(rows))
    )
    for r, (m, run) in enumerate(rows):
        axes[r, 0].imshow(inputs[m])
        axes[r, 0].set_ylabel(
            f"{run['label']}\nK={run['num_modules']}", fontsize=6, rotation=0, ha="right", va="center"
        )
        for c, p in enumerate(columns):
            ax = axes[r, c + 1]
            ax.imshow(run["feature_maps"][p][m].numpy(), cmap="viridis")
            if r == 0:
                ax.set_title(parts[p], fontsize=7)
            if p in run["module_outputs"]:  # a module output of this run: framed
                for spine in ax.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(1.5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Channel-mean activation maps per part (red frame: an output of the run's own modules)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
