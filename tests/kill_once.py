"""A torchrun entry point for the restart tests: `python -m fastlocal.train` with the same arguments, except that
in the first attempt (TORCHELASTIC_RESTART_COUNT = 0) rank $KILL_RANK kills itself with SIGKILL before its
training step number $KILL_STEP (counted from 1 over the whole run), as a crashed machine would."""

import os
import signal
import sys

from fastlocal import engine
from fastlocal.train import main

if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ["RANK"] == os.environ["KILL_RANK"]:
    eager_step, steps = engine.Trainer.eager_step, []

    def eager_step_or_die(self, x, y):
        steps.append(1)
        if len(steps) == int(os.environ["KILL_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return eager_step(self, x, y)

    engine.Trainer.eager_step = eager_step_or_die

sys.exit(main())
