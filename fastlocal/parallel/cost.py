"""Each local module's measured cost, and the throughput model of a pipeline fed with those costs.

`plan --profile` (fastlocal.build.profile_pipeline) and the stage partition of the pipeline trainers use this
file; it imports no trainer. docs/pipeline.md#the-throughput-model has the model in words.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from fastlocal.config import Config
from fastlocal.methods import Batch, LocalMethod
from fastlocal.optim import build_optimizer
from fastlocal.parallel.data import module_parameter_groups
from fastlocal.parallel.mesh import partition, stage_ranges
from fastlocal.split import LocalModule


# -- per-module cost --------------------------------------------------------------------------------------------
class _Timer:
    """Seconds between marks: CUDA events on a GPU (read after one synchronisation), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


@contextmanager
def _timing_run(method: LocalMethod, cfg: Config, info, device: torch.device) -> Iterator[Batch]:
    """A batch of train.batch_size random images for timing `method`'s model; its weights and statistics are
    put back as they were afterwards."""
    backbone = method.backbone
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in (backbone, method)]
    g = torch.Generator().manual_seed(0)
    dtype = next(backbone.parameters()).dtype
    x = torch.randn(cfg.train.batch_size, 3, info.image_size, info.image_size, generator=g).to(device, dtype)
    y = torch.randint(0, info.num_classes, (cfg.train.batch_size,), generator=g).to(device)
    try:
        yield Batch(x, y, info.mean, info.std)
    finally:
        backbone.load_state_dict(saved[0])
        method.load_state_dict(saved[1])


def _timing_optimizer(params: list, cfg: Config, device: torch.device) -> torch.optim.SGD:
    """The run's optimizer (fastlocal.engine.build_optimizer: fused on CUDA) with the LR at 0, so the timed
    steps leave the weights where they are."""
    optimizer = build_optimizer(params, cfg, device)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    return optimizer


def measure_module_costs(
    modules: Sequence[LocalModule],
    method: LocalMethod,
    cfg: Config,
    info,
    device: torch.device,
    forward_context: Callable = None,
    repeats: int = 5,
    end_to_end: bool = False,
) -> list[dict]:
    """Each module's cost on `device`, in seconds per step of train.batch_size random images (the median of
    `repeats` after one warm-up): forward, its loss forward and backward, the input-only VJPs the cascade runs
    through it, its weight VJP and its optimizer step; `total` sums them, `output_bytes` is the activation a
    stage boundary after it carries. The model's weights, statistics and gradients are left as they were.

    `end_to_end` (backprop's modules): one backward call gives the input's and the weights' gradients together,
    as end-to-end backprop runs it, timed as `weight_vjp` (`input_vjp` is then 0). Timed apart, the two VJPs
    cost more than together (on one CPU core, ResNet-32 at batch 64: their sum was 19 % above a BP step)."""
    from contextlib import nullcontext

    forward_context = forward_context or nullcontext
    window, num = method.window, len(modules)
    groups = module_parameter_groups(list(modules), method, method.backbone)
    optimizers = [_timing_optimizer(group, cfg, device) if group else None for group in groups]
    samples = [[[] for _ in range(5)] for _ in range(num)]  # per module and part, one time per repeat
    out_bytes = [0] * num
    with _timing_run(method, cfg, info, device) as batch:
        for rep in range(repeats + 1):
            a = batch.x
            for i, module in enumerate(modules):
                # As in the schedule: the input needs a gradient only where a cascade passes through the module
                # (end to end: wherever a module comes before it).
                inputs = a.detach().requires_grad_(i > 0 and (window > 1 or end_to_end))
                timer = _Timer(device)
                timer.mark()
                with forward_context():
                    out = module(inputs)
                timer.mark()
                own, cascade = out.detach().requires_grad_(), out.detach().requires_grad_()
                with forward_context():
                    loss = method.module_loss(i, own, cascade, batch)
                if loss is not None:
                    loss.backward()
                timer.mark()
                grad = sum(g for g in (own.grad, cascade.grad) if g is not None) if loss is not None else out * 0
                graph_input, graph_output = inputs, out
                if i > 0 and window == 1 and not end_to_end:  # an input VJP on a graph of its own, untimed
                    graph_input = a.detach().requires_grad_()
                    with forward_context():
                        graph_output = module(graph_input)
                timer.mark()
                if i > 0 and not end_to_end:
                    torch.autograd.grad(graph_output, graph_input, grad, retain_graph=True)
                timer.mark()
                both = [inputs] if i > 0 and end_to_end else []
                torch.autograd.backward(out, grad, inputs=[*both, *module.trainable_parameters])
                timer.mark()
                if optimizers[i] is not None:
                    optimizers[i].step()
                timer.mark()
                for p in groups[i]:
                    p.grad = None
                if rep:
                    intervals = timer.intervals()
                    for k, seconds in enumerate(intervals[:2] + intervals[3:]):  # [2] is the untimed forward
                        samples[i][k].append(seconds)
                out_bytes[i] = out.numel() * out.element_size()
                a = out
    costs = []
    for i in range(num):
        forward, loss, input_vjp, weight_vjp, step = (statistics.median(times) for times in samples[i])
        # The cascade runs an input-only VJP through module i for each loss i+1..i+W-1 that exists.
        carries = sum(1 for j in range(i + 1, min(num, i + window)))
        costs.append(
            {
                "forward": forward,
                "loss": loss,
                "input_vjp": input_vjp,
                "weight_vjp": weight_vjp,
                "optimizer": step,
                "carries": carries,
                "total": forward + loss + weight_vjp + step + carries * input_vjp,
                "output_bytes": out_bytes[i],
            }
        )
    return costs


# -- the throughput model --------------------------------------------------------------------------------------
def predict_step(
    costs: Sequence[dict],
    sizes: Sequence[int],
    window: int = 1,
    cascade: str = "exact",
    link_bytes_per_second: float = 0.0,
) -> dict:
    """The steady step time of a local-learning pipeline with stages of `sizes` modules (docs/pipeline.md).

    Stage k costs t_k (the sum of its modules' `total`) and its output takes c_k to send (0 with no link
    figure: the link is not modelled). Without a cascade crossing a boundary (window 1, or DGL) nothing waits
    for a later stage: step = max_k max(t_k, c_k). MLAAN `exact`: stage k waits, after its own work up to its
    last loss, for the cotangent of stage k+1, which needs c_k, then stage k+1's forwards, losses and cascade
    VJPs of its first W-1 modules, then the cotangent's way back; its last module's loss overlaps that wait.
    MLAAN `stale`: no wait, but stage k recomputes the forward, weight VJP and carried input VJPs of its last
    W-1 modules on the kept input."""
    ranges = stage_ranges(sizes)
    last_stage = len(ranges) - 1

    def send(k: int, copies: int = 1) -> float:
        if k == last_stage or not link_bytes_per_second:
            return 0.0
        return copies * costs[ranges[k].stop - 1]["output_bytes"] / link_bytes_per_second

    stage_costs, steps = [], []
    for k, r in enumerate(ranges):
        t = sum(costs[i]["total"] for i in r)
        extra = 0.0
        if window > 1 and k < last_stage:
            tail = list(r)[-(window - 1) :]
            if cascade == "exact":
                head = list(ranges[k + 1])[: window - 1]
                round_trip = (
                    send(k)
                    + send(k, window - 1)
                    + sum(
                        costs[i]["forward"] + costs[i]["loss"] + costs[i]["carries"] * costs[i]["input_vjp"]
                        for i in head
                    )
                )
                extra = max(0.0, round_trip - costs[r.stop - 1]["loss"])
            else:
                extra = sum(costs[i]["forward"] + costs[i]["weight_vjp"] + costs[i]["input_vjp"] for i in tail)
        stage_costs.append(t)
        steps.append(max(t + extra, send(k)))
    single = sum(c["total"] for c in costs)
    step = max(steps)
    return {
        "stage_seconds": stage_costs,
        "step_seconds": step,
        "single_device_seconds": single,
        "speedup": single / step,
    }


def measure_single_device_step(
    modules, method, cfg: Config, info, device: torch.device, forward_context, repeats: int = 5
) -> float:
    """Seconds of one real single-device step (fastlocal.schedule.local_train_step and an SGD step with the LR
    at 0) on random images, the median of `repeats` after one warm-up; the model is left as it was."""
    from fastlocal.schedule import local_train_step

    params = [p for p in (*method.backbone.parameters(), *method.parameters()) if p.requires_grad]
    optimizer = _timing_optimizer(params, cfg, device)
    times = []
    with _timing_run(method, cfg, info, device) as batch:
        for rep in range(repeats + 1):
            timer = _Timer(device)
            timer.mark()
            optimizer.zero_grad(set_to_none=True)
            local_train_step(list(modules), method, batch, forward_context)
            optimizer.step()
            timer.mark()
            if rep:
                times.append(timer.intervals()[0])
        optimizer.zero_grad(set_to_none=True)
    return statistics.median(times)


# -- pipelined backprop's costs and model -----------------------------------------------------------------------
class _EndToEndLoss(nn.Module):
    """What `measure_module_costs` needs of a method to time end-to-end backprop's modules: no local losses,
    the final head's cross-entropy after the last module."""

    window = 1

    def __init__(self, backbone, num_modules: int):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a submodule: its state is the backbone's
        self.last = num_modules - 1

    def module_loss(self, i, own, cascade, batch):
        return nn.functional.cross_entropy(self.backbone.head(own), batch.y) if i == self.last else None


def measure_backprop_costs(modules, backbone, cfg: Config, info, device, forward_context) -> list[dict]:
    """`measure_module_costs` for end-to-end backprop over the same modules: no local heads, the final head's
    loss on the last module only."""
    method = _EndToEndLoss(backbone, len(modules))
    return measure_module_costs(modules, method, cfg, info, device, forward_context, end_to_end=True)


def backprop_work(cost: dict) -> float:
    """A module's share of a backprop step (seconds per batch): forward, loss, backward (input and weight VJPs;
    from :func:`measure_backprop_costs`, one call), optimizer."""
    return cost["forward"] + cost["loss"] + cost["input_vjp"] + cost["weight_vjp"] + cost["optimizer"]


def predict_pipelined_bp(
    costs: Sequence[dict],
    sizes: Sequence[int],
    micro_batches: int,
    link_bytes_per_second: float = 0.0,
    micro_costs: Sequence[dict] | None = None,
) -> dict:
    """Pipelined backprop (1F1B, M = `micro_batches`) on stages of `sizes` modules, from `costs` of
    :func:`measure_backprop_costs` at the batch and `micro_costs` at the micro-batch (batch / M). Stage k works
    w_k per micro-batch: its modules' forward, loss and backward plus, but for the last stage, twice its
    output's sending time c_k (activation forward, gradient back); o_k is its optimizer step, once a batch.
    step = (M + S - 1) * max_k w_k + max_k o_k; one device: the sum of every module's :func:`backprop_work` at
    the batch. Without `micro_costs` a micro-batch is taken to cost 1/M of the batch (on a CPU core a
    micro-batch of 16 images costs more than that per image: measure it)."""
    m = micro_batches
    micro = micro_costs or [{**c, **{k: v / m for k, v in c.items() if k != "carries"}} for c in costs]
    work, optimizer = [], []
    for k, r in enumerate(stage_ranges(sizes)):
        sent = micro[r.stop - 1]["output_bytes"] / link_bytes_per_second if link_bytes_per_second else 0.0
        compute = sum(backprop_work(micro[i]) - micro[i]["optimizer"] for i in r)
        work.append(compute + (2 * sent if k < len(sizes) - 1 else 0.0))
        optimizer.append(sum(costs[i]["optimizer"] for i in r))
    single = sum(backprop_work(c) for c in costs)
    step = (m + len(sizes) - 1) * max(work) + max(optimizer)
    return {
        "stage_seconds": work,
        "step_seconds": step,
        "single_device_seconds": single,
        "speedup": single / step,
        "micro_batches": m,
    }


def profile(
    cfg: Config,
    build_learner: Callable[[Config], nn.Module],
    info,
    device: torch.device,
    num_stages: int,
    link_gbps: float = 0.0,
    micro_batches: int = 4,
) -> dict:
    """`python -m fastlocal.plan --profile --stages S`: every module's measured cost on `device` for DGL and
    MLAAN (the config's K, split and options; `build_learner(cfg)` builds a `LocalLearner`), the check of their
    sum against a measured single-device step, and the predicted steady step and speed-up of DGL, MLAAN exact,
    MLAAN stale and pipelined BP on S stages, each partitioned by its own costs. `info` holds the images'
    `image_size`, `num_classes`, `mean` and `std`. A model fed with measured costs: no pipeline runs here."""
    from fastlocal.schedule import forward_context_for

    forward_context = forward_context_for(device, cfg.system.precision)
    link = link_gbps * 1e9 / 8
    result: dict = {
        "device": str(device),
        "stages": num_stages,
        "batch_size": cfg.train.batch_size,
        "link_gbps": link_gbps or None,
        "methods": {},
        "predicted": {},
        "note": "modelled from measured per-module costs (docs/pipeline.md), not a measured pipeline; "
        "the link is " + (f"{link_gbps} Gbit/s" if link_gbps else "not modelled (free)"),
    }
    all_costs, learners = {}, {}
    for name in ("dgl", "mlaan"):
        method_cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=name))
        torch.manual_seed(cfg.system.seed)
        learner = build_learner(method_cfg)
        learner.backbone.to(device)
        learner.method.to(device)
        modules, method = learner.local_modules, learner.method
        costs = measure_module_costs(modules, method, method_cfg, info, device, forward_context)
        step = measure_single_device_step(modules, method, method_cfg, info, device, forward_context)
        total = sum(c["total"] for c in costs)
        result["methods"][name] = {
            "modules": costs,
            "sum_seconds": total,
            "measured_step_seconds": step,
            "sum_within_10_percent": abs(total - step) <= 0.1 * step,
        }
        all_costs[name] = (costs, method.window)
        learners[name] = learner
    dgl, _ = all_costs["dgl"]
    mlaan, window = all_costs["mlaan"]
    for label, costs, w, cascade in (
        ("dgl", dgl, 1, "exact"),
        ("mlaan_exact", mlaan, window, "exact"),
        ("mlaan_stale", mlaan, window, "stale"),
    ):
        sizes = partition([c["total"] for c in costs], num_stages)
        result["predicted"][label] = {"stage_sizes": sizes, **predict_step(costs, sizes, w, cascade, link)}
    # Pipelined BP: DGL's modules (the same split) timed as end-to-end backprop, at the batch (one device, and
    # the partition, as the trainer's) and at the micro-batch each 1F1B slot runs.
    dgl_learner = learners["dgl"]
    modules, backbone = dgl_learner.local_modules, dgl_learner.backbone
    bp = measure_backprop_costs(modules, backbone, cfg, info, device, forward_context)
    micro_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, batch_size=max(1, cfg.train.batch_size // micro_batches))
    )
    bp_micro = measure_backprop_costs(modules, backbone, micro_cfg, info, device, forward_context)
    bp_sizes = partition([backprop_work(c) for c in bp], num_stages)
    result["predicted"]["pipelined_bp"] = {
        "stage_sizes": bp_sizes,
        **predict_pipelined_bp(bp, bp_sizes, micro_batches, link, micro_costs=bp_micro),
    }
    return result
