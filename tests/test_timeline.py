"""fastlocal.parallel.timeline: where a pipeline stage's time goes, on a clock the test drives."""

from __future__ import annotations

import pytest

from fastlocal.parallel import timeline as timeline_module
from fastlocal.parallel.timeline import BACKPROP_KINDS, KINDS, StageTimeline


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timeline_module.time, "perf_counter", fake)
    return fake


def test_a_step_splits_into_its_waits_and_the_compute_left(clock):
    timeline = StageTimeline(kept=range(1, 2))
    for _ in range(3):  # three steps: 1 s compute, 0.5 s waiting for the input, 0.25 s sending, 2 s between steps
        with timeline.step():
            with timeline.span("wait_input"):
                clock.advance(0.5)
            clock.advance(1.0)
            with timeline.span("send"):
                clock.advance(0.25)
        clock.advance(2.0)
    with timeline.span("send"):  # a drain after the last step: outside any step
        clock.advance(0.75)
    record = timeline.record(stage=1)
    assert record["steps"] == 3 and record["stage"] == 1
    seconds = record["seconds"]
    assert seconds["compute"] == pytest.approx(3.0)
    assert seconds["wait_input"] == pytest.approx(1.5)
    assert seconds["send"] == pytest.approx(3 * 0.25 + 0.75)
    assert seconds["between_steps"] == pytest.approx(4.0)  # between steps 1-2 and 2-3, not after the last
    assert seconds["wait_cotangent"] == seconds["wait_weights"] == 0.0
    total = 3.0 + 1.5 + 1.5 + 4.0
    assert record["fractions"]["compute"] == pytest.approx(3.0 / total, abs=1e-4)
    # Only the kept step (the second) keeps its spans: its wait, its send, then the step itself.
    assert [s[0] for s in record["spans"]] == ["wait_input", "send", "step"]
    start = 100.0 + 3.75  # the second step starts after the first (1.75 s) and the 2 s between
    assert record["spans"][2][1] == pytest.approx(start) and record["spans"][2][2] == pytest.approx(start + 1.75)


def test_a_new_epoch_starts_from_nothing(clock):
    timeline = StageTimeline()
    with timeline.step():
        clock.advance(1.0)
    timeline.begin_epoch()
    clock.advance(5.0)  # the evaluation between epochs is not time between steps
    with timeline.step():
        clock.advance(2.0)
    record = timeline.record(stage=0)
    assert record["steps"] == 1 and record["seconds"]["compute"] == pytest.approx(2.0)
    assert record["seconds"]["between_steps"] == 0.0


def test_backprop_stages_time_the_forward_and_leave_the_rest_to_backward_and_waits(clock):
    timeline = StageTimeline(BACKPROP_KINDS)
    with timeline.step():
        with timeline.span("forward"):
            clock.advance(1.0)
        clock.advance(3.0)
    seconds = timeline.record(stage=0)["seconds"]
    assert list(seconds) == list(BACKPROP_KINDS) and set(KINDS) != set(BACKPROP_KINDS)
    assert seconds["forward"] == pytest.approx(1.0) and seconds["backward_and_waits"] == pytest.approx(3.0)


def test_a_short_epoch_keeps_the_spans_of_its_second_half(clock):
    timeline = StageTimeline()
    timeline.begin_epoch(steps=2)
    for _ in range(2):
        with timeline.step():
            clock.advance(1.0)
    assert [span[1] for span in timeline.record(stage=0)["spans"]] == [pytest.approx(101.0)]  # the second step
    timeline.begin_epoch(steps=100)
    for _ in range(100):
        with timeline.step():
            clock.advance(1.0)
    assert len(timeline.record(stage=0)["spans"]) == 6  # steps 4 to 9
