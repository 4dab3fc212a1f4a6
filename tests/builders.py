"""Shared test builders: a backbone, its split and a method from a few config overrides; CLI runs; gloo ranks."""

import json
import multiprocessing
import os
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import torch

from fastlocal.config import build_config
from fastlocal.methods import METHODS, build_method
from fastlocal.models import build_backbone
from fastlocal.parallel import group as process_group
from fastlocal.split import split_backbone

# The CLI arguments of a run that trains in seconds on the bundled subset (the CLI tests' base).
TINY_RUN = [
    "--data.source=bundled",
    "--data.max_train=100",
    "--data.max_test=50",
    "--model.arch=resnet20",
    "--train.batch_size=25",
    "--train.eval_batch_size=50",
    "--log.progress=false",
    "--system.num_threads=1",
]


def torchrun_tiny_run(out, *extra: str, processes: int = 2) -> list[str]:
    """`torchrun --standalone --nproc_per_node=2 -m fastlocal.train` of a tiny MLAAN K=3 run on the bundled
    subset (CPU, one thread each), with `extra` arguments, writing `out`."""
    import sys

    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"),
        *("-m", "fastlocal.train", "--data.source=bundled", "--data.max_train=40", "--data.max_test=20"),
        *("--model.arch=resnet20", "--method.name=mlaan", "--method.num_modules=3", "--train.epochs=1"),
        *("--system.device=cpu", "--train.batch_size=20", "--log.progress=false", "--system.num_threads=1"),
        *extra,
        *("--out", str(out)),
    ]


def restart_after_a_kill(out, whole, *extra: str, kill_rank: int, kill_step: int) -> subprocess.CompletedProcess:
    """Train the tiny torchrun run (`torchrun_tiny_run` with `extra`) twice, 2 ranks, under torchrun
    --max-restarts=1: into `whole` uninterrupted, and into `out` with rank `kill_rank` killed (SIGKILL) before its
    step `kill_step` (tests/kill_once.py) so that torchrun restarts the group. Checks that both end with the same
    weights, batch-norm statistics, momentum and EMA copies, and that the second run restarted; returns it."""
    command = torchrun_tiny_run(whole, *extra)
    restart = ["--max-restarts=1", "--monitor-interval=0.5"]
    script = str(Path(__file__).with_name("kill_once.py"))
    at = command.index("-m", 3)  # torchrun's own options end where the trainer's module begins
    killed = [*command[:at], *restart, script, *command[at + 2 :]]
    killed[-1] = str(out)
    run_cli([*command[:at], *restart, *command[at:]], whole)
    repo = str(Path(__file__).resolve().parents[1])  # the script's folder comes first on its path: name the package's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_RANK": str(kill_rank), "KILL_STEP": str(kill_step)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(killed, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torchrun restart 1: the run continues from its last checkpoint" in result.stdout, result.stdout[-2000:]
    got, expected = (torch.load(Path(run) / "checkpoint.pt", weights_only=True) for run in (out, whole))
    for part in ("backbone", "method"):
        for key, value in expected[part].items():
            assert torch.equal(value, got[part][key]), (part, key)
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], got["optimizer"]["state"][index]["momentum_buffer"]), index
    assert got["state"]["epoch"] == expected["state"]["epoch"] and got["state"]["mid_epoch"] is None
    return result


def run_cli(command: list[str], out, expect: int = 0) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run a CLI command (one thread per process, a 240 s hard stop); check its exit status; the process and,
    after a successful run, the run directory `out`'s summary.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == expect, result.stderr[-3000:]
    return result, json.loads((Path(out) / "summary.json").read_text()) if expect == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str, job, timeout_s: float, device_type: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    process_group.init_data_parallel(torch.device(device_type), timeout=timedelta(seconds=timeout_s))
    try:
        job(rank, world, Path(out))
    finally:
        process_group.close()


def launch(
    job, world: int, out: Path, timeout_s: float = 120, collective_timeout_s: float = 60, device_type: str = "cpu"
) -> list[int]:
    """Run `job(rank, world, out)` on `world` spawned ranks (gloo on CPU; NCCL with device_type cuda); their exit
    codes. A collective waits at most `collective_timeout_s`; the ranks are killed and the test fails after
    `timeout_s` (a deadlock fails instead of hanging)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    args = (world, port, str(out), job, collective_timeout_s, device_type)
    procs = [ctx.Process(target=_rank, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still ran after {timeout_s} s: a deadlock"
    return [p.exitcode for p in procs]


def keep_step_checkpoint(trainer, epoch: int, step: int, copy_to: Path) -> None:
    """After `trainer`'s step checkpoint at `step` of epoch index `epoch` (train.checkpoint_every), rank 0 copies
    the checkpoint to `copy_to`: what a run killed right after it leaves. Every rank waits for the copy."""
    import shutil

    from fastlocal.engine import CHECKPOINT_NAME

    save = trainer.save_step_checkpoint

    def save_and_keep(steps_done: int, loss_sum, seconds: float) -> None:
        save(steps_done, loss_sum, seconds)
        if (trainer.state.epoch, steps_done) == (epoch, step):
            if trainer.is_main:
                shutil.copy(trainer.out_dir / CHECKPOINT_NAME, copy_to)
            process_group.barrier()

    trainer.save_step_checkpoint = save_and_keep


def fit_with_rank1_stopped(trainer, rank: int, out: Path, stop_before_step: int = 2) -> None:
    """Rank 1 stops itself (SIGSTOP, as a frozen process) before its step `stop_before_step`; the other ranks'
    fit() must end with a PeerTimeout. Rank 0 writes its message and the seconds from rank 1's stop to
    out/timeout.txt, then kills rank 1 (a stopped process ignores everything else), and re-raises."""
    import signal

    step, calls = trainer.run_step, []

    def stop_at(x, y):
        calls.append(1)
        if rank == 1 and len(calls) == stop_before_step:
            (out / "rank1.pid").write_text(f"{os.getpid()} {time.time()}")
            os.kill(os.getpid(), signal.SIGSTOP)
        return step(x, y)

    trainer.run_step = stop_at
    try:
        trainer.fit(log=lambda *a: None)
    except process_group.PeerTimeout as err:
        if rank == 0:
            pid, stopped_at = (out / "rank1.pid").read_text().split()
            (out / "timeout.txt").write_text(f"{time.time() - float(stopped_at):.1f}\n{err}")
            os.kill(int(pid), signal.SIGKILL)
        raise


def build(method: str, arch: str, k: int, overrides=(), dtype=torch.float64, seed: int = 0, input_size: int = 32):
    """(cfg, backbone, modules, method) with `overrides` as 'section.key=value' strings."""
    items = [f"method.name={method}", f"method.num_modules={k}", f"model.arch={arch}", *overrides]
    cfg = build_config(None, items, METHODS)
    torch.manual_seed(seed)
    backbone = build_backbone(arch, 10, input_size)
    modules = split_backbone(backbone, k, cfg.method.stem_separate)
    built = build_method(cfg, backbone, modules)
    backbone.to(dtype)
    built.to(dtype)
    return cfg, backbone, modules, built


class LossScaler:
    """Wraps a method, multiplying module i's loss by scale[i] (a probe for what each loss reaches)."""

    def __init__(self, method, scales):
        self.method, self.scales, self.window = method, scales, method.window

    def module_loss(self, i, own, cascade, batch):
        loss = self.method.module_loss(i, own, cascade, batch)
        return None if loss is None else loss * self.scales[i]

    def before_optimizer_step(self):
        pass


def short_mlaan_run(device, overrides=(), prepare=None, steps: int = 3):
    """Losses of `steps` SGD steps of MLAAN resnet20 K=3 (16x16 random batches of 6, fixed seeds) on
    `device`, and the method; `prepare(backbone, method)` runs after the move to the device."""
    from fastlocal.methods import Batch
    from fastlocal.optim import build_optimizer
    from fastlocal.schedule import local_train_step

    cfg, backbone, modules, method = build("mlaan", "resnet20", 3, overrides, dtype=torch.float32, input_size=16)
    backbone.to(device)
    method.to(device)
    if prepare is not None:
        prepare(backbone, method)
    params = [p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(6, 3, 16, 16, generator=g).to(device)
        y = torch.randint(0, 10, (6,), generator=g).to(device)
        optimizer.zero_grad()
        losses.append(local_train_step(modules, method, Batch(x, y, (0.5,) * 3, (0.5,) * 3)).item())
        optimizer.step()
    return losses, method


def forward_backward(net: torch.nn.Module, x: torch.Tensor):
    """(output, input gradient, parameter gradients) of `net` on `x` for the loss mean(y^2)."""
    xs = x.clone().requires_grad_()
    y = net(xs)
    y.pow(2).mean().backward()
    return y, xs.grad, [p.grad for p in net.parameters()]


def assert_same_forward_backward(got, expected):
    """Two `forward_backward` results agree to fp32 rounding (a fused path against the plain one)."""
    (y1, dx1, g1), (y0, dx0, g0) = got, expected
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-4, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
