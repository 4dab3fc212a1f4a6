"""One accounting of a training step's memory, by component (`python -m fastlocal.plan --memory`).

    report = step_memory_plan(cfg, num_classes, image_size, batch_size)
    report["memory"]  # {"activations", "parameters", "gradients", "optimizer", "frozen", "total"}, bytes

Components (bytes):

- activations: the peak of what the step holds for its backward. CPU: `SavedTensorAccountant` (tensors saved
  for backward, the inputs recomputation keeps included); CUDA: the caching allocator's peak during the step
  minus what was allocated before it (weights, EMA copies, optimizer state) and minus `gradients`.
- parameters: the trainable parameters and every buffer (batch-norm running statistics).
- gradients: the largest number of gradient bytes alive at once in the step: every trainable parameter's
  with the plain step, the in-flight modules' and heads' with `system.fused_optimizer_step`.
- optimizer: the optimizer's state (SGD's momentum buffers).
- frozen: the parameters that get no gradient (MLAAN's EMA copies).
- total: their sum (on CUDA: the allocator's peak, exactly; on CPU an upper bound, as the peaks of
  activations and gradients need not coincide).

Only activations grow with the batch. They are measured at two small batches on the run's device and
extrapolated linearly to the batch asked for (a saved activation is a per-sample tensor, plus per-channel
statistics that do not grow); tests/test_memory.py checks the extrapolation against a measurement.
"""

from __future__ import annotations

import torch

from fastlocal.build import ParallelContext, build_learner, place_learner, resolve_device
from fastlocal.config import Config
from fastlocal.measure import SavedTensorAccountant, parameter_storages, reset_peak
from fastlocal.methods import Batch
from fastlocal.optim import build_optimizer, step_parameters
from fastlocal.schedule import forward_context_for, local_train_step

COMPONENTS = ("activations", "parameters", "gradients", "optimizer", "frozen", "total")
SMALL_BATCHES = (2, 4)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _GradientMeter:
    """Gradient bytes alive during a step: added when a parameter's gradient first appears, removed when the
    fused step frees it; `peak` is the largest sum."""

    def __init__(self, params: list[torch.Tensor]):
        self.live, self.peak = 0, 0
        self.counted: set[int] = set()
        self.handles = [p.register_post_accumulate_grad_hook(self._added) for p in params]

    def _added(self, p: torch.Tensor) -> None:
        if id(p) not in self.counted:
            self.counted.add(id(p))
            self.live += p.grad.numel() * p.grad.element_size()
            self.peak = max(self.peak, self.live)

    def freed(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if id(p) in self.counted:
                self.counted.discard(id(p))
                self.live -= p.grad.numel() * p.grad.element_size()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class StepMemory:
    """A learner and its optimizer, built from a config on a device, whose steps are measured."""

    def __init__(self, cfg: Config, num_classes: int, image_size: int, device: torch.device | None = None):
        self.cfg, self.num_classes, self.image_size = cfg, num_classes, image_size
        self.device = device or resolve_device(cfg.system.device)
        torch.manual_seed(cfg.system.seed)
        self.learner = build_learner(cfg, num_classes, image_size)
        place_learner(cfg, self.learner, ParallelContext("none", self.device, cfg.train.batch_size))
        self.params = [p for p in self.learner.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg, self.device)
        self.forward_context = forward_context_for(self.device, cfg.system.precision)
        self.fused = cfg.system.fused_optimizer_step
        self.reads_allocator = self.device.type == "cuda"  # else: the saved-tensor accounting
        self.learner.train()

    def batch(self, batch_size: int) -> Batch:
        g = torch.Generator().manual_seed(batch_size)
        size = self.image_size
        x = torch.randn(batch_size, 3, size, size, generator=g).to(self.device)
        if self.cfg.system.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=g).to(self.device)
        return Batch(x, y, (0.5,) * 3, (0.25,) * 3)

    def _step(self, batch: Batch, meter: _GradientMeter | None = None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        learner = self.learner
        if self.fused:

            def step(params):
                step_parameters(self.optimizer, params)
                if meter is not None:
                    meter.freed(params)

            local_train_step(learner.local_modules, learner.method, batch, self.forward_context, step_parameters=step)
        else:
            local_train_step(learner.local_modules, learner.method, batch, self.forward_context)
            self.optimizer.step()

    def measure(self, batch_size: int) -> dict:
        """One step at `batch_size`, by component (on CUDA after an unmeasured one, which creates the
        optimizer state and tunes the kernels, so the allocator's baseline holds the state)."""
        batch = self.batch(batch_size)
        state = {k: v.clone() for k, v in self.learner.state_dict().items()}
        optimizer_state = self.optimizer.state_dict()
        meter = _GradientMeter(self.params)
        try:
            if self.reads_allocator:
                self._step(batch)
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize(self.device)
                before = torch.cuda.memory_allocated(self.device)
                reset_peak(self.device)
                self._step(batch, meter)
                torch.cuda.synchronize(self.device)
                activations = torch.cuda.max_memory_allocated(self.device) - before - meter.peak
                kind = "cuda allocator (max_memory_allocated during the step, less the memory before it)"
            else:
                ignore = parameter_storages(self.learner)
                with SavedTensorAccountant(ignore=ignore) as acct:
                    self._step(batch, meter)
                activations = acct.peak_bytes
                kind = "cpu saved-tensor accounting (fastlocal.measure.SavedTensorAccountant)"
        finally:
            meter.close()
        optimizer_bytes = _nbytes(
            t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        )
        # The measurement must not train: the weights and the optimizer go back as they were.
        self.learner.load_state_dict(state)
        self.optimizer.load_state_dict(optimizer_state)
        self.optimizer.zero_grad(set_to_none=True)
        all_params = list(self.learner.parameters())
        components = {
            "activations": int(activations),
            "parameters": _nbytes(p for p in all_params if p.requires_grad) + _nbytes(self.learner.buffers()),
            "gradients": meter.peak,
            "optimizer": optimizer_bytes,
            "frozen": _nbytes(p for p in all_params if not p.requires_grad),
        }
        components["total"] = sum(components.values())
        return {"batch_size": batch_size, "measured_on": kind, **components}


def extrapolate(small: list[dict], batch_size: int) -> dict:
    """The components at `batch_size` from measurements at two smaller batches: activations on the line
    through the two, the rest as measured (they do not depend on the batch)."""
    first, second = small
    slope = (second["activations"] - first["activations"]) / (second["batch_size"] - first["batch_size"])
    activations = first["activations"] + slope * (batch_size - first["batch_size"])
    components = {k: second[k] for k in ("parameters", "gradients", "optimizer", "frozen")}
    components = {"activations": round(activations), **components}
    components["total"] = sum(components.values())
    return {name: components[name] for name in COMPONENTS}


def step_memory_plan(
    cfg: Config,
    num_classes: int,
    image_size: int,
    batch_size: int,
    device: torch.device | None = None,
    small_batches: tuple[int, int] = SMALL_BATCHES,
) -> dict:
    """`memory`: the six components (bytes) of a step at `batch_size`, measured on the run's device at
    `small_batches` and extrapolated; `memory_measurement`: how."""
    meter = StepMemory(cfg, num_classes, image_size, device)
    small = [meter.measure(b) for b in small_batches]
    return {
        "memory": extrapolate(small, batch_size),
        "memory_measurement": {
            "batch_size": batch_size,
            "device": str(meter.device),
            "measured_on": small[0]["measured_on"],
            "small_batches": [{k: m[k] for k in ("batch_size", *COMPONENTS)} for m in small],
            "extrapolation": "activations linear in the batch through the two small batches; the rest as measured",
            "recompute": cfg.system.recompute,
            "fused_optimizer_step": cfg.system.fused_optimizer_step,
            "precision": cfg.system.precision,
        },
    }
