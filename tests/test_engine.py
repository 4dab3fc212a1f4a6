"""The local backward schedule: gradient isolation, equivalence with BP and a literal DGL, memory."""

import math

import pytest
import torch
import torch.nn.functional as F
from builders import LossScaler, build

from fastlocal.config import build_config
from fastlocal.measure import SavedTensorAccountant, parameter_storages
from fastlocal.methods import METHODS, Batch
from fastlocal.optim import build_optimizer, learning_rate
from fastlocal.schedule import local_train_step

CIFAR_MEAN, CIFAR_STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def make(method="dgl", arch="resnet20", k=4, dtype=torch.float64, seed=0, **method_overrides):
    return build(method, arch, k, [f"method.{key}={value}" for key, value in method_overrides.items()], dtype, seed)


def batch(n=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(n, 3, 32, 32, generator=g, dtype=dtype),
        torch.randint(0, 10, (n,), generator=g),
        CIFAR_MEAN,
        CIFAR_STD,
    )


def all_params(backbone, method):
    return [*backbone.parameters(), *method.parameters()]


@pytest.mark.parametrize("k", [2, 4, 9])
def test_dgl_each_module_gets_gradient_from_its_own_loss_only(k):
    _, backbone, modules, method = make(k=k)
    b = batch()
    for probe in range(k):
        # Every loss but the probed one is multiplied by NaN: any parameter it reaches gets a NaN gradient.
        scales = [1.0 if i == probe else math.nan for i in range(k)]
        for p in all_params(backbone, method):
            p.grad = None
        local_train_step(modules, LossScaler(method, scales), b)
        for i, module in enumerate(modules):
            grads = [p.grad for p in module.parameters()]
            assert all(g is not None for g in grads)
            finite = all(torch.isfinite(g).all() for g in grads)
            assert finite == (i == probe), f"loss {probe} vs module {i}"
            if i == probe:
                assert sum(g.abs().sum() for g in grads) > 0


def test_dgl_matches_a_literal_reference_step():
    _, backbone, modules, method = make(k=5)
    b = batch()
    local_train_step(modules, method, b)
    fast = [p.grad.clone() for p in all_params(backbone, method)]
    for p in all_params(backbone, method):
        p.grad = None
    # Literal DGL: forward module by module, detach between modules, each loss backward on its own.
    h = b.x
    for i, module in enumerate(modules):
        h = module(h.detach())
        head = backbone.head if i == len(modules) - 1 else method.objectives[str(i)].head
        F.cross_entropy(head(h), b.y).backward()
    slow = [p.grad for p in all_params(backbone, method)]
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-12, atol=1e-14)


def _restore_bn_state(backbone, state):
    backbone.load_state_dict(state)


def test_dgl_with_one_module_is_exactly_bp():
    cfg, backbone, modules, method = make(k=1)
    _, ref_backbone, _, _ = make(method="bp", k=1)
    ref_backbone.load_state_dict(backbone.state_dict())
    opt = build_optimizer(all_params(backbone, method), cfg)
    ref_opt = build_optimizer(list(ref_backbone.parameters()), cfg)
    for step in range(3):
        b = batch(seed=step)
        opt.zero_grad()
        local_train_step(modules, method, b)
        opt.step()
        ref_opt.zero_grad()  # plain end-to-end backprop, written out
        F.cross_entropy(ref_backbone(b.x), b.y).backward()
        ref_opt.step()
    assert len(list(method.parameters())) == 0
    for (name, p), q in zip(backbone.state_dict().items(), ref_backbone.state_dict().values()):
        assert torch.equal(p, q), name


def test_bp_method_equals_dgl_k1_and_refuses_k_above_1():
    _, b1, m1, method1 = make("bp", k=1, seed=3)
    _, b2, m2, method2 = make("dgl", k=1, seed=3)
    b = batch()
    local_train_step(m1, method1, b)
    local_train_step(m2, method2, b)
    for p, q in zip(b1.parameters(), b2.parameters()):
        assert torch.equal(p.grad, q.grad)
    with pytest.raises(ValueError, match="method.num_modules must be 1"):
        make("bp", k=2)


@pytest.mark.parametrize("head", ["0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f"])
def test_every_head_type_trains(head):
    _, backbone, modules, method = make(k=3, head=head)
    local_train_step(modules, method, batch())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())


def peak_saved_bytes(method_name, arch, k, n=4):
    _, backbone, modules, method = make(method_name, arch, k, dtype=torch.float32)
    b = batch(n, dtype=torch.float32)
    with SavedTensorAccountant(ignore=parameter_storages(backbone, method)) as acct:
        local_train_step(modules, method, b)
    return acct.peak_bytes


def test_dgl_resnet110_k54_holds_under_a_fifth_of_bp_activation_memory():
    bp = peak_saved_bytes("bp", "resnet110", 1)
    dgl = peak_saved_bytes("dgl", "resnet110", 54)
    assert dgl < bp / 5, (dgl, bp)


def test_saved_bytes_accounting_is_exact_for_a_known_graph():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 4, requires_grad=True)
    with SavedTensorAccountant(ignore=[w]) as acct:
        y = torch.relu(x @ w)  # matmul saves x (and w, ignored); relu saves its output
        assert acct.current_bytes == 8 * 16 * 4 + 8 * 4 * 4
        y.sum().backward()
    assert acct.current_bytes == 0 and acct.peak_bytes == 8 * 16 * 4 + 8 * 4 * 4


def test_reference_lr_schedule_matches_spec_formula():
    cfg = build_config(None, ["optim.schedule=ref", "optim.lr=0.8", "train.epochs=400"], METHODS)
    assert learning_rate(cfg, 0, 0, 10) == pytest.approx(0.01)  # e = 1: warmup starts at 0.01
    e = 5
    expected = 0.5 * 0.8 * (1 + math.cos(math.pi * e / 400)) * (e - 1) / 10 + 0.01 * (11 - e) / 10
    assert learning_rate(cfg, e - 1, 3, 10) == pytest.approx(expected)
    assert learning_rate(cfg, 399, 0, 10) == pytest.approx(0.0, abs=1e-12)


def test_imagenet_cosine_epoch_schedule():
    cfg = build_config(None, ["optim.schedule=cosine_epoch", "optim.lr=0.05", "train.epochs=150"], METHODS)
    assert learning_rate(cfg, 0, 5, 10) == pytest.approx(0.05)
    assert learning_rate(cfg, 75, 0, 10) == pytest.approx(0.025)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = build_config(None, ["optim.lr=0.4", "train.epochs=3", "optim.warmup_epochs=1"], METHODS)
    lrs = [learning_rate(cfg, e, s, 10) for e in range(3) for s in range(10)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 0.01


def test_denormalised_images_use_constants_made_once():
    from fastlocal.methods import base

    x = torch.randn(2, 3, 4, 4)
    batch = Batch(x, torch.zeros(2, dtype=torch.long), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    expected = x * torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1) + torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(batch.images01(), expected.clamp(0, 1))
    # The same constant tensors on every step: no host-to-device copy inside a step (CUDA-graph safe).
    first = base._channel_constants((0.5, 0.4, 0.3), x.device, x.dtype)
    batch.images01()
    assert base._channel_constants((0.5, 0.4, 0.3), x.device, x.dtype) is first
