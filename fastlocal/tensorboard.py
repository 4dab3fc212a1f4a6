"""log.tensorboard: TensorBoard event files in the run directory (`DIR/tensorboard`; `pip install
'fastlocal[tensorboard]'`).

Scalars, against the global step (the step count since the run began):

- every step: `train/lr`;
- every epoch, at its last step: `loss/module_<i>` (module i's loss, averaged over the epoch; a module with
  no loss of its own, as MLAAN's first W-1, has none), `loss/total` (their sum), `loss/train` (the last
  module's, the train_loss of metrics.jsonl), `test/accuracy` (%), `speed/images_per_second` and
  `memory/<what>_mib` (the run's peak memory: CUDA allocator peaks, or the CPU saved-tensor peak).

The module losses are summed on the device inside the step (no host synchronisation; a CUDA graph captures
the sums) and read once an epoch. A pipeline run has no per-module sums (its stages compute the losses
apart); it logs the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastlocal.config import UserError
from fastlocal.parallel.group import sum_across_ranks


class ModuleLosses:
    """`method` as `local_train_step` uses it, adding each module's loss to a sum on the device."""

    def __init__(self, method, device: torch.device):
        self.method, self.window = method, method.window
        self.sums = torch.zeros(2, method.num_modules, dtype=torch.float64, device=device)  # (loss sum, count)

    def module_loss(self, i: int, own: torch.Tensor, cascade: torch.Tensor, batch) -> torch.Tensor | None:
        loss = self.method.module_loss(i, own, cascade, batch)
        if loss is not None:
            self.sums[0, i] += loss.detach().double()
            self.sums[1, i] += 1
        return loss

    def before_optimizer_step(self) -> None:
        self.method.before_optimizer_step()

    def take(self) -> dict[int, float]:
        """Each module's mean loss since the last call (data parallel: over every rank), and reset. Every rank
        calls it (a collective)."""
        sums, counts = sum_across_ranks(self.sums.clone()).tolist()
        self.sums.zero_()
        return {i: total / count for i, (total, count) in enumerate(zip(sums, counts)) if count}


class TensorBoardLog:
    """A SummaryWriter on `out_dir/tensorboard`; `purge_step` (a resumed run): events at and after it, left
    by the interrupted run, are dropped."""

    def __init__(self, out_dir: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "log.tensorboard = true needs TensorBoard, which is not installed: pip install "
                "'fastlocal[tensorboard]' (or set log.tensorboard=false)"
            ) from None
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=purge_step)

    def step(self, global_step: int, lr: float) -> None:
        self.writer.add_scalar("train/lr", lr, global_step)

    def epoch(self, global_step: int, row: dict, module_losses: dict[int, float], peak_memory: dict | None) -> None:
        scalars = {f"loss/module_{i}": loss for i, loss in module_losses.items()}
        if module_losses:
            scalars["loss/total"] = sum(module_losses.values())
        scalars.update(
            {
                "loss/train": row["train_loss"],
                "test/accuracy": row["test_acc"],
                "speed/images_per_second": row["images_per_second"],
            }
        )
        for key, value in (peak_memory or {}).items():
            if key.endswith("_bytes") and value is not None:
                scalars[f"memory/{key.removesuffix('_bytes')}_mib"] = value / 2**20
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
