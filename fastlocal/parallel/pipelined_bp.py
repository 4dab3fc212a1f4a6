"""The baseline: end-to-end backprop pipelined over the same stages (`method.name = bp`, `system.parallel = modules`).

docs/pipeline.md#the-pipelined-bp-baseline. The backbone is cut into the K local modules a local method with
`method.num_modules = K` would train (the same split), the modules are grouped into S stages (one process and
device each) as `fastlocal.parallel.pipeline` groups them (`pipeline.stage_sizes`, or by measured cost), and every
batch runs through `torch.distributed.pipelining` with `Schedule1F1B` in `pipeline.micro_batches` equal
micro-batches. The gradient is the mean over micro-batches of the end-to-end cross-entropy's gradient; batch
norm normalises each micro-batch (and updates its running statistics once per micro-batch), so the step
equals one device accumulating the micro-batches' gradients, not one device's full-batch step.

Stage 0 reads the batch and sends the labels to the last stage, which computes the loss. The epochs, LR
schedule, logging, evaluation through the stages and the checkpoints gathered into the single-device format
are `fastlocal.parallel.pipeline.PipelineTrainer`'s.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from fastlocal.config import Config, ConfigError, resolve_num_modules
from fastlocal.engine import Trainer
from fastlocal.methods import LocalMethod
from fastlocal.parallel.cost import backprop_work, measure_backprop_costs
from fastlocal.parallel.group import DataParallel, waiting_for
from fastlocal.parallel.mesh import Stage, pipeline_mesh
from fastlocal.parallel.pipeline import PipelineTrainer
from fastlocal.parallel.timeline import BACKPROP_KINDS, StageTimeline
from fastlocal.split import LocalModule, split_backbone

TAG_LABELS = 4  # fastlocal.parallel.pipeline's tags are 1-3; torch.distributed.pipelining sends with tag 0


class PipelinedBackprop:
    """Stage `stage` of end-to-end backprop through `torch.distributed.pipelining` (`Schedule1F1B`): the local
    modules `stage.modules` (and, on the last stage, the backbone's final head) as one `PipelineStage`.
    `forward_backward` fills the gradients of one batch; the optimizer is the caller's."""

    def __init__(
        self,
        backbone,
        modules: list[LocalModule],
        stage: Stage,
        device: torch.device,
        batch_size: int,
        micro_batches: int,
        forward_context=None,
        timeline: StageTimeline | None = None,
    ):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        if batch_size % micro_batches:
            raise ConfigError(
                f"train.batch_size = {batch_size} does not split into pipeline.micro_batches = {micro_batches} "
                "equal micro-batches; choose a batch size divisible by the micro-batch count"
            )
        layers = [modules[i] for i in stage.modules] + ([backbone.head] if stage.is_last else [])
        self.submodule = _Forward(nn.Sequential(*layers), forward_context, timeline)
        self.stage, self.micro_batches = stage, micro_batches
        dtype = next(backbone.parameters()).dtype
        with torch.no_grad():  # the micro-batch this stage receives, from an eval-mode forward (statistics untouched)
            was = backbone.training
            backbone.eval()
            size = backbone.input_size
            x = torch.zeros(batch_size // micro_batches, 3, size, size, device=device, dtype=dtype)
            for i in range(stage.modules.start):
                x = modules[i](x)
            backbone.train(was)
        self.pipeline_stage = PipelineStage(self.submodule, stage.rank, stage.num_stages, device, input_args=(x,))
        # scale_grads (the default): each micro-batch's gradient is divided by their number, so the sum is the mean.
        self.schedule = Schedule1F1B(self.pipeline_stage, micro_batches, loss_fn=nn.functional.cross_entropy)

    def forward_backward(self, x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        """One batch (x on the first stage, the labels y on the last): forward and backward of every
        micro-batch, 1F1B. The last stage returns the mean micro-batch loss, the others None."""
        losses: list[torch.Tensor] = []
        args = (x,) if self.stage.is_first else ()
        last = self.stage.is_last
        self.schedule.step(*args, target=y if last else None, losses=losses if last else None, return_outputs=False)
        return torch.stack(losses).mean().detach() if last else None


class _Forward(nn.Module):
    """A stage's layers with every forward in the run's forward context (bf16 autocast or nothing), timed as
    the timeline's `forward` when one is given."""

    def __init__(self, layers: nn.Module, forward_context=None, timeline: StageTimeline | None = None):
        super().__init__()
        self.layers, self.forward_context = layers, forward_context
        self.timeline = timeline

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with (
            self.timeline.span("forward") if self.timeline is not None else nullcontext(),
            self.forward_context() if self.forward_context is not None else nullcontext(),
        ):
            return self.layers(x)


class PipelinedBackpropTrainer(PipelineTrainer):
    """`Trainer` for one stage of pipelined backprop. It shares `PipelineTrainer`'s placement on the stages
    (:meth:`~fastlocal.parallel.pipeline.PipelineTrainer.place_on_stages`, balanced by this class's `module_costs`),
    evaluation through the stages, gathered checkpoints and summary; not its local step (its __init__ skips
    PipelineTrainer's, which sets up the local schedule's messages)."""

    def __init__(
        self,
        cfg: Config,
        backbone,
        method: LocalMethod,
        data,
        device: torch.device,
        out_dir,
        parallel: DataParallel,
        stage_sizes=None,
        log=print,
    ):
        # The cut: the K local modules a local method with this K and split trains (method holds one: bp's).
        modules = split_backbone(
            backbone, resolve_num_modules(cfg.method), cfg.method.stem_separate, cfg.method.split, cfg.model.arch
        )
        Trainer.__init__(self, cfg, backbone, modules, method, data, device, out_dir, parallel=None)
        num_stages = parallel.world_size
        if cfg.pipeline.micro_batches < num_stages:
            raise ConfigError(
                f"pipeline.micro_batches = {cfg.pipeline.micro_batches} is fewer than the {num_stages} pipeline "
                "stages; the 1F1B schedule needs at least one micro-batch per stage: raise it (the bubble shrinks "
                "as (S - 1) / (M + S - 1)) or start fewer processes"
            )
        if not cfg.train.drop_last and data.train.num_images % cfg.train.batch_size:
            raise ConfigError(
                f"pipelined backprop splits every batch into pipeline.micro_batches equal micro-batches, but the "
                f"{data.train.num_images} training images leave a last batch of "
                f"{data.train.num_images % cfg.train.batch_size} (train.batch_size = {cfg.train.batch_size}); "
                "set train.drop_last=true or a batch size that divides the training set"
            )
        name = f"pipelined backprop (1F1B, {cfg.pipeline.micro_batches} micro-batches)"
        self.place_on_stages(parallel, pipeline_mesh(num_stages), stage_sizes, log, name)
        self.timeline = StageTimeline(BACKPROP_KINDS)
        self.pipeline = PipelinedBackprop(
            backbone,
            modules,
            self.stage,
            device,
            cfg.train.batch_size,
            cfg.pipeline.micro_batches,
            self.forward_context,
            self.timeline,
        )
        self._probe_shapes()  # for the evaluation through the stages
        self._labels = torch.zeros(cfg.train.batch_size, dtype=torch.int64, device=device)
        self._no_loss = torch.zeros((), dtype=torch.float64, device=device)

    def module_costs(self, cfg: Config) -> list[float]:
        """Each module's measured cost in end-to-end backprop, which the partition balances."""
        costs = measure_backprop_costs(
            self.modules, self.backbone, cfg, self.data.info, self.device, self.forward_context
        )
        return [backprop_work(c) for c in costs]

    def step_without_zero_grad(self, x, y) -> torch.Tensor:
        """One batch through the pipeline, then this stage's optimizer step. Returns the batch's loss on the last
        stage (the mean over its micro-batches), 0 elsewhere: summed over stages, it is the loss."""
        with self.timeline.step():
            return self._stage_step(x, y)

    def _stage_step(self, x, y) -> torch.Tensor:
        stage, label_send = self.stage, None
        if stage.is_first:
            if self.channels_last_input:
                x = x.contiguous(memory_format=torch.channels_last)
            if not stage.is_last:
                label_send = dist.isend(y.contiguous(), stage.num_stages - 1, tag=TAG_LABELS)
        elif stage.is_last:
            with waiting_for("the labels of the batch from stage 0 (rank 0)", [0]):
                dist.recv(self._labels, 0, tag=TAG_LABELS)
            y = self._labels
        with waiting_for("activations or gradients from a neighbouring stage (the 1F1B schedule)"):
            loss = self.pipeline.forward_backward(x, y)
            if label_send is not None:
                label_send.wait()
        self.optimizer.step()
        return self._no_loss if loss is None else loss

    def train_epoch(self, epoch: int) -> dict:
        self.timeline.begin_epoch(len(self.data.train))
        row = Trainer.train_epoch(self, epoch)  # every step is complete when it returns: nothing to drain
        self.gather_timelines()
        return row

    def summary(self) -> dict:
        summary = super().summary()
        summary.update(schedule="1F1B", micro_batches=self.cfg.pipeline.micro_batches)
        return summary
