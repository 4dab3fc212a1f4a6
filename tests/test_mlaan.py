"""MLAAN and InfoPro: the engine's single-forward step against a literal step written from
docs/method.md#methods."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from builders import build

from fastlocal.measure import SavedTensorAccountant, parameter_storages
from fastlocal.methods import Batch
from fastlocal.methods.leaps import check_leaps, leap_lists
from fastlocal.models import build_backbone
from fastlocal.schedule import local_train_step
from fastlocal.split import max_modules, split_parts

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def make(arch="resnet32", k=8, dtype=torch.float64, method="mlaan", seed=0, **overrides):
    """Overrides as keyword arguments, section and key joined by a double underscore."""
    return build(
        method, arch, k, [f"{key.replace('__', '.')}={value}" for key, value in overrides.items()], dtype, seed
    )


def batch(n=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g, dtype=dtype)
    return Batch(x, torch.tensor([0, 1, 0, 1, 2, 3, 2, 3][:n]), MEAN, STD)


def literal_mlaan_step(cfg, backbone, modules, method, b):
    """docs/method.md#methods as the authors' code computes it: every window recomputed from a detached input, the
    independent term on a module-local recomputation, one backward of the sum, then the EMA loop."""
    num_modules, window = len(modules), cfg.mlaan.window
    wx, wy = cfg.mlaan.wx, cfg.mlaan.wy
    c_own, c_prop = cfg.mlaan.final_weights
    with torch.no_grad():
        acts, h = [], b.x
        for module in modules:
            h = module(h)
            acts.append(h)

    def run(start, stop):  # modules start..stop from a detached input
        z = b.x if start == 0 else acts[start - 1].detach()
        for j in range(start, stop + 1):
            z = modules[j](z)
        return z

    total = 0.0
    for i in range(window - 1, num_modules - 1):
        key = str(i)
        if key not in method.own_objectives:
            continue
        a_own = run(i, i)
        total = total + wx * method.own_objectives[key](a_own, b)
        z = run(max(0, i - window + 1), i)
        if key in method.lams:
            lam = method.lams[key]
            z = lam.aug[0](z) + lam.ema_first(z)
            for block in lam.aug[1:]:
                z = block(z)
        total = total + wy * method.cascaded_objectives[key](z, b)
    z = run(max(0, num_modules - window), num_modules - 1)
    total = total + c_prop * F.cross_entropy(backbone.head(z), b.y)
    if c_own != c_prop:
        total = total + (c_own - c_prop) * F.cross_entropy(backbone.head(run(num_modules - 1, num_modules - 1)), b.y)
    total.backward()
    with torch.no_grad():
        m = cfg.mlaan.ema_momentum
        keys = list(method.lams.keys())
        for key in keys if cfg.mlaan.ema_scope == "all" else keys[-1:]:
            lam = method.lams[key]
            for ema, live in zip(lam.ema_first.parameters(), lam.live_blocks[0].parameters()):
                ema.mul_(m).add_(live, alpha=1 - m)


def perturb(backbone, scale=0.05, seed=7):
    """Move the live weights away from their copies, so an EMA step changes something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def compare_fast_and_literal(arch, k, **overrides):
    cfg, backbone, modules, method = make(arch, k, **overrides)
    perturb(backbone)
    slow = copy.deepcopy((backbone, modules, method))
    b = batch()
    local_train_step(modules, method, b)
    literal_mlaan_step(cfg, *slow, b)
    fast_params = [*backbone.parameters(), *method.parameters()]
    slow_params = [*slow[0].parameters(), *slow[2].parameters()]
    assert len(fast_params) == len(slow_params)
    checked = 0
    for (name, p), q in zip([*backbone.named_parameters(), *method.named_parameters()], slow_params):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        scale = q.grad.abs().max().item()
        assert (p.grad - q.grad).abs().max().item() <= 1e-10 * max(scale, 1e-30), name
        checked += 1
    assert checked > 0
    for (name, p), q in zip(method.state_dict().items(), slow[2].state_dict().values()):
        if "ema_first" in name and "running" not in name and "num_batches" not in name:
            assert torch.allclose(p, q, rtol=1e-12, atol=1e-15), name
    return method


@pytest.mark.parametrize("k", [8, 15, 6])
@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize("lam", [True, False])
def test_fast_step_matches_literal_step_dgl_base(k, window, lam):
    compare_fast_and_literal("resnet32", k, mlaan__window=window, mlaan__lam=lam)


@pytest.mark.parametrize("k,window,lam", [(8, 2, True), (15, 3, True), (6, 2, False), (15, 2, True)])
def test_fast_step_matches_literal_step_infopro_base(k, window, lam):
    compare_fast_and_literal("resnet32", k, mlaan__base="infopro", mlaan__window=window, mlaan__lam=lam)


@pytest.mark.parametrize("scope", ["all", "last"])
def test_ema_state_after_a_step_matches_for_both_scopes(scope):
    method = compare_fast_and_literal("resnet32", 8, mlaan__ema_scope=scope)
    moved = [not torch.equal(lam.ema_first.conv1.weight, lam.aug[0].conv1.weight) for lam in method.lams.values()]
    # The copies start equal to the live block; after a perturbed step only the EMA'd ones moved.
    assert moved == ([True] * len(moved) if scope == "all" else [False] * (len(moved) - 1) + [True])


def test_final_weights_other_than_one_one_match_literal():
    compare_fast_and_literal("resnet32", 8, mlaan__final_weights="1.0,0.999", mlaan__window=3)


def grads_reached_by(method, modules, b, poison):
    """Run a step with `poison` (a callable given the method) making one term NaN; return which
    modules' parameters got NaN gradients."""
    for p in [*method.backbone.parameters(), *method.parameters()]:
        p.grad = None
    handles = poison(method)
    local_train_step(modules, method, b)
    for h in handles:
        h.remove()
    return [i for i, m in enumerate(modules) if any(not torch.isfinite(p.grad).all() for p in m.parameters())]


def nan_output(module):
    return module.register_forward_hook(lambda mod, inputs, out: out * math.nan)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_which_modules_each_loss_reaches(window):
    k = 8
    _, _, modules, method = make(k=k, mlaan__window=window)
    b = batch()
    heads = range(window - 1, k - 1)
    assert sorted(int(key) for key in method.own_objectives) == list(heads)  # modules 0..W-2 have no head
    for i in heads:
        key = str(i)
        reached = grads_reached_by(method, modules, b, lambda m, key=key: [nan_output(m.own_objectives[key])])
        assert reached == [i], ("independent term", i)
        reached = grads_reached_by(method, modules, b, lambda m, key=key: [nan_output(m.cascaded_objectives[key])])
        assert reached == list(range(max(0, i - window + 1), i + 1)), ("cascaded term", i)
    reached = grads_reached_by(method, modules, b, lambda m: [nan_output(m.backbone.head)])
    assert reached == list(range(max(0, k - window), k)), "final loss"


def test_lam_copies_are_trained_by_the_cascaded_term_only_and_ema_copies_are_frozen():
    _, _, modules, method = make(k=8)
    b = batch()
    key = "3"
    reached_lam = []
    for poison_key in ("own", "cascaded"):
        for p in method.parameters():
            p.grad = None
        objectives = method.own_objectives if poison_key == "own" else method.cascaded_objectives
        h = nan_output(objectives[key])
        local_train_step(modules, method, b)
        h.remove()
        reached_lam.append(any(not torch.isfinite(p.grad).all() for p in method.lams[key].aug.parameters()))
    assert reached_lam == [False, True]
    assert all(not p.requires_grad for p in method.lams[key].ema_first.parameters())


def test_each_lam_has_one_frozen_copy_the_size_of_its_first_leap_block():
    _, backbone, _, method = make(k=15, dtype=torch.float32)
    for key, lam in method.lams.items():
        frozen = [p for p in lam.parameters() if not p.requires_grad]
        first = backbone.parts[method.leap_parts[int(key)][0]]
        assert sum(p.numel() for p in frozen) == sum(p.numel() for p in first.parameters()), key
        assert [p.shape for p in frozen] == [p.shape for p in first.parameters()], key


@pytest.mark.parametrize("arch", ["resnet20", "resnet32", "resnet110"])
def test_generated_leap_lists_are_valid_for_every_k(arch):
    backbone = build_backbone(arch, 10, 32)
    for stem_separate in (False, True):
        for k in range(2, max_modules(len(backbone.blocks), stem_separate) + 1):
            if stem_separate and k < 2:
                continue
            parts = split_parts(backbone, k, stem_separate)
            lists, _ = leap_lists(backbone, arch, parts, list(range(k - 1)), "generated")
            for i, leaps in lists.items():
                check_leaps(backbone, parts[i][-1], leaps)
                assert leaps[-1] == len(backbone.blocks)  # ends at the last block
                assert backbone.part_info[leaps[-1]].out_channels == backbone.part_info[-1].out_channels


@pytest.mark.parametrize("arch,k", [("resnet34", 16), ("resnet50", 8)])
def test_generated_leap_lists_are_valid_for_imagenet_resnets(arch, k):
    backbone = build_backbone(arch, 1000, 64)
    parts = split_parts(backbone, k)
    lists, _ = leap_lists(backbone, arch, parts, list(range(k - 1)), "auto")
    for i, leaps in lists.items():
        check_leaps(backbone, parts[i][-1], leaps)


def test_reference_leaps_for_unknown_k_is_a_clear_error():
    with pytest.raises(ValueError, match="no leap table for resnet32 K=5"):
        make(k=5, mlaan__leaps="reference")


def peak_saved(method, arch, k, n=4, **overrides):
    _, backbone, modules, m = make(arch, k, dtype=torch.float32, method=method, **overrides)
    with SavedTensorAccountant(ignore=parameter_storages(backbone, m)) as acct:
        local_train_step(modules, m, batch(n, torch.float32))
    return acct.peak_bytes


def test_mlaan_memory_below_bp():
    bp32 = peak_saved("bp", "resnet32", 1)
    assert peak_saved("mlaan", "resnet32", 15) < bp32
    bp110 = peak_saved("bp", "resnet110", 1)
    assert peak_saved("mlaan", "resnet110", 54) < 0.35 * bp110


def test_infopro_weights_and_zero_weight_warning():
    from fastlocal.methods.objectives import infopro_weights

    assert infopro_weights((5, 0.5, 0, 1), 0, 6) == (5, 0.5)
    assert infopro_weights((5, 0.5, 0, 1), 4, 6) == (0, 1)
    assert infopro_weights((5, 0.5, 0, 1), 2, 6) == pytest.approx((2.5, 0.75))
    with pytest.warns(UserWarning, match=r"local module\(s\) \[6\] are reached by no loss"):
        make(k=8, method="infopro", infopro__weights="5,0.5,0,0")


def test_paper_infopro_weights_with_a_cascade_train_module_k_minus_2_and_build_no_lam_for_it():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "never trained" warning: the final loss reaches module K-2
        _, _, modules, method = make(k=8, mlaan__base="infopro", infopro__weights="5,0.5,0,0", mlaan__window=2)
    assert "6" not in method.lams and "6" not in method.own_objectives and "6" not in method.cascaded_objectives
    assert sorted(method.lams) == ["1", "2", "3", "4", "5"]
    local_train_step(modules, method, batch())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in modules[6].parameters())
    with pytest.warns(UserWarning, match=r"local module\(s\) \[6\] are reached by no loss"):
        make(k=8, mlaan__base="infopro", infopro__weights="5,0.5,0,0", mlaan__window=1)


def test_infopro_trains_with_supcon():
    _, backbone, modules, method = make(k=4, method="infopro", infopro__label_loss="supcon")
    local_train_step(modules, method, batch())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in backbone.parameters())


def test_supcon_matches_a_direct_formula():
    from fastlocal.methods.objectives import supcon_loss

    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2])  # label 2 has no positive: left out
    z = F.normalize(f, dim=1)
    losses = []
    for i in range(6):
        pos = [p for p in range(6) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = sum(torch.exp(z[i] @ z[a] / 0.07) for a in range(6) if a != i)
        losses.append(-sum(torch.log(torch.exp(z[i] @ z[p] / 0.07) / denom) for p in pos) / len(pos))
    torch.testing.assert_close(supcon_loss(f, y).double(), torch.stack(losses).mean())


def test_paper_literal_lam_trains_its_copies_and_pulls_them_toward_the_live_blocks():
    _, backbone, modules, method = make(k=8, mlaan__lam_mode="literal")
    lam = method.lams["3"]
    assert lam.ema_first is None and all(p.requires_grad for p in lam.aug.parameters())
    perturb(backbone)
    before = [p.detach().clone() for p in lam.aug.parameters()]
    live = [p.detach().clone() for block in lam.live_blocks for p in block.parameters()]
    local_train_step(modules, method, batch())  # gradients, then the EMA (before any optimizer step)
    m = method.ema_momentum
    for p, old, target in zip(lam.aug.parameters(), before, live, strict=True):
        torch.testing.assert_close(p.detach(), m * old + (1 - m) * target, rtol=1e-12, atol=1e-15)
        assert p.grad is not None


def bilinear_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D linear interpolation with the corners aligned: output i
    samples input position i * (size_in - 1) / (size_out - 1)."""
    a = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        pos = i * (size_in - 1) / (size_out - 1)
        lo = min(int(pos), size_in - 2)
        frac = pos - lo
        a[i, lo] += 1 - frac
        a[i, lo + 1] += frac
    return a


def test_infopro_objective_is_bce_with_logits_of_a_bilinear_decoder_written_here():
    _, _, _, method = make(k=4, method="infopro")  # weights (5, 0.5, 0, 1); module 1 of K=4: r = 1/2
    objective = method.objectives["1"]
    recon_weight, label_weight = 2.5, 0.75  # (5*(1-r) + 0*r, 0.5*(1-r) + 1*r), r = 1/2
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 32, 16, 16, generator=g, dtype=torch.float64)  # module 1's output: 32 channels, 16 px
    b = batch()
    dec = objective.decoder
    a = bilinear_matrix(16, 32)
    up = torch.einsum("ij,bcjk,lk->bcil", a, h, a)  # upsample rows and columns to 32x32
    z = F.conv2d(up, dec.conv1.weight, dec.conv1.bias, padding=1)
    mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    z = (z - mean) / torch.sqrt(var + 1e-5) * dec.bn.weight.view(1, -1, 1, 1) + dec.bn.bias.view(1, -1, 1, 1)
    logits = F.conv2d(torch.relu(z), dec.conv2.weight, dec.conv2.bias, padding=1)
    std, mean = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (STD, MEAN))
    target = (b.x * std + mean).clamp(0, 1)
    # -(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))), with log sigmoid(z) = -softplus(-z) and
    # log(1 - sigmoid(z)) = -softplus(z) (the logs of saturated sigmoids lose digits in float64 too)
    bce = (target * F.softplus(-logits) + (1 - target) * F.softplus(logits)).mean()
    label = F.cross_entropy(objective.head(h), b.y)
    expected = recon_weight * bce + label_weight * label
    torch.testing.assert_close(objective(h, b), expected, rtol=1e-10, atol=1e-12)


def test_ema_follows_the_pre_step_live_weight_across_an_optimizer_step():
    from fastlocal.optim import build_optimizer

    cfg, backbone, modules, method = make(k=8)
    perturb(backbone)  # the live blocks move away from the copies taken at build time
    params = [p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    lam = method.lams["3"]
    live_before = [p.detach().clone() for p in lam.live_blocks[0].parameters()]
    ema_before = [p.detach().clone() for p in lam.ema_first.parameters()]
    local_train_step(modules, method, batch())
    optimizer.step()
    m = 0.995
    for ema, e0, live, l0 in zip(
        lam.ema_first.parameters(), ema_before, lam.live_blocks[0].parameters(), live_before, strict=True
    ):
        torch.testing.assert_close(ema.detach(), m * e0 + (1 - m) * l0, rtol=1e-12, atol=1e-15)
        if live.dim() > 1:  # the optimizer moved the live weight, and the EMA did not follow the new value
            assert (live - l0).abs().max() > 1e-6
            assert (ema - (m * e0 + (1 - m) * live)).abs().max() > 1e-9


@pytest.mark.parametrize(
    "method,overrides,convs_linears",
    [
        ("mlaan", [], (0, 1)),  # auto on a DGL base: GAP + Linear, the paper's "MLAAN" row
        ("mlaan", ["mlaan.base=infopro"], (1, 2)),
        ("dgl", [], (1, 2)),
        ("infopro", [], (1, 2)),
        ("mlaan", ["method.head=2c2f"], (2, 2)),
    ],
)
def test_each_method_resolves_head_auto(method, overrides, convs_linears):
    _, _, _, built = build(method, "resnet20", 3, overrides, dtype=torch.float32)
    heads = [m.head for m in built.modules() if isinstance(getattr(m, "head", None), torch.nn.Module)]
    assert heads
    for head in heads:
        kinds = [type(m) for m in head.modules()]
        assert (kinds.count(torch.nn.Conv2d), kinds.count(torch.nn.Linear)) == convs_linears
