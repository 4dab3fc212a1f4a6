"""Compile fastlocal's Triton kernels, launched as the training step launches them, for a CUDA GPU that is
not here (default sm_90: H100 and H200), and print each kernel's registers and local memory.

    python scripts/compile_kernels.py [--arch 90] [--sweep] [--quick]

Why: without a GPU the kernels run only in the Triton interpreter, which accepts programs the compiler
rejects (tile shapes, dtypes of a dot) and says nothing of register pressure. This runs each kernel's host
code on CPU tensors at the step's shapes (batch 1024) with the launches recorded instead of run, then
compiles every distinct launch (arguments' dtypes, constexprs) with Triton's compiler and ptxas for the
target, and reads registers and local memory (spills, if above 0) with cuobjdump. Arguments are specialised
as Triton's launcher specialises them (ints equal to 1 become constants; 16-divisible pointers and ints say
so), so the code should be the GPU's, up to the Triton version.

`--sweep`: also the launch shapes the kernel benchmarks try (BN_LAUNCH_SHAPES in
bench/test_bench_kernels.py). `--quick`: bf16 channels-last only (what the fast path runs). Exit status 1
when a kernel does not compile. Must run without TRITON_INTERPRET (it replaces the kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py: unset TRITON_INTERPRET (the interpreter replaces the kernels being compiled)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastlocal.kernels import aux_loss, batch_norm, ema  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.uint8: "*u8",
    torch.bool: "*i1",
}
BATCH = 1024
STAGES = {"stage1": (16, 32), "stage2": (32, 16), "stage3": (64, 8)}  # channels, height = width


class Launch:
    """One recorded launch: the kernel, the types and constants of its bound arguments, its options."""

    def __init__(self, kernel: JITFunction, arguments: dict, options: dict):
        self.kernel, self.options = kernel, options
        # Specialised as Triton's launcher does: an int equal to 1 becomes a constant, and pointers and ints
        # divisible by 16 carry that fact (what lets the compiler vectorise loads).
        signature, self.constexprs, self.attrs = {}, {}, {}
        for index, param in enumerate(kernel.params):
            value = arguments[param.name]
            specialize = not param.do_not_specialize
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if param.is_constexpr or value is None or (specialize and is_int and value == 1):
                signature[param.name] = "constexpr"
                self.constexprs[param.name] = value
                continue
            signature[param.name] = _type(value)
            aligned = value.data_ptr() % 16 == 0 if isinstance(value, torch.Tensor) else is_int and value % 16 == 0
            if specialize and aligned:
                self.attrs[(index,)] = [["tt.divisibility", 16]]
        self.signature = signature

    @property
    def key(self) -> tuple:
        return (
            self.kernel.fn.__name__,
            tuple(self.signature.items()),
            tuple(map(repr, self.constexprs.items())),
            tuple(sorted(self.attrs)),
            tuple(sorted(self.options.items())),
        )

    def describe(self) -> str:
        dtypes = sorted({t for t in self.signature.values() if t.startswith("*") and t != "*fp32" and t[1] != "i"})
        constants = " ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel.fn.__name__} {'/'.join(dtypes) or 'fp32'} {constants}".strip()


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a {type(value).__name__} argument")


@contextlib.contextmanager
def recorded_launches(launches: dict):
    """Kernel launches are recorded (by distinct signature) instead of run."""
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        names = {param.name for param in self.params}
        options = {k: v for k, v in kwargs.items() if k not in names}  # num_warps, num_stages
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        launch = Launch(self, dict(bound.arguments), options)
        launches.setdefault(launch.key, launch)

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def _activation(channels: int, size: int, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    t = torch.empty(BATCH, channels, size, size, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _forward_backward(output: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    torch.autograd.grad(output, inputs, torch.empty_like(output))


def batch_norm_launches(dtype: torch.dtype, channels_last: bool) -> None:
    for channels, size in STAGES.values():
        for residual, relu in ((True, True), (False, True), (False, False)):
            x = _activation(channels, size, dtype, channels_last).requires_grad_()
            res = _activation(channels, size, dtype, channels_last).requires_grad_() if residual else None
            weight = torch.ones(channels, requires_grad=True)
            bias = torch.zeros(channels, requires_grad=True)
            y = batch_norm.batch_norm_act(
                x, weight, bias, torch.zeros(channels), torch.ones(channels), 0.1, 1e-5, res, relu
            )
            _forward_backward(y, [t for t in (x, weight, bias, res) if t is not None])


def ema_launches(dtype: torch.dtype) -> None:
    # Tensors of the sizes of a LAM block copy: convolution weights and batch-norm vectors.
    shapes = [(64, 64, 3, 3), (64, 32, 3, 3), (64,), (32, 16, 1, 1), (7,)]
    ema_tensors = [torch.zeros(s, dtype=dtype) for s in shapes]
    live = [torch.ones(s, dtype=dtype) for s in shapes]
    ema.ema_update_(ema_tensors, live, 0.995)
    ema.ema_update_(ema_tensors, live, torch.tensor(0.995))


def aux_loss_launches(dtype: torch.dtype, channels_last: bool) -> None:
    for batch, channels, size, classes in ((BATCH, 64, 8, 10), (256, 512, 7, 1000)):
        x = torch.empty(batch, channels, size, size, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        weight = torch.zeros(classes, channels, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        target = torch.zeros(batch, dtype=torch.int64)
        _forward_backward(aux_loss.gap_linear_cross_entropy(x, weight, bias, target), [x, weight, bias])


def _bench_lists():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "test_bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))
    spec.loader.exec_module(module)
    return module.BN_LAUNCH_SHAPES


def record_all(quick: bool, sweep: bool) -> list[Launch]:
    launches: dict = {}
    layouts = [(torch.bfloat16, True)] if quick else [(torch.bfloat16, True), (torch.float32, False)]
    with recorded_launches(launches):
        for dtype, channels_last in layouts:
            batch_norm_launches(dtype, channels_last)
            ema_launches(dtype)
            aux_loss_launches(dtype, channels_last)
        if sweep:
            bn_shapes = _bench_lists()
            defaults = {name: getattr(batch_norm, name) for overrides in bn_shapes for name in overrides}
            try:
                for overrides in bn_shapes:
                    for name, value in {**defaults, **overrides}.items():
                        setattr(batch_norm, name, value)
                    batch_norm_launches(torch.bfloat16, True)
            finally:
                for name, value in defaults.items():
                    setattr(batch_norm, name, value)
    return list(launches.values())


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack and local bytes of the kernel in a cubin (cuobjdump -res-usage)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument("--sweep", action="store_true", help="also the launch shapes the kernel benchmarks try")
    parser.add_argument("--quick", action="store_true", help="bf16 channels-last only")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    # The host code asks which GPU it runs on where the launch shapes depend on it: answer for the target.
    aux_loss._capability_major = lambda device: args.arch // 10
    launches = record_all(args.quick, args.sweep)
    print(
        f"{len(launches)} distinct launches, compiled for sm_{args.arch} with Triton {triton.__version__}", flush=True
    )
    failures = 0
    for launch in launches:
        constexprs = {
            (index,): launch.constexprs[name]
            for index, name in enumerate(launch.signature)
            if name in launch.constexprs
        }
        source = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=constexprs, attrs=launch.attrs)
        try:
            compiled = triton.compile(source, target=target, options=launch.options)
        except Exception as error:  # report every kernel, then fail
            failures += 1
            print(f"FAILED {launch.describe()}: {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
            continue
        usage = resource_usage(compiled.asm["cubin"])
        spills = usage.get("LOCAL", 0) + usage.get("STACK", 0)
        print(
            f"regs {usage.get('REG', '?'):>3}  local {spills:>4}  warps {compiled.metadata.num_warps}  "
            f"{launch.describe()}",
            flush=True,
        )
    print(f"compile_kernels.py: {len(launches) - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
