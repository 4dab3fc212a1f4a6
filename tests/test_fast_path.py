"""GPU fast-path options checked on CPU: bf16 autocast, channels_last, the optimizer implementation."""

import pytest
import torch

from fastlocal.config import ConfigError, build_config
from fastlocal.engine import build_optimizer, forward_context_for, local_train_step
from fastlocal.methods import METHODS, Batch, build_method
from fastlocal.models import build_backbone
from fastlocal.split import split_backbone


def losses(method="mlaan", k=3, steps=3, precision="fp32", channels_last=False, foreach=True):
    cfg = build_config(None, [f"method.name={method}", f"method.num_modules={k}", "model.arch=resnet20"], METHODS)
    torch.manual_seed(0)
    backbone = build_backbone("resnet20", 10, 16)
    modules = split_backbone(backbone, k)
    m = build_method(cfg, backbone, modules)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    backbone.to(memory_format=fmt)
    m.to(memory_format=fmt)
    params = [p for p in (*backbone.parameters(), *m.parameters()) if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    if not foreach:
        optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=0.9, nesterov=True, weight_decay=1e-4,
                                    foreach=False)
    context = forward_context_for(torch.device("cpu"), precision)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(8, 3, 16, 16, generator=g).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (8,), generator=g)
        optimizer.zero_grad()
        out.append(local_train_step(modules, m, Batch(x, y, (0.5,) * 3, (0.5,) * 3), context).item())
        optimizer.step()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    return out


def test_multi_tensor_optimizer_leaves_the_loss_sequence_identical():
    assert losses(foreach=True) == losses(foreach=False)


def test_channels_last_follows_the_contiguous_run():
    assert losses(channels_last=True) == pytest.approx(losses(), rel=1e-5)


def test_bf16_autocast_follows_fp32_within_bf16_noise():
    fp32, bf16 = losses(), losses(precision="bf16")
    assert bf16 == pytest.approx(fp32, rel=5e-2)
    assert bf16 != fp32  # autocast really ran in bf16


def test_bad_precision_is_a_clear_error():
    with pytest.raises(ConfigError, match="system.precision = 'fp16' is not valid; choose one of: fp32, bf16"):
        build_config(None, ["system.precision=fp16"], METHODS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused SGD step is used on CUDA only")
def test_fused_optimizer_on_cuda_matches_foreach():
    cfg = build_config(None, [], METHODS)
    weights = [torch.randn(10, 10, device="cuda", requires_grad=True) for _ in range(3)]
    copies = [w.detach().clone().requires_grad_() for w in weights]
    fused = build_optimizer(weights, cfg, torch.device("cuda"))
    plain = build_optimizer(copies, cfg)
    for _ in range(3):
        for ws, opt in ((weights, fused), (copies, plain)):
            for w in ws:
                w.grad = torch.ones_like(w)
            opt.step()
    for a, b in zip(weights, copies):
        torch.testing.assert_close(a, b)


TINY_RUN = ["--data.source=bundled", "--data.max_train=60", "--data.max_test=20", "--model.arch=resnet20",
            "--method.name=mlaan", "--method.num_modules=3", "--train.batch_size=16", "--train.epochs=2",
            "--log.progress=false"]


def final_state(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["backbone"]


def test_cuda_graphs_on_cpu_warn_and_train_exactly_as_eager(tmp_path):
    from fastlocal.train import main

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU fallback")
    assert main([*TINY_RUN, "--out", str(tmp_path / "eager")]) == 0
    with pytest.warns(UserWarning, match="system.cuda_graphs=true needs a CUDA device"):
        assert main([*TINY_RUN, "--system.cuda_graphs=true", "--out", str(tmp_path / "graphs")]) == 0
    eager, graphs = final_state(tmp_path / "eager"), final_state(tmp_path / "graphs")
    assert all(torch.equal(eager[k], graphs[k]) for k in eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("extra", [[], ["--system.precision=bf16", "--system.channels_last=true"]])
def test_cuda_graph_run_matches_eager_run(tmp_path, extra):
    from fastlocal.train import main

    torch.backends.cudnn.deterministic = True  # the same convolution algorithms in both runs
    # 60 images at batch 16: three full batches and a partial one (eager) per epoch; the graph replays.
    args = [*TINY_RUN, "--system.device=cuda", *extra]
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert main([*args, "--system.cuda_graphs=true", "--out", str(tmp_path / "graphs")]) == 0
    eager, graphs = final_state(tmp_path / "eager"), final_state(tmp_path / "graphs")
    for k in eager:
        if extra:  # bf16: the same math, summation order may differ
            torch.testing.assert_close(graphs[k].float(), eager[k].float(), rtol=2e-2, atol=2e-3)
        else:
            torch.testing.assert_close(graphs[k], eager[k], rtol=1e-5, atol=1e-6)
