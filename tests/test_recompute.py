"""system.recompute and system.fused_optimizer_step change memory, not the math: in float64, several SGD steps
with either option leave the same weights, batch-norm running statistics, EMA copies and momentum buffers as
the plain step, for every method and MLAAN window (fastlocal/recompute.py, FusedOptimizerStep in
fastlocal/schedule.py)."""

import functools

import pytest
import torch

from fastlocal.build import build_learner
from fastlocal.config import ConfigError, build_config
from fastlocal.measure import SavedTensorAccountant, parameter_storages
from fastlocal.methods import METHODS, Batch
from fastlocal.methods import mlaan as mlaan_module
from fastlocal.optim import build_optimizer, step_parameters
from fastlocal.schedule import forward_context_for, local_train_step

STEPS = 3
IMAGE = 16

CASES = {
    "bp": ["method.name=bp"],
    "dgl": ["method.name=dgl", "method.num_modules=3"],
    "infopro": ["method.name=infopro", "method.num_modules=3"],
    "mlaan-w1": ["method.name=mlaan", "method.num_modules=4", "mlaan.window=1"],
    "mlaan-w2": ["method.name=mlaan", "method.num_modules=4", "mlaan.window=2"],
    "mlaan-w3": ["method.name=mlaan", "method.num_modules=4", "mlaan.window=3"],
    "mlaan-w2-no-lam": ["method.name=mlaan", "method.num_modules=4", "mlaan.lam=false"],
    "mlaan-infopro-w2": ["method.name=mlaan", "method.num_modules=4", "mlaan.base=infopro"],
    "mlaan-literal": ["method.name=mlaan", "method.num_modules=4", "mlaan.lam_mode=literal"],
}


def build(items, *extra):
    cfg = build_config(
        None,
        [
            "model.arch=resnet20",
            "optim.lr=0.2",
            "optim.weight_decay=0.01",
            "mlaan.ema_momentum=0.5",  # the EMA moves a lot: a wrong EMA read shows
            *items,
            *extra,
        ],
        METHODS,
    )
    torch.manual_seed(0)
    learner = build_learner(cfg, 10, IMAGE).double()
    params = [p for p in learner.parameters() if p.requires_grad]
    return learner, build_optimizer(params, cfg)


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(4, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
        yield Batch(x, torch.randint(0, 10, (4,), generator=g), (0.5,) * 3, (0.25,) * 3)


def train(items, *extra, fused=False):
    learner, optimizer = build(items, *extra)
    for batch in batches():
        optimizer.zero_grad(set_to_none=True)
        if fused:
            local_train_step(
                learner.local_modules,
                learner.method,
                batch,
                step_parameters=functools.partial(step_parameters, optimizer),
            )
            assert all(p.grad is None for p in learner.parameters()), "the fused step frees every gradient"
        else:
            local_train_step(learner.local_modules, learner.method, batch)
            optimizer.step()
    return learner, optimizer


def assert_same_state(reference, other):
    (learner_a, optimizer_a), (learner_b, optimizer_b) = reference, other
    state_a, state_b = learner_a.state_dict(), learner_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():  # weights, running statistics, batch counts, EMA copies
        torch.testing.assert_close(state_b[key], value, rtol=1e-9, atol=1e-12, msg=f"{key} differs")
    buffers_a = [optimizer_a.state[p]["momentum_buffer"] for p in learner_a.parameters() if p.requires_grad]
    buffers_b = [optimizer_b.state[p]["momentum_buffer"] for p in learner_b.parameters() if p.requires_grad]
    for a, b in zip(buffers_a, buffers_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@functools.cache
def plain(case):
    return train(CASES[case])


LEVELS = [("all", case) for case in CASES] + [
    (level, case) for level in ("heads", "modules") for case in ("bp", "infopro", "mlaan-w2", "mlaan-w3")
]


@pytest.mark.parametrize(("level", "case"), LEVELS)
def test_recompute_leaves_the_same_state_after_several_steps(level, case):
    assert_same_state(plain(case), train(CASES[case], f"system.recompute={level}"))


@pytest.mark.parametrize("case", list(CASES))
def test_fused_optimizer_step_leaves_the_same_state_after_several_steps(case):
    assert_same_state(plain(case), train(CASES[case], fused=True))


@pytest.mark.parametrize("case", ["mlaan-w2", "mlaan-w3", "dgl"])
def test_recompute_all_with_the_fused_step_leaves_the_same_state(case):
    assert_same_state(plain(case), train(CASES[case], "system.recompute=all", fused=True))


@pytest.mark.parametrize("window", [1, 2])
def test_fused_step_reads_a_live_weight_updated_before_its_ema_from_a_copy(window, monkeypatch):
    """Module 1's LAM leaps to block (0,0), which module 0 holds: with W = 1 module 0 is stepped before loss 1
    moves its EMA copy, so the EMA must read the weight of before that update (the plain step's)."""
    generated = mlaan_module.leap_lists

    def with_an_earlier_block(backbone, arch, module_parts, modules_with_lam, mode):
        lists, source = generated(backbone, arch, module_parts, modules_with_lam, mode)
        lists[1] = [1, 4, 7]  # block (0,0), (1,0), (2,0) after module 1's output (16 channels)
        return lists, source

    monkeypatch.setattr(mlaan_module, "leap_lists", with_an_earlier_block)
    items = ["method.name=mlaan", "method.num_modules=5", f"mlaan.window={window}"]
    assert_same_state(train(items), train(items, fused=True))


def saved_bytes(items, *extra):
    learner, _ = build(items, *extra)
    batch = next(batches())
    with SavedTensorAccountant(ignore=parameter_storages(learner)) as acct:
        local_train_step(learner.local_modules, learner.method, batch)
    return acct.peak_bytes


def test_recompute_lowers_the_accounted_activations_and_all_is_lowest():
    """The kept inputs are saved through autograd, so the accounting sees them: recompute must still lower
    the peak (BP: per-block checkpointing; MLAAN W=2: modules and heads)."""
    bp, bp_checkpointed = (saved_bytes(CASES["bp"], f"system.recompute={r}") for r in ("none", "modules"))
    assert bp_checkpointed < 0.6 * bp
    mlaan = {r: saved_bytes(CASES["mlaan-w2"], f"system.recompute={r}") for r in ("none", "heads", "modules", "all")}
    assert mlaan["all"] < min(mlaan["heads"], mlaan["modules"]) <= max(mlaan["heads"], mlaan["modules"]) < mlaan["none"]


def test_fused_step_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="fused_optimizer_step"):
        build_config(None, ["system.fused_optimizer_step=true", "system.cuda_graphs=true"], METHODS)


def test_recompute_replays_the_forward_autocast_state():
    """bf16 autocast: the recomputed blocks run under the autocast of the first forward, so the gradients are
    bitwise those of the kept graphs."""

    def gradients(level):
        learner, _ = build(CASES["mlaan-w2"], f"system.recompute={level}")
        learner.float()
        batch = next(batches())
        batch = Batch(batch.x.float(), batch.y, batch.mean, batch.std)
        local_train_step(learner.local_modules, learner.method, batch, forward_context_for(batch.x.device, "bf16"))
        return [p.grad for p in learner.parameters() if p.requires_grad]

    for plain_grad, recomputed in zip(gradients("none"), gradients("all"), strict=True):
        assert torch.equal(plain_grad, recomputed)
