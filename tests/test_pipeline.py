"""Local modules on different processes (fastlocal.parallel.pipeline) on CPU: 2 and 3 gloo ranks spawned from pytest,
each launch with a hard timeout (a deadlock fails the test instead of hanging it).

The reference is the single-device step (fastlocal.schedule.local_train_step and one SGD step) on the same
batches from the same initial weights, in float64: the pipeline's weights, EMA copies, batch-norm statistics
and optimizer state, gathered into the single-device checkpoint, must equal it.
"""

import time
from pathlib import Path

import pytest
import torch
from builders import (
    build,
    fit_with_rank1_stopped,
    keep_step_checkpoint,
    launch,
    restart_after_a_kill,
    run_cli,
    torchrun_tiny_run,
)

from fastlocal.data import DataBundle, DatasetInfo, DeviceLoader
from fastlocal.engine import Trainer
from fastlocal.export import export_run
from fastlocal.methods import Batch
from fastlocal.parallel import data as data_parallel
from fastlocal.parallel import group as process_group
from fastlocal.parallel.mesh import partition, stage_ranges
from fastlocal.parallel.pipeline import PipelineTrainer, StageCotangents
from fastlocal.parallel.timeline import KINDS
from fastlocal.schedule import local_train_step

SIZE = 8
BATCH = 8
STEPS = 3
STATS = ((0.5,) * 3, (0.5,) * 3)
COMMON = [f"train.batch_size={BATCH}", "log.progress=false", "log.measure_memory=false"]
# name -> (method, K, overrides, stage sizes)
CASES = {
    2: {
        "dgl": ("dgl", 4, [], [2, 2]),
        "infopro": ("infopro", 3, [], [1, 2]),
        "mlaan-w2": ("mlaan", 4, ["mlaan.window=2"], [2, 2]),
    },
    3: {
        "dgl": ("dgl", 4, [], [1, 2, 1]),
        "infopro": ("infopro", 3, [], [1, 1, 1]),
        "mlaan-w2": ("mlaan", 4, ["mlaan.window=2"], [1, 2, 1]),
        # A window of 3 over stages of one module: a cotangent crosses two boundaries.
        "mlaan-w3": ("mlaan", 4, ["mlaan.window=3"], [1, 1, 2]),
        "mlaan-w3-literal": ("mlaan", 4, ["mlaan.window=3", "mlaan.lam_mode=literal"], [1, 1, 2]),
    },
}


def batches(steps: int = STEPS, last: int = BATCH):
    """`steps` random batches of BATCH images, the last of `last` (a partial batch travels in part of a buffer)."""
    g = torch.Generator().manual_seed(1)
    sizes = [BATCH] * (steps - 1) + [last]
    return [
        (torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g))
        for n in sizes
    ]


class Float64:
    """A loader whose images come as float64 (the models of these tests are float64)."""

    def __init__(self, loader):
        self.loader, self.num_images, self.world_size = loader, loader.num_images, loader.world_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.loader.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return ((x.double(), y) for x, y in self.loader)


def tiny_data(rank: int = 0, world: int = 1) -> DataBundle:
    """16 training and 6 test images; with `world` > 1 the shard of data replica `rank` (global batch BATCH)."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (22, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (22,), generator=g)
    info = DatasetInfo("tiny", 10, SIZE, [str(c) for c in range(10)], *STATS, pad=0, pad_mode="reflect", flip=False)
    common = dict(mean=info.mean, std=info.std, pad=0, flip=False, rank=rank, world_size=world)
    return DataBundle(
        Float64(DeviceLoader(images[:16], labels[:16], BATCH // world, train=True, **common)),
        Float64(DeviceLoader(images[16:], labels[16:], 4, train=False, **common)),
        info,
    )


def pipeline_trainer(rank: int, world: int, method: str, k: int, overrides, sizes, out: Path, seed: int = 0):
    cfg, backbone, modules, built = build(method, "resnet20", k, [*overrides, *COMMON], input_size=SIZE, seed=seed)
    parallel = process_group.DataParallel(rank, world, rank)
    return PipelineTrainer(
        cfg,
        backbone,
        modules,
        built,
        tiny_data(),
        torch.device("cpu"),
        out,
        parallel,
        stage_sizes=sizes,
        log=lambda *a: None,
    )


def _pipeline_steps(rank: int, world: int, out: Path) -> None:
    for name, (method, k, overrides, sizes) in CASES[world].items():
        trainer = pipeline_trainer(rank, world, method, k, overrides, sizes, out)
        trainer.begin(STEPS)
        for x, y in batches(last=5):
            trainer.eager_step(x, y) if rank == 0 else trainer.eager_step(None, None)
        trainer.drain()
        ckpt = trainer.checkpoint()
        if rank == 0:
            torch.save(ckpt, out / f"{name}-{world}.pt")


def reference(method: str, k: int, overrides, last: int = BATCH) -> dict:
    """The single-device run's checkpoint after STEPS steps."""
    cfg, backbone, modules, built = build(method, "resnet20", k, [*overrides, *COMMON], input_size=SIZE)
    trainer = Trainer(cfg, backbone, modules, built, tiny_data(), torch.device("cpu"), Path("unused"))
    for x, y in batches(last=last):
        trainer.zero_grad()
        local_train_step(modules, built, Batch(x, y, *STATS))
        trainer.optimizer.step()
    return trainer.checkpoint()


def assert_same_checkpoint(got: dict, expected: dict, name: str, exact: bool = False) -> None:
    for part in ("backbone", "method"):
        assert list(got[part]) == list(expected[part]), (name, part)
        for key, value in expected[part].items():
            if exact:
                assert torch.equal(got[part][key], value), (name, part, key)
            else:
                torch.testing.assert_close(got[part][key], value, rtol=1e-12, atol=1e-14, msg=f"{name} {part} {key}")
    assert sorted(got["optimizer"]["state"]) == sorted(expected["optimizer"]["state"]), name
    for index, state in expected["optimizer"]["state"].items():
        torch.testing.assert_close(
            got["optimizer"]["state"][index]["momentum_buffer"],
            state["momentum_buffer"],
            rtol=1e-12,
            atol=1e-14,
            msg=f"{name} optimizer {index}",
        )
    assert got["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]


@pytest.mark.parametrize("world", [2, 3])
def test_pipeline_steps_equal_the_single_device_steps(tmp_path, world):
    assert launch(_pipeline_steps, world, tmp_path, timeout_s=150) == [0] * world
    for name, (method, k, overrides, _) in CASES[world].items():
        got = torch.load(tmp_path / f"{name}-{world}.pt", weights_only=True)
        expected = reference(method, k, overrides, last=5)
        assert_same_checkpoint(got, expected, f"{name} on {world} stages")
        initial = build(method, "resnet20", k, overrides, input_size=SIZE)[1].state_dict()
        first = next(iter(initial))
        assert not torch.equal(got["backbone"][first], initial[first]), name  # trained at all


def test_partition_minimises_the_slowest_stage():
    assert stage_ranges([2, 1, 3]) == [range(0, 2), range(2, 3), range(3, 6)]
    # Costs 5,1,1,1,1,5 on 3 stages: {5}, {1,1,1,1}, {5} has a slowest stage of 5 (an even split: 6).
    assert partition([5, 1, 1, 1, 1, 5], 3) == [1, 4, 1]
    assert partition([1, 1, 1, 1], 2) == [2, 2]


def test_stage_cotangents_send_what_crosses_the_boundary_by_depth():
    """A stage holding modules 2..3 with a window of 3: loss 2's cascade reaches modules 0-1 below it, loss 3's
    module 1; the cotangents at module 1's output are kept apart by how far they still go."""
    modules = [torch.nn.Linear(2, 2, bias=False).double() for _ in range(4)]
    for m in modules:
        m.trainable_parameters = list(m.parameters())
    cot = StageCotangents(modules, range(2, 4), window=3)
    x = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    a2 = modules[2](x)
    cot.graphs[2] = (x, a2)
    a3_in = a2.detach().requires_grad_()
    cot.graphs[3] = (a3_in, modules[3](a3_in))
    g2, g3 = torch.ones(1, 2, dtype=torch.float64), 2 * torch.ones(1, 2, dtype=torch.float64)
    cot.add_loss_gradients(2, None, g2)
    cot.add_loss_gradients(3, None, g3)
    w2, w3 = modules[2].weight.detach(), modules[3].weight.detach()
    # depth 2 (to modules 1 and 0): loss 2's cotangent through module 2; depth 1 (module 1): loss 3's through 3, 2.
    torch.testing.assert_close(cot.outgoing[1], g2 @ w2)
    torch.testing.assert_close(cot.outgoing[0], g3 @ w3 @ w2)
    torch.testing.assert_close(cot.sums[2], g2 + g3 @ w3)


def _fit_and_gather(rank: int, world: int, out: Path) -> None:
    trainer = pipeline_trainer(
        rank,
        world,
        "mlaan",
        4,
        ["mlaan.window=2", "train.epochs=2"],
        [2, 2],
        out / "pipe" if rank == 0 else out / "rank1",
    )
    trainer.fit(log=lambda *a: None)
    # The single-device run's checkpoint continues in the pipeline.
    resumed = pipeline_trainer(
        rank,
        world,
        "mlaan",
        4,
        ["mlaan.window=2", "train.epochs=3"],
        [2, 2],
        out / "single" if rank == 0 else out / "rank1",
    )
    resumed.load_checkpoint(out / "single" / "checkpoint.pt")
    resumed.fit(log=lambda *a: None)


def test_fit_through_the_pipeline_equals_one_device_and_resumes_both_ways(tmp_path):
    """Two epochs of fit() (training, evaluation through the pipeline, gathered checkpoints) equal the
    single-device run; the pipeline's checkpoint resumes on one device, the single device's in the pipeline,
    and both third epochs agree."""
    import json

    overrides = ["mlaan.window=2", "train.epochs=2", *COMMON]
    cfg, backbone, modules, method = build("mlaan", "resnet20", 4, overrides, input_size=SIZE)
    single = Trainer(cfg, backbone, modules, method, tiny_data(), torch.device("cpu"), tmp_path / "single")
    single.fit(log=lambda *a: None)
    assert launch(_fit_and_gather, 2, tmp_path, timeout_s=150) == [0, 0]
    assert not (tmp_path / "rank1").exists()
    got = torch.load(tmp_path / "pipe" / "checkpoint.pt", weights_only=True)
    assert_same_checkpoint(got, single.checkpoint(), "fit")
    # fastlocal.export reads the pipeline's run as the one-device run's.
    exported, _ = export_run(tmp_path / "pipe")
    assert exported.keys() == got["backbone"].keys()
    assert all(torch.equal(exported[k], v) for k, v in got["backbone"].items())
    pipe_summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert pipe_summary["parallel"] == "modules" and pipe_summary["pipeline_stages"] == [[0, 1], [2, 3]]
    assert_stage_timelines(pipe_summary, steps=2 * len(tiny_data().train), kinds=KINDS)
    single_rows = pipe_summary_history(tmp_path / "single")[:2]
    for a, b in zip(pipe_summary_history(tmp_path / "pipe"), single_rows, strict=True):
        assert a["test_acc"] == b["test_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
    # The gathered checkpoint resumes on one device; the single device's resumed in the pipeline (tmp/single,
    # now at 3 epochs) agrees with it.
    cfg3, *rest = build("mlaan", "resnet20", 4, ["mlaan.window=2", "train.epochs=3", *COMMON], input_size=SIZE)
    resumed = Trainer(cfg3, *rest, tiny_data(), torch.device("cpu"), tmp_path / "resumed")
    resumed.load_checkpoint(tmp_path / "pipe" / "checkpoint.pt")
    assert resumed.fit(log=lambda *a: None)["epochs"] == 3
    in_pipeline = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    assert in_pipeline["state"]["epoch"] == 3
    assert_same_checkpoint(in_pipeline, resumed.checkpoint(), "resumed in the pipeline")


def _step_checkpoint_and_resume(rank: int, world: int, out: Path) -> None:
    # MLAAN's cascade and EMA cross the cut; 2 steps an epoch, a step checkpoint in the middle of each.
    overrides = ["mlaan.window=2", "train.epochs=2", "train.checkpoint_every=1"]
    whole = pipeline_trainer(rank, world, "mlaan", 4, overrides, [2, 2], out / ("whole" if rank == 0 else "rank1"))
    keep_step_checkpoint(whole, epoch=1, step=1, copy_to=out / "mid.pt")
    whole.fit(log=lambda *a: None)
    resumed = pipeline_trainer(rank, world, "mlaan", 4, overrides, [2, 2], out / ("resumed" if rank == 0 else "rank1"))
    resumed.load_checkpoint(out / "mid.pt")
    resumed.fit(log=lambda *a: None)


def assert_resumed_mid_epoch_as_whole(out: Path) -> None:
    """out/mid.pt is a step checkpoint of epoch 2; out/resumed, resumed from it, ended as out/whole."""
    mid = torch.load(out / "mid.pt", weights_only=True)
    assert mid["state"]["epoch"] == 1 and mid["state"]["mid_epoch"]["step"] == 1
    whole = torch.load(out / "whole" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(out / "resumed" / "checkpoint.pt", weights_only=True)
    assert_same_checkpoint(resumed, whole, "resumed mid-epoch", exact=True)
    rows = [pipe_summary_history(out / run) for run in ("whole", "resumed")]
    assert [r["train_loss"] for r in rows[0]] == pytest.approx([r["train_loss"] for r in rows[1]], rel=1e-12)


def test_a_step_checkpoint_resumes_the_pipeline_mid_epoch_to_the_same_weights(tmp_path):
    assert launch(_step_checkpoint_and_resume, 2, tmp_path, timeout_s=150) == [0, 0]
    assert_resumed_mid_epoch_as_whole(tmp_path)


@pytest.mark.parametrize("option", ["pipeline.cascade=stale", "pipeline.ema_every=2"])
def test_step_checkpoints_refuse_what_carries_state_between_steps(tmp_path, option):
    """The stale cascade and a sparse EMA carry messages from one step into the next (hybrid is refused by the
    same condition)."""
    from fastlocal.config import ConfigError

    with pytest.raises(ConfigError, match="train.checkpoint_every"):
        pipeline_trainer(0, 2, "mlaan", 4, ["mlaan.window=2", "train.checkpoint_every=1", option], [2, 2], tmp_path)


def assert_stage_timelines(summary: dict, steps: int, kinds) -> None:
    """summary.json's stage_timeline: every stage, every step it trained, its time split into the kinds."""
    timeline = summary["stage_timeline"]
    assert [r["stage"] for r in timeline] == list(range(len(summary["pipeline_stages"])))
    for record in timeline:
        assert record["steps"] == steps and list(record["seconds"]) == list(kinds)
        assert record["seconds"][kinds[0]] > 0 and sum(record["fractions"].values()) == pytest.approx(1, abs=1e-3)
        assert record["spans"] and {kind for kind, _, _ in record["spans"]} <= {"step", *kinds}
        assert all(a <= b for _, a, b in record["spans"])


def pipe_summary_history(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stage1_fails(rank: int, world: int, out: Path) -> None:
    trainer = pipeline_trainer(rank, world, "dgl", 4, [], [2, 2], out)
    trainer.begin(STEPS)
    for step, (x, y) in enumerate(batches()):
        if rank == 1 and step == 1:
            raise ValueError("stage 1 fails on purpose")
        trainer.eager_step(x, y) if rank == 0 else trainer.eager_step(None, None)
    trainer.drain()
    torch.distributed.barrier()  # stage 0 waits for a stage that is gone


def test_a_failing_stage_ends_every_stage_with_an_error(tmp_path):
    codes = launch(_stage1_fails, 2, tmp_path, timeout_s=90, collective_timeout_s=15)
    assert codes[0] != 0 and codes[1] != 0


def _stage1_stops(rank: int, world: int, out: Path) -> None:
    overrides = ["mlaan.window=2"]  # stage 0 waits for stage 1's cotangent of every step
    trainer = pipeline_trainer(rank, world, "mlaan", 4, overrides, [2, 2], out / ("run" if rank == 0 else "rank1"))
    fit_with_rank1_stopped(trainer, rank, out)


def test_a_stage_that_stops_answering_ends_the_job_naming_it(tmp_path):
    codes = launch(_stage1_stops, 2, tmp_path, timeout_s=90, collective_timeout_s=3)
    assert codes[0] == 1 and codes[1] == -9, codes
    seconds, message = (tmp_path / "timeout.txt").read_text().split("\n", 1)
    assert 3 <= float(seconds) < 30, seconds
    assert message.startswith(
        "rank 0 waited 3 s (system.dist_timeout) for the cotangent of step 2 from stage 1 (rank 1)"
    )
    assert "rank 1 stopped answering" in message, message


def test_single_device_names_for_the_options():
    from fastlocal.config import ConfigError, build_config
    from fastlocal.methods import METHODS

    with pytest.raises(ConfigError, match="set system.pipeline_stages"):
        build_config(None, ["system.parallel=hybrid"], METHODS)
    with pytest.raises(ConfigError, match="stage_sizes"):
        build_config(None, ["method.num_modules=4", "pipeline.stage_sizes=1,2"], METHODS)


def test_torchrun_cli_trains_a_pipeline_and_resumes_on_one_device(tmp_path):
    import sys

    out = tmp_path / "run"
    result, summary = run_cli(torchrun_tiny_run(out, "--system.parallel=modules"), out)
    assert summary["parallel"] == "modules" and summary["world_size"] == 2 and summary["epochs"] == 1
    assert result.stdout.count("final test accuracy") == 1  # rank 0 alone logs
    assert "pipeline: 2 stages" in result.stdout  # partitioned by the measured costs
    resume = [sys.executable, "-m", "fastlocal.train", "--resume", str(out), "--train.epochs=2"]
    resume.append("--system.parallel=none")  # the saved config says modules
    assert run_cli(resume, out)[1]["epochs"] == 2


def test_torchrun_restarts_a_killed_stage_and_the_pipeline_continues_from_its_step_checkpoint(tmp_path):
    """torchrun --max-restarts=1, a 2-stage MLAAN pipeline (its cascade and EMA cross the cut), 4 steps an epoch, a
    step checkpoint after step 3: stage 1 killed (SIGKILL) before step 4 of epoch 2; the restarted group
    continues from the step checkpoint by itself and ends as the uninterrupted run."""
    run = ("--data.max_train=80", "--train.epochs=2", "--train.checkpoint_every=3", "--system.dist_timeout=30")
    pipeline = ("--system.parallel=modules", "--pipeline.stage_sizes=1,2")  # one cut, the same in every attempt
    result = restart_after_a_kill(tmp_path / "killed", tmp_path / "whole", *run, *pipeline, kill_rank=1, kill_step=8)
    assert f"resuming {tmp_path / 'killed'} after step 3 of epoch 2" in result.stdout


SLEEPS = [0.24, 0.16, 0.40, 0.32, 0.48, 0.20, 0.28, 0.36]
"""A cost profile (seconds per module and step) the replay test plays with sleeps: far above the tiny model's
own compute, and sleeping needs no CPU, so four ranks replay it faithfully on a busy two-core machine (at
half these sleeps, a load of 5 on the 2 cores once put the steady step 11 % above the model's)."""
REPLAY_STEPS, REPLAY_WARMUP = 12, 3


def _replay(rank: int, world: int, out: Path) -> None:
    sizes = partition(SLEEPS, world)
    trainer = pipeline_trainer(rank, world, "dgl", len(SLEEPS), [], sizes, out)
    for module, seconds in zip(trainer.modules, SLEEPS):
        module.register_forward_hook(lambda *args, seconds=seconds: time.sleep(seconds))
    trainer.begin(REPLAY_STEPS)
    done = []
    for x, y in batches(REPLAY_STEPS):
        trainer.eager_step(x, y) if rank == 0 else trainer.eager_step(None, None)
        done.append(time.perf_counter())
    trainer.drain()
    if rank == world - 1:
        (out / "steady.txt").write_text(repr((done[-1] - done[REPLAY_WARMUP]) / (REPLAY_STEPS - 1 - REPLAY_WARMUP)))


def test_replayed_cost_profile_runs_at_the_predicted_steady_step(tmp_path):
    """The throughput model against the real engine: DGL K=8 on 4 gloo stages, each module's cost replayed by a
    sleep in its forward; the measured steady step is the model's max_k t_k within 10 %."""
    from fastlocal.parallel.cost import measure_module_costs, predict_step

    # The profile: each module's sleep plus its own compute (a few ms, measured here, on this busy machine).
    cfg, _, modules, method = build("dgl", "resnet20", len(SLEEPS), COMMON, input_size=SIZE)
    compute = measure_module_costs(modules, method, cfg, tiny_data().info, torch.device("cpu"))
    costs = [{**c, "total": c["total"] + s, "output_bytes": 0} for c, s in zip(compute, SLEEPS)]
    sizes = partition(SLEEPS, 4)
    predicted = predict_step(costs, sizes)
    assert predicted["step_seconds"] == pytest.approx(
        max(sum(costs[i]["total"] for i in r) for r in stage_ranges(sizes))
    )
    assert launch(_replay, 4, tmp_path, timeout_s=150) == [0] * 4
    steady = float((tmp_path / "steady.txt").read_text())
    assert steady == pytest.approx(predicted["step_seconds"], rel=0.10), (steady, predicted)
    assert sum(c["total"] for c in costs) / steady == pytest.approx(predicted["speedup"], rel=0.10)


def test_plan_profile_prints_partitions_and_predictions(capsys):
    import json

    from fastlocal.plan import main

    args = [
        "--model.arch=resnet20",
        "--method.num_modules=4",
        "--train.batch_size=4",
        "--system.device=cpu",
        "--profile",
        "--stages",
        "2",
        "--link-gbps",
        "100",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["predicted"]) == {"dgl", "mlaan_exact", "mlaan_stale", "pipelined_bp"}
    for name, prediction in result["predicted"].items():
        assert sum(prediction["stage_sizes"]) == 4 and len(prediction["stage_sizes"]) == 2, name
        assert prediction["step_seconds"] > 0 and prediction["speedup"] > 0, name
    for measured in result["methods"].values():
        assert len(measured["modules"]) == 4 and measured["modules"][0]["output_bytes"] == 4 * 16 * 32 * 32 * 4
        assert measured["measured_step_seconds"] > 0 and "sum_within_10_percent" in measured
    assert "not a measured pipeline" in result["note"]
    assert main([*args[:4], "--profile"]) == 2  # no --stages


DEVIATIONS = {  # the documented approximations, on 2 stages of modules 0-1 | 2-3, against written-out references
    "mlaan-stale": ("mlaan", 4, ["mlaan.window=2", "pipeline.cascade=stale"], [2, 2]),
    "mlaan-ema-every-2": ("mlaan", 4, ["mlaan.window=2", "pipeline.ema_every=2"], [2, 2]),
}


def _deviation_steps(rank: int, world: int, out: Path) -> None:
    for name, (method, k, overrides, sizes) in DEVIATIONS.items():
        trainer = pipeline_trainer(rank, world, method, k, overrides, sizes, out)
        trainer.begin(STEPS)
        for x, y in batches():
            trainer.eager_step(x, y) if rank == 0 else trainer.eager_step(None, None)
        trainer.drain()
        ckpt = trainer.checkpoint()
        if rank == 0:
            torch.save(ckpt, out / f"{name}.pt")


def add(a, b):
    return b if a is None else a if b is None else a + b


def written_out_reference(overrides, stale: bool, ema_every: int) -> dict:
    """MLAAN W=2, K=4 with modules 0-1 on one stage and 2-3 on the next, one module at a time:
    - stale: loss 2's cotangent at module 1's output reaches module 1 one step late, through module 1 recomputed
      (current weights, batch-norm statistics kept) on its input of that step; the last step's comes in time;
    - ema_every = P: module 1's LAM follows blocks of the second stage with the weights of P steps earlier and
      momentum m^P every P steps (and once more after the last step); module 2's LAM, whose blocks are on its
      own stage, every step."""
    from fastlocal.kernels import ema_update_

    cfg, backbone, modules, method = build("mlaan", "resnet20", 4, [*overrides, *COMMON], input_size=SIZE)
    trainer = Trainer(cfg, backbone, modules, method, tiny_data(), torch.device("cpu"), Path("unused"))
    m = method.ema_momentum
    pushed = []
    late = None  # (input of module 1, cotangent) of the previous step
    for t, (x, y) in enumerate(batches()):
        trainer.zero_grad()
        batch = Batch(x, y, *STATS)
        inputs, outputs, sums, carries = [], [], [None] * 4, [None] * 4
        previous = x
        for i in range(4):
            a_in = previous if i == 0 else previous.detach().requires_grad_()
            a = modules[i](a_in)
            own, cascade = a.detach().requires_grad_(), a.detach().requires_grad_()
            loss = method.module_loss(i, own, cascade, batch)
            if loss is not None:
                loss.backward()
                sums[i] = add(own.grad, cascade.grad)
                if i > 0:
                    (carries[i],) = torch.autograd.grad(a, a_in, cascade.grad, retain_graph=True)
            inputs.append(a_in)
            outputs.append(a)
            previous = a
        last = t == STEPS - 1
        sums[0] = carries[1]
        sums[2] = add(sums[2], carries[3])
        if not stale or last:
            sums[1] = add(sums[1], carries[2])
        for i in range(4):
            torch.autograd.backward(outputs[i], sums[i], inputs=modules[i].trainable_parameters)
        if late is not None:
            kept, cotangent = late
            saved = {k: v.clone() for k, v in modules[1].state_dict().items()}
            recomputed = modules[1](kept)
            torch.autograd.backward(recomputed, cotangent, inputs=modules[1].trainable_parameters)
            modules[1].load_state_dict(saved)
        late = (inputs[1].detach().clone(), carries[2]) if stale and not last else None
        if ema_every == 1:
            method.before_optimizer_step()
        else:
            targets1, live1 = method.lams["1"].ema_pairs()
            targets2, live2 = method.lams["2"].ema_pairs()
            ema_update_(targets2, live2, m)
            if t % ema_every == 0:
                pushed.append([p.detach().clone() for p in live1])
                if len(pushed) > 1:
                    ema_update_(targets1, pushed.pop(0), m**ema_every)
        trainer.optimizer.step()
    for weights in pushed:  # the pipeline applies what is still on its way at the end of the epoch
        ema_update_(method.lams["1"].ema_pairs()[0], weights, m**ema_every)
    return trainer.checkpoint()


def test_stale_cascade_and_ema_every_follow_their_written_rules(tmp_path):
    assert launch(_deviation_steps, 2, tmp_path, timeout_s=150) == [0, 0]
    exact = reference("mlaan", 4, ["mlaan.window=2"])
    assert_same_checkpoint(written_out_reference(["mlaan.window=2"], False, 1), exact, "the written-out reference")
    for name, (_, _, overrides, _) in DEVIATIONS.items():
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        expected = written_out_reference(overrides, stale="stale" in name, ema_every=2 if "ema" in name else 1)
        assert_same_checkpoint(got, expected, name)
        with pytest.raises(AssertionError):  # a deviation: not the single-device step
            assert_same_checkpoint(got, exact, name)


# -- hybrid: 2 data replicas x 2 pipeline stages ------------------------------------------------------------------
REPLICAS = 2
HYBRID = {  # name -> (method, K, overrides, stage sizes); MLAAN's cascade and EMA copies cross the stage boundary
    "dgl": ("dgl", 4, [], [2, 2]),
    "mlaan-w2": ("mlaan", 4, ["mlaan.window=2"], [2, 2]),
}
# The stale cascade adds to stage 0's gradients after its flush: averaged only then (else GradientAverager raises).
HYBRID_STALE = ("mlaan", 4, ["mlaan.window=2", "pipeline.cascade=stale"], [2, 2])


def half(tensor: torch.Tensor, replica: int) -> torch.Tensor:
    """Data replica `replica`'s shard of a global batch."""
    size = tensor.shape[0] // REPLICAS
    return tensor[replica * size : (replica + 1) * size]


def hybrid_trainer(rank: int, world: int, mesh, method: str, k: int, overrides, sizes, out: Path, epochs: int = 1):
    # Every rank builds from its own seed: the broadcast from rank 0 (as fastlocal.train does) makes them equal.
    overrides = [*overrides, *COMMON, f"train.epochs={epochs}"]
    cfg, backbone, modules, built = build(method, "resnet20", k, overrides, input_size=SIZE, seed=rank)
    data_parallel.broadcast_from_rank0(backbone, built)
    parallel = process_group.DataParallel(rank, world, rank)
    data = tiny_data(mesh.replica, REPLICAS)
    return PipelineTrainer(
        cfg, backbone, modules, built, data, torch.device("cpu"), out, parallel, sizes, lambda *a: None, mesh
    )


def _hybrid_steps(rank: int, world: int, out: Path) -> None:
    from fastlocal.parallel.mesh import hybrid_mesh

    mesh = hybrid_mesh(2, torch.device("cpu"))
    assert (mesh.replica, mesh.pipe_ranks) == (rank // 2, (rank // 2 * 2, rank // 2 * 2 + 1))
    for name, (method, k, overrides, sizes) in {**HYBRID, "mlaan-stale": HYBRID_STALE}.items():
        trainer = hybrid_trainer(rank, world, mesh, method, k, overrides, sizes, out)
        trainer.begin(STEPS)
        for x, y in batches():
            if trainer.stage.is_first:
                trainer.eager_step(half(x, mesh.replica), half(y, mesh.replica))
            else:
                trainer.eager_step(None, None)
        trainer.drain()
        data_parallel.average_buffers(trainer.backbone, trainer.method, group=mesh.data_group)  # as fit() does
        torch.save(trainer.owned_state(), out / f"{name}-rank{rank}.pt")
        ckpt = trainer.checkpoint()
        if rank == 0:
            torch.save(ckpt, out / f"{name}.pt")
    # fit(): training, evaluation through each replica's pipeline on its test shard, the gathered checkpoint.
    method, k, overrides, sizes = HYBRID["mlaan-w2"]
    trainer = hybrid_trainer(rank, world, mesh, method, k, overrides, sizes, out / ("fit" if rank == 0 else "other"))
    trainer.fit()


def data_parallel_reference(method: str, k: int, overrides) -> dict:
    """Data parallelism's definition in one process (as tests/test_distributed.py): each replica's half of every
    batch through the single-device schedule from the same weights, with that replica's own batch-norm running
    statistics; the gradients averaged, one EMA update, one optimizer step; at the end the running statistics
    averaged over the replicas. The checkpoint."""
    cfg, backbone, modules, built = build(method, "resnet20", k, [*overrides, *COMMON], input_size=SIZE)
    trainer = Trainer(cfg, backbone, modules, built, tiny_data(), torch.device("cpu"), Path("unused"))
    buffers = [*backbone.buffers(), *built.buffers()]
    running = [[b.clone() for b in buffers] for _ in range(REPLICAS)]
    ema_update = built.before_optimizer_step
    built.before_optimizer_step = lambda: None  # the EMA moves once per step, below
    for x, y in batches():
        grads = []
        for replica in range(REPLICAS):
            with torch.no_grad():
                for b, value in zip(buffers, running[replica]):
                    b.copy_(value)
            trainer.zero_grad()
            local_train_step(modules, built, Batch(half(x, replica), half(y, replica), *STATS))
            grads.append([None if p.grad is None else p.grad.clone() for p in trainer.params])
            running[replica] = [b.clone() for b in buffers]
        for i, p in enumerate(trainer.params):
            p.grad = None if grads[0][i] is None else sum(g[i] for g in grads) / REPLICAS
        ema_update()
        trainer.optimizer.step()
    del built.before_optimizer_step
    with torch.no_grad():
        for i, b in enumerate(buffers):
            b.copy_(sum(r[i] for r in running) / REPLICAS if b.is_floating_point() else running[0][i])
    return trainer.checkpoint()


def test_hybrid_mesh_steps_equal_data_parallel_and_fit_gathers_and_evaluates(tmp_path):
    """4 gloo ranks as 2 data replicas x 2 stages (float64): after 3 steps the gathered checkpoint (weights, EMA
    copies, averaged batch-norm statistics, optimizer state) equals data parallelism's averaged-gradient
    reference, and the replicas hold the same stages; one epoch of fit() evaluates the whole test set (each
    replica its shard) and writes a checkpoint that resumes on one device."""
    import json

    from fastlocal.engine import evaluate

    assert launch(_hybrid_steps, 4, tmp_path, timeout_s=150) == [0] * 4
    for name in [*HYBRID, "mlaan-stale"]:
        for stage in range(2):  # replica 1's stage equals replica 0's, bit for bit
            a = torch.load(tmp_path / f"{name}-rank{stage}.pt", weights_only=True)
            b = torch.load(tmp_path / f"{name}-rank{2 + stage}.pt", weights_only=True)
            for part in ("backbone", "method"):
                assert a[part].keys() == b[part].keys()
                for key in a[part]:
                    assert torch.equal(a[part][key], b[part][key]), (name, stage, part, key)
    for name, (method, k, overrides, _) in HYBRID.items():
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert_same_checkpoint(got, data_parallel_reference(method, k, overrides), f"hybrid {name}")
    assert not (tmp_path / "other").exists()
    summary = json.loads((tmp_path / "fit" / "summary.json").read_text())
    assert summary["parallel"] == "hybrid" and summary["world_size"] == 4 and summary["data_replicas"] == 2
    method, k, overrides, _ = HYBRID["mlaan-w2"]
    cfg, backbone, modules, built = build(
        method, "resnet20", k, [*overrides, *COMMON, "train.epochs=2"], input_size=SIZE
    )
    single = Trainer(cfg, backbone, modules, built, tiny_data(), torch.device("cpu"), tmp_path / "fit")
    single.load_checkpoint(tmp_path / "fit" / "checkpoint.pt")
    # Every test image counted once: one device evaluating the gathered checkpoint on the whole test set agrees.
    assert evaluate(backbone, single.data.test) == summary["final_test_acc"]
    assert single.fit(log=lambda *a: None)["epochs"] == 2


def test_hybrid_options_fail_with_what_to_set():
    from fastlocal.config import ConfigError, build_config, resume_config, to_dict
    from fastlocal.methods import METHODS
    from fastlocal.parallel.mesh import hybrid_replicas

    assert hybrid_replicas(8, 4) == 2
    with pytest.raises(ConfigError, match="must divide the number of processes, 6"):
        hybrid_replicas(6, 4)
    with pytest.raises(ConfigError, match="pipelined backprop runs with system.parallel=modules"):
        build_config(None, ["system.parallel=hybrid", "system.pipeline_stages=2", "method.name=bp"], METHODS)
    cfg = build_config(None, ["system.parallel=hybrid", "system.pipeline_stages=2"], METHODS)
    # A hybrid run resumes as a pipeline or on one device.
    for mode in ("modules", "none"):
        assert resume_config(to_dict(cfg), [f"system.parallel={mode}"], METHODS).system.parallel == mode


def test_cli_rejects_pipeline_stages_that_do_not_divide_the_processes(monkeypatch, capsys):
    from fastlocal.train import main

    torchrun = dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    args = ["--log.progress=false", "--system.parallel=hybrid", "--system.pipeline_stages=2"]
    assert main(args) == 2  # before joining any process group
    assert "system.pipeline_stages = 2 must divide the number of processes, 3" in capsys.readouterr().err
    assert main(args[:2]) == 2
    assert "set system.pipeline_stages=S" in capsys.readouterr().err


def test_torchrun_cli_trains_hybrid_and_resumes_as_a_pipeline(tmp_path):

    out = tmp_path / "run"
    command = torchrun_tiny_run(out, "--system.parallel=hybrid", "--system.pipeline_stages=2", processes=4)
    result, summary = run_cli(command, out)
    assert summary["parallel"] == "hybrid" and summary["world_size"] == 4 and summary["data_replicas"] == 2
    assert result.stdout.count("final test accuracy") == 1  # rank 0 alone logs
    assert "(20 train / 10 test images)" in result.stdout  # replica 0's shard of the 40 / 20
    assert "2 data replicas x 2 pipeline stages" in result.stdout
    # The gathered checkpoint continues as a 2-stage pipeline (system.pipeline_stages is ignored there).
    resume = torchrun_tiny_run(out, "--system.parallel=modules", processes=2)
    resume = [*resume[: resume.index("fastlocal.train") + 1], "--resume", str(out), "--train.epochs=2"]
    resume.append("--system.parallel=modules")
    summary = run_cli(resume, out)[1]
    assert summary["epochs"] == 2 and summary["parallel"] == "modules"


def test_profiling_leaves_the_model_as_it_was():
    """The profile's timings (fastlocal.plan --profile, the measured partition) run real steps on the run's own
    model; its weights, EMA copies, batch-norm statistics and gradients must be as before afterwards."""
    from contextlib import nullcontext

    from fastlocal.parallel.cost import measure_module_costs, measure_single_device_step

    cfg, backbone, modules, method = build("mlaan", "resnet20", 4, [*COMMON, "mlaan.window=2"], input_size=SIZE)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (backbone, method)]
    measure_module_costs(modules, method, cfg, tiny_data().info, torch.device("cpu"), repeats=1)
    measure_single_device_step(modules, method, cfg, tiny_data().info, torch.device("cpu"), nullcontext, repeats=1)
    for saved, module in zip(before, (backbone, method)):
        for key, value in module.state_dict().items():
            assert torch.equal(value, saved[key]), key
    assert all(p.grad is None for p in (*backbone.parameters(), *method.parameters()))
