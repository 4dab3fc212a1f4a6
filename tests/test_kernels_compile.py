"""Every Triton kernel compiles for an H100/H200 (sm_90), without a GPU: scripts/compile_kernels.py."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRITON = importlib.util.find_spec("triton")
PTXAS = Path(TRITON.origin).parent / "backends" / "nvidia" / "bin" / "ptxas" if TRITON else None
# The fused batch norm's kernels and the aux loss's.
CHECKED_KERNELS = (
    "bn_stats_partials_kernel",
    "bn_stats_finalize_kernel",
    "bn_apply_kernel",
    "bn_grad_partials_kernel",
    "bn_grad_sums_kernel",
    "bn_grad_input_kernel",
    "aux_loss_logits_kernel",
    "aux_loss_grad_kernel",
    "aux_loss_backward_kernel",
    "aux_loss_pool_kernel",
)


@pytest.mark.skipif(PTXAS is None or not PTXAS.exists(), reason="needs triton with its bundled ptxas")
@pytest.mark.parametrize("arch", [90, 80], ids=["sm90-hopper", "sm80-ampere"])
def test_the_fast_path_kernels_compile_and_do_not_spill(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compile_kernels.py"), "--quick", "--arch", str(arch)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = re.findall(r"^regs\s+(\d+)\s+local\s+(\d+)\s+warps\s+\d+\s+(\w+)", run.stdout, re.MULTILINE)
    compiled = {name for _, _, name in rows}
    assert set(CHECKED_KERNELS) | {"ema_update_kernel"} <= compiled
    spilling = [(name, local) for _, local, name in rows if name in CHECKED_KERNELS and int(local) > 0]
    assert not spilling, f"kernels spill registers to local memory on sm_{arch}: {spilling}"


def test_the_gradient_tiles_of_the_aux_loss_are_smaller_before_hopper(monkeypatch):
    from fastlocal.kernels import aux_loss

    cuda = torch.device("cuda")
    for major, edge in ((8, 32), (9, 64), (10, 64), (None, 64)):
        monkeypatch.setattr(aux_loss, "_capability_major", lambda device, major=major: major)
        assert aux_loss._grad_tile_cap(cuda) == edge
        assert aux_loss._grad_blocks(256, 512, 1000, 1 << 30, cuda)[:3] == (edge, edge, edge)
