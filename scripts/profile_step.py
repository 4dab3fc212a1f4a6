"""Where a training step's GPU time goes, on one CUDA device.

    PYTHONPATH=$PWD python scripts/profile_step.py [--arch resnet32 --k 15 --batch 1024]
    PYTHONPATH=$PWD python scripts/profile_step.py --flops      (CPU is enough: FLOPs and bytes of one step vs BP)

1. Graphed step time (bf16 + channels_last, the step replayed from a CUDA graph) of a set of variants:
   `--set ablations`: BP, DGL, MLAAN without LAM, MLAAN, MLAAN with the PyTorch (reference) kernels (the
   deltas say what each part costs); `--set fast` (default): BP and MLAAN with the fused batch norm and
   the side stream, one at a time and together.
2. Whether concurrency could pay (`--probe`): one module's LAM forward+backward and the next module's
   forward, captured in one graph, serially and on two streams.
3. The eager MLAAN step under torch.profiler (`--profile plain|fbn`): the top CUDA kernels by device time.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fastlocal.config import build_config
from fastlocal.graphs import GraphedStep
from fastlocal.methods import METHODS, Batch, build_method
from fastlocal.models import build_backbone
from fastlocal.models.cifar_resnet import use_fused_batch_norm
from fastlocal.optim import build_optimizer
from fastlocal.schedule import forward_context_for, local_train_step
from fastlocal.split import split_backbone

MEAN_STD = ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616))


def build(
    arch: str,
    method: str,
    k: int,
    batch: int,
    extra=(),
    kernels: str = "triton",
    device="cuda",
    fused_bn: bool = False,
    streams: bool = False,
):
    items = [f"model.arch={arch}", f"method.name={method}", f"method.num_modules={k}", *extra]
    cfg = build_config(None, items, METHODS)
    torch.manual_seed(0)
    backbone = build_backbone(arch, 10, 32)
    modules = split_backbone(backbone, k, cfg.method.stem_separate)
    m = build_method(cfg, backbone, modules)
    m.kernels = kernels if device == "cuda" else "reference"
    if fused_bn:
        use_fused_batch_norm([backbone, m], "triton")
    side_stream = torch.cuda.Stream() if streams else None
    for net in (backbone, m):
        net.to(device=device, memory_format=torch.channels_last)
    params = [p for p in (*backbone.parameters(), *m.parameters()) if p.requires_grad]
    graph = device == "cuda"
    optimizer = build_optimizer(params, cfg, torch.device(device), lr_on_device=graph)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    context = forward_context_for(torch.device(device), "bf16", cache_casts=not graph)

    def step_without_zero_grad(xs, ys):
        loss = local_train_step(modules, m, Batch(xs, ys, *MEAN_STD), context, side_stream=side_stream)
        optimizer.step()
        return loss

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)

    return backbone, modules, m, x, y, step_without_zero_grad, zero_grad


def graphed_ms(step_without_zero_grad, zero_grad, x, y, rounds: int = 20) -> float:
    runner = GraphedStep(step_without_zero_grad, zero_grad)
    for _ in range(5):
        runner(x, y)
    return timed_ms(lambda: runner(x, y), rounds)


def timed_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def concurrency_probe(arch: str, k: int, batch: int, module: int) -> tuple[float, float]:
    """(serial ms, two-stream ms) of LAM_module fwd+bwd and module+1's forward, each replayed from a graph."""
    backbone, modules, m, x, y, _, _ = build(arch, "mlaan", k, batch)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        a = x
        for i in range(module + 1):
            a = modules[i](a)
    lam, nxt = m.lams[str(module)], modules[module + 1]
    z = a.detach().requires_grad_()

    def work(side: torch.cuda.Stream | None):
        main = torch.cuda.current_stream()
        if side is not None:
            side.wait_stream(main)
        with torch.cuda.stream(side if side is not None else main), torch.autocast("cuda", torch.bfloat16):
            out = lam(z).float().mean()
        out.backward()
        with torch.autocast("cuda", torch.bfloat16):
            nxt(a)
        if side is not None:
            main.wait_stream(side)

    results = []
    for use_side in (False, True):
        side = torch.cuda.Stream() if use_side else None
        warm = torch.cuda.Stream()
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            for _ in range(3):
                work(side)
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        z.grad = None
        with torch.cuda.graph(graph):
            work(side)
        results.append(timed_ms(graph.replay, 30))
    return results[0], results[1]


# Ops that allocate or alias without touching tensor data: no memory traffic.
_NO_TRAFFIC = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "zeros_like",
    "detach",
    "set_",
    "lift_fresh",
}


class StepCost(TorchDispatchMode):
    """Counts, per op: the FLOPs of every op PyTorch's flop counter knows (convolutions and matrix products,
    forward and backward), and the bytes of the op's tensor inputs and outputs, a proxy of the memory
    traffic of unfused kernels (views and allocations excluded). FlopCounterMode itself cannot be used:
    its module hooks break `autograd.grad`."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        if not aliases and func._overloadpacket.__name__ not in _NO_TRAFFIC:
            tensors = [
                t
                for t in (*args, *kwargs.values(), *(out if isinstance(out, (tuple, list)) else (out,)))
                if isinstance(t, torch.Tensor)
            ]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def step_cost(arch: str, method: str, k: int, extra=(), batch: int = 4) -> tuple[int, int]:
    """(FLOPs, bytes) of one local_train_step, fp32 (forwards and backwards; the optimizer excluded)."""
    _, modules, m, x, y, _, _ = build(arch, method, k, batch, extra, device="cpu")
    with StepCost() as counter:
        local_train_step(modules, m, Batch(x.contiguous(), y, *MEAN_STD))
    return counter.flops, counter.bytes


def print_flops(arch: str, k: int) -> None:
    bp_flops, bp_bytes = step_cost(arch, "bp", 1)
    print(
        f"== one step relative to BP, {arch} (BP: {bp_flops / 4 / 1e9:.3f} GFLOP and "
        f"{bp_bytes / 4 / 1e6:.1f} MB of op inputs and outputs per image, fp32)"
    )
    for name, method, extra in (
        ("dgl", "dgl", ()),
        ("mlaan without LAM", "mlaan", ("mlaan.lam=false",)),
        ("mlaan", "mlaan", ()),
    ):
        flops, num_bytes = step_cost(arch, method, k, extra)
        print(f"{name} K={k}: {flops / bp_flops:.2f}x BP's FLOPs, {num_bytes / bp_bytes:.2f}x its bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--flops", action="store_true", help="only count FLOPs and bytes (runs on the CPU)")
    parser.add_argument("--set", choices=("fast", "ablations"), default="fast")
    parser.add_argument("--probe", action="store_true", help="run the two-stream concurrency probe")
    parser.add_argument("--profile", choices=("plain", "fbn", "none"), default="fbn")
    args = parser.parse_args()
    if args.flops:
        print_flops(args.arch, args.k)
        return
    torch.backends.cudnn.benchmark = True
    arch, k, batch = args.arch, args.k, args.batch

    print(f"== graphed bf16+channels_last step, {arch}, batch {batch}", flush=True)
    if args.set == "ablations":
        variants = [
            ("bp K=1", "bp", 1, (), {}),
            (f"dgl K={k}", "dgl", k, (), {}),
            (f"mlaan K={k} no LAM", "mlaan", k, ("mlaan.lam=false",), {}),
            (f"mlaan K={k} W=1 (LAM only)", "mlaan", k, ("mlaan.window=1",), {}),
            (f"mlaan K={k}", "mlaan", k, (), {}),
            (f"mlaan K={k} reference kernels", "mlaan", k, (), {"kernels": "reference"}),
        ]
    else:
        variants = [
            ("bp", "bp", 1, (), {}),
            ("bp fbn", "bp", 1, (), {"fused_bn": True}),
            (f"mlaan K={k}", "mlaan", k, (), {}),
            (f"mlaan K={k} fbn", "mlaan", k, (), {"fused_bn": True}),
            (f"mlaan K={k} streams", "mlaan", k, (), {"streams": True}),
            (f"mlaan K={k} fbn+streams", "mlaan", k, (), {"fused_bn": True, "streams": True}),
        ]
    for name, method, kk, extra, options in variants:
        _, _, _, x, y, step, zero = build(arch, method, kk, batch, extra, **options)
        print(f"{name:36s} {graphed_ms(step, zero, x, y):8.2f} ms", flush=True)
        del step, zero
        torch.cuda.empty_cache()

    if args.probe:
        print("== concurrency probe: LAM_i fwd+bwd with module i+1's forward, one graph", flush=True)
        for module in (2, 8):
            serial, parallel = concurrency_probe(arch, k, batch, module)
            print(f"module {module}: serial {serial:.3f} ms, two streams {parallel:.3f} ms", flush=True)

    print_profile(arch, k, batch, args.profile)


def print_profile(arch: str, k: int, batch: int, which: str) -> None:
    if which == "none":
        return
    print(f"== profiler: eager mlaan K={k} step ({which})", flush=True)
    _, _, _, x, y, step, zero = build(arch, "mlaan", k, batch, fused_bn=which == "fbn")
    for _ in range(3):
        zero()
        step(x, y)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            zero()
            step(x, y)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
