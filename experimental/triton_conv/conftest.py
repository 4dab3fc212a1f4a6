import os
import sys
from pathlib import Path

import torch

# Triton runs in its CPU interpreter when there is no GPU; the variable must be set before triton is
# first imported. The tests import `conv` from this folder and the shared builders from tests/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "tests"), str(HERE.parents[1] / "bench")]
