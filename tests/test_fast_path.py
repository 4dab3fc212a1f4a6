"""GPU fast-path options checked on CPU: bf16 autocast, channels_last, the optimizer implementation,
the side stream for the losses."""

import pytest
import torch
from builders import build

from fastlocal.config import ConfigError, build_config
from fastlocal.graphs import GraphedStep
from fastlocal.methods import METHODS, Batch, build_method
from fastlocal.models import build_backbone
from fastlocal.optim import build_optimizer
from fastlocal.schedule import LossFork, forward_context_for, local_train_step
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
        optimizer = torch.optim.SGD(
            params, lr=cfg.optim.lr, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=False
        )
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
    # fp32 with another convolution algorithm per layout: summation order differs, and how much depends on the
    # thread count (5e-5 relative after a few steps with one thread); a layout bug is off by far more.
    assert losses(channels_last=True) == pytest.approx(losses(), rel=2e-4)


def test_bf16_autocast_follows_fp32_within_bf16_noise():
    fp32, bf16 = losses(), losses(precision="bf16")
    assert bf16 == pytest.approx(fp32, rel=5e-2)
    assert bf16 != fp32  # autocast really ran in bf16


def test_bad_precision_is_a_clear_error():
    with pytest.raises(ConfigError, match="system.precision = 'fp16' is not valid; choose one of: fp32, bf16"):
        build_config(None, ["system.precision=fp16"], METHODS)


@pytest.mark.gpu
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


TINY_RUN = [
    "--data.source=bundled",
    "--data.max_train=60",
    "--data.max_test=20",
    "--model.arch=resnet20",
    "--method.name=mlaan",
    "--method.num_modules=3",
    "--train.batch_size=16",
    "--train.epochs=2",
    "--log.progress=false",
]


def final_state(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["backbone"]


@pytest.mark.no_gpu
def test_cuda_graphs_on_cpu_warn_and_train_exactly_as_eager(tmp_path):
    from fastlocal.train import main

    assert main([*TINY_RUN, "--out", str(tmp_path / "eager")]) == 0
    with pytest.warns(UserWarning, match="system.cuda_graphs=true needs a CUDA device"):
        assert main([*TINY_RUN, "--system.cuda_graphs=true", "--out", str(tmp_path / "graphs")]) == 0
    eager, graphs = final_state(tmp_path / "eager"), final_state(tmp_path / "graphs")
    assert all(torch.equal(eager[k], graphs[k]) for k in eager)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["--system.precision=bf16", "--system.channels_last=true"]])
def test_cuda_graph_run_matches_eager_run(tmp_path, extra):
    from fastlocal.train import main

    torch.backends.cudnn.deterministic = True  # the same convolution algorithms in both runs
    # 60 images at batch 16: three full batches and a partial one (eager) per epoch; the graph replays.
    args = [*TINY_RUN, "--system.device=cuda", *extra]
    assert main([*args, "--system.cuda_graphs=false", "--out", str(tmp_path / "eager")]) == 0
    assert main([*args, "--system.cuda_graphs=true", "--out", str(tmp_path / "graphs")]) == 0
    eager, graphs = final_state(tmp_path / "eager"), final_state(tmp_path / "graphs")
    for k in eager:
        if extra:  # bf16: the same math, summation order may differ
            torch.testing.assert_close(graphs[k].float(), eager[k].float(), rtol=2e-2, atol=2e-3)
        else:
            torch.testing.assert_close(graphs[k], eager[k], rtol=1e-5, atol=1e-6)


# -- system.cuda_streams: each module's loss on a side stream -------------------------------------------


def test_cuda_streams_flag_parses_and_validates():
    assert build_config(None, [], METHODS).system.cuda_streams == "auto"
    assert build_config(None, ["system.cuda_streams=true"], METHODS).system.cuda_streams == "true"
    assert build_config(None, ["system.cuda_streams=False"], METHODS).system.cuda_streams == "false"
    with pytest.raises(ConfigError, match="system.cuda_streams = 'maybe' is not valid; choose one of: auto, true"):
        build_config(None, ["system.cuda_streams=maybe"], METHODS)


@pytest.mark.no_gpu
def test_cuda_streams_on_cpu_warn_and_train_exactly_as_one_stream(tmp_path):
    from fastlocal.train import main

    assert main([*TINY_RUN, "--out", str(tmp_path / "plain")]) == 0
    with pytest.warns(UserWarning, match="system.cuda_streams=true needs a CUDA device"):
        assert main([*TINY_RUN, "--system.cuda_streams=true", "--out", str(tmp_path / "streams")]) == 0
    plain, streams = final_state(tmp_path / "plain"), final_state(tmp_path / "streams")
    assert all(torch.equal(plain[k], streams[k]) for k in plain)


def test_side_stream_with_a_cpu_batch_is_a_clear_error():
    _, _, modules, method = build("dgl", "resnet20", 2, dtype=torch.float32)
    b = Batch(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="side_stream needs the batch on a CUDA device"):
        local_train_step(modules, method, b, side_stream=object())


class OneStream(LossFork):
    """The side-stream schedule's order (one loss left in flight), run serially on one stream."""

    in_flight = 1


def step_results(method, overrides, step):
    """The loss, every gradient and every state tensor (BN statistics, EMA copies) after one `step`."""
    _, backbone, modules, m = build(method, "resnet20", 4, overrides, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    b = Batch(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g), (0.5,) * 3, (0.5,) * 3)
    loss = step(modules, m, b)
    params = [p for p in (*backbone.parameters(), *m.parameters()) if p.requires_grad]
    assert all(p.grad is not None for p in params)
    return [loss, *(p.grad for p in params), *backbone.state_dict().values(), *m.state_dict().values()]


@pytest.mark.parametrize(
    "method,overrides",
    [
        ("mlaan", []),
        ("mlaan", ["mlaan.window=3"]),
        ("mlaan", ["mlaan.lam=false"]),
        ("mlaan", ["mlaan.base=infopro"]),
        ("dgl", []),
    ],
)
def test_side_stream_schedule_computes_bitwise_the_one_stream_step(method, overrides):
    """What streams cannot change is checked here on CPU: the side-stream schedule's reordering (module
    i+1's forward before loss i's cascade VJPs and flush) gives the same bits."""
    one_stream = step_results(method, overrides, local_train_step)
    reordered = step_results(
        method, overrides, lambda modules, m, b: local_train_step(modules, m, b, side_stream=OneStream())
    )
    assert len(one_stream) == len(reordered)
    assert all(torch.equal(a, b) for a, b in zip(one_stream, reordered))


def cuda_steps(side_stream, graphed: bool, steps: int = 3, name: str = "mlaan", overrides=()):
    """Loss and gradients (copied to the CPU) after each of `steps` resnet20 K=4 fp32 steps of method `name`
    on CUDA, eagerly or through GraphedStep (step 1 eager warm-up, step 2 capture then replay, step 3 replay)."""
    _, backbone, modules, method = build(name, "resnet20", 4, overrides, dtype=torch.float32)
    backbone.cuda()
    method.cuda()
    params = [p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad]

    def zero_grad():
        for p in params:
            p.grad = None

    def step(x, y):
        return local_train_step(modules, method, Batch(x, y, (0.5,) * 3, (0.5,) * 3), side_stream=side_stream)

    graph_runner = GraphedStep(step, zero_grad, warmup_steps=1)
    g = torch.Generator().manual_seed(1)
    results = []
    for _ in range(steps):
        x = torch.randn(32, 3, 32, 32, generator=g).cuda()
        y = torch.randint(0, 10, (32,), generator=g).cuda()
        if graphed:
            loss = graph_runner(x, y)
        else:
            zero_grad()
            loss = step(x, y)
        torch.cuda.synchronize()
        results.append([loss.cpu(), *(p.grad.cpu() for p in params)])
    if graphed:
        assert graph_runner.graph is not None and not graph_runner.failed
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda_graph"])
def test_side_stream_gives_bitwise_identical_losses_and_gradients_on_cuda(exact_cuda_math, graphed):
    one_stream = cuda_steps(None, graphed)
    two_streams = cuda_steps(torch.cuda.Stream(), graphed)
    for step, (a, b) in enumerate(zip(one_stream, two_streams)):
        assert len(a) == len(b)
        assert all(torch.equal(u, v) for u, v in zip(a, b)), f"step {step + 1}"


@pytest.mark.gpu
def test_graph_and_streams_step_is_bitwise_the_eager_step(exact_cuda_math):
    # Issue 6, acceptance 3: fp32 with the step replayed from a CUDA graph and the side stream computes the
    # eager one-stream step's losses and gradients bit for bit (deterministic convolutions, no TF32).
    eager = cuda_steps(None, graphed=False)
    fast = cuda_steps(torch.cuda.Stream(), graphed=True)
    for step, (a, b) in enumerate(zip(eager, fast)):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)), f"step {step + 1}"


@pytest.mark.gpu
@pytest.mark.parametrize("name,overrides", [("infopro", []), ("mlaan", ["mlaan.base=infopro"])])
def test_infopro_graph_and_streams_step_matches_the_eager_step(exact_cuda_math, name, overrides):
    # InfoPro (and MLAAN on it) with the step replayed from a CUDA graph and the losses on the side stream
    # against the eager one-stream step. Not bitwise: the decoder's bilinear upsampling adds its gradient with
    # atomics on CUDA, in no fixed order even eagerly; a stale or skipped replay would be far off.
    eager = cuda_steps(None, graphed=False, name=name, overrides=overrides)
    fast = cuda_steps(torch.cuda.Stream(), graphed=True, name=name, overrides=overrides)
    for step, (a, b) in enumerate(zip(eager, fast)):
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-6, msg=lambda m, step=step: f"step {step + 1}: {m}")


def test_fast_path_training_script_runs_every_variant(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "fast_path_training.py"
    spec = importlib.util.spec_from_file_location("fast_path_training", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tiny = [
        "data.max_train=48",
        "data.max_test=16",
        "model.arch=resnet20",
        "method.num_modules=3",
        "train.batch_size=16",
    ]
    assert script.main(["--out", str(tmp_path), "--epochs", "1", *tiny]) == 0
    results = json.loads((tmp_path / "fast_path_training.json").read_text())
    assert list(results) == ["off", "fp32-fast", "on"]
    assert all(len(r["train_loss"]) == len(r["test_acc"]) == 1 for r in results.values())
    if not torch.cuda.is_available():  # the CUDA-only options fell back, and said so
        assert any("cuda_graphs=true needs a CUDA device" in w for w in results["on"]["warnings"])
        assert results["fp32-fast"]["train_loss"] == results["off"]["train_loss"]


@pytest.mark.no_gpu
def test_auto_switches_stay_silent_and_off_on_cpu(tmp_path):
    import warnings

    from fastlocal.train import main

    cfg = build_config(None, [], METHODS)
    assert (cfg.system.cuda_graphs, cfg.system.cuda_streams, cfg.system.fused_batch_norm) == ("auto",) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto: on where it helps (CUDA), silently off elsewhere
        assert main([*TINY_RUN, "--train.epochs=1", "--out", str(tmp_path)]) == 0


def test_switches_take_toml_booleans(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[system]\ncuda_graphs = false\ncuda_streams = true\nfused_batch_norm = "auto"\n')
    cfg = build_config(path, [], METHODS)
    assert (cfg.system.cuda_graphs, cfg.system.cuda_streams, cfg.system.fused_batch_norm) == ("false", "true", "auto")


@pytest.mark.parametrize("option", ["system.fused_batch_norm"])
@pytest.mark.no_gpu
def test_triton_block_options_without_triton_warn_and_train(option, tmp_path):
    from fastlocal.train import main

    args = [
        "--data.source=bundled",
        "--data.max_train=40",
        "--data.max_test=20",
        "--model.arch=resnet20",
        "--method.name=dgl",
        "--method.num_modules=2",
        "--train.batch_size=16",
        "--train.epochs=1",
        "--log.progress=false",
        f"--{option}=true",
        "--out",
        str(tmp_path),
    ]
    with pytest.warns(UserWarning, match=f"{option}=true needs the Triton kernels"):
        assert main(args) == 0
