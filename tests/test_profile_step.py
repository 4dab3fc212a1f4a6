"""scripts/profile_step.py's cost counter, whose FLOP and byte ratios docs/fast-path.md quotes."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

_SPEC = importlib.util.spec_from_file_location(
    "profile_step", Path(__file__).parents[1] / "scripts" / "profile_step.py"
)
profile_step = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(profile_step)


def test_cost_of_a_convolution_and_a_relu_counted_by_hand():
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    with profile_step.StepCost() as cost:
        y = F.conv2d(x, w, padding=1)  # a (2, 4, 5, 5) output
        z = F.relu(y)
        z.view(-1).detach()  # views: no traffic
    assert z.shape == (2, 4, 5, 5)
    assert cost.flops == 2 * (2 * 4 * 5 * 5) * (3 * 3 * 3)  # a multiply and an add per weight per output
    conv_bytes = 4 * (x.numel() + w.numel() + y.numel())
    relu_bytes = 4 * (y.numel() + z.numel())
    assert cost.bytes == conv_bytes + relu_bytes


def test_mlaan_costs_more_than_dgl_which_costs_more_than_bp():
    bp = profile_step.step_cost("resnet32", "bp", 1, batch=2)
    dgl = profile_step.step_cost("resnet32", "dgl", 4, batch=2)
    mlaan = profile_step.step_cost("resnet32", "mlaan", 4, batch=2)
    for kind in (0, 1):  # FLOPs, then bytes
        assert bp[kind] < dgl[kind] < mlaan[kind]
