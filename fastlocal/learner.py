"""The learner API: local learning of any backbone inside the user's own training loop.

    backbone = fastlocal.Backbone(stem, blocks, None, head, input_size=32)   # or fastlocal.adapt(model, 224)
    learner = fastlocal.LocalLearner(backbone, "mlaan", num_modules=4, window=2)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:
        optimizer.zero_grad()
        loss = learner.step(x, y)      # the local forward/backward of the batch: fills .grad, moves the EMA
        optimizer.step()
    learner.eval(); logits = learner(x) # evaluation is the backbone's plain forward

`step` runs the same schedule the command-line trainer runs (`fastlocal.schedule.local_train_step`), and the
trainer builds its learner with `LocalLearner.from_config`. docs/any_model.md has the details.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from fastlocal.config import Config, ConfigError, resolve_num_modules, set_value, validate
from fastlocal.models import Backbone

# The config sections whose fields are a method's options, by the methods that read them.
OPTION_SECTIONS = {"method": None, "infopro": ("infopro", "mlaan"), "mlaan": ("mlaan",)}
NOT_OPTIONS = ("name", "num_modules")  # given as LocalLearner's own arguments


def method_config(method: str, num_modules: int | None, options: dict, arch: str) -> Config:
    """A validated Config for `method` with K = `num_modules` and `options` given by field name ("window") or
    dotted ("mlaan.window")."""
    from fastlocal.methods import METHODS

    cfg = Config()
    cfg.model.arch = arch
    set_value(cfg, "method.name", method)
    set_value(cfg, "method.num_modules", 0 if num_modules is None else num_modules)
    fields = {
        f.name: section
        for section in OPTION_SECTIONS
        for f in dataclasses.fields(getattr(cfg, section))
        if f.name not in NOT_OPTIONS
    }
    for key, value in options.items():
        section, _, name = key.rpartition(".")
        section = section or fields.get(name)
        if section not in OPTION_SECTIONS or name not in fields:
            raise ConfigError(f"unknown option {key!r} for LocalLearner; the options are: {', '.join(fields)}")
        readers = OPTION_SECTIONS[section]
        if readers is not None and method not in readers:
            raise ConfigError(
                f"option {key!r} belongs to {section} and method {method!r} does not use it "
                f"(it applies to: {', '.join(readers)})"
            )
        set_value(cfg, f"{section}.{name}", value)
    return validate(cfg, METHODS)


class LocalLearner(nn.Module):
    """A backbone split into K gradient-isolated local modules, trained by a local learning method.

    `method`: bp, dgl, infopro or mlaan. `num_modules`: K (None: 1 for bp, 4 otherwise). `options`: the
    method's settings by name, e.g. window=2, wx=0.001, base="infopro", head="1c2f", weights=(5, 0.5, 0, 1),
    split="balanced", stem_separate=True (fields of MethodConfig, InfoProConfig, MLAANConfig in
    fastlocal/config.py). `mean`/`std`: the normalisation of the inputs, which InfoPro's reconstruction
    undoes (the defaults mean the inputs are images in [0, 1]). `kernels`: reference (PyTorch), auto (the
    Triton kernels on CUDA) or triton. `arch`: a name for the backbone; MLAAN looks up a preset leap table
    under it (e.g. resnet32) and generates shape-checked leap lists otherwise.

    Parameters: `learner.parameters()` are the backbone's and the method's (auxiliary heads, LAM copies;
    the frozen EMA copies never get a gradient, so an optimizer leaves them alone).

    `recompute`: none, heads, modules or all (system.recompute, docs/usage.md#memory-options): less activation
    memory for more compute, the same math.
    """

    def __init__(
        self,
        backbone: Backbone,
        method: str = "mlaan",
        num_modules: int | None = None,
        *,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        kernels: str = "reference",
        arch: str | None = None,
        recompute: str = "none",
        **options,
    ):
        if not isinstance(backbone, Backbone):
            raise ConfigError(
                f"LocalLearner needs a fastlocal.Backbone, got a {type(backbone).__name__}; build one "
                "with fastlocal.Backbone(stem, blocks, None, head, input_size) or "
                "fastlocal.adapt(model, input_size)"
            )
        cfg = method_config(method, num_modules, options, arch or f"custom:{type(backbone).__name__}")
        set_value(cfg, "system.recompute", recompute)
        validate(cfg)
        self._build(cfg, backbone, mean, std, kernels)

    @classmethod
    def from_config(
        cls, cfg: Config, backbone: Backbone, mean: Sequence[float], std: Sequence[float], kernels: str = "reference"
    ) -> LocalLearner:
        """The learner a run's config describes (what `python -m fastlocal.train` trains)."""
        learner = cls.__new__(cls)
        learner._build(cfg, backbone, mean, std, kernels)
        return learner

    def _build(self, cfg: Config, backbone: Backbone, mean, std, kernels: str) -> None:
        from fastlocal.methods import build_method
        from fastlocal.recompute import set_recompute
        from fastlocal.split import split_backbone

        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"mean and std need one value per input channel (3), got {list(mean)} and {list(std)}")
        self.cfg = cfg
        self.backbone = backbone
        # The modules share the backbone's parts: a plain list, so the state_dict holds each tensor once.
        # bp trains one module end to end; its K > 1 only cuts pipelined backprop's stages
        # (fastlocal.parallel.pipelined_bp).
        num_modules = 1 if cfg.method.name == "bp" else resolve_num_modules(cfg.method)
        # One module holds the stem too: a stem_separate meant for the pipeline's cut does not apply to it.
        stem_separate = cfg.method.stem_separate and num_modules > 1
        self.local_modules = split_backbone(backbone, num_modules, stem_separate, cfg.method.split, cfg.model.arch)
        self.method = build_method(cfg, backbone, self.local_modules)
        set_recompute(self.local_modules, self.method, cfg.system.recompute)
        self.mean, self.std = tuple(mean), tuple(std)
        self.kernels = kernels

    @property
    def num_modules(self) -> int:
        return len(self.local_modules)

    def describe(self) -> str:
        """The split, e.g. 'stem+0.0 | 0.1+0.2 | 1.0+1.1'."""
        from fastlocal.split import describe_split

        return describe_split(self.backbone, [m.part_ids for m in self.local_modules])

    def step(self, x: torch.Tensor, y: torch.Tensor, forward_context=None) -> torch.Tensor:
        """Local forward and backward of one batch: fills `.grad` of every trained parameter (accumulating
        into existing gradients, like `loss.backward()`), then moves MLAAN's EMA copies toward the live
        blocks; call the optimizer's step after it. Returns the last module's loss, detached.
        `forward_context`: a context-manager factory wrapping every forward (e.g. bf16 autocast)."""
        from fastlocal.kernels import resolve_backend
        from fastlocal.methods import Batch
        from fastlocal.schedule import local_train_step

        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != self.backbone.input_size:
            raise ConfigError(
                f"step takes images (batch, 3, {self.backbone.input_size}, {self.backbone.input_size})"
                f" (the backbone's input size), got {tuple(x.shape)}"
            )
        if y.shape != x.shape[:1]:
            raise ConfigError(f"step takes one label per image: x has {x.shape[0]}, y has shape {tuple(y.shape)}")
        try:
            self.method.kernels = resolve_backend(self.kernels, x.device)
        except ValueError as err:
            raise ConfigError(f"kernels = {self.kernels!r}: {err}") from None
        args = () if forward_context is None else (forward_context,)
        return local_train_step(self.local_modules, self.method, Batch(x, y, self.mean, self.std), *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain forward of the whole backbone: evaluation and inference."""
        return self.backbone(x)
