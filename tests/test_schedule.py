"""fastlocal/schedule.py: the order of one step's work, with and without a side stream.

The one-stream order is what bounds activation memory (docs/method.md#the-single-forward-schedule): with
W = 1 a module's graph is freed before the next module's forward. With a side stream only module i+1's
forward moves ahead of the processing of loss i (tests/test_fast_path.py checks that the bits agree)."""

import pytest
import torch
from builders import build

from fastlocal.methods import Batch
from fastlocal.schedule import LossFork, _Cotangents, local_train_step


class SerialSideStream(LossFork):
    """The side-stream order (one loss left in flight) on one stream."""

    in_flight = 1


def step_events(method: str, window_overrides, fork, monkeypatch) -> list[str]:
    _, _, modules, m = build(method, "resnet20", 4, window_overrides, dtype=torch.float32)
    events = []
    for i, module in enumerate(modules):
        module.register_forward_hook(lambda *_, i=i: events.append(f"forward {i}"))
    flush = _Cotangents.flush
    monkeypatch.setattr(_Cotangents, "flush", lambda self, j: (events.append(f"flush {j}"), flush(self, j))[1])
    g = torch.Generator().manual_seed(1)
    b = Batch(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g), (0.5,) * 3, (0.5,) * 3)
    local_train_step(modules, m, b, side_stream=fork)
    return events


# Written out from the schedule: module j is flushed once loss j+W-1 has been processed.
ONE_STREAM_W1 = ["forward 0", "flush 0", "forward 1", "flush 1", "forward 2", "flush 2", "forward 3", "flush 3"]
ONE_STREAM_W2 = ["forward 0", "forward 1", "flush 0", "forward 2", "flush 1", "forward 3", "flush 2", "flush 3"]
SIDE_STREAM_W1 = ["forward 0", "forward 1", "flush 0", "forward 2", "flush 1", "forward 3", "flush 2", "flush 3"]
SIDE_STREAM_W2 = ["forward 0", "forward 1", "forward 2", "flush 0", "forward 3", "flush 1", "flush 2", "flush 3"]


@pytest.mark.parametrize(
    "method,overrides,fork,expected",
    [
        ("dgl", [], None, ONE_STREAM_W1),
        ("mlaan", ["mlaan.window=2"], None, ONE_STREAM_W2),
        ("dgl", [], SerialSideStream(), SIDE_STREAM_W1),
        ("mlaan", ["mlaan.window=2"], SerialSideStream(), SIDE_STREAM_W2),
    ],
    ids=["one-stream-W1", "one-stream-W2", "side-stream-W1", "side-stream-W2"],
)
def test_each_module_is_flushed_as_early_as_its_schedule_allows(method, overrides, fork, expected, monkeypatch):
    assert step_events(method, overrides, fork, monkeypatch) == expected


def test_the_default_fork_is_the_no_op():
    fork = LossFork()
    assert fork.in_flight == 0 and fork.done() is None
    with fork.forked():
        pass
    fork.wait(None)
    fork.join()
