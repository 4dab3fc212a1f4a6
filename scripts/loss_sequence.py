"""Per-step training losses of a fixed-seed CPU run, exactly (float.hex), as JSON on stdout: what a change
meant not to alter the math must leave unchanged (compare two outputs with `cmp`).

    python scripts/loss_sequence.py > before.json      # default: MLAAN ResNet-20 K=4, 2 epochs, bundled subset
    python scripts/loss_sequence.py --method.num_modules=8 > k8.json
"""

import json
import sys
import tempfile
from pathlib import Path

from fastlocal import engine
from fastlocal.config import build_config, parse_overrides
from fastlocal.methods import METHODS
from fastlocal.train import run

DEFAULTS = [
    "model.arch=resnet20",
    "method.name=mlaan",
    "method.num_modules=4",
    "train.epochs=2",
    "system.device=cpu",
    "system.seed=0",
    "log.progress=false",
    "system.num_threads=1",
]


def main(argv: list[str]) -> None:
    steps = []
    step = engine.Trainer.step_without_zero_grad

    def recorded(self, x, y):
        loss = step(self, x, y)
        steps.append(float(loss).hex())
        return loss

    engine.Trainer.step_without_zero_grad = recorded
    cfg = build_config(None, DEFAULTS + parse_overrides(argv), METHODS)
    out = Path(tempfile.mkdtemp()) / "run"
    run(cfg, out, log=lambda line: print(line, file=sys.stderr))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"steps": steps, "epochs": [(row["train_loss"].hex(), row["test_acc"]) for row in rows]}))


if __name__ == "__main__":
    main(sys.argv[1:])
