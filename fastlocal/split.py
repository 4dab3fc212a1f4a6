"""Group a backbone's parts (stem + blocks) into K contiguous, gradient-isolated local modules.

docs/method.md#splits-and-leap-tables. The generated `uniform` split reproduces most of the authors' tables: the parts
[stem, block 0, ..., block N-1] are cut into K contiguous groups as evenly as possible, the first groups
taking one part more, so the stem always shares module 0 with at least one block (ResNet-32 K=8:
stem+(0,0) | (0,1-2) | ...; K=15 and ResNet-110 K=54: stem+(0,0), then one block each).
`stem_separate` makes the stem a module of its own (the paper's DGL "K=16" for ResNet-32).
`reference` takes the authors' split for an (arch, K) they wrote one for (`REFERENCE_SPLITS`); it differs
from `uniform` only for ResNet-110 K=32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastlocal.config import ConfigError
from fastlocal.models import Backbone

# (arch, K) -> the number of parts of each module in the authors' split (the stem counts as a part of
# module 0). The leap presets of fastlocal/methods/leaps.py were written for exactly these splits.
REFERENCE_SPLITS: dict[tuple[str, int], list[int]] = {
    ("resnet32", 8): [2] * 8,
    ("resnet32", 15): [2] + [1] * 14,
    ("resnet110", 32): [3, 1, 2, 1, 2, 2, 2, 2, 1, 2, 1, 2, 1, 2, 1, 2, 2, 2, 2, 1, 2, 1, 2, 2, 1, 2, 1, 2, 2, 2, 2, 2],
    ("resnet110", 54): [2] + [1] * 53,
    ("resnet34", 16): [2] + [1] * 15,
    ("resnet101", 33): [2] + [1] * 32,
}


def reference_split(arch: str, num_modules: int) -> list[list[int]] | None:
    """Part numbers of each module of the authors' split for (arch, K), or None when they wrote none."""
    sizes = REFERENCE_SPLITS.get((arch, num_modules))
    if sizes is None:
        return None
    groups, start = [], 0
    for size in sizes:
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def max_modules(num_blocks: int, stem_separate: bool) -> int:
    return num_blocks + 1 if stem_separate else num_blocks


def even_groups(num_items: int, num_groups: int) -> list[list[int]]:
    """Contiguous groups of range(num_items), sizes differing by at most one, larger groups first."""
    base, extra = divmod(num_items, num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def balanced_groups(costs: Sequence[float], num_groups: int) -> list[list[int]]:
    """Contiguous groups minimising the largest group cost (linear-partition dynamic programme)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[g][i]: the smallest possible max-cost of splitting items[:i] into g groups.
    best = [[inf] * (n + 1) for _ in range(num_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(num_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, num_groups + 1):
        for i in range(g, n + 1):
            for j in range(g - 1, i):
                value = max(best[g - 1][j], prefix[i] - prefix[j])
                if value < best[g][i]:
                    best[g][i], cut[g][i] = value, j
    groups, end = [], n
    for g in range(num_groups, 0, -1):
        start = cut[g][end]
        groups.append(list(range(start, end)))
        end = start
    return groups[::-1]


def part_saved_bytes(backbone: Backbone, batch_size: int = 2) -> list[int]:
    """Bytes each part saves for backward on a small batch (the activation memory a module holds)."""
    from fastlocal.measure import SavedTensorAccountant

    device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    x = torch.zeros(batch_size, 3, backbone.input_size, backbone.input_size, device=device)
    costs = []
    was_training = backbone.training
    backbone.train()
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    for part in backbone.parts:
        x = x.detach().requires_grad_()
        with SavedTensorAccountant(ignore=part.parameters()) as acct:
            x = part(x)
        costs.append(acct.peak_bytes)
    backbone.load_state_dict(state)  # the probe must not move BN running statistics
    backbone.train(was_training)
    return costs


def split_parts(
    backbone: Backbone, num_modules: int, stem_separate: bool = False, strategy: str = "uniform", arch: str = ""
) -> list[list[int]]:
    """Part numbers of each module (part 0 = stem, part p = block p-1). `arch` names the backbone for
    the `reference` strategy."""
    num_blocks = len(backbone.blocks)
    limit = max_modules(num_blocks, stem_separate)
    if not 1 <= num_modules <= limit:
        hint = "" if stem_separate else f" (or {limit + 1} with method.stem_separate=true)"
        raise ConfigError(
            f"method.num_modules = {num_modules} is not possible for this backbone: it has {num_blocks} "
            f"blocks, so K must be between 1 and {limit}{hint}"
        )
    if stem_separate and num_modules == 1:
        raise ConfigError("method.stem_separate=true needs method.num_modules >= 2 (the stem alone plus the blocks)")
    if strategy == "reference":
        groups = None if stem_separate else reference_split(arch, num_modules)
        if groups is None or groups[-1][-1] != num_blocks:
            available = ", ".join(f"{a} K={k}" for a, k in REFERENCE_SPLITS)
            raise ConfigError(
                f"method.split = reference, but the authors wrote no split for {arch or 'this backbone'} "
                f"K={num_modules}{' with the stem separate' if stem_separate else ''} (they did for: "
                f"{available}); use method.split=uniform or balanced"
            )
        return groups
    if strategy == "balanced":
        costs = part_saved_bytes(backbone)
        if stem_separate:
            return [[0]] + [[p + 1 for p in g] for g in balanced_groups(costs[1:], num_modules - 1)]
        # The stem shares module 0 with block 0: balance over the items [stem+block 0, block 1, ...].
        groups = balanced_groups([costs[0] + costs[1], *costs[2:]], num_modules)
        item_parts = [[0, 1]] + [[p] for p in range(2, len(costs))]
        return [[p for item in g for p in item_parts[item]] for g in groups]
    if stem_separate:
        return [[0]] + [[p + 1 for p in g] for g in even_groups(num_blocks, num_modules - 1)]
    return even_groups(num_blocks + 1, num_modules)


class LocalModule(nn.Sequential):
    """A contiguous run of backbone parts; `part_ids` says which."""

    def __init__(self, parts: Sequence[nn.Module], part_ids: Sequence[int]):
        super().__init__(*parts)
        self.part_ids = list(part_ids)
        # The weight VJP's `inputs`, built once instead of on every step (.to() keeps parameter identities).
        self.trainable_parameters = [p for p in self.parameters() if p.requires_grad]
        self.recompute = False
        """Keep only each part's input and recompute the part for a VJP (fastlocal.recompute, system.recompute)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute:
            from fastlocal.recompute import run_chain

            return run_chain([(part, [part]) for part in self], x)
        return super().forward(x)


def split_backbone(
    backbone: Backbone, num_modules: int, stem_separate: bool = False, strategy: str = "uniform", arch: str = ""
) -> list[LocalModule]:
    """The K local modules, sharing parameters with `backbone` (no copies)."""
    parts = backbone.parts
    return [
        LocalModule([parts[p] for p in ids], ids)
        for ids in split_parts(backbone, num_modules, stem_separate, strategy, arch)
    ]


def describe_split(backbone: Backbone, groups: list[list[int]]) -> str:
    names = [info.name for info in backbone.part_info]
    return " | ".join("+".join(names[p] for p in g) for g in groups)
