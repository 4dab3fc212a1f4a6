"""fastlocal/memory.py: a step's memory by component, measured at small batches and extrapolated."""

import json

import pytest
import torch

from fastlocal import plan
from fastlocal.config import build_config
from fastlocal.memory import COMPONENTS, StepMemory, extrapolate
from fastlocal.methods import METHODS

TINY = ["model.arch=resnet20", "system.device=cpu"]


def config(*items):
    return build_config(None, [*TINY, *items], METHODS)


@pytest.mark.parametrize(
    "items",
    [
        ["method.name=bp"],
        ["method.name=mlaan", "method.num_modules=4"],
        ["method.name=mlaan", "method.num_modules=4", "system.recompute=all", "system.fused_optimizer_step=true"],
    ],
    ids=["bp", "mlaan", "mlaan-lowest"],
)
def test_extrapolated_activations_match_a_measurement_at_a_larger_batch(items):
    meter = StepMemory(config(*items), 10, 16)
    small = [meter.measure(2), meter.measure(4)]
    predicted = extrapolate(small, 12)
    measured = meter.measure(12)
    assert abs(predicted["activations"] - measured["activations"]) <= 0.05 * measured["activations"]
    assert abs(predicted["total"] - measured["total"]) <= 0.05 * measured["total"]


def test_components_count_what_the_model_holds():
    cfg = config("method.name=mlaan", "method.num_modules=4", "optim.momentum=0.9")
    meter = StepMemory(cfg, 10, 16)
    step = meter.measure(2)
    params = list(meter.learner.parameters())
    trainable = sum(p.numel() * 4 for p in params if p.requires_grad)
    frozen = sum(p.numel() * 4 for p in params if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in meter.learner.buffers())
    assert frozen > 0  # the EMA copies
    assert step["parameters"] == trainable + buffers
    assert step["frozen"] == frozen
    assert step["optimizer"] == trainable  # one momentum buffer per parameter
    assert step["gradients"] == trainable  # the plain step holds every gradient at its end
    assert step["total"] == sum(step[k] for k in COMPONENTS[:-1])


def test_fused_step_and_recompute_lower_gradients_and_activations():
    plain = StepMemory(config("method.name=mlaan", "method.num_modules=4"), 10, 16).measure(4)
    lowest = StepMemory(
        config("method.name=mlaan", "method.num_modules=4", "system.recompute=all", "system.fused_optimizer_step=true"),
        10,
        16,
    ).measure(4)
    assert lowest["gradients"] < 0.7 * plain["gradients"]
    assert lowest["activations"] < 0.7 * plain["activations"]
    assert lowest["parameters"] == plain["parameters"] and lowest["optimizer"] == plain["optimizer"]


def test_measuring_leaves_the_model_as_it_was():
    meter = StepMemory(config("method.name=mlaan", "method.num_modules=3"), 10, 16)
    before = {k: v.clone() for k, v in meter.learner.state_dict().items()}
    meter.measure(2)
    for key, value in meter.learner.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not meter.optimizer.state


def test_plan_memory_prints_the_six_components(capsys):
    argv = [*(f"--{item}" for item in TINY), "--method.name=dgl", "--method.num_modules=3", "--memory", "--batch=64"]
    assert plan.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["memory"]) == set(COMPONENTS)
    assert all(isinstance(v, int) for v in result["memory"].values())
    assert result["memory"]["frozen"] == 0 and min(result["memory"].values()) >= 0  # DGL has no EMA copies
    assert result["memory"]["activations"] > 0
    assert result["memory_measurement"]["batch_size"] == 64
    assert result["memory_measurement"]["small_batches"][0]["batch_size"] == 2


def test_on_cuda_activations_are_the_allocator_peak_less_the_baseline_and_the_gradients(monkeypatch):
    """The CUDA branch's bookkeeping, with a fake allocator (this machine has no GPU; the real reading is the GPU
    script's): one unmeasured step first (it creates the optimizer state), then the baseline, then the measured
    step; activations = its peak - the baseline - the gradients alive at its end."""
    baseline, peak = 10_000_000, 25_000_000
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: events.append("baseline") or baseline)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: events.append("peak") or peak)
    meter = StepMemory(config("method.name=mlaan", "method.num_modules=3"), 10, 16)
    meter.reads_allocator = True
    step_of = meter._step
    monkeypatch.setattr(meter, "_step", lambda *args: events.append("step") or step_of(*args))
    step = meter.measure(2)
    assert events == ["step", "baseline", "step", "peak"]
    trainable = sum(p.numel() * 4 for p in meter.learner.parameters() if p.requires_grad)
    assert step["gradients"] == trainable
    assert step["activations"] == peak - baseline - trainable
    assert step["measured_on"].startswith("cuda allocator")
    assert not meter.optimizer.state  # the unmeasured step trained nothing either
