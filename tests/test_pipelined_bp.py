"""Pipelined backprop (fastlocal.parallel.pipelined_bp: `torch.distributed.pipelining`, Schedule1F1B) on gloo CPU ranks
spawned from pytest, every launch with a hard timeout.

The reference is written out here from the definition: one device, float64, each batch cut into M equal
micro-batches, the gradient of (1/M) * sum of the micro-batches' cross-entropies (so batch norm normalises
each micro-batch and updates its running statistics once per micro-batch), one SGD step per batch.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from builders import keep_step_checkpoint, launch, run_cli, torchrun_tiny_run
from test_pipeline import (
    COMMON,
    SIZE,
    STEPS,
    assert_resumed_mid_epoch_as_whole,
    assert_same_checkpoint,
    assert_stage_timelines,
    batches,
    tiny_data,
)

from fastlocal.build import build_learner as build_model
from fastlocal.config import ConfigError, build_config
from fastlocal.engine import Trainer
from fastlocal.methods import METHODS
from fastlocal.parallel import group as process_group
from fastlocal.parallel.pipelined_bp import PipelinedBackpropTrainer
from fastlocal.parallel.timeline import BACKPROP_KINDS

MICRO = 4  # batches of 8: micro-batches of 2 images, at least one per stage (1F1B)
K = 4


def build_bp(overrides=(), k: int = K):
    """(cfg, backbone, one-module list, bp method) in float64, the weights of seed 0; pipelined (modules) with
    K local-module cut points, or on one device (k = 1)."""
    pipelined = ["system.parallel=modules", f"pipeline.micro_batches={MICRO}"] if k > 1 else []
    cfg = build_config(None, ["method.name=bp", f"method.num_modules={k}", *pipelined, *COMMON, *overrides], METHODS)
    torch.manual_seed(0)
    learner = build_model(cfg, 10, SIZE)
    learner.backbone.double()
    learner.method.double()
    return cfg, learner.backbone, learner.local_modules, learner.method


class MicroBatchedBackprop(Trainer):
    """The reference: one device, the batch's gradient the mean of its MICRO micro-batches' gradients."""

    def step_without_zero_grad(self, x, y):
        losses = []
        for xm, ym in zip(x.chunk(MICRO), y.chunk(MICRO), strict=True):
            loss = torch.nn.functional.cross_entropy(self.backbone(xm), ym)
            (loss / MICRO).backward()
            losses.append(loss.detach())
        self.optimizer.step()
        return torch.stack(losses).mean()


def micro_batched_reference(overrides, out: Path) -> MicroBatchedBackprop:
    cfg, backbone, modules, method = build_bp(overrides, k=1)
    return MicroBatchedBackprop(cfg, backbone, modules, method, tiny_data(), torch.device("cpu"), out)


def pipelined_trainer(rank: int, world: int, overrides, sizes, out: Path) -> PipelinedBackpropTrainer:
    cfg, backbone, _, method = build_bp(overrides)
    parallel = process_group.DataParallel(rank, world, rank)
    return PipelinedBackpropTrainer(
        cfg, backbone, method, tiny_data(), torch.device("cpu"), out, parallel, stage_sizes=sizes, log=lambda *a: None
    )


def _steps_on_three_stages(rank: int, world: int, out: Path) -> None:
    trainer = pipelined_trainer(rank, world, [], [1, 2, 1], out)
    for x, y in batches():
        trainer.eager_step(x, y) if rank == 0 else trainer.eager_step(None, None)
    ckpt = trainer.checkpoint()
    if rank == 0:
        torch.save(ckpt, out / "steps.pt")


def test_steps_on_three_stages_equal_micro_batched_backprop(tmp_path):
    """A middle stage that sees neither the images nor the labels; the checkpoint gathered from three stages."""
    assert launch(_steps_on_three_stages, 3, tmp_path, timeout_s=150) == [0, 0, 0]
    reference = micro_batched_reference([], tmp_path / "unused")
    for x, y in batches():
        reference.eager_step(x, y)
    got = torch.load(tmp_path / "steps.pt", weights_only=True)
    assert_same_checkpoint(got, reference.checkpoint(), f"{STEPS} steps on 3 stages")


def _fit(rank: int, world: int, out: Path) -> None:
    trainer = pipelined_trainer(rank, world, ["train.epochs=2"], [2, 2], out / "pipe" if rank == 0 else out / "rank1")
    trainer.fit(log=lambda *a: None)
    # The one-device reference's checkpoint continues in the pipeline.
    out3 = out / "single-in-pipe" if rank == 0 else out / "rank1"
    resumed = pipelined_trainer(rank, world, ["train.epochs=3"], [2, 2], out3)
    resumed.load_checkpoint(out / "single" / "checkpoint.pt")
    resumed.fit(log=lambda *a: None)


def _step_checkpoint_and_resume(rank: int, world: int, out: Path) -> None:
    overrides = ["train.epochs=2", "train.checkpoint_every=1"]  # 2 steps an epoch
    whole = pipelined_trainer(rank, world, overrides, [2, 2], out / ("whole" if rank == 0 else "rank1"))
    keep_step_checkpoint(whole, epoch=1, step=1, copy_to=out / "mid.pt")
    whole.fit(log=lambda *a: None)
    resumed = pipelined_trainer(rank, world, overrides, [2, 2], out / ("resumed" if rank == 0 else "rank1"))
    resumed.load_checkpoint(out / "mid.pt")
    resumed.fit(log=lambda *a: None)


def test_a_step_checkpoint_resumes_pipelined_backprop_mid_epoch_to_the_same_weights(tmp_path):
    assert launch(_step_checkpoint_and_resume, 2, tmp_path, timeout_s=150) == [0, 0]
    assert_resumed_mid_epoch_as_whole(tmp_path)


def test_fit_equals_micro_batched_backprop_and_resumes_on_one_device(tmp_path):
    """Two epochs of fit() on 2 stages (LR schedule, evaluation through the stages, gathered checkpoints) equal
    the one-device reference, loss and accuracy included; the checkpoint resumes on one device (plain BP), as
    the reference's does, and the reference's resumes in the pipeline."""
    reference = micro_batched_reference(["train.epochs=2"], tmp_path / "single")
    reference.fit(log=lambda *a: None)
    assert launch(_fit, 2, tmp_path, timeout_s=150) == [0, 0]
    assert not (tmp_path / "rank1").exists()
    got = torch.load(tmp_path / "pipe" / "checkpoint.pt", weights_only=True)
    assert_same_checkpoint(got, reference.checkpoint(), "fit")
    initial = build_bp()[1].state_dict()
    first = next(iter(initial))
    assert not torch.equal(got["backbone"][first], initial[first])  # trained at all
    rows = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("pipe", "single")
    ]
    for a, b in zip(*rows, strict=True):
        assert a["test_acc"] == b["test_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert summary["parallel"] == "modules" and summary["pipeline_stages"] == [[0, 1], [2, 3]]
    assert summary["schedule"] == "1F1B" and summary["micro_batches"] == MICRO
    assert_stage_timelines(summary, steps=2 * len(tiny_data().train), kinds=BACKPROP_KINDS)
    assert all(r["seconds"]["forward"] > 0 for r in summary["stage_timeline"])
    assert summary["num_parameters"] == sum(p.numel() for p in reference.params)  # every stage's
    # A third epoch on one device, plain BP, from either checkpoint: the same weights.
    third = {}
    for run in ("pipe", "single"):
        cfg, backbone, modules, method = build_bp(["train.epochs=3"], k=1)
        resumed = Trainer(cfg, backbone, modules, method, tiny_data(), torch.device("cpu"), tmp_path / f"{run}-3")
        resumed.load_checkpoint(tmp_path / run / "checkpoint.pt")
        assert resumed.fit(log=lambda *a: None)["epochs"] == 3
        third[run] = resumed.checkpoint()
    assert_same_checkpoint(third["pipe"], third["single"], "resumed on one device")
    # And the reference's checkpoint resumed in the pipeline: the reference's own third epoch.
    reference3 = micro_batched_reference(["train.epochs=3"], tmp_path / "single-3-micro")
    reference3.load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    reference3.fit(log=lambda *a: None)
    in_pipeline = torch.load(tmp_path / "single-in-pipe" / "checkpoint.pt", weights_only=True)
    assert in_pipeline["state"]["epoch"] == 3
    assert_same_checkpoint(in_pipeline, reference3.checkpoint(), "resumed in the pipeline")


def test_micro_batches_and_partial_batches_are_checked(capsys, tmp_path):
    from fastlocal.train import main

    with pytest.raises(ConfigError, match="does not split into pipeline.micro_batches = 3"):
        build_bp(["pipeline.micro_batches=3"])
    bp_pipeline = ["--method.name=bp", "--method.num_modules=4", "--system.parallel=modules"]
    assert main([*bp_pipeline, "--train.batch_size=8", "--pipeline.micro_batches=3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastlocal: error: train.batch_size = 8 does not split") and "Traceback" not in err
    with pytest.raises(ConfigError, match="method.num_modules must be 1"):
        build_config(None, ["method.name=bp", "method.num_modules=4"], METHODS)  # K > 1 only cuts a pipeline
    with pytest.raises(ConfigError, match="1F1B schedule needs at least one micro-batch per stage"):
        pipelined_trainer(0, 3, ["pipeline.micro_batches=2"], [1, 2, 1], Path("unused"))
    with pytest.raises(ConfigError, match="train.drop_last=true"):  # 16 images in batches of 12: a last batch of 4
        pipelined_trainer(0, 2, ["train.batch_size=12"], [2, 2], Path("unused"))


def test_torchrun_cli_trains_pipelined_backprop_and_resumes_on_one_device(tmp_path):
    out = tmp_path / "run"
    command = torchrun_tiny_run(out, "--method.name=bp", "--system.parallel=modules", "--pipeline.micro_batches=2")
    result, summary = run_cli(command, out)
    assert "pipelined backprop (1F1B, 2 micro-batches): 2 stages" in result.stdout  # partitioned by measured cost
    assert summary["method"] == "bp" and summary["parallel"] == "modules" and summary["world_size"] == 2
    assert summary["num_modules"] == 3 and summary["images_per_second"] > 0
    resume = [sys.executable, "-m", "fastlocal.train", "--resume", str(out), "--train.epochs=2"]
    result, _ = run_cli([*resume, "--system.parallel=none"], out, expect=2)
    assert "add --method.num_modules=1" in result.stderr  # bp's K on one device
    assert run_cli([*resume, "--system.parallel=none", "--method.num_modules=1"], out)[1]["epochs"] == 2


def test_the_throughput_model_of_pipelined_backprop():
    """docs/pipeline.md's formula, with costs typed here. Per micro-batch, stage k works w_k = its forward +
    loss + VJPs, plus twice its output's sending time but on the last stage; its optimizer step o_k runs once a
    batch; step = (M + S - 1) * max_k w_k + max_k o_k; one device: every module's work at the batch."""
    from fastlocal.parallel.cost import predict_pipelined_bp

    names = ("forward", "loss", "input_vjp", "weight_vjp", "optimizer", "output_bytes")
    costs = [  # at the batch
        dict(zip(names, (1.0, 0.0, 0.5, 1.0, 0.1, 50))),  # 2.6 s of work
        dict(zip(names, (2.0, 0.0, 1.0, 2.0, 0.2, 80))),  # 5.2 s
        dict(zip(names, (1.0, 0.5, 0.5, 1.0, 0.1, 40))),  # 3.1 s, the final loss included; the last stage sends none
    ]
    micro = [  # at the micro-batch: more than a quarter of the batch's
        dict(zip(names, (0.4, 0.0, 0.2, 0.4, 0.1, 20))),  # 1.0 s; 20 bytes = 0.2 s at 100 bytes/s
        dict(zip(names, (0.6, 0.0, 0.3, 0.6, 0.2, 20))),  # 1.5 s
        dict(zip(names, (0.3, 0.2, 0.1, 0.3, 0.1, 10))),  # 0.9 s
    ]
    got = predict_pipelined_bp(costs, [1, 2], micro_batches=4, link_bytes_per_second=100.0, micro_costs=micro)
    assert got["stage_seconds"] == pytest.approx([1.0 + 2 * 0.2, 1.5 + 0.9])
    assert got["step_seconds"] == pytest.approx((4 + 2 - 1) * 2.4 + 0.3)  # stage 1's optimizer: 0.2 + 0.1
    assert got["single_device_seconds"] == pytest.approx(10.9)
    assert got["speedup"] == pytest.approx(10.9 / (5 * 2.4 + 0.3))
    # No micro-batch costs: a quarter of the batch's (sent bytes included).
    even = predict_pipelined_bp(costs, [1, 2], micro_batches=4, link_bytes_per_second=100.0)
    assert even["stage_seconds"] == pytest.approx([2.5 / 4 + 2 * 0.5 / 4, (5.0 + 3.0) / 4])
    assert even["step_seconds"] == pytest.approx(5 * 2.0 + 0.3)


def test_bp_on_one_device_ignores_a_stem_separate_meant_for_the_stage_cut():
    """`--method.stem_separate=true --method.num_modules=16` names where pipelined BP may cut ResNet-32; on one
    device (and in the Trainer's learner) BP is still one module, the stem with the blocks."""
    overrides = ["method.name=bp", "method.num_modules=16", "method.stem_separate=true", "model.arch=resnet32"]
    overrides.append("system.parallel=modules")  # where bp's K > 1 is valid: the cut of pipelined backprop
    learner = build_model(build_config(None, overrides, METHODS), 10, 32, (0.5,) * 3, (0.5,) * 3)
    assert learner.num_modules == 1
    assert sum(p.numel() for p in learner.local_modules[0].parameters()) == sum(
        p.numel() for name, p in learner.backbone.named_parameters() if not name.startswith("head")
    )
