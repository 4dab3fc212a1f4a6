"""Where a pipeline stage's training time goes: computing, waiting for its input, waiting for a cotangent or
for weights from another stage, sending, and the time between steps (stage 0 loads the next batch there).

Every stage keeps one :class:`StageTimeline`: seconds per kind summed over the epoch's steps, and the spans of a
few steps of the epoch (for the picture in docs/pipeline.md). Compute is a step's time less its waits and
sends. The clock is `time.perf_counter` (CLOCK_MONOTONIC on Linux): one clock for every process of a machine,
so the stages of one machine line up in a picture; across machines only the per-kind sums compare.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# The kinds of time, in the order a picture stacks them. The first is a step's time less the others inside it.
KINDS = ("compute", "wait_input", "wait_cotangent", "wait_weights", "send", "between_steps")
# Pipelined backprop: torch.distributed.pipelining waits inside its 1F1B schedule, where a stage cannot time its
# waits apart from its backward; the forward is timed, the rest of a step is backward and waits together.
BACKPROP_KINDS = ("backward_and_waits", "forward", "send", "between_steps")
# Which steps of an epoch keep their spans: past the first few (allocations, first messages), few enough to draw;
# in an epoch of fewer than twice KEPT_FROM steps, from its middle on.
KEPT_FROM, KEPT_COUNT = 4, 6


class StageTimeline:
    """Seconds per kind and the spans of the steps in `kept` for one stage over one epoch."""

    def __init__(self, kinds: tuple[str, ...] = KINDS, kept: range | None = None):
        self.kinds, self.fixed_kept = kinds, kept
        self.begin_epoch()

    def begin_epoch(self, steps: int | None = None) -> None:
        """Start an epoch of `steps` steps (None: as many as KEPT_FROM + KEPT_COUNT or more)."""
        first = KEPT_FROM if steps is None else min(KEPT_FROM, steps // 2)
        self.kept = self.fixed_kept if self.fixed_kept is not None else range(first, first + KEPT_COUNT)
        self.seconds = dict.fromkeys(self.kinds, 0.0)
        self.steps = 0
        self.spans: list[tuple[str, float, float]] = []  # (kind, start, end); compute spans are whole steps
        self._step_index = -1
        self._step_waits = 0.0
        self._last_step_end: float | None = None

    @contextmanager
    def step(self) -> Iterator[None]:
        """One training step: its time less the spans of other kinds inside it is the first kind (compute)."""
        start = time.perf_counter()
        if self._last_step_end is not None:
            self.seconds["between_steps"] += start - self._last_step_end
        self._step_index += 1
        self._step_waits = 0.0
        try:
            yield
        finally:
            end = time.perf_counter()
            self.seconds[self.kinds[0]] += end - start - self._step_waits
            self.steps += 1
            self._last_step_end = end
            if self._step_index in self.kept:
                self.spans.append(("step", start, end))

    @contextmanager
    def span(self, kind: str) -> Iterator[None]:
        """A wait or a send inside a step (or at the end of the epoch: a drain)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.seconds[kind] += end - start
            self._step_waits += end - start
            if self._step_index in self.kept:
                self.spans.append((kind, start, end))

    def record(self, stage: int, replica: int = 0) -> dict:
        """This epoch's timeline as plain data (what summary.json holds per stage)."""
        return {
            "stage": stage,
            "replica": replica,
            "steps": self.steps,
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
            "fractions": fractions(self.seconds),
            "spans": [(kind, round(a, 6), round(b, 6)) for kind, a, b in self.spans],
        }


def fractions(seconds: dict[str, float]) -> dict[str, float]:
    """Each kind's share of the total."""
    total = sum(seconds.values())
    return {k: round(v / total, 4) if total else 0.0 for k, v in seconds.items()}


def summed(epochs: list[dict]) -> dict:
    """One stage's records of several epochs as one: seconds and steps summed, the last epoch's spans."""
    seconds = {k: round(sum(r["seconds"][k] for r in epochs), 6) for k in epochs[-1]["seconds"]}
    return {**epochs[-1], "steps": sum(r["steps"] for r in epochs), "seconds": seconds, "fractions": fractions(seconds)}


def describe(records: list[dict]) -> str:
    """One line per stage: the share of its time each kind took."""
    lines = []
    for r in records:
        parts = ", ".join(f"{k.replace('_', ' ')} {100 * f:.0f}%" for k, f in r["fractions"].items() if f >= 0.005)
        lines.append(f"stage {r['stage']}: {r['steps']} steps; {parts}")
    return "\n".join(lines)
