"""The trainer: epochs, evaluation, checkpoints, logging, timing, the LR and the optimizer.

One step's forward and backward through the local schedule is `fastlocal.schedule.local_train_step`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastlocal.config import Config, UserError, cuda_option_on, to_dict, to_toml
from fastlocal.graphs import GraphedStep
from fastlocal.measure import SavedTensorAccountant, cuda_peak, parameter_storages, reset_peak
from fastlocal.methods import Batch, LocalMethod
from fastlocal.schedule import forward_context_for, local_train_step
from fastlocal.split import LocalModule

CHECKPOINT_NAME = "checkpoint.pt"


class NonFiniteLossError(UserError):
    pass


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config, device: torch.device | None = None,
                    lr_on_device: bool = False) -> torch.optim.SGD:
    """SGD with Nesterov momentum and weight decay on all parameters. One fused kernel for the whole
    update on CUDA, the multi-tensor (foreach) path elsewhere; `lr_on_device` keeps the LR in a device
    tensor (a CUDA graph reads it; `set_learning_rate` fills it)."""
    fused = device is not None and device.type == "cuda"
    lr = torch.tensor(cfg.optim.lr, device=device) if lr_on_device else cfg.optim.lr
    return torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
                           weight_decay=cfg.optim.weight_decay, fused=fused or None,
                           foreach=None if fused else True)


def learning_rate(cfg: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """The LR for a step. `ref`: the reference's CIFAR per-epoch rule (SPEC 5, e = epoch + 1);
    `cosine_epoch`: the ImageNet reference's per-epoch cosine (epoch from 0);
    `cosine`: per-iteration linear warmup then cosine decay to 0."""
    lr0, epochs = cfg.optim.lr, cfg.train.epochs
    if cfg.optim.schedule == "cosine_epoch":
        return 0.5 * lr0 * (1 + math.cos(math.pi * epoch / epochs))
    if cfg.optim.schedule == "ref":
        e = epoch + 1
        cosine = 0.5 * lr0 * (1 + math.cos(math.pi * e / epochs))
        return cosine * (e - 1) / 10 + 0.01 * (11 - e) / 10 if e <= 10 else cosine
    step = epoch * steps_per_epoch + step_in_epoch
    total = epochs * steps_per_epoch
    warmup = min(round(cfg.optim.warmup_epochs * steps_per_epoch), total - 1)
    if step < warmup:
        return lr0 * (step + 1) / warmup
    return 0.5 * lr0 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the LR of every group: in place when it is a device tensor (a captured graph reads it)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


@torch.no_grad()
def evaluate(backbone: torch.nn.Module, loader, channels_last: bool = False) -> float:
    """Top-1 accuracy (%) of the backbone's final head on `loader`."""
    was_training = backbone.training
    backbone.eval()
    correct = torch.zeros((), dtype=torch.int64, device=next(backbone.parameters()).device)
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += (backbone(x).argmax(1) == y).sum()
    backbone.train(was_training)
    return 100.0 * correct.item() / loader.num_images


def save_atomic(obj, path: Path) -> None:
    """Write then rename, so a crash mid-write never corrupts the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class RunState:
    """What a checkpoint restores besides the weights."""

    epoch: int = 0
    """Epochs completed."""
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    peak_memory: dict | None = None


class Trainer:
    """Trains `backbone` with `method` on `data` and writes the run directory."""

    def __init__(self, cfg: Config, backbone, modules: list[LocalModule], method: LocalMethod, data,
                 device: torch.device, out_dir: Path):
        self.cfg, self.backbone, self.modules, self.method = cfg, backbone, modules, method
        self.data, self.device, self.out_dir = data, device, Path(out_dir)
        self.params = [p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad]
        use_graphs = cuda_option_on("system.cuda_graphs", cfg.system.cuda_graphs, device, "training eagerly")
        # Module i's loss runs on this stream while module i+1 runs forward (local_train_step).
        use_streams = cuda_option_on("system.cuda_streams", cfg.system.cuda_streams, device, "training on one stream")
        self.side_stream = torch.cuda.Stream(device) if use_streams else None
        self.lr_on_device = use_graphs
        self.optimizer = build_optimizer(self.params, cfg, device, lr_on_device=use_graphs)
        # Autocast's weight-cast cache must be off inside a CUDA graph (the casts are part of the replay).
        self.forward_context = forward_context_for(device, cfg.system.precision, cache_casts=not use_graphs)
        self.channels_last = cfg.system.channels_last
        self.run_step = GraphedStep(self.step_without_zero_grad, self.zero_grad) if use_graphs else self.eager_step
        self.state = RunState()

    # -- one step ---------------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step_without_zero_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Local forward/backward, EMA, optimizer step; what a CUDA graph captures."""
        loss = local_train_step(self.modules, self.method, Batch(x, y, self.data.info.mean, self.data.info.std),
                                self.forward_context, side_stream=self.side_stream)
        self.optimizer.step()
        return loss

    def eager_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.zero_grad()
        return self.step_without_zero_grad(x, y)

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {
            "config": to_dict(self.cfg),
            "backbone": self.backbone.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": self.state.__dict__,
        }

    def load_checkpoint(self, path: Path) -> None:
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as err:  # a truncated or foreign file: say so, do not crash
            raise UserError(
                f"cannot read checkpoint {path}: {err}; it is corrupt or not a fastlocal checkpoint"
            ) from None
        self.backbone.load_state_dict(ckpt["backbone"])
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # the LR's kind (float or device tensor) follows this run
            if self.lr_on_device and not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(group["lr"], device=self.device)
            elif not self.lr_on_device and isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].item()
        self.state = RunState(**ckpt["state"])

    # -- training ----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        cfg, loader = self.cfg, self.data.train
        loader.set_epoch(epoch)
        steps = len(loader)
        self.backbone.train()
        self.method.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        progress = None
        if cfg.log.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, unit="batch")
        start = time.perf_counter()
        lr = cfg.optim.lr
        for step, (x, y) in enumerate(loader):
            lr = learning_rate(cfg, epoch, step, steps)
            set_learning_rate(self.optimizer, lr)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.state.peak_memory is None and cfg.log.measure_memory and self.device.type == "cpu":
                with SavedTensorAccountant(ignore=parameter_storages(self.backbone, self.method)) as acct:
                    loss = self.eager_step(x, y)
                self.state.peak_memory = {"kind": "cpu_saved_tensors", "batch_size": int(x.shape[0]),
                                          "peak_saved_bytes": acct.peak_bytes}
            else:
                loss = self.run_step(x, y)
            loss_sum += loss
            if progress is not None:
                progress.update(1)
                if step % 20 == 0 or step == steps - 1:
                    progress.set_postfix(loss=f"{loss_sum.item() / (step + 1):.3f}", lr=f"{lr:.3g}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if progress is not None:
            progress.close()
        train_loss = loss_sum.item() / max(1, steps)
        if not math.isfinite(train_loss):
            last_good = (f"the checkpoint of epoch {epoch} in {self.out_dir} is intact" if epoch
                         else "no checkpoint was written")
            raise NonFiniteLossError(
                f"the training loss became {train_loss} in epoch {epoch + 1}; the run diverged. Lower "
                f"optim.lr (now {cfg.optim.lr}) or lengthen optim.warmup_epochs; {last_good}"
            )
        return {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "epoch_seconds": seconds,
                "images_per_second": loader.num_images / seconds if not cfg.train.drop_last
                else steps * cfg.train.batch_size / seconds}

    def fit(self, log=print) -> dict:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.toml").write_text(to_toml(cfg))
        metrics_path = self.out_dir / "metrics.jsonl"
        # The metrics file always mirrors the checkpoint: rewrite it from the restored history.
        metrics_path.write_text("".join(json.dumps(row) + "\n" for row in self.state.history))
        if self.device.type == "cuda":
            reset_peak(self.device)
        for epoch in range(self.state.epoch, cfg.train.epochs):
            row = self.train_epoch(epoch)
            with self.forward_context():
                row["test_acc"] = evaluate(self.backbone, self.data.test, self.channels_last)
            self.state.epoch = epoch + 1
            self.state.history.append(row)
            self.state.train_seconds += row["epoch_seconds"]
            if self.device.type == "cuda":
                self.state.peak_memory = cuda_peak(self.device)
            save_atomic(self.checkpoint(), self.out_dir / CHECKPOINT_NAME)
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"epoch {row['epoch']}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  "
                f"test acc {row['test_acc']:.2f}%  {row['images_per_second']:.0f} img/s  lr {row['lr']:.4g}")
        summary = self.summary()
        write_json_atomic(summary, self.out_dir / "summary.json")
        return summary

    def summary(self) -> dict:
        history = self.state.history
        cfg = self.cfg
        images = len(history) * self.data.train.num_images
        return {
            "method": cfg.method.name,
            "arch": cfg.model.arch,
            "dataset": self.data.info.name,
            "num_modules": len(self.modules),
            "epochs": len(history),
            "final_test_acc": history[-1]["test_acc"] if history else None,
            # The best test epoch is model selection on the test set: reported, labelled, never the headline.
            "best_test_acc": max(r["test_acc"] for r in history) if history else None,
            "best_test_acc_note": "best epoch chosen on the test set (the paper's convention); not a fair estimate",
            "num_parameters": sum(p.numel() for p in self.params),
            "num_backbone_parameters": sum(p.numel() for p in self.backbone.parameters()),
            "train_seconds": self.state.train_seconds,
            "images_per_second": images / self.state.train_seconds if self.state.train_seconds else None,
            "peak_memory": self.state.peak_memory,
            "device": device_name(self.device),
            "torch_version": torch.__version__,
        }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
