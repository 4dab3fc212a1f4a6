"""The process group of a multi-process run (torchrun's env:// rendezvous): which parallel mode a run is in,
joining and leaving the group, and the few collectives the trainer needs, each a no-op in one process."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastlocal.config import UserError

BACKEND = "cpu:gloo,cuda:nccl"
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
"""How long a rank waits in a collective or for a message by default (system.dist_timeout): a rank that died
or hangs brings the job down with an error after at most this long (torchrun usually ends it sooner, when the
failed rank exits)."""
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes the run directory and logs."""
        return self.rank == 0


def silent_log(*args, **kwargs) -> None:
    """The log of the ranks other than 0."""


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def restart_count() -> int:
    """How many times torchrun (--max-restarts) has restarted this group of processes; 0 outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def resolve_parallel(parallel: str) -> str:
    """system.parallel -> "data", "modules", "hybrid" or "none": auto is data parallel under torchrun."""
    torchrun = launched_by_torchrun()
    if parallel == "auto":
        return "data" if torchrun else "none"
    if parallel == "modules" and not (torchrun and int(os.environ["WORLD_SIZE"]) > 1):
        raise UserError(
            "system.parallel = modules puts the local modules on several processes, one stage each, "
            "started by torchrun, e.g. torchrun --nproc_per_node=2 -m fastlocal.train --config FILE "
            "--system.parallel=modules; use system.parallel=none (or auto) for one process"
        )
    if parallel == "hybrid" and not (torchrun and int(os.environ["WORLD_SIZE"]) > 1):
        raise UserError(
            "system.parallel = hybrid runs data replicas of a pipeline on several processes started by "
            "torchrun, e.g. torchrun --nproc_per_node=4 -m fastlocal.train --config FILE "
            "--system.parallel=hybrid --system.pipeline_stages=2; use system.parallel=none (or auto) for one process"
        )
    if parallel == "data" and not torchrun:
        raise UserError(
            "system.parallel = data needs several processes started by torchrun, e.g. "
            "torchrun --nproc_per_node=2 -m fastlocal.train --config FILE; use system.parallel=none "
            "(or auto) for one process"
        )
    if parallel == "none" and torchrun and int(os.environ["WORLD_SIZE"]) > 1:
        raise UserError(
            f"system.parallel = none, but torchrun started {os.environ['WORLD_SIZE']} processes, which "
            "would each train their own copy into the same run directory; use system.parallel=data "
            "(or auto), or start one process"
        )
    return parallel


class PeerTimeout(Exception):
    """A rank waited system.dist_timeout for other ranks that did not answer; the message names them and what
    was awaited."""


class _Waits:
    """What this rank is doing (`progress`: the step) and how long it waits for others; the heartbeat that
    tells the ranks that stopped answering from the ones that are only busy."""

    timeout_s: float = COLLECTIVE_TIMEOUT.total_seconds()
    progress: str = "setup"
    heartbeat: _Heartbeat | None = None


class _Heartbeat:
    """Each rank adds 1 to its counter in torchrun's key-value store every `interval` seconds, from a thread: a
    rank whose counter stands still is stopped (SIGSTOP, a frozen machine), not merely busy. Counters, not
    clocks, so the machines' clocks may differ."""

    def __init__(self, rank: int, world_size: int, interval: float):
        self.rank, self.world_size, self.interval = rank, world_size, interval
        self.prefix = f"fastlocal/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=max(1.0, 3 * interval)),
            wait_for_workers=False,
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="fastlocal-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.store.add(f"{self.prefix}{self.rank}", 1)
            except Exception:  # noqa: BLE001 -- the store is gone: the job is ending; nothing to report from here
                return

    def silent_ranks(self) -> list[int] | None:
        """The other ranks whose heartbeat stood still over a few intervals; None if the store does not answer."""
        try:
            keys = [f"{self.prefix}{r}" for r in range(self.world_size)]
            before = [self.store.add(key, 0) for key in keys]
            time.sleep(4 * self.interval)
            after = [self.store.add(key, 0) for key in keys]
        except Exception:  # noqa: BLE001 -- the store's host does not answer
            return None
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def set_progress(text: str) -> None:
    """What this rank is doing, for the message of a wait that timed out (e.g. "step 3 of epoch 2")."""
    _Waits.progress = text


def is_timeout(err: BaseException) -> bool:
    """Whether a torch.distributed error is a wait that ran past the process group's timeout."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


@contextmanager
def waiting_for(what: str, peers: Sequence[int] | None = None) -> Iterator[None]:
    """Run a wait on other ranks (`peers`, None: all); a timeout becomes a :class:`PeerTimeout` that names this
    rank, what it waited for and at which step, and the ranks that stopped answering."""
    try:
        yield
    except RuntimeError as err:
        if not is_timeout(err):
            raise
        raise PeerTimeout(describe_timeout(what, peers)) from None


def describe_timeout(what: str, peers: Sequence[int] | None) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    head = f"rank {rank} waited {_Waits.timeout_s:g} s (system.dist_timeout) for {what}, at {_Waits.progress}"
    silent = _Waits.heartbeat.silent_ranks() if _Waits.heartbeat is not None else []
    if silent is None:
        tail = (
            "the key-value store at MASTER_ADDR:MASTER_PORT does not answer either (without torchrun's agent, rank 0 "
            "hosts it): rank 0 or the network stopped"
        )
    elif silent:
        names = ", ".join(str(r) for r in silent)
        tail = (
            f"rank {names} stopped answering (its heartbeat stands still: a stopped process, e.g. SIGSTOP, or a "
            "frozen machine)"
            if len(silent) == 1
            else f"ranks {names} stopped answering (their heartbeats stand still)"
        )
    else:
        who = "rank " + ", ".join(map(str, peers)) if peers else "every rank"
        tail = (
            f"{who} still answers but did not get there: slower than system.dist_timeout allows (raise it), "
            "or waiting for this rank in turn (a deadlock)"
        )
    return f"{head}; {tail}. Ending the job (torchrun stops the other ranks)"


def init_data_parallel(
    device: torch.device, timeout: timedelta = COLLECTIVE_TIMEOUT
) -> tuple[DataParallel, torch.device]:
    """Join the process group torchrun set up (env:// rendezvous), every wait on other ranks bounded by `timeout`
    (system.dist_timeout), and start this rank's heartbeat. On CUDA each process takes the GPU of its local
    rank. Returns the rank's description and its device."""
    parallel = DataParallel(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        if parallel.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {parallel.local_rank} has no GPU: this node has "
                f"{torch.cuda.device_count()}; start at most that many processes per node"
            )
        device = torch.device("cuda", parallel.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # NCCL for CUDA tensors where there are GPUs; gloo for CPU tensors (and a CPU-only torch build).
        backend = BACKEND if torch.cuda.is_available() else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one key-value store (its agent's) across restarts, and the process group's keys in it
            # are not per attempt: a restarted group could read the addresses of the killed attempt's ranks (seen:
            # gloo's connectFullMesh refused, then the restart failed). The keys of each attempt under a prefix.
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
            )
            attempt = dist.PrefixStore(f"fastlocal/attempt_{restart_count()}/", store)
            dist.init_process_group(
                backend, store=attempt, rank=parallel.rank, world_size=parallel.world_size, timeout=timeout
            )
        else:
            dist.init_process_group(backend, timeout=timeout)
    _Waits.timeout_s = timeout.total_seconds()
    if _Waits.heartbeat is None and parallel.world_size > 1:
        _Waits.heartbeat = _Heartbeat(parallel.rank, parallel.world_size, min(1.0, max(0.05, _Waits.timeout_s / 20)))
    return parallel, device


def close() -> None:
    """Leave the process group. Trainers sit in reference cycles (bound methods), so a pipeline's communication
    handles can outlive the group until the interpreter exits, where freeing them can abort the process
    ("terminate called without an active exception"): seen once in CI on a 3-stage gloo test, and in 3 of 35
    runs of it when all ranks left at once after a barrier; with this collection first, in none of 60 such
    runs (nor in 60 without the barrier)."""
    if _Waits.heartbeat is not None:
        _Waits.heartbeat.close()
        _Waits.heartbeat = None
    _Waits.progress = "setup"
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Every rank waits for the others (after rank 0 wrote a checkpoint: no rank moves on and reads it first);
    nothing without a process group."""
    if dist.is_available() and dist.is_initialized():
        with waiting_for("every rank at a barrier (after a checkpoint)"):
            dist.barrier()


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over ranks (a copy); unchanged without a process group."""
    total = values.clone()
    if dist.is_available() and dist.is_initialized():
        with waiting_for("every rank's losses or counts (a sum over ranks)"):
            dist.all_reduce(total)
    return total


def min_across_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` over ranks (the number of steps every rank can run); `value` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor(value, dtype=torch.int64, device=device)
    with waiting_for("every rank's step count (the start of an epoch)"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())
