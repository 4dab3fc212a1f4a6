"""LAM paired-branch fusion (mlaan.fuse_pair): the fused Aug_i[0](z) + EMA_i[0](z) against the unfused sum."""

import copy
from types import SimpleNamespace

import pytest
import torch
from builders import build

import fastlocal.methods.fused_pair as fused_pair
from fastlocal import kernels
from fastlocal.config import ConfigError, build_config
from fastlocal.methods import METHODS, Batch
from fastlocal.methods.mlaan import LeapAugmentedModule
from fastlocal.models import build_backbone
from fastlocal.models.cifar_resnet import use_fused_batch_norm
from fastlocal.schedule import local_train_step

RTOL = 1e-10  # float64: only the summation order inside convolutions and reductions differs


def assert_close(actual, expected, name=""):
    scale = max(expected.abs().max().item(), 1e-30)
    assert (actual - expected).abs().max().item() <= RTOL * scale, name


def make_method(fuse, arch="resnet32", k=15, **overrides):
    """(cfg, backbone, modules, method): MLAAN with fuse_pair on or off, float64."""
    items = [f"mlaan.fuse_pair={fuse}", *(f"{key.replace('__', '.')}={value}" for key, value in overrides.items())]
    return build("mlaan", arch, k, items)


def make_copies_differ(lam, seed=3):
    """Move the EMA copy and every BN buffer away from the Aug copy: a swapped or mixed-up half must show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in (lam.aug[0], lam.ema_first):
            for p in block.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            for name, buf in block.named_buffers():
                if name.endswith("running_mean"):
                    buf.add_(0.1 * torch.randn(buf.shape, generator=g, dtype=buf.dtype))
                elif name.endswith("running_var"):
                    buf.mul_(1 + 0.5 * torch.rand(buf.shape, generator=g, dtype=buf.dtype))


def lam_pair(module, memory_format=torch.contiguous_format, fused_batch_norm=None):
    """(unfused LAM, fused LAM) for `module` of ResNet-32 K=15: equal copies with Aug != EMA."""
    lam = make_method(False)[3].lams[str(module)]
    make_copies_differ(lam)
    use_fused_batch_norm([lam], fused_batch_norm)
    fused = copy.deepcopy(lam)
    fused.fuse_pair = True  # the same tensors, fused path
    lam.to(memory_format=memory_format)
    fused.to(memory_format=memory_format)
    return lam, fused


def forward_backward(lam, z, seed):
    """(output, grad of z) of the LAM, backpropagating a random cotangent drawn from `seed`."""
    z = z.detach().clone().requires_grad_()
    out = lam(z)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype))
    return out.detach(), z.grad


def compare_lams(module, memory_format=torch.contiguous_format, steps=2, fused_batch_norm=None):
    unfused, fused = lam_pair(module, memory_format, fused_batch_norm)
    assert fused.fuse_pair and not unfused.fuse_pair
    first = unfused.live_blocks[0]
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        z = torch.randn(4, first.conv1.in_channels, 16, 16, generator=g, dtype=torch.float64)
        z = z.contiguous(memory_format=memory_format)
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        for lam in (unfused, fused):
            lam.zero_grad(set_to_none=True)
        expected, expected_dz = forward_backward(unfused, z, seed)
        actual, actual_dz = forward_backward(fused, z, seed)
        assert_close(actual, expected, "output")
        assert_close(actual_dz, expected_dz, "grad z")
        for (name, p), q in zip(fused.named_parameters(), unfused.parameters(), strict=True):
            if name.startswith("ema_first"):
                assert p.grad is None and q.grad is None, name  # the frozen copy gets no gradient
            else:
                assert_close(p.grad, q.grad, name)
        state, expected_state = fused.state_dict(), unfused.state_dict()
        assert list(state) == list(expected_state)
        for name, value in state.items():
            if name.endswith("num_batches_tracked"):
                assert torch.equal(value, expected_state[name]), name
            else:
                assert_close(value, expected_state[name], name)
    # Evaluation mode uses each copy's own running statistics.
    unfused.eval()
    fused.eval()
    with torch.no_grad():
        assert_close(fused(z), unfused(z), "eval output")
    return unfused, fused


def test_fused_pair_matches_unfused_for_an_identity_shortcut_block():
    unfused, _ = compare_lams(10)  # module 10 of K=15 leaps over parts 12, 13, 15: stride 1, 64 channels
    block = unfused.aug[0]
    assert len(block.shortcut) == 0 and block.conv1.stride == (1, 1)


def test_fused_pair_matches_unfused_for_a_downsampling_block():
    unfused, _ = compare_lams(1)  # module 1 of K=15 starts its leaps at part 6: 16 -> 32 channels, stride 2
    block = unfused.aug[0]
    assert len(block.shortcut) == 2 and block.conv1.stride == (2, 2)


@pytest.mark.parametrize("module", [1, 10])
def test_fused_pair_works_in_channels_last(module):
    unfused, fused = compare_lams(module, torch.channels_last, steps=1)
    assert fused.aug[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("module", [1, 10])
def test_fused_pair_goes_through_batch_norm_act_when_the_blocks_use_it(module, monkeypatch):
    widths = []
    original = kernels.batch_norm_act

    def recorded(x, *args, **kwargs):
        widths.append(x.shape[1])
        return original(x, *args, **kwargs)

    # Only the fused pair's calls are recorded; the blocks' own forwards call the original.
    monkeypatch.setattr(fused_pair, "kernels", SimpleNamespace(batch_norm_act=recorded))
    # The unfused side runs BasicBlock's own fused forward: both sides use the same kernel.
    unfused, _ = compare_lams(module, steps=1, fused_batch_norm="reference")
    channels = unfused.aug[0].conv1.out_channels
    num_bns = 2 + (len(unfused.aug[0].shortcut) > 0)
    assert widths == [2 * channels] * num_bns  # one step: each fused BN pair once, at double width


def test_a_whole_step_gives_the_same_loss_gradients_and_state(monkeypatch):
    calls = []
    original = fused_pair.fused_pair_forward

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr("fastlocal.methods.mlaan.fused_pair_forward", counted)
    runs = []
    for fuse in (False, True):
        _, backbone, modules, method = make_method(fuse, arch="resnet20", k=4)
        assert all(lam.fuse_pair == fuse for lam in method.lams.values())
        params = [p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        losses, grads = [], []
        # Two steps: at step 0 Aug = EMA; after an SGD step and an EMA step the two halves differ.
        for _ in range(2):
            x = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64)
            y = torch.randint(0, 10, (6,), generator=g)
            optimizer.zero_grad()
            losses.append(local_train_step(modules, method, Batch(x, y, (0.5,) * 3, (0.5,) * 3)))
            grads.append([p.grad.clone() for p in params])
            optimizer.step()
        runs.append((losses, grads, {**backbone.state_dict(), **method.state_dict()}))
    assert len(calls) == 2 * len(method.lams)  # the fused run took the fused path at every LAM
    (losses, grads, state), (fused_losses, fused_grads, fused_state) = runs
    for step in range(2):
        assert_close(fused_losses[step], losses[step], f"loss {step}")
        for i, (p, q) in enumerate(zip(fused_grads[step], grads[step], strict=True)):
            assert_close(p, q, f"grad {i} step {step}")
    assert list(fused_state) == list(state)
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(fused_state[name], value), name
        else:
            assert_close(fused_state[name], value, name)


def test_fusion_changes_no_parameters_state_keys_or_ema_lists():
    plain, fused = make_method(False)[3], make_method(True)[3]
    assert list(plain.state_dict()) == list(fused.state_dict())
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in fused.named_parameters()]
    assert [t.shape for t in plain.ema_tensors()[0]] == [t.shape for t in fused.ema_tensors()[0]]
    fused.load_state_dict(plain.state_dict())  # checkpoints load either way


def test_blocks_that_are_not_cifar_basic_blocks_keep_the_unfused_path():
    backbone = build_backbone("resnet18", 10, 32).double()
    lam = LeapAugmentedModule([backbone.parts[5], backbone.parts[7]], fuse_pair=True)  # torchvision blocks
    assert not lam.fuse_pair
    z = torch.randn(2, 128, 8, 8, dtype=torch.float64)
    assert lam(z).shape == (2, 512, 2, 2)
    cifar = build_backbone("resnet20", 10, 32)
    different = copy.deepcopy(cifar.parts[4])
    different.bn1.eps = 1e-3  # copies that differ in structure are not fused either
    assert not fused_pair.pair_is_fusable(cifar.parts[4], different)
    assert fused_pair.pair_is_fusable(cifar.parts[4], copy.deepcopy(cifar.parts[4]))


def test_literal_lam_mode_ignores_the_flag():
    method = make_method(True, k=8, mlaan__lam_mode="literal")[3]
    assert all(lam.ema_first is None and not lam.fuse_pair for lam in method.lams.values())


def test_mixed_train_and_eval_copies_fall_back_to_the_unfused_path(monkeypatch):
    unfused, fused = lam_pair(10)
    for lam in (unfused, fused):
        lam.ema_first.eval()
    monkeypatch.setattr("fastlocal.methods.mlaan.fused_pair_forward", None)  # a call would fail
    z = torch.randn(2, 64, 8, 8, dtype=torch.float64)
    assert_close(fused(z), unfused(z))


def test_fuse_pair_config_flag():
    assert build_config(None, [], METHODS).mlaan.fuse_pair is False
    assert build_config(None, ["mlaan.fuse_pair=true"], METHODS).mlaan.fuse_pair is True
    with pytest.raises(ConfigError, match="mlaan.fuse_pair must be true or false, got 'sometimes'"):
        build_config(None, ["mlaan.fuse_pair=sometimes"], METHODS)
