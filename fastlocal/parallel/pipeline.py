"""Local modules on different devices, trained at the same time (`system.parallel = modules`, under torchrun).

docs/pipeline.md. Each process is a *stage* that owns a contiguous group of local modules (one device
each). Every stage builds the whole model from the same seed, but trains, evaluates and checkpoints only
what it owns; the rest of its copy is never read.

Per step t, stage s:

1. takes its input: the batch (stage 0) or the previous stage's detached output of batch t with the labels
   (and the images, for the InfoPro objectives that reconstruct them), received into one of two buffers;
   the receive of batch t+1 is posted at once, before any compute ("receives posted early");
2. runs its modules through the local schedule (docs/method.md#the-single-forward-schedule) and sends its
   last module's output right after that module's forward, from one of two send buffers, so step t+1 can
   fill the other while the send of step t is in flight ("sends double-buffered");
3. takes its optimizer step on its own parameters and goes on to step t+1 without waiting for any later
   stage (DGL, InfoPro, MLAAN without a cascade crossing a boundary).

Why DGL and InfoPro give exactly the single-device weights: module j's update at step t depends only on
its input of batch t and its own weights; its input is module j-1's output of batch t computed with module
j-1's weights of step t, in the pipeline as on one device (there too module j-1 runs forward before its
own update of step t). Only the time at which stages run moves.

MLAAN crosses boundaries twice, both handled exactly (`pipeline.cascade = exact`, `pipeline.ema_every = 1`):

- a cascaded loss of module i reaches modules i-W+1..i; where some sit on the previous stage, the cotangent
  at the stage's input is sent back one stage (grouped by how many modules it still has to reach, so a
  window longer than a stage travels on); the earlier stage waits for it before its last W-1 modules'
  weight VJPs;
- a LAM's EMA copy follows a live block that a later stage may own: the owner sends that block's weights
  at the start of every step (the weights the single-device EMA of that step reads, before any update of
  the step), and the receiver applies its EMA with them before its optimizer step.

Messages between a pair of stages in one direction are sent and received in the same order (tags name
their kind), so the same code works with gloo and NCCL.

`system.parallel = hybrid` runs D data replicas of an S-stage pipeline on a (data, pipe) device mesh
(:class:`Mesh`): the messages above go between the stages of one replica; each stage's gradients are averaged
over the D replicas holding that stage (fastlocal.GradientAverager on the stage's data group), so
the step is data parallelism's with each replica's shard through the pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from fastlocal.config import Config, ConfigError, to_dict
from fastlocal.engine import Trainer, non_finite_tensors
from fastlocal.methods import Batch, LocalMethod
from fastlocal.optim import build_optimizer
from fastlocal.parallel.cost import measure_module_costs
from fastlocal.parallel.data import GradientAverager
from fastlocal.parallel.group import DataParallel, barrier, sum_across_ranks, waiting_for
from fastlocal.parallel.mesh import Mesh, Stage, module_of_tensors, partition, pipeline_mesh, stage_ranges
from fastlocal.parallel.timeline import StageTimeline, summed
from fastlocal.schedule import _accumulate
from fastlocal.split import LocalModule

TAG_ACTIVATION, TAG_COTANGENT, TAG_WEIGHTS = 1, 2, 3


# -- the cotangents of one stage ------------------------------------------------------------------------
class StageCotangents:
    """The local schedule's module graphs and cotangent sums (fastlocal.schedule._Cotangents) for the modules
    lo..hi-1 of a stage. A cascaded cotangent that leaves the stage at its input is kept in `outgoing`,
    indexed by depth-1, where depth is the number of modules (on earlier stages) it still trains."""

    def __init__(self, modules: Sequence[LocalModule], stage: range, window: int):
        self.modules, self.window = modules, window
        self.lo, self.hi = stage.start, stage.stop
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sums: dict[int, torch.Tensor | None] = {}
        self.outgoing: list[torch.Tensor | None] = [None] * max(0, window - 1)

    def deliver(self, j: int, cotangent: torch.Tensor, depth: int) -> None:
        """`cotangent` at module j's output trains modules j, j-1, ..., j-depth+1 (input-only VJPs between)."""
        while True:
            if j < self.lo:
                _accumulate(self.outgoing, depth - 1, cotangent)
                return
            self.sums[j] = cotangent if self.sums.get(j) is None else self.sums[j] + cotangent
            if depth == 1 or j == 0:
                return
            module_input, module_output = self.graphs[j]
            (cotangent,) = torch.autograd.grad(module_output, module_input, cotangent, retain_graph=True)
            j, depth = j - 1, depth - 1

    def add_loss_gradients(self, i: int, own: torch.Tensor | None, cascade: torch.Tensor | None) -> None:
        if own is not None:
            self.sums[i] = own if self.sums.get(i) is None else self.sums[i] + own
        if cascade is not None:
            self.deliver(i, cascade, self.window)

    def flush(self, j: int) -> None:
        _, output = self.graphs.pop(j)
        total = self.sums.pop(j, None)
        if total is not None:
            torch.autograd.backward(output, total, inputs=self.modules[j].trainable_parameters)


def check_pipeline(cfg: Config) -> None:
    """Options the pipeline rules out."""
    if cfg.system.sync_batch_norm:
        raise ConfigError(
            "system.sync_batch_norm = true is for data parallelism; a pipeline stage holds whole "
            "batches. Set system.sync_batch_norm=false"
        )


# -- the pipeline trainer ----------------------------------------------------------------------------------
def uses_images(cfg: Config) -> bool:
    """Whether module losses read the images (InfoPro's reconstruction), so later stages need them."""
    return cfg.method.name == "infopro" or (cfg.method.name == "mlaan" and cfg.mlaan.base == "infopro")


class _StepsOnly:
    """What a stage after the first iterates instead of the training loader: as many steps, no data (the
    batch arrives from the previous stage)."""

    def __init__(self, loader):
        self.loader = loader
        self.num_images, self.world_size, self.start_step = loader.num_images, loader.world_size, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.start_step = start_step

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter([(None, None)] * (len(self.loader) - self.start_step))


class _DataView:
    """The data bundle with the training loader replaced (stages after the first)."""

    def __init__(self, data, train):
        self.train, self.test, self.info = train, data.test, data.info


class PipelineTrainer(Trainer):
    """`Trainer` for one pipeline stage: the same epochs, LR, logging and run directory (written by rank 0),
    with the step, the evaluation and the checkpoints going through the pipeline. With a `mesh` of several
    replicas (hybrid), this stage's gradients are averaged over its data group before every optimizer step and
    its batch-norm running statistics before every evaluation and checkpoint, as in data parallelism."""

    def __init__(
        self,
        cfg: Config,
        backbone,
        modules: list[LocalModule],
        method: LocalMethod,
        data,
        device: torch.device,
        out_dir,
        parallel: DataParallel,
        stage_sizes: Sequence[int] | None = None,
        log=print,
        mesh: Mesh | None = None,
    ):
        super().__init__(cfg, backbone, modules, method, data, device, out_dir, parallel=None)
        self.nonfinite_check_steps = 0  # a check is a collective, which would drain the pipeline: once an epoch
        self.place_on_stages(parallel, mesh or pipeline_mesh(parallel.world_size), stage_sizes, log, "pipeline")
        if self.mesh.num_replicas > 1:  # hybrid: this stage's gradients, averaged over the replicas holding it
            self.grad_averager = GradientAverager(modules, method, backbone, group=self.mesh.data_group)
        # The stale cascade adds to the last modules' gradients after their flush: average them all at the end.
        self._average_after_step = cfg.pipeline.cascade == "stale"
        self.window = method.window
        self.send_images = uses_images(cfg)
        self._probe_shapes()
        self._plan_ema()
        self._buffers_in = self._buffers_out = None
        self._pending: list[tuple[int, list, list]] = []  # (step, works, tensors kept alive until sent)
        self._step = 0
        self._steps = 0
        self._stale = self._kept_input = None
        if cfg.train.checkpoint_every and (
            self.mesh.num_replicas > 1 or cfg.pipeline.cascade == "stale" or cfg.pipeline.ema_every > 1
        ):
            raise ConfigError(
                "train.checkpoint_every (step checkpoints) needs every step of a pipeline to be complete when it "
                "ends; system.parallel = hybrid, pipeline.cascade = stale and pipeline.ema_every > 1 carry state "
                "from one step into the next. Set train.checkpoint_every=0 (a checkpoint per epoch) or use "
                "system.parallel=modules, pipeline.cascade=exact and pipeline.ema_every=1"
            )
        if cfg.pipeline.cascade == "stale" and min(len(r) for r in self.ranges[:-1]) < method.window - 1:
            raise ConfigError(
                f"pipeline.cascade = stale needs every stage but the last to hold at least "
                f"mlaan.window - 1 = {method.window - 1} modules (stages: "
                f"{[len(r) for r in self.ranges]}); use pipeline.cascade=exact or other "
                "pipeline.stage_sizes"
            )

    # -- setup ---------------------------------------------------------------------------------------
    def place_on_stages(self, parallel, mesh: Mesh, stage_sizes, log, name: str) -> None:
        """What every pipeline trainer (this one, pipelined backprop's) sets up: this process's stage of `mesh`,
        the modules' partition (`stage_sizes`, pipeline.stage_sizes, or balanced by :meth:`module_costs`), the
        parameters this stage owns and their optimizer, and the data it reads (stage 0 alone reads batches)."""
        self.parallel, self.is_main, self.mesh = parallel, parallel.is_main, mesh
        self.world_size = mesh.num_replicas  # the Trainer's divisor of summed losses, multiplier of images
        self.measure_cpu_memory = False  # the saved-tensor accounting measures one process's step (not a stage's)
        num_stages = mesh.num_stages
        if num_stages > len(self.modules):  # checked on every stage, before rank 0 alone measures the costs
            raise ConfigError(
                f"{num_stages} pipeline stages need at least as many local modules, but method.num_modules = "
                f"{len(self.modules)} (for bp: where the stages may cut); raise it or start fewer processes"
            )
        sizes = list(stage_sizes or self.cfg.pipeline.stage_sizes or self._measured_partition(num_stages))
        if len(sizes) != num_stages:
            raise ConfigError(
                f"pipeline.stage_sizes = {sizes} names {len(sizes)} stages but the pipeline has {num_stages} "
                "(torchrun's processes; hybrid: system.pipeline_stages); give one module count per stage"
            )
        self.ranges = stage_ranges(sizes)
        index = mesh.pipe_ranks.index(parallel.rank)
        self.stage = Stage(index, num_stages, self.ranges[index], mesh.pipe_ranks)
        log(
            f"{name}: {num_stages} stages holding modules " + " | ".join(f"{r.start}-{r.stop - 1}" for r in self.ranges)
        )
        self.stage_of_module = [s for s, r in enumerate(self.ranges) for _ in r]
        owner = module_of_tensors(self.modules, self.method)
        self.tensor_stage = {key: self.stage_of_module[j] for key, j in owner.items()}
        self.all_params, last = self.params, num_stages - 1  # the final head (no module holds it): the last stage's
        self.params = [p for p in self.all_params if self.tensor_stage.get(id(p), last) == self.stage.rank]
        self.lr_on_device = False
        self.optimizer = build_optimizer(self.params, self.cfg, self.device)
        self.timeline = StageTimeline()  # where this stage's time goes (summary.json: stage_timeline)
        self.stage_timelines: list[list[dict]] = []  # rank 0: every stage's record, per epoch
        self.run_step = self.eager_step  # no CUDA graph: a step's messages are not capturable
        self.channels_last_input = self.channels_last
        self.channels_last = False  # stage 0 converts the batch itself (other stages get no loader batch)
        if not self.stage.is_first:
            self.data = _DataView(self.data, _StepsOnly(self.data.train))

    def module_costs(self, cfg: Config) -> list[float]:
        """Each module's measured cost on this device (at `cfg`'s batch size), which the partition balances."""
        costs = measure_module_costs(self.modules, self.method, cfg, self.data.info, self.device, self.forward_context)
        return [c["total"] for c in costs]

    def _measured_partition(self, num_stages: int) -> list[int]:
        """Rank 0 measures each module's cost on this device, at the batch one replica's pipeline carries; every
        stage takes its partition."""
        sizes = [None]
        if self.parallel.is_main:
            train = dataclasses.replace(self.cfg.train, batch_size=self.cfg.train.batch_size // self.mesh.num_replicas)
            cfg = dataclasses.replace(self.cfg, train=train)
            sizes = [partition(self.module_costs(cfg), num_stages)]
        dist.broadcast_object_list(sizes, src=0)
        return sizes[0]

    @torch.no_grad()
    def _probe_shapes(self) -> None:
        """Per-image shape and dtype of every module's output, from a batch-1 forward in eval mode (BN
        running statistics untouched)."""
        info = self.data.info
        x = torch.zeros(1, 3, info.image_size, info.image_size, device=self.device)
        x = x.to(next(self.backbone.parameters()).dtype)
        was = self.backbone.training
        self.backbone.eval()
        self.image_shape, self.image_dtype = tuple(x.shape[1:]), x.dtype
        self.out_shapes = []
        with self.forward_context():
            for module in self.modules:
                x = module(x)
                self.out_shapes.append((tuple(x.shape[1:]), x.dtype))
        self.backbone.train(was)

    def _plan_ema(self) -> None:
        """MLAAN's EMA pairs this stage updates, and which live tensors go from which stage to which."""
        method, stage = self.method, self.stage.rank
        self.ema_targets, self.ema_live = [], []  # every pair this stage updates (its LAMs' EMA copies)
        self.ema_remote_targets, self.ema_remote_live = [], []  # the pairs whose live tensor another stage owns
        self.weights_to: dict[int, list[torch.Tensor]] = {}  # receiver stage -> live tensors this stage sends
        self.weights_from: dict[int, list[torch.Tensor]] = {}  # owner stage -> live tensors this stage receives
        self._weights_pending: list[tuple[int, list]] = []  # (step pushed, receives) not applied yet
        lams = getattr(method, "lams", None)
        if not lams:
            return
        keys = list(lams.keys())
        if self.cfg.mlaan.ema_scope == "last":
            keys = keys[-1:]
        for key in keys:
            receiver = self.stage_of_module[int(key)]
            targets, live = lams[key].ema_pairs()
            for target, tensor in zip(targets, live):
                owner = self.tensor_stage[id(tensor)]
                if receiver == stage:
                    self.ema_targets.append(target)
                    self.ema_live.append(tensor)
                    if owner != stage:
                        self.ema_remote_targets.append(target)
                        self.ema_remote_live.append(tensor)
                        self.weights_from.setdefault(owner, []).append(tensor)
                elif owner == stage:
                    self.weights_to.setdefault(receiver, []).append(tensor)

    def _message_buffers(self, activation_shape, dtype) -> list[torch.Tensor]:
        """[batch size, activation, labels(, images)] for one batch of at most train.batch_size images."""
        batch = self.cfg.train.batch_size // self.mesh.num_replicas  # hybrid: one replica's share
        device = self.device
        buffers = [
            torch.zeros(1, dtype=torch.int64, device=device),
            torch.zeros(batch, *activation_shape, dtype=dtype, device=device),
            torch.zeros(batch, dtype=torch.int64, device=device),
        ]
        if self.send_images:
            buffers.append(torch.zeros(batch, *self.image_shape, dtype=self.image_dtype, device=device))
        return buffers

    # -- communication -------------------------------------------------------------------------------
    def _post(self, ops: list[dist.P2POp]) -> list:
        return dist.batch_isend_irecv(ops) if ops else []

    def _post_receive_input(self, step: int) -> None:
        if self.stage.is_first or step >= self._steps:
            return
        if self._buffers_in is None:
            shape, dtype = self.out_shapes[self.stage.modules.start - 1]
            self._buffers_in = [self._message_buffers(shape, dtype) for _ in range(2)]
        buffers = self._buffers_in[step % 2]
        self._receive_works[step % 2] = self._post(
            [dist.P2POp(dist.irecv, b, self.stage.peer(self.stage.rank - 1), tag=TAG_ACTIVATION) for b in buffers]
        )

    def _send_output(self, step: int, output: torch.Tensor, batch: Batch) -> None:
        with self.timeline.span("send"):  # the copies into send buffers and the posting
            if self._buffers_out is None:
                shape, dtype = self.out_shapes[self.stage.modules.stop - 1]
                self._buffers_out = [self._message_buffers(shape, dtype) for _ in range(2)]
            buffers = self._buffers_out[step % 2]  # its send of step-2 was waited for at the start of this step
            n = output.shape[0]
            buffers[0].fill_(n)
            buffers[1][:n].copy_(output.detach())
            buffers[2][:n].copy_(batch.y)
            if self.send_images:
                buffers[3][:n].copy_(batch.x)
            next_rank = self.stage.peer(self.stage.rank + 1)
            works = self._post([dist.P2POp(dist.isend, b, next_rank, tag=TAG_ACTIVATION) for b in buffers])
            self._pending.append((step, works, []))

    def _wait_sends(self, older_than: int) -> None:
        keep = []
        for step, works, tensors in self._pending:
            if step < older_than:
                with (
                    self.timeline.span("send"),
                    waiting_for(f"a neighbouring stage to take this stage's messages of step {step + 1}"),
                ):
                    for work in works:
                        work.wait()
            else:
                keep.append((step, works, tensors))
        self._pending = keep

    def _send_weights(self, step: int) -> None:
        """Owner: the live tensors other stages' EMA copies follow, as they are before this step's update."""
        with self.timeline.span("send"):  # the copies into send buffers and the posting
            for receiver, tensors in sorted(self.weights_to.items()):
                flat = torch.cat([t.detach().reshape(-1) for t in tensors])
                works = self._post([dist.P2POp(dist.isend, flat, self.stage.peer(receiver), tag=TAG_WEIGHTS)])
                self._pending.append((step, works, [flat]))

    def _post_receive_weights(self) -> list[tuple[list, torch.Tensor, list[torch.Tensor]]]:
        received = []
        for owner, tensors in sorted(self.weights_from.items()):
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=self.device)
            works = self._post([dist.P2POp(dist.irecv, flat, self.stage.peer(owner), tag=TAG_WEIGHTS)])
            received.append((works, flat, tensors))
        return received

    def _sends_cotangent_back(self) -> bool:
        return not self.stage.is_first and self.window > 1

    def _gets_cotangent(self) -> bool:
        return not self.stage.is_last and self.window > 1

    def _cotangent_buffers(self, n: int) -> list[torch.Tensor]:
        shape, dtype = self.out_shapes[self.stage.modules.stop - 1]
        return [
            torch.zeros(self.window - 1, dtype=torch.int64, device=self.device),
            torch.zeros(self.window - 1, n, *shape, dtype=dtype, device=self.device),
        ]

    def _send_cotangent(self, step: int, outgoing: list[torch.Tensor | None], like: torch.Tensor) -> None:
        with self.timeline.span("send"):  # the copies into send buffers and the posting
            present = torch.tensor([g is not None for g in outgoing], dtype=torch.int64, device=self.device)
            stacked = torch.stack([like.new_zeros(like.shape) if g is None else g for g in outgoing])
            works = self._post(
                [
                    dist.P2POp(dist.isend, t, self.stage.peer(self.stage.rank - 1), tag=TAG_COTANGENT)
                    for t in (present, stacked)
                ]
            )
            self._pending.append((step, works, [present, stacked]))

    # -- one step ------------------------------------------------------------------------------------
    def step_without_zero_grad(self, x, y) -> torch.Tensor:
        with self.timeline.step():
            return self._stage_step(x, y)

    def _stage_step(self, x, y) -> torch.Tensor:
        step, stage = self._step, self.stage
        self._step += 1
        self._wait_sends(older_than=step - 1)  # frees the send buffers of step-2
        if stage.is_first:
            if self.channels_last_input:
                x = x.contiguous(memory_format=torch.channels_last)
            batch = Batch(x, y, self.data.info.mean, self.data.info.std)
            inputs = x
        else:
            peer = stage.peer(stage.rank - 1)
            with (
                self.timeline.span("wait_input"),
                waiting_for(f"the activation of step {step + 1} from stage {stage.rank - 1} (rank {peer})", [peer]),
            ):
                for work in self._receive_works[step % 2]:
                    work.wait()
            buffers = self._buffers_in[step % 2]
            n = int(buffers[0].item())
            images = buffers[3][:n] if self.send_images else buffers[1][:0]
            batch = Batch(images, buffers[2][:n], self.data.info.mean, self.data.info.std)
            inputs = buffers[1][:n].requires_grad_(self.window > 1)
            self._post_receive_input(step + 1)  # receive early: batch t+1 lands while this stage computes
        every = self.cfg.pipeline.ema_every
        if step % every == 0:
            self._weights_pending.append((step, self._post_receive_weights()))
            self._send_weights(step)
        incoming = cotangent_works = None
        if self._gets_cotangent():
            incoming = self._cotangent_buffers(inputs.shape[0])
            cotangent_works = self._post(
                [dist.P2POp(dist.irecv, t, stage.peer(stage.rank + 1), tag=TAG_COTANGENT) for t in incoming]
            )
        # stale: the cotangent of this step is applied at the next (the epoch's last step waits for its own).
        stale = self.cfg.pipeline.cascade == "stale" and self._gets_cotangent() and step < self._steps - 1
        loss = self._local_step(step, inputs, batch, incoming, cotangent_works, wait_incoming=not stale)
        if self._stale is not None:
            self._apply_stale_cotangent()
        if stale and cotangent_works is not None:
            self._stale = (incoming, cotangent_works, self._kept_input)
        if self.grad_averager is not None:
            if self._average_after_step:
                for j in stage.modules:
                    self.grad_averager.after_flush(j)
            self.grad_averager.finish()
        self._ema_step(step)
        self.optimizer.step()
        return loss

    def _flush(self, cotangents: StageCotangents, j: int) -> None:
        """Module j's weight VJP; hybrid: then the all-reduce of its gradients starts (it overlaps the rest)."""
        cotangents.flush(j)
        if self.grad_averager is not None and not self._average_after_step:
            self.grad_averager.after_flush(j)

    def _ema_step(self, step: int) -> None:
        """MLAAN's EMA of this stage's LAM copies. ema_every = 1: every pair, with the live weights of this step
        (received from their owners). P > 1: the pairs of live tensors this stage owns every step; the others
        every P steps, with the weights pushed P steps earlier and momentum m^P."""
        from fastlocal.kernels import ema_update_

        every = self.cfg.pipeline.ema_every
        if every == 1:
            self._apply_weights(self._weights_pending.pop(0)[1])
        if not hasattr(self.method, "lams"):  # no EMA across stages (DGL, InfoPro: nothing at all)
            self.method.before_optimizer_step()
            return
        momentum = self.method.ema_momentum
        if every == 1:
            if self.ema_targets:
                ema_update_(self.ema_targets, self.ema_live, momentum, backend=self.method.kernels)
            return
        remote = {id(t) for t in self.ema_remote_targets}
        local = [(t, lv) for t, lv in zip(self.ema_targets, self.ema_live) if id(t) not in remote]
        if local:
            ema_update_([t for t, _ in local], [lv for _, lv in local], momentum, backend=self.method.kernels)
        if step % every == 0 and len(self._weights_pending) > 1:  # the push of step-P
            self._apply_remote_ema(self._weights_pending.pop(0)[1])

    def _apply_weights(self, received) -> None:
        for works, flat, tensors in received:
            with (
                self.timeline.span("wait_weights"),
                waiting_for("the live weights of a LAM's EMA copy from the stage that owns them"),
            ):
                for work in works:
                    work.wait()
            with torch.no_grad():  # this stage's copy of the owner's live tensors, as the owner sent them
                for tensor, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
                    tensor.copy_(chunk.view_as(tensor))

    def _apply_remote_ema(self, received) -> None:
        from fastlocal.kernels import ema_update_

        self._apply_weights(received)
        if self.ema_remote_targets:
            ema_update_(
                self.ema_remote_targets,
                self.ema_remote_live,
                self.method.ema_momentum**self.cfg.pipeline.ema_every,
                backend=self.method.kernels,
            )

    @torch.no_grad()
    def _restore(self, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for buffer, value in saved:
            buffer.copy_(value)

    def _apply_stale_cotangent(self) -> None:
        """pipeline.cascade = stale (Features Replay style): the next stage's cotangent of the previous step
        trains this stage's last W-1 modules now: their forward is recomputed from the input kept then, with
        the current weights (batch-norm running statistics left untouched), and its weight VJPs add to this
        step's gradients."""
        (present, stacked), works, kept = self._stale
        self._stale = None
        peer = self.stage.peer(self.stage.rank + 1)
        with (
            self.timeline.span("wait_cotangent"),
            waiting_for(f"the stale cotangent from stage {self.stage.rank + 1} (rank {peer})", [peer]),
        ):
            for work in works:
                work.wait()
        hi, window = self.stage.modules.stop, self.window
        tail = range(hi - window + 1, hi)
        saved = [(b, b.clone()) for j in tail for b in self.modules[j].buffers()]
        cotangents = StageCotangents(self.modules, tail, window)
        previous = kept
        for j in tail:
            inputs = previous.detach().requires_grad_(j > tail.start)
            with self.forward_context():
                output = self.modules[j](inputs)
            cotangents.graphs[j] = (inputs, output)
            previous = output
        for depth in range(1, window):
            if present[depth - 1]:
                cotangents.deliver(hi - 1, stacked[depth - 1], depth)
        for j in tail:
            cotangents.flush(j)
        self._restore(saved)  # after the backward, which reads the running statistics batch norm saved

    def _local_step(
        self, step: int, inputs: torch.Tensor, batch: Batch, incoming, incoming_works, wait_incoming: bool = True
    ) -> torch.Tensor:
        """The stage's modules through the local schedule (fastlocal.schedule.local_train_step's order)."""
        stage, method, window = self.stage, self.method, self.window
        lo, hi = stage.modules.start, stage.modules.stop
        cotangents = StageCotangents(self.modules, stage.modules, window)
        last_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        # The last loss whose cascade reaches below this stage; past it the cotangent sent back is complete.
        cascade_done_after = lo + window - 2 if self._sends_cotangent_back() else None
        previous = inputs
        for i in range(lo, hi):
            if i > lo:
                previous = previous.detach().requires_grad_(window > 1)
            if i == hi - window + 1 and not wait_incoming:  # stale: the input the recomputation will need
                self._kept_input = previous.detach().clone()
            with self.forward_context():
                output = self.modules[i](previous)
            cotangents.graphs[i] = (previous, output)
            if i == hi - 1 and not stage.is_last:
                self._send_output(step, output, batch)  # the next stage starts as soon as possible
            own, cascade = output.detach().requires_grad_(), output.detach().requires_grad_()
            with self.forward_context():
                loss = method.module_loss(i, own, cascade, batch)
            if loss is not None:
                loss.backward()
                cotangents.add_loss_gradients(i, own.grad, cascade.grad)
                if i == len(self.modules) - 1:
                    last_loss = loss.detach()
            if i == cascade_done_after:
                self._send_cotangent(step, cotangents.outgoing, inputs)
            if i - window + 1 >= lo:  # its last loss has run, and no later stage's cascade reaches it
                self._flush(cotangents, i - window + 1)
            previous = output
        if incoming_works is not None and wait_incoming:  # exact cascade: the next stage's cotangents of this step
            peer = stage.peer(stage.rank + 1)
            with (
                self.timeline.span("wait_cotangent"),
                waiting_for(f"the cotangent of step {step + 1} from stage {stage.rank + 1} (rank {peer})", [peer]),
            ):
                for work in incoming_works:
                    work.wait()
            present, stacked = incoming
            for depth in range(1, window):
                if present[depth - 1]:
                    cotangents.deliver(hi - 1, stacked[depth - 1], depth)
        if self._sends_cotangent_back() and (cascade_done_after is None or cascade_done_after >= hi):
            self._send_cotangent(step, cotangents.outgoing, inputs)  # the window is longer than this stage
        for j in range(max(lo, hi - window + 1), hi):
            self._flush(cotangents, j)
        return last_loss

    def drain(self) -> None:
        """Wait for every send still in flight, and apply the EMA weights still to come (end of an epoch)."""
        while self._weights_pending:
            _, received = self._weights_pending.pop(0)
            if self.cfg.pipeline.ema_every > 1:
                self._apply_remote_ema(received)
            else:
                self._apply_weights(received)
        self._wait_sends(older_than=self._step + 1)

    # -- epochs, evaluation, checkpoints -----------------------------------------------------------------
    def begin(self, steps: int, first_step: int = 0) -> None:
        """Before step `first_step` of `steps` (an epoch; a step checkpoint's position when resumed): post the
        receive of its batch."""
        self._step, self._steps = first_step, steps
        self._receive_works = [None, None]
        self._post_receive_input(first_step)

    def train_epoch(self, epoch: int) -> dict:
        self.timeline.begin_epoch(len(self.data.train))
        self.begin(len(self.data.train), self.state.mid_epoch["step"] if self.state.mid_epoch else 0)
        try:
            row = super().train_epoch(epoch)
        finally:
            self._steps = 0
        self.drain()
        self.gather_timelines()
        return row

    def gather_timelines(self) -> None:
        """Every stage's timeline of this epoch, kept on rank 0 for summary.json."""
        records = [None] * dist.get_world_size()
        with waiting_for("the stages' timelines of the epoch, gathered at its end"):
            dist.all_gather_object(records, self.timeline.record(self.stage.rank, self.mesh.replica))
        if self.is_main:
            self.stage_timelines.append(records)

    def test_accuracy(self) -> float:
        with self.forward_context():
            return pipeline_evaluate(
                self.modules,
                self.backbone,
                self.data.test,
                self.stage,
                self.out_shapes,
                self.image_dtype,
                self.channels_last_input,
            )

    def owned_state(self) -> dict:
        """This stage's entries of the single-device checkpoint: its modules' and heads' tensors, and the
        optimizer state of its parameters under their single-device index."""
        mine = self.stage.rank
        last = self.stage.num_stages - 1

        def owned(root: nn.Module) -> dict:
            return {
                k: v.detach().cpu()
                for k, v in root.state_dict(keep_vars=True).items()
                if self.tensor_stage.get(id(v), last) == mine
            }

        index = {id(p): g for g, p in enumerate(self.all_params)}
        local = self.optimizer.state_dict()
        state = {
            index[id(self.params[i])]: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in local["state"].items()
        }
        return {
            "backbone": owned(self.backbone),
            "method": owned(self.method),
            "optimizer_state": state,
            "param_groups": local["param_groups"],
        }

    def checkpoint(self) -> dict | None:
        """The single-device checkpoint, gathered on rank 0 from its replica's stages (None on the other ranks;
        the replicas of a hybrid mesh hold the same model)."""
        if self.mesh.replica != 0:
            return None
        parts = [None] * self.stage.num_stages if self.is_main else None
        with waiting_for("the stages' weights, gathered on rank 0 for the checkpoint"):
            dist.gather_object(self.owned_state(), parts, dst=0, group=self.mesh.pipe_group)
        if not self.is_main:
            return None
        backbone, method, state = {}, {}, {}
        for part in parts:
            backbone.update(part["backbone"])
            method.update(part["method"])
            state.update(part["optimizer_state"])
        groups = [{**parts[0]["param_groups"][0], "params": list(range(len(self.all_params)))}]
        full_backbone = {k: backbone[k] for k in self.backbone.state_dict()}
        full_method = {k: method[k] for k in self.method.state_dict()}
        return {
            "config": to_dict(self.cfg),
            "backbone": full_backbone,
            "method": full_method,
            "optimizer": {"state": dict(sorted(state.items())), "param_groups": groups},
            "state": self.state.__dict__,
        }

    def save_checkpoint(self) -> None:
        own = self.owned_state()
        bad = non_finite_tensors({"backbone": own["backbone"], "method": own["method"]})
        if sum_across_ranks(torch.tensor(len(bad), device=self.device)).item():
            raise self.diverged(
                f"after epoch {self.state.epoch}, tensors of the model hold inf or nan"
                + (f" (first on this stage: {bad[0]})" if bad else ""),
                completed_epochs=self.state.epoch - 1,
            )
        ckpt = self.checkpoint()
        if self.is_main:
            from fastlocal.engine import CHECKPOINT_NAME, save_atomic

            save_atomic(ckpt, self.out_dir / CHECKPOINT_NAME)
        barrier()

    def restore(self, ckpt: dict) -> None:
        """A single-device checkpoint (written by one device or gathered from a pipeline): every stage loads
        the weights, and the optimizer state of its own parameters."""
        full = ckpt["optimizer"]
        index = {id(p): g for g, p in enumerate(self.all_params)}
        local_state = {
            i: full["state"][index[id(p)]] for i, p in enumerate(self.params) if index[id(p)] in full["state"]
        }
        groups = [{**full["param_groups"][0], "params": list(range(len(self.params)))}]
        super().restore({**ckpt, "optimizer": {"state": local_state, "param_groups": groups}})

    def summary(self) -> dict:
        summary = super().summary()
        summary.update(
            num_parameters=sum(p.numel() for p in self.all_params),  # every stage's, not this one's
            world_size=self.stage.num_stages * self.mesh.num_replicas,
            parallel="hybrid" if self.mesh.num_replicas > 1 else "modules",
            data_replicas=self.mesh.num_replicas,
            pipeline_stages=[[r.start, r.stop - 1] for r in self.ranges],
            stage_timeline=self.timeline_summary(),
        )
        return summary

    def timeline_summary(self) -> list[dict]:
        """Per stage (and replica): seconds per kind summed over the epochs trained in this process, and the
        spans of the last epoch's kept steps."""
        return [summed(records) for records in zip(*self.stage_timelines)]


# -- evaluation through the pipeline --------------------------------------------------------------------------
@torch.no_grad()
def pipeline_evaluate(
    modules: Sequence[LocalModule],
    backbone: nn.Module,
    loader,
    stage: Stage,
    out_shapes: list,
    image_dtype: torch.dtype,
    channels_last: bool = False,
) -> float:
    """Top-1 accuracy (%) of the backbone's final head: stage 0 reads the test batches, each stage runs its
    modules in eval mode and passes the output (and the labels) on; the last stage counts (hybrid: every
    replica on its shard of the test set; the counts are summed over all ranks)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    lo, hi = stage.modules.start, stage.modules.stop
    batches = iter(loader) if stage.is_first else iter([(None, None)] * len(loader))
    for x, y in batches:
        if stage.is_first:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        else:
            n = torch.zeros(1, dtype=torch.int64, device=device)
            previous = stage.peer(stage.rank - 1)
            with waiting_for(f"an evaluation batch from stage {stage.rank - 1} (rank {previous})", [previous]):
                dist.recv(n, previous, tag=TAG_ACTIVATION)
                shape, dtype = out_shapes[lo - 1]
                x = torch.empty(int(n.item()), *shape, dtype=dtype, device=device)
                y = torch.empty(int(n.item()), dtype=torch.int64, device=device)
                dist.recv(x, previous, tag=TAG_ACTIVATION)
                dist.recv(y, previous, tag=TAG_ACTIVATION)
        for i in range(lo, hi):
            x = modules[i](x)
        if stage.is_last:
            correct += (backbone.head(x).argmax(1) == y).sum()
        else:
            following = stage.peer(stage.rank + 1)
            dist.send(torch.tensor([x.shape[0]], dtype=torch.int64, device=device), following, tag=TAG_ACTIVATION)
            dist.send(x.contiguous(), following, tag=TAG_ACTIVATION)
            dist.send(y.contiguous(), following, tag=TAG_ACTIVATION)
    backbone.train(was_training)
    total = loader.num_images if stage.is_last else 0
    correct, total = sum_across_ranks(torch.stack([correct, torch.tensor(total, device=device)]))
    return 100.0 * correct.item() / total.item()
