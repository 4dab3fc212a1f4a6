"""Data parallelism on CPU: 2 gloo ranks spawned from pytest, each with a hard timeout (a deadlock fails).

The reference for the gradients is DDP's definition, computed here in one process: each rank's shard
runs through the single-process schedule from the same weights (batch-norm statistics per shard), the
gradients are averaged, then one EMA update and one optimizer step.
"""

import json
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

from fastlocal.config import ConfigError, build_config
from fastlocal.data import DataBundle, DatasetInfo, DeviceLoader
from fastlocal.engine import CHECKPOINT_NAME, Trainer, evaluate
from fastlocal.export import export_run
from fastlocal.methods import METHODS, Batch
from fastlocal.optim import build_optimizer
from fastlocal.parallel import data as data_parallel
from fastlocal.parallel import group as process_group
from fastlocal.schedule import local_train_step

WORLD = 2
GLOBAL_BATCH = 8
SIZE = 8  # image side: small enough for every case of the equality test to run in seconds
STATS = ((0.5,) * 3, (0.5,) * 3)
CASES = {
    "bp": ("bp", 1, []),
    "dgl": ("dgl", 3, []),
    "infopro": ("infopro", 3, []),
    "mlaan-w2": ("mlaan", 4, ["mlaan.window=2"]),
    "mlaan-w2-no-lam": ("mlaan", 4, ["mlaan.window=2", "mlaan.lam=false"]),
    "mlaan-w3": ("mlaan", 4, ["mlaan.window=3"]),
    "mlaan-w3-no-lam": ("mlaan", 4, ["mlaan.window=3", "mlaan.lam=false"]),
}


def global_batches(steps: int = 3):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (GLOBAL_BATCH,), generator=g),
        )
        for _ in range(steps)
    ]


def shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    size = GLOBAL_BATCH // WORLD
    return tensor[rank * size : (rank + 1) * size]


def weights(backbone, method) -> dict[str, torch.Tensor]:
    """Every parameter, the frozen EMA copies included (not the BN running statistics)."""
    named = {f"backbone.{k}": v for k, v in backbone.named_parameters()}
    named.update({f"method.{k}": v for k, v in method.named_parameters()})
    return {k: v.detach().clone() for k, v in named.items()}


def _three_data_parallel_steps(rank: int, world: int, out: Path) -> None:
    for name, (method_name, k, overrides) in CASES.items():
        cfg, backbone, modules, method = build(method_name, "resnet20", k, overrides, input_size=SIZE, seed=rank)
        data_parallel.broadcast_from_rank0(backbone, method)  # rank 1 was built from another seed
        averager = data_parallel.GradientAverager(modules, method, backbone)
        optimizer = build_optimizer([p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad], cfg)
        for x, y in global_batches():
            optimizer.zero_grad(set_to_none=True)
            local_train_step(
                modules, method, Batch(shard(x, rank), shard(y, rank), *STATS), after_flush=averager.after_flush
            )
            averager.finish()
            optimizer.step()
        torch.save(weights(backbone, method), out / f"{name}-rank{rank}.pt")


def reference_weights(method_name: str, k: int, overrides: list[str]) -> dict[str, torch.Tensor]:
    cfg, backbone, modules, method = build(method_name, "resnet20", k, overrides, input_size=SIZE, seed=0)
    params = [p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    ema_update = method.before_optimizer_step
    for x, y in global_batches():
        per_shard = []
        method.before_optimizer_step = lambda: None  # the EMA moves once per step, below
        for rank in range(WORLD):
            optimizer.zero_grad(set_to_none=True)
            local_train_step(modules, method, Batch(shard(x, rank), shard(y, rank), *STATS))
            per_shard.append([None if p.grad is None else p.grad.clone() for p in params])
        del method.before_optimizer_step
        for i, p in enumerate(params):
            grads = [g[i] for g in per_shard]
            p.grad = None if grads[0] is None else sum(grads) / WORLD
        ema_update()
        optimizer.step()
    return weights(backbone, method)


def test_three_steps_equal_the_averaged_gradient_reference_for_every_method(tmp_path):
    assert launch(_three_data_parallel_steps, WORLD, tmp_path, timeout_s=240) == [0, 0]
    for name, (method_name, k, overrides) in CASES.items():
        rank0 = torch.load(tmp_path / f"{name}-rank0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"{name}-rank1.pt", weights_only=True)
        expected = reference_weights(method_name, k, overrides)
        initial = weights(*build(method_name, "resnet20", k, overrides, input_size=SIZE, seed=0)[1::2])
        assert set(rank0) == set(expected)
        for key in expected:
            # Identical replicas (EMA copies included), equal to the reference, and trained at all.
            assert torch.equal(rank0[key], rank1[key]), (name, key)
            torch.testing.assert_close(rank0[key], expected[key], rtol=1e-12, atol=1e-14, msg=f"{name} {key}")
        first = next(iter(initial))
        assert not torch.equal(rank0[first], initial[first]), name


def tiny_data(rank: int, world: int) -> DataBundle:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (22, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (22,), generator=g)
    info = DatasetInfo("tiny", 10, 16, [str(c) for c in range(10)], *STATS, pad=2, pad_mode="reflect", flip=True)
    common = dict(mean=info.mean, std=info.std, pad=2, flip=True, rank=rank, world_size=world)
    return DataBundle(
        DeviceLoader(images[:16], labels[:16], GLOBAL_BATCH // world, train=True, **common),
        DeviceLoader(images[16:], labels[16:], 4, train=False, **common),
        info,
    )


def tiny_trainer(rank: int, world: int, out: Path, epochs: int, parallel=None, extra=()) -> Trainer:
    overrides = [
        *extra,
        f"train.epochs={epochs}",
        f"train.batch_size={GLOBAL_BATCH}",
        "log.progress=false",
        "log.measure_memory=false",
        "mlaan.window=2",
    ]
    cfg, backbone, modules, method = build("mlaan", "resnet20", 3, overrides, dtype=torch.float32, input_size=16)
    return Trainer(cfg, backbone, modules, method, tiny_data(rank, world), torch.device("cpu"), out, parallel)


def _fit_and_resume(rank: int, world: int, out: Path) -> None:
    parallel = process_group.DataParallel(rank, WORLD, rank)
    # Rank 1 is given its own directory: it must not write there.
    whole = tiny_trainer(rank, WORLD, out / ("whole" if rank == 0 else "rank1"), 2, parallel)
    whole.fit(log=lambda *a: None)
    state = {**whole.backbone.state_dict(), **{f"m.{k}": v for k, v in whole.method.state_dict().items()}}
    torch.save(state, out / f"state-rank{rank}.pt")
    cut = tiny_trainer(rank, WORLD, out / "cut", 2, parallel)
    train_epoch = cut.train_epoch

    def interrupted_in_second_epoch(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(epoch)

    cut.train_epoch = interrupted_in_second_epoch
    with pytest.raises(KeyboardInterrupt):
        cut.fit(log=lambda *a: None)
    resumed = tiny_trainer(rank, WORLD, out / "cut", 2, parallel)
    resumed.load_checkpoint(out / "cut" / CHECKPOINT_NAME)
    resumed.fit(log=lambda *a: None)
    # A classifier that always answers class 0, on labels 0, 1, 0, 1, ...: rank 0's shard (the even images) is
    # all right, rank 1's all wrong; the summed counts give 50% on both.
    always_zero = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    torch.nn.init.zeros_(always_zero[1].weight)
    with torch.no_grad():
        always_zero[1].bias.copy_(torch.arange(10, 0, -1))
    loader = DeviceLoader(
        torch.zeros(7, 3, 16, 16, dtype=torch.uint8),
        torch.arange(7) % 2,
        2,
        train=False,
        mean=STATS[0],
        std=STATS[1],
        rank=rank,
        world_size=WORLD,
    )
    (out / f"accuracy-rank{rank}.txt").write_text(repr(evaluate(always_zero, loader)))


def test_fit_writes_from_rank0_averages_running_stats_and_resumes_exactly(tmp_path):
    assert launch(_fit_and_resume, WORLD, tmp_path, timeout_s=180) == [0, 0]
    assert not (tmp_path / "rank1").exists()
    for rank in range(WORLD):  # 4 of the 7 test images have label 0
        assert float((tmp_path / f"accuracy-rank{rank}.txt").read_text()) == pytest.approx(100 * 4 / 7)
    rank0 = torch.load(tmp_path / "state-rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "state-rank1.pt", weights_only=True)
    for key in rank0:  # BN running statistics included: the rule makes them equal
        assert torch.equal(rank0[key], rank1[key]), key
    whole = torch.load(tmp_path / "whole" / CHECKPOINT_NAME, weights_only=True)
    cut = torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=True)
    for key in whole["backbone"]:
        assert torch.equal(whole["backbone"][key], cut["backbone"][key]), key
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "data" and summary["epochs"] == 2
    # Sharded evaluation summed over ranks = one process evaluating every test image.
    single = tiny_trainer(0, 1, tmp_path / "single", 3)
    single.backbone.load_state_dict(whole["backbone"])
    assert evaluate(single.backbone, single.data.test) == summary["final_test_acc"]
    # fastlocal.export reads the data-parallel run as a one-device run: the backbone, under its class's keys.
    exported, _ = export_run(tmp_path / "whole")
    assert exported.keys() == whole["backbone"].keys()
    assert all(torch.equal(exported[k], v) for k, v in whole["backbone"].items())
    # The data-parallel checkpoint resumes in one process.
    single.load_checkpoint(tmp_path / "whole" / CHECKPOINT_NAME)
    assert single.fit(log=lambda *a: None)["epochs"] == 3


def _step_checkpoint_and_resume(rank: int, world: int, out: Path) -> None:
    parallel = process_group.DataParallel(rank, WORLD, rank)
    every_step = ["train.checkpoint_every=1"]  # 2 steps an epoch: a step checkpoint in the middle of each
    whole = tiny_trainer(rank, WORLD, out / ("whole" if rank == 0 else "rank1"), 2, parallel, every_step)
    keep_step_checkpoint(whole, epoch=1, step=1, copy_to=out / "mid.pt")
    whole.fit(log=lambda *a: None)
    resumed = tiny_trainer(rank, WORLD, out / ("resumed" if rank == 0 else "rank1"), 2, parallel, every_step)
    resumed.load_checkpoint(out / "mid.pt")
    resumed.fit(log=lambda *a: None)


def test_a_step_checkpoint_resumes_mid_epoch_to_the_same_weights(tmp_path):
    """Resumed from the checkpoint written after step 1 of epoch 2, the run ends as the uninterrupted one: the
    weights, the batch-norm statistics (each rank's own until the epoch's end averages them), the momentum and
    the EMA copies, and the epoch's loss."""
    assert launch(_step_checkpoint_and_resume, WORLD, tmp_path, timeout_s=180) == [0, 0]
    mid = torch.load(tmp_path / "mid.pt", weights_only=True)
    assert mid["state"]["epoch"] == 1 and mid["state"]["mid_epoch"]["step"] == 1
    whole = torch.load(tmp_path / "whole" / CHECKPOINT_NAME, weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=True)
    assert resumed["state"]["mid_epoch"] is None and resumed["state"]["epoch"] == 2
    for part in ("backbone", "method"):
        for key, value in whole[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
    for index, state in whole["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][index]["momentum_buffer"])
    rows = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("whole", "resumed")
    ]
    assert [r["train_loss"] for r in rows[0]] == pytest.approx([r["train_loss"] for r in rows[1]], rel=1e-12)


def _rank1_stops(rank: int, world: int, out: Path) -> None:
    trainer = tiny_trainer(
        rank, WORLD, out / ("run" if rank == 0 else "rank1"), 1, process_group.DataParallel(rank, WORLD, rank)
    )
    fit_with_rank1_stopped(trainer, rank, out)


def test_a_rank_that_stops_answering_ends_the_job_naming_it(tmp_path):
    """Rank 1 frozen (SIGSTOP) before its second step: rank 0 waits system.dist_timeout (3 s here) in the
    gradient all-reduce, then ends with a message naming rank 1 and what it waited for; never a hang."""
    codes = launch(_rank1_stops, WORLD, tmp_path, timeout_s=90, collective_timeout_s=3)
    assert codes[0] == 1 and codes[1] == -9, codes  # rank 0: the error; rank 1: killed by rank 0, never resumed
    seconds, message = (tmp_path / "timeout.txt").read_text().split("\n", 1)
    assert 3 <= float(seconds) < 30, seconds
    assert message.startswith("rank 0 waited 3 s (system.dist_timeout) for every rank's gradients"), message
    assert "at step 2/2 of epoch 1" in message and "rank 1 stopped answering" in message, message


RESTART_RUN = ("--data.max_train=80", "--train.epochs=2", "--train.checkpoint_every=3", "--system.dist_timeout=30")
"""4 steps an epoch (80 images, global batch 20), a step checkpoint after step 3 of each."""


def test_torchrun_restarts_a_killed_rank_and_the_run_continues_from_its_step_checkpoint(tmp_path):
    """torchrun --max-restarts=1, data parallel: rank 1 killed (SIGKILL) before step 4 of epoch 2; torchrun restarts
    the group, the same command continues from the step checkpoint by itself (no --resume) and ends as the
    uninterrupted run."""
    result = restart_after_a_kill(tmp_path / "killed", tmp_path / "whole", *RESTART_RUN, kill_rank=1, kill_step=8)
    assert f"resuming {tmp_path / 'killed'} after step 3 of epoch 2" in result.stdout


def _rank1_fails(rank: int, world: int, out: Path) -> None:
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    torch.distributed.all_reduce(torch.ones(3))  # rank 0 waits for a peer that is gone


def test_a_failing_rank_ends_every_rank_with_an_error(tmp_path):
    codes = launch(_rank1_fails, WORLD, tmp_path, timeout_s=60, collective_timeout_s=20)
    assert codes[0] != 0 and codes[1] != 0


def test_sharded_device_loader_reads_each_training_position_once_per_rank():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (11, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(11)  # a label names its image
    common = dict(train=True, mean=STATS[0], std=STATS[1], pad=2, flip=True, seed=5)
    whole = DeviceLoader(images, labels, 12, **common)
    whole.set_epoch(1)
    ((_, y_all),) = list(whole)
    # Rank r reads positions r, r+3, ... of the one-process epoch's order (the padding wraps to position 0);
    # each rank draws its own crops and flips.
    positions = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]
    for rank in range(3):
        loader = DeviceLoader(images, labels, 2, rank=rank, world_size=3, **common)
        loader.set_epoch(1)
        assert loader.num_images == 4 and len(loader) == 2  # 11 padded to 12, 4 each
        read = torch.cat([y for _, y in loader])
        assert torch.equal(read, y_all[positions[rank::3]])
    test = [
        DeviceLoader(images, labels, 3, train=False, mean=STATS[0], std=STATS[1], rank=r, world_size=3)
        for r in range(3)
    ]
    # Evaluation: every image exactly once over the ranks (no wrap-around), so summed counts are exact.
    assert sorted(torch.cat([y for t in test for _, y in t]).tolist()) == list(range(11))
    assert sum(t.num_images for t in test) == 11


def test_global_batch_must_split_over_the_ranks():
    assert data_parallel.per_rank_batch(128, 4) == 32
    with pytest.raises(ConfigError, match="multiple of 3"):
        data_parallel.per_rank_batch(128, 3)


def test_cli_rejects_a_batch_that_does_not_split(monkeypatch, capsys):
    from fastlocal.train import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert main(["--train.batch_size=25", "--log.progress=false"]) == 2
    assert "train.batch_size = 25" in capsys.readouterr().err


def test_parallel_option(monkeypatch):
    for name in process_group.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert process_group.resolve_parallel("auto") == "none"
    with pytest.raises(ConfigError, match="set system.pipeline_stages"):
        build_config(None, ["system.parallel=hybrid"], METHODS)
    with pytest.raises(Exception, match="torchrun"):
        process_group.resolve_parallel("hybrid")
    with pytest.raises(Exception, match="torchrun"):
        process_group.resolve_parallel("modules")
    with pytest.raises(Exception, match="torchrun"):
        process_group.resolve_parallel("data")
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="x", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    assert process_group.resolve_parallel("auto") == "data"
    with pytest.raises(Exception, match="system.parallel=data"):
        process_group.resolve_parallel("none")


def test_sync_batch_norm_wiring_on_cpu():
    cfg, backbone, modules, method = build("mlaan", "resnet20", 4, ["system.sync_batch_norm=true"], input_size=16)
    batch_norms = [m for m in (*backbone.modules(), *method.modules()) if isinstance(m, torch.nn.BatchNorm2d)]
    params_before = [list(m.trainable_parameters) for m in modules]
    ema_before = method.ema_tensors()
    assert data_parallel.use_sync_batch_norm(backbone, method) == len(batch_norms) > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in (*backbone.modules(), *method.modules()))
    # The module splits' parameters and the EMA lists still name the model's tensors.
    for module, before in zip(modules, params_before):
        assert {id(p) for p in module.parameters()} == {id(p) for p in before}
    assert {id(p) for p in method.parameters()} >= {id(p) for p in ema_before[0]}
    with pytest.raises(ConfigError, match="needs CUDA"):
        data_parallel.check_options(cfg, torch.device("cpu"))


def test_torchrun_cli_trains_data_parallel_writes_world_size_and_resumes(tmp_path):
    out = tmp_path / "run"
    command = torchrun_tiny_run(
        out,
        "--data.loader=torch",
        "--data.num_workers=0",
        "--data.crop_size=32",
        "--data.resize_size=32",  # the device loader's sharding is tested above; here the streaming one's
    )
    result, summary = run_cli(command, out)
    assert summary["world_size"] == 2 and summary["parallel"] == "data" and summary["epochs"] == 1
    assert result.stdout.count("final test accuracy") == 1  # rank 0 alone logs
    assert "(20 train / 10 test images)" in result.stdout  # rank 0's shard of the 40 / 20
    resume = [*command[: command.index("fastlocal.train") + 1], "--resume", str(out), "--train.epochs=2"]
    result, summary = run_cli(resume, out)
    assert "resuming" in result.stdout and summary["epochs"] == 2


def _sync_batch_norm_step(rank: int, world: int, out: Path) -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    cfg, backbone, modules, method = build("dgl", "resnet20", 3, [], dtype=torch.float32, input_size=16)
    assert data_parallel.use_sync_batch_norm(backbone, method) > 0
    device = torch.device("cuda", rank)
    backbone.to(device)
    method.to(device)
    averager = data_parallel.GradientAverager(modules, method, backbone)
    optimizer = build_optimizer([p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad], cfg)
    x, y = global_batches(1)[0]
    local_train_step(
        modules,
        method,
        Batch(shard(x, rank).float().to(device), shard(y, rank).to(device), *STATS),
        after_flush=averager.after_flush,
    )
    averager.finish()
    optimizer.step()
    torch.save({k: v.cpu() for k, v in weights(backbone, method).items()}, out / f"sync-rank{rank}.pt")


@pytest.mark.gpu(devices=2)  # SyncBatchNorm across ranks
def test_sync_batch_norm_step_equals_one_process_on_the_global_batch(tmp_path, exact_cuda_math):
    """With synchronised statistics a data-parallel step is the one-process step on the global batch."""
    assert launch(_sync_batch_norm_step, WORLD, tmp_path, timeout_s=180, device_type="cuda") == [0, 0]
    cfg, backbone, modules, method = build("dgl", "resnet20", 3, [], dtype=torch.float32, input_size=16)
    device = torch.device("cuda", 0)
    backbone.to(device)
    method.to(device)
    optimizer = build_optimizer([p for p in (*backbone.parameters(), *method.parameters()) if p.requires_grad], cfg)
    x, y = global_batches(1)[0]
    local_train_step(modules, method, Batch(x.float().to(device), y.to(device), *STATS))
    optimizer.step()
    expected = {k: v.cpu() for k, v in weights(backbone, method).items()}
    rank0 = torch.load(tmp_path / "sync-rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "sync-rank1.pt", weights_only=True)
    for key in expected:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
