"""Turn a pytest-benchmark JSON of the ``bench/`` suite into a Markdown table and PNG plots.

    python -m fastlocal.bench.report RESULTS.json [MORE.json ...] [--out DIR]

writes ``DIR/bench.md`` (one row per training-step case: device, batch, K, median step time, images per
second, peak memory and the ratios of time and memory to BP of the same backbone, batch and input size
in the same file), ``DIR/memory_vs_k.png`` (peak memory relative to BP against K, per method),
``DIR/step_time.png`` (step time relative to BP, per case) and, when the file holds the batch sweep of
``bench/test_bench_memory.py``, ``DIR/memory_vs_batch.png``. The fast path's rows
(``bench/test_bench_fast_path.py``) get their own table, and the kernel benchmarks what they say to ship
(the fastest launch shape of the fused batch norm; the Triton convolution against cuDNN). DIR defaults to
the first JSON file's folder. Several files (say one per pytest invocation) are read as one list of
benchmarks. Every table of the suite (``bench/loaders.py`` and ``bench/fast_path_training.py`` print theirs
too) is written by ``markdown_table``; every ratio to BP is computed by ``ratio``.

Ratios are recomputed here from the medians and peaks of the rows, against the BP row of the same
device, backbone, input size, batch and suite; a case whose BP row is not in the file keeps the ratio
recorded in its ``extra_info`` (measured in the same session by the suite). On CUDA peak memory is
``max_memory_allocated``; on CPU it is the bytes saved for backward at the peak of a step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

MIB = 2**20
GIB = 2**30

# docs/method.md#the-authors-code-measured: one H100, the authors' code, fp32/TF32, batch 1024 at 32x32:
# (arch, method, K) -> (step ms, peak allocated GiB).
AUTHORS_MEASURED = {
    ("resnet32", "bp", 1): (50.4, 2.51),
    ("resnet32", "dgl", 16): (61.7, 0.61),
    ("resnet32", "infopro", 16): (296.9, 1.09),
    ("resnet32", "mlaan", 15): (202.4, 1.81),
    ("resnet110", "bp", 1): (169.8, 8.21),
    ("resnet110", "dgl", 54): (206.2, 0.75),
    ("resnet110", "mlaan", 54): (776.1, 1.92),
}
# The paper's Table 3 (GPU memory in GB, a whole-process reading at batch 1024 for the CIFAR sizes:
# max_memory_reserved plus about 0.44 GiB of CUDA context, docs/method.md#what-the-paper-reports).
PAPER_TABLE3_GB = {
    ("resnet32", "bp", 1): 3.37,
    ("resnet32", "mlaan", 15): 2.62,
    ("resnet110", "bp", 1): 9.26,
    ("resnet110", "mlaan", 54): 2.76,
}
PAPER_BATCH = 1024
# extra_info["suite"] of the rows bench/test_bench_steps.py and bench/test_bench_memory.py write; other
# benchmarks in the file (kernels, loaders) are listed apart.
STEP_SUITE, SWEEP_SUITE, FAST_PATH_SUITE = "fastlocal-steps", "fastlocal-memory-sweep", "fastlocal-fast-path"
# The memory options (system.recompute, system.fused_optimizer_step) are labels of their own: mlaan-all etc.
MLAAN_OPTIONS = ("mlaan-heads", "mlaan-modules", "mlaan-all", "mlaan-lowest")
METHOD_ORDER = ("bp", "bp-checkpoint", "bp-bf16", "dgl", "infopro", "mlaan", *MLAAN_OPTIONS, "dgl+mlaan")
LOCAL_METHODS = ("dgl", "infopro", "mlaan", "dgl+mlaan")
METHOD_COLORS = {
    "bp": "C7",
    "bp-checkpoint": "C7",
    "bp-bf16": "C7",
    "dgl": "C0",
    "infopro": "C1",
    "mlaan": "C2",
    "mlaan-heads": "C4",
    "mlaan-modules": "C5",
    "mlaan-all": "C6",
    "mlaan-lowest": "C8",
    "dgl+mlaan": "C3",
}
# Backbones in the order a reader expects (small CIFAR nets first, then ImageNet ones).
ARCH_ORDER = (
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
)


def ratio(value: float | None, reference: float | None) -> float | None:
    """`value` / `reference` to four decimals, or None when either is missing or the reference is 0: every
    ratio to BP (or to a default) that the suite records or this report prints."""
    if value is None or not reference:
        return None
    return round(value / reference, 4)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table; cells are written with str()."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


class ReportError(Exception):
    """A problem with the input file or the environment, reported without a traceback."""


@dataclass
class Row:
    name: str
    case: str
    method: str
    arch: str
    input_size: int
    batch: int
    num_modules: int
    device: str
    device_type: str
    sweep: bool
    median_s: float
    peak_bytes: int
    reserved_bytes: int | None
    process_bytes: int | None
    time_ratio: float | None
    memory_ratio: float | None
    ratio_source: str

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median_s if self.median_s else math.nan

    @property
    def bp_key(self) -> tuple:
        return (self.device, self.arch, self.input_size, self.batch, self.sweep)


def load_results(path: Path) -> dict:
    """The parsed pytest-benchmark JSON, or a ReportError that says what is wrong with the file."""
    if not path.is_file():
        raise ReportError(
            f"{path}: no such file; write one with pytest bench/ --benchmark-only --benchmark-json={path}"
        )
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not a text file; expected the JSON of pytest --benchmark-json") from None
    except json.JSONDecodeError as err:
        raise ReportError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "expected the file written by pytest --benchmark-json"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f"{path} is not a pytest-benchmark JSON: it has no 'benchmarks' list")
    if not data["benchmarks"]:
        raise ReportError(f"{path} holds no benchmarks (a run with --benchmark-disable records none)")
    return data


def _number(value, what: str, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ReportError(f"benchmark {name!r}: {what} is {value!r}, not a number")
    return float(value)


def parse_rows(data: dict) -> tuple[list[Row], list[dict]]:
    """Step and sweep cases (extra_info["suite"] names one of ours), and the other benchmarks."""
    rows, others = [], []
    for bench in data["benchmarks"]:
        if not isinstance(bench, dict):
            raise ReportError(f"a benchmark entry is {type(bench).__name__}, not an object")
        name = str(bench.get("name", "?"))
        info = bench.get("extra_info") or {}
        stats = bench.get("stats") or {}
        if not isinstance(info, dict) or info.get("suite") not in (STEP_SUITE, SWEEP_SUITE):
            if not isinstance(info, dict) or info.get("suite") != FAST_PATH_SUITE:  # that one has its own table
                others.append(bench)
            continue
        memory = info.get("memory") or {}
        try:
            rows.append(
                Row(
                    name=name,
                    case=str(info["case"]),
                    method=str(info["method"]),
                    arch=str(info["arch"]),
                    input_size=int(info["input_size"]),
                    batch=int(info["batch"]),
                    num_modules=int(info["K"]),
                    device=str(info.get("device", "?")),
                    device_type=str(info.get("device_type", "?")),
                    sweep=info["suite"] == SWEEP_SUITE,
                    median_s=_number(stats.get("median"), "stats.median", name),
                    peak_bytes=int(_number(info.get("peak_memory_bytes"), "extra_info.peak_memory_bytes", name)),
                    reserved_bytes=memory.get("max_reserved_bytes"),
                    process_bytes=memory.get("process_total_bytes") or memory.get("device_used_bytes"),
                    time_ratio=info.get("time_ratio_vs_bp"),
                    memory_ratio=info.get("memory_ratio_vs_bp"),
                    ratio_source="session",
                )
            )
        except KeyError as err:
            raise ReportError(f"benchmark {name!r}: extra_info lacks {err.args[0]!r}") from None
    return rows, others


def add_ratios(rows: list[Row]) -> None:
    """Time and memory of each row over those of the BP row of the same device, backbone, input size,
    batch and suite in the file; rows without such a BP row keep the ratios their session recorded."""
    bp_rows = {row.bp_key: row for row in rows if row.method == "bp"}
    for row in rows:
        bp = bp_rows.get(row.bp_key)
        if bp is None:
            continue
        row.time_ratio = ratio(row.median_s, bp.median_s)
        row.memory_ratio = ratio(row.peak_bytes, bp.peak_bytes)
        row.ratio_source = "file"


def _rank(value: str, order: tuple[str, ...]) -> int:
    return order.index(value) if value in order else len(order)


def _sort_key(row: Row) -> tuple:
    return (
        row.device,
        row.sweep,
        _rank(row.arch, ARCH_ORDER),
        row.arch,
        row.input_size,
        row.batch,
        _rank(row.method, METHOD_ORDER),
        row.num_modules,
    )


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------


def fmt_mib(num_bytes: float | None) -> str:
    if num_bytes is None:
        return "-"
    mib = num_bytes / MIB
    return f"{mib:.2f}" if mib < 10 else f"{mib:.1f}" if mib < 1000 else f"{mib:.0f}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None or not math.isfinite(ratio):
        return "-"
    return f"{ratio:.3f}" if ratio < 0.1 else f"{ratio:.2f}"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_rate(rate: float) -> str:
    return "-" if not math.isfinite(rate) else f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"


def _case_name(row: Row) -> str:
    return f"{row.arch} {row.method}" + (f" {row.input_size}px" if row.input_size != 32 else "")


def step_table(rows: list[Row]) -> list[str]:
    cuda = any(row.device_type == "cuda" for row in rows)
    header = ["case", "device", "batch", "K", "median step ms", "images/s", "peak MiB"]
    if cuda:
        header += ["reserved MiB", "process MiB"]
    header += ["time vs BP", "memory vs BP"]
    cells = []
    for row in rows:
        line = [
            _case_name(row),
            row.device,
            row.batch,
            row.num_modules,
            fmt_ms(row.median_s),
            fmt_rate(row.images_per_second),
            fmt_mib(row.peak_bytes),
        ]
        if cuda:
            line += [fmt_mib(row.reserved_bytes), fmt_mib(row.process_bytes)]
        cells.append(line + [fmt_ratio(row.time_ratio), fmt_ratio(row.memory_ratio)])
    return markdown_table(header, cells)


def paper_comparison(rows: list[Row]) -> list[str]:
    """Rows at the paper's batch on CUDA beside the authors' measured step and the paper's Table 3."""
    picked = [
        row
        for row in rows
        if row.device_type == "cuda"
        and row.batch == PAPER_BATCH
        and not row.sweep
        and (row.arch, row.method, row.num_modules) in AUTHORS_MEASURED.keys() | PAPER_TABLE3_GB.keys()
    ]
    if not picked:
        return []
    lines = [
        "## Against the paper's Table 3 and the authors' code, measured",
        "",
        "Authors: their code on one H100 (PyTorch 2.11, fp32/TF32, batch 1024). Table 3: the "
        "paper's GPU memory, a whole-process reading (about max_memory_reserved + 0.44 GiB of CUDA context), "
        "so compare it with the process column.",
        "",
        "| case | K | step ms | authors' step ms | allocated GiB | authors' allocated GiB | reserved GiB "
        "| process GiB | Table 3 GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in picked:
        key = (row.arch, row.method, row.num_modules)
        ref_ms, ref_gib = AUTHORS_MEASURED.get(key, (None, None))
        paper = PAPER_TABLE3_GB.get(key)

        def gib(value):
            return "-" if value is None else f"{value / GIB:.2f}"

        lines.append(
            " | ".join(
                [
                    f"| {_case_name(row)}",
                    str(row.num_modules),
                    fmt_ms(row.median_s),
                    "-" if ref_ms is None else f"{ref_ms:g}",
                    gib(row.peak_bytes),
                    "-" if ref_gib is None else f"{ref_gib:g}",
                    gib(row.reserved_bytes),
                    gib(row.process_bytes),
                    "-" if paper is None else f"{paper:g}",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "The paper's ImageNet cells (ResNet-34 BP 10.74 GB vs MLAAN 9.09) were taken at its training "
        "batch, not at this suite's small ImageNet batch, so they are not set beside it.",
        "",
    ]
    return lines


def other_table(others: list[dict]) -> list[str]:
    if not others:
        return []
    cells = [
        [
            bench.get("name", "?"),
            bench.get("group") or "-",
            fmt_duration((bench.get("stats") or {}).get("median")),
            fmt_duration((bench.get("stats") or {}).get("iqr")),
            (bench.get("stats") or {}).get("rounds", "-"),
        ]
        for bench in others
    ]
    return [
        "## Other benchmarks in the file",
        "",
        *markdown_table(["benchmark", "group", "median", "IQR", "rounds"], cells),
        "",
    ]


def fast_path_table(benchmarks: list[dict]) -> list[str]:
    """The rows of bench/test_bench_fast_path.py: each variant's step time and its ratios."""
    infos = [b["extra_info"] for b in benchmarks if (b.get("extra_info") or {}).get("suite") == FAST_PATH_SUITE]
    if not infos:
        return []
    keys = (
        "median_step_ms",
        "time_ratio_vs_fastest_bp",
        "time_ratio_vs_bp_graph",
        "speedup_vs_authors",
        "memory_ratio_vs_bp_same_precision",
    )
    cells = [[info["case"], *("-" if info.get(key) is None else info[key] for key in keys)] for info in infos]
    header = [
        "case",
        "ms",
        "vs fastest BP",
        "vs BP bf16-cl-graph",
        "speed-up vs authors",
        "memory vs BP (same precision)",
    ]
    return ["## Fast path", "", *markdown_table(header, cells), ""]


def _median_us(bench: dict) -> float:
    return bench["stats"]["median"] * 1e6


def kernel_choices(benchmarks: list[dict]) -> list[str]:
    """What the kernel benchmarks say to ship: per batch-norm shape the fastest launch shape against the
    shipped default, and per convolution shape the fastest Triton tile against cuDNN (medians; only a GPU
    run means anything)."""
    by_shape: dict[str, dict[str, float]] = defaultdict(dict)
    conv: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for bench in benchmarks:
        info = bench.get("extra_info") or {}
        if "launch_shape" in info:
            by_shape[info["shape"]][info["launch_shape"]] = _median_us(bench)
        elif "conv_pixels" in info:
            name = "cudnn" if info["implementation"] == "eager" else f"triton-{info['conv_pixels']}"
            conv[(info["shape"], info["timing"])][name] = _median_us(bench)
    lines = []
    if by_shape:
        cells = []
        for shape, times in sorted(by_shape.items()):
            best, best_us = min(times.items(), key=lambda kv: kv[1])
            default = times.get("default")
            cells.append(
                [
                    shape,
                    f"{default:.1f}" if default else "?",
                    best,
                    f"{best_us:.1f}",
                    f"{ratio(default, best_us):.2f}" if default else "?",
                ]
            )
        header = ["batch norm shape", "shipped default us", "fastest launch shape", "its us", "default / fastest"]
        lines += ["## Kernel launch shapes", "", *markdown_table(header, cells), ""]
    cells = []
    for (shape, timing), times in sorted(conv.items()):
        triton_times = {k: v for k, v in times.items() if k.startswith("triton")}
        if "cudnn" in times and triton_times:
            tile, best_us = min(triton_times.items(), key=lambda kv: kv[1])
            cells.append(
                [
                    shape,
                    timing,
                    f"{times['cudnn']:.1f}",
                    f"{tile.removeprefix('triton-')} pixels",
                    f"{best_us:.1f}",
                    f"{ratio(times['cudnn'], best_us):.2f}",
                ]
            )
    if cells:
        header = ["convolution shape", "timing", "cuDNN us", "fastest Triton tile", "its us", "cuDNN / Triton"]
        lines += ["## Triton convolution against cuDNN", "", *markdown_table(header, cells), ""]
    return lines


def fmt_duration(seconds) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _machine_lines(data: dict, json_name: str) -> list[str]:
    """Devices and versions as every benchmark records them (bench/common.py's `environment`)."""
    infos = [b.get("extra_info") or {} for b in data["benchmarks"]]
    devices = sorted({str(info["device"]) for info in infos if "device" in info})
    versions = sorted(
        {(info.get("torch"), info.get("triton"), info.get("mode")) for info in infos if "torch" in info}, key=str
    )
    machine = data.get("machine_info") or {}
    lines = [f"- Device: {', '.join(devices) or '-'}"]
    for torch_version, triton_version, mode in versions:
        lines.append(f"- torch {torch_version}, triton {triton_version or 'not installed'}, size mode `{mode}`")
    if machine:
        lines.append(
            f"- Host: {machine.get('node', '?')}, {machine.get('system', '?')} {machine.get('release', '')}, "
            f"Python {machine.get('python_version', '?')}"
        )
    if data.get("datetime"):
        lines.append(f"- Run: {data['datetime']}")
    lines.append(f"- Report: `python -m fastlocal.bench.report {json_name}`")
    return lines


def markdown(data: dict, rows: list[Row], others: list[dict], json_name: str) -> str:
    steps = [row for row in rows if not row.sweep]
    sweep = [row for row in rows if row.sweep]
    cpu = any(row.device_type == "cpu" for row in rows)
    lines = ["# fastlocal: training-step time and memory against BP", ""]
    lines += _machine_lines(data, json_name) + [""]
    lines += (
        []
        if not rows
        else [
            "A step is `optimizer.zero_grad`, `local_train_step` (forward and backward of the local schedule) and "
            "`optimizer.step` on a random batch already on the device; the time is the median of the timed rounds, "
            "device synchronised. Peak memory: "
            + (
                "on CPU, the bytes of tensors saved for backward alive at the peak of one step "
                "(`fastlocal.measure.SavedTensorAccountant`, parameters not counted); "
                if cpu
                else ""
            )
            + "on CUDA, `max_memory_allocated` of one step (reserved and the NVML process total beside it). "
            "Ratios are to BP at the same backbone, input size and batch, in the same run. `bp-checkpoint` is BP "
            "with `system.recompute=modules` (per-block checkpointing: each block keeps its input and "
            "recomputes its forward in the backward); `bp-bf16` runs BP under bf16 autocast.",
            "",
        ]
    )
    if steps:
        lines += ["## Training step, per method, backbone and K", ""] + step_table(steps) + [""]
    if sweep:
        lines += ["## Peak memory across batch sizes (ResNet-110, K=54)", ""] + step_table(sweep) + [""]
    lines += paper_comparison(rows)
    lines += fast_path_table(data["benchmarks"])
    lines += kernel_choices(data["benchmarks"])
    lines += other_table(others)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("the plots need matplotlib: pip install 'fastlocal[analysis]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, title: str | None = None) -> None:
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_axes(ax, xticks: list[int]) -> None:
    """Log-log axes labelled with plain numbers (K or batch on x, ratios or MiB on y)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    spaced = []
    for x in xticks:  # K = 15 and 16 side by side would print on top of each other
        if not spaced or x >= 1.25 * spaced[-1]:
            spaced.append(x)
    if spaced:
        ax.set_xticks(spaced, [str(x) for x in spaced])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    # Label the 2s and 5s between decades too: memory ratios often span less than one decade.
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))


def _panels(rows: list[Row]) -> dict[tuple, list[Row]]:
    panels: dict[tuple, list[Row]] = {}
    for row in rows:
        panels.setdefault((row.device, row.arch, row.input_size, row.batch), []).append(row)
    return panels


def _title(key: tuple) -> str:
    device, arch, input_size, batch = key
    return f"{arch} {input_size}px, batch {batch}\n{device}"


def plot_memory_vs_k(rows: list[Row], path: Path) -> None:
    plt = _pyplot()
    panels = _panels([row for row in rows if not row.sweep])
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, (key, panel) in zip(axes[0], panels.items()):
        for method in LOCAL_METHODS:
            points = sorted(
                (row.num_modules, row.memory_ratio)
                for row in panel
                if row.method == method and row.memory_ratio is not None
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=method, color=METHOD_COLORS[method])
        for method, style in (("bp", "-"), ("bp-checkpoint", "--"), ("bp-bf16", ":")):
            for row in panel:
                if row.method == method and row.memory_ratio is not None:
                    ax.axhline(
                        row.memory_ratio,
                        color="grey",
                        linestyle=style,
                        linewidth=1,
                        label=f"{method} ({fmt_ratio(row.memory_ratio)})",
                    )
        _log_axes(ax, sorted({row.num_modules for row in panel if row.method in LOCAL_METHODS}))
        ax.set_xlabel("K (local modules)")
        ax.set_ylabel("peak memory / BP")
        ax.set_title(_title(key), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path, "Peak memory of a training step relative to BP")


def plot_step_time(rows: list[Row], path: Path) -> None:
    plt = _pyplot()
    panels = _panels([row for row in rows if not row.sweep])
    height = max(3.0, 0.28 * max((len(p) for p in panels.values()), default=1) + 1.2)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), height), squeeze=False)
    for ax, (key, panel) in zip(axes[0], panels.items()):
        panel = [row for row in panel if row.time_ratio is not None]
        labels = [f"{row.method} K={row.num_modules}" for row in panel]
        ratios = [row.time_ratio for row in panel]
        bars = ax.barh(range(len(panel)), ratios, color=[METHOD_COLORS.get(row.method, "C0") for row in panel])
        for bar, row in zip(bars, panel):
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {fmt_ms(row.median_s)} ms",
                va="center",
                fontsize=7,
            )
        ax.set_yticks(range(len(panel)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xlabel("step time / BP")
        ax.set_xlim(0, max(ratios, default=1) * 1.3)
        ax.set_title(_title(key), fontsize=9)
    _save(plt, fig, path, "Training-step time relative to BP (median)")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (time, memory) points no other point beats in both, by increasing time."""
    front: list[tuple[float, float]] = []
    for time_ratio, memory_ratio in sorted(points):
        if not front or memory_ratio < front[-1][1]:
            front.append((time_ratio, memory_ratio))
    return front


def plot_time_vs_memory(rows: list[Row], path: Path) -> None:
    """Per backbone: one point per method, K and memory option (step time and peak memory, both / BP), and the
    Pareto front through them."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    panels = _panels([row for row in rows if not row.sweep])
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.6 * max(1, len(panels)), 4.6), squeeze=False)
    for ax, (key, panel) in zip(axes[0], panels.items()):
        panel = [row for row in panel if row.time_ratio is not None and row.memory_ratio is not None]
        placed: list[tuple[float, float]] = []
        for row in sorted(panel, key=lambda r: (r.time_ratio, r.memory_ratio)):
            ax.scatter(row.time_ratio, row.memory_ratio, color=METHOD_COLORS.get(row.method, "C9"), s=18, zorder=3)
            label = row.method if row.method.startswith("bp") else f"{row.method} K={row.num_modules}"
            # Options with the same memory and nearly the same time (recompute=all and lowest) would print
            # their labels on top of each other: each such label goes one line lower.
            near = sum(
                abs(math.log(t / row.time_ratio)) < 0.4 and abs(math.log(m / row.memory_ratio)) < 0.05
                for t, m in placed
            )
            placed.append((row.time_ratio, row.memory_ratio))
            ax.annotate(
                label,
                (row.time_ratio, row.memory_ratio),
                fontsize=6,
                xytext=(3, 2 - 8 * near),
                textcoords="offset points",
            )
        front = pareto_front([(row.time_ratio, row.memory_ratio) for row in panel])
        if front:
            ax.step(*zip(*front), where="post", color="black", linewidth=1, label="Pareto front")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers (2, 0.3), not 2x10^0 printed over each other
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "235" else ""))
        ax.set_xlabel("step time / BP")
        ax.set_ylabel("peak memory / BP")
        ax.set_title(_title(key), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    _save(plt, fig, path, "Time against memory of a training step, relative to BP")


def plot_memory_vs_batch(rows: list[Row], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for method in METHOD_ORDER:
        points = sorted((row.batch, row.peak_bytes / MIB) for row in rows if row.method == method)
        if points:
            ax.plot(*zip(*points), marker="o", label=method, color=METHOD_COLORS[method])
    _log_axes(ax, sorted({row.batch for row in rows}))
    ax.set_xlabel("batch")
    ax.set_ylabel("peak memory (MiB)")
    devices = sorted({row.device for row in rows})
    ax.set_title(f"ResNet-110, K=54: peak memory vs batch\n{', '.join(devices)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def merge_results(paths: list[Path]) -> dict:
    """One pytest-benchmark document from several: the benchmarks of all, the machine of the first."""
    documents = [load_results(path) for path in paths]
    merged = dict(documents[0])
    merged["benchmarks"] = [bench for doc in documents for bench in doc["benchmarks"]]
    return merged


def write_report(json_paths: Path | list[Path], out_dir: Path, plots: bool = True) -> list[Path]:
    """Write bench.md and (with `plots`) the plots of the JSON file(s) into `out_dir`; return the paths."""
    paths = [json_paths] if isinstance(json_paths, Path) else list(json_paths)
    data = merge_results(paths)
    rows, others = parse_rows(data)
    add_ratios(rows)
    rows.sort(key=_sort_key)
    plots = plots and bool(rows)
    if plots:
        _pyplot()  # fail before writing anything when the plots cannot be made
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create the output folder {out_dir}: {err.strerror}") from None
    written = [out_dir / "bench.md"]
    written[0].write_text(markdown(data, rows, others, " ".join(path.name for path in paths)))
    if plots:
        plot_memory_vs_k(rows, out_dir / "memory_vs_k.png")
        plot_step_time(rows, out_dir / "step_time.png")
        plot_time_vs_memory(rows, out_dir / "time_vs_memory.png")
        written += [out_dir / "memory_vs_k.png", out_dir / "step_time.png", out_dir / "time_vs_memory.png"]
        sweep = [row for row in rows if row.sweep]
        if sweep:
            plot_memory_vs_batch(sweep, out_dir / "memory_vs_batch.png")
            written.append(out_dir / "memory_vs_batch.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlocal.bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results",
        type=Path,
        nargs="+",
        help="the JSON written by pytest bench/ --benchmark-json=FILE (several are merged)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first JSON's folder)")
    parser.add_argument("--no-plots", action="store_true", help="write only bench.md (no matplotlib needed)")
    args = parser.parse_args(argv)
    out_dir = args.out if args.out is not None else args.results[0].parent
    try:
        written = write_report(args.results, out_dir, plots=not args.no_plots)
    except ReportError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
