"""Sweeps: every config x seed as an ordinary run directory of `python -m fastlocal.train`.

The run of config C with seed S is OUT/<C's file stem>/seed<S>, trained by the train CLI in a subprocess
(`--config C --system.seed=S --out DIR`, the sweep's overrides added). A finished run (summary.json) is
skipped, an interrupted one (a checkpoint, no summary.json) continues with `--resume DIR`, so running the
same sweep again completes it. With several GPUs, one run per GPU at a time (CUDA_VISIBLE_DEVICES names
it); otherwise one run at a time. The runs are independent processes, so the same list also runs as a
cluster job array, one run per array task (docs/reproduce.md#sweeps-and-seeds).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastlocal.config import Config, UserError, build_config, to_dict
from fastlocal.runs import read_config, read_summary, run_state

LOG_NAME = "train.log"
"""The train CLI's output of a sweep's run, in its run directory (appended to by a resume)."""
# Overrides a resume accepts (fastlocal.config.resume_config): passed on to --resume commands.
RESUME_PREFIXES = ("log.", "data.cache_dir=")


@dataclass
class SweepRun:
    """One config x seed of a sweep."""

    config: Path
    seed: int
    out: Path
    overrides: list[str]
    """The sweep's section.key=value overrides (system.seed not among them)."""

    @property
    def name(self) -> str:
        return f"{self.config.stem} seed {self.seed}"

    def state(self) -> str:
        return run_state(self.out)

    def command(self) -> list[str] | None:
        """The train CLI command that finishes this run (None when it is finished)."""
        train = [sys.executable, "-m", "fastlocal.train"]
        state = self.state()
        if state == "finished":
            return None
        if state == "interrupted":
            kept = [f"--{o}" for o in self.overrides if o.startswith(RESUME_PREFIXES)]
            return [*train, "--resume", str(self.out), *kept]
        options = [f"--{o}" for o in self.overrides]
        return [*train, "--config", str(self.config), *options, f"--system.seed={self.seed}", "--out", str(self.out)]


def comparable(cfg: Config) -> dict:
    """The config without what may differ between two runs of the same experiment (logging, the cache)."""
    values = to_dict(cfg)
    values.pop("log")
    values["data"].pop("cache_dir")
    return values


def config_differences(saved: Config, wanted: Config) -> list[str]:
    """'section.key: saved X, sweep Y' for every field that differs."""
    before, after = comparable(saved), comparable(wanted)
    return [
        f"{section}.{key}: {before[section][key]!r} in the run, {after[section][key]!r} in the sweep"
        for section in after
        for key in after[section]
        if before[section][key] != after[section][key]
    ]


def plan_sweep(configs: list[str], seeds: list[int], out: str | Path, overrides: list[str]) -> list[SweepRun]:
    """The sweep's runs, config-major; every config validated with every seed first, and every run directory
    that already holds a run checked to hold this config's run."""
    from fastlocal.methods import METHODS

    if any(o.startswith("system.seed=") for o in overrides):
        raise UserError("--system.seed is set by --seeds in a sweep; drop it and list the seeds in --seeds")
    paths = [Path(c) for c in configs]
    for path in paths:
        if not path.is_file():
            raise UserError(
                f"config {path} does not exist; pass TOML files such as configs/dgl_resnet32_k8_cifar10.toml"
            )
    stems = [p.stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise UserError(
            f"configs named {', '.join(twice)} appear twice: a run's directory is OUT/<config name>/seed<N>, so "
            "config file names must differ; list each config once (or rename a copy)"
        )
    if not seeds:
        raise UserError("--seeds is empty; give seeds such as --seeds 0,1,2")
    runs = []
    for path in paths:
        for seed in seeds:
            wanted = build_config(path, [*overrides, f"system.seed={seed}"], METHODS)
            run = SweepRun(path, seed, Path(out) / path.stem / f"seed{seed}", list(overrides))
            if run.state() != "new":
                differences = config_differences(read_config(run.out), wanted)
                if differences:
                    raise UserError(
                        f"{run.out} already holds a run of another config ({'; '.join(differences[:5])}); give "
                        "the sweep the options that run was started with, or another --out (or remove that run)"
                    )
            runs.append(run)
    return runs


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-2' -> [0, 1, 2]."""
    try:
        if "-" in text.strip().lstrip("-") and "," not in text:
            first, last = (int(v) for v in text.split("-", 1))
            return list(range(first, last + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--seeds {text}: give integers separated by commas (0,1,2) or a range (0-2)") from None


def local_gpus(setting: str) -> list[str]:
    """The GPUs to run on: 'auto' (those CUDA_VISIBLE_DEVICES shows, else every GPU torch sees), 'none', or
    a list '0,1'. An empty list means the CPU, one run at a time."""
    if setting == "none":
        return []
    if setting != "auto":
        return [g.strip() for g in setting.split(",") if g.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class Outcome:
    run: SweepRun
    code: int
    seconds: float


def run_sweep(runs: list[SweepRun], gpus: list[str], log=print) -> list[Outcome]:
    """Train every run that is not finished: one run per GPU at a time, or one at a time on the CPU. Returns
    what each started run's process did. SIGINT/SIGTERM stop the running runs after their current step
    (each keeps its last checkpoint) and start no more."""
    todo = [run for run in runs if run.state() != "finished"]
    for run in runs:
        if run not in todo:
            log(f"skip {run.name}: finished ({run.out})")
    if not todo:
        return []
    jobs: queue.Queue = queue.Queue()
    for index, run in enumerate(todo, 1):
        jobs.put((index, run))
    slots = gpus or [None]
    echo = len(slots) == 1  # one run at a time: its output goes to the terminal too
    outcomes: list[Outcome] = []
    running: dict[str, subprocess.Popen] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def worker(gpu: str | None) -> None:
        while not stop.is_set():
            try:
                index, run = jobs.get_nowait()
            except queue.Empty:
                return
            command = run.command()
            if command is None:  # finished meanwhile (another sweep on the same folder)
                continue
            where = f"GPU {gpu}" if gpu is not None else "the CPU" if not gpus else "the device"
            action = "resume" if "--resume" in command else "start"
            # The child imports the fastlocal this sweep runs (a source checkout as much as an installed one).
            package_root = str(Path(__file__).resolve().parents[1])
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
            }
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            run.out.mkdir(parents=True, exist_ok=True)
            log(f"[{index}/{len(todo)}] {action} {run.name} on {where}: {run.out} (log: {run.out / LOG_NAME})")
            start = time.perf_counter()
            with (run.out / LOG_NAME).open("a") as log_file:
                log_file.write(f"# sweep: on {where} (CUDA_VISIBLE_DEVICES={gpu})\n" if gpu is not None else "")
                log_file.write("$ " + " ".join(command) + "\n")
                log_file.flush()
                # A session of its own: a Ctrl-C in the terminal reaches the sweep, which passes it on once.
                process = subprocess.Popen(
                    command,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
                with lock:
                    running[run.name] = process
                for line in process.stdout:
                    log_file.write(line)
                    log_file.flush()
                    if echo:
                        sys.stdout.write("    " + line)
                        sys.stdout.flush()
                code = process.wait()
            with lock:
                running.pop(run.name)
                outcomes.append(Outcome(run, code, time.perf_counter() - start))
            minutes = (time.perf_counter() - start) / 60
            if code == 0:
                summary = read_summary(run.out) or {}
                accuracy = summary.get("final_test_acc")
                said = f"final test accuracy {accuracy:.2f}%" if accuracy is not None else "done"
                log(f"[{index}/{len(todo)}] {run.name}: {said} ({minutes:.1f} min)")
            else:
                failed = f"FAILED (exit {code}) after {minutes:.1f} min; see {run.out / LOG_NAME}"
                log(f"[{index}/{len(todo)}] {run.name}: {failed}")

    def forward(signum, frame) -> None:
        stop.set()
        with lock:
            for process in running.values():
                process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        threads = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in slots]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop.is_set():
        raise KeyboardInterrupt
    return outcomes


def describe_runs(runs: list[SweepRun]) -> str:
    """One line per run: its number (the job-array task), state, directory and the command that finishes it."""
    lines = []
    for index, run in enumerate(runs, 1):
        command = run.command()
        shown = "(finished)" if command is None else " ".join([Path(command[0]).name, *command[1:]])
        lines.append(f"{index}\t{run.state()}\t{run.out}\t{shown}")
    return "\n".join(lines)
