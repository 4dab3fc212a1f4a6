"""Linear probes: a linear classifier on frozen features, the paper's "layer-wise linear separability"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeResult:
    train_acc: float
    """Top-1 accuracy (%) on the features it was trained on."""
    test_acc: float
    """Top-1 accuracy (%) on held-out features."""


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> ProbeResult:
    """Multinomial logistic regression on train_x: (n, d) -> train_y: (n,), tested on (test_x, test_y).

    The features are standardised with the training split's mean and std. Full-batch L-BFGS with a strong
    Wolfe line search from zero weights: deterministic, and it converges on the few thousand to ~50,000
    pooled features (d <= 2048) a probe sees; `weight_decay` (an L2 penalty on the weights, not the bias)
    keeps the optimum finite on separable features."""
    train_x, test_x = train_x.float(), test_x.float()
    mean = train_x.mean(0)
    std = train_x.std(0).clamp_min(1e-6)  # constant (dead) channels carry no information
    train_x = (train_x - mean) / std
    test_x = (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], num_classes, device=train_x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=train_x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        train_acc = (train_x @ weight + bias).argmax(1).eq(train_y).float().mean().item()
        test_acc = (test_x @ weight + bias).argmax(1).eq(test_y).float().mean().item()
    return ProbeResult(100 * train_acc, 100 * test_acc)
