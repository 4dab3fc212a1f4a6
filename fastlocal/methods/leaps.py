"""Leap lists of MLAAN's LAM heads: which backbone blocks module i's LAM copies
(docs/method.md#splits-and-leap-tables).

A leap list must be a chain the shapes allow: its first block accepts module i's output, and each
following block accepts the output of the one before. The presets are the authors' tables; each was
written for one split (`fastlocal.split.REFERENCE_SPLITS`) and is used only for that split. For any
other split or K, `generate_leaps` builds a list with the authors' rule: take every shape-changing block
after the module (so the chain reaches the last stage's width and resolution), end at the last block,
and fill up to four blocks with blocks of the final shape.
"""

from __future__ import annotations

from fastlocal.config import ConfigError
from fastlocal.models import Backbone
from fastlocal.split import REFERENCE_SPLITS, reference_split

Block = tuple[int, int]


def _expand(table: list[tuple[range, list[Block]]]) -> dict[int, list[Block]]:
    return {m: blocks for modules, blocks in table for m in modules}


_R32_A = [(1, 0), (2, 0), (2, 2), (2, 4)]
_R32_B = [(1, 0), (2, 0), (2, 3), (2, 4)]
_R32_C = [(2, 0), (2, 2), (2, 3), (2, 4)]
_R110_A = [(1, 0), (2, 0), (2, 2), (2, 17)]
_R110_B = [(2, 0), (2, 2), (2, 3), (2, 17)]
# (arch, K) -> {module: leap blocks}, 0-based (stage, index), for the split REFERENCE_SPLITS[(arch, K)].
# The ImageNet tables copy blocks at or before the module too (e.g. ResNet-34 K=16 module 4 leaps to
# (1,1), its own block); any block of the right shape can be copied, so they are kept as written.
REFERENCE_LEAPS: dict[tuple[str, int], dict[int, list[Block]]] = {
    ("resnet32", 15): _expand(
        [
            (range(0, 2), _R32_A),
            (range(2, 3), _R32_B),
            (range(3, 4), _R32_A),
            (range(4, 5), _R32_B),
            (range(5, 10), _R32_C),
            (range(10, 11), [(2, 1), (2, 2), (2, 4)]),
            (range(11, 12), [(2, 2), (2, 3), (2, 4)]),
            (range(12, 13), [(2, 3), (2, 4)]),
            (range(13, 14), [(2, 4)]),
        ]
    ),
    ("resnet32", 8): _expand(
        [
            (range(0, 2), _R32_A),
            (range(2, 3), _R32_B),
            (range(3, 5), _R32_C),
            (range(5, 6), [(2, 2), (2, 3), (2, 4)]),
            (range(6, 7), [(2, 3), (2, 4)]),
        ]
    ),
    ("resnet110", 32): _expand(
        [
            (range(0, 11), _R110_A),
            (range(11, 21), _R110_B),
            (range(21, 22), [(2, 0), (2, 3), (2, 4), (2, 17)]),
            (range(22, 26), [(2, 8), (2, 17)]),
            (range(26, 28), [(2, 14), (2, 17)]),
            (range(28, 29), [(2, 15), (2, 17)]),
            (range(29, 30), [(2, 16), (2, 17)]),
            (range(30, 31), [(2, 17)]),
        ]
    ),
    ("resnet110", 54): _expand(
        [
            (range(0, 18), _R110_A),
            (range(18, 35), _R110_B),
            (range(35, 36), [(2, 0), (2, 3), (2, 4), (2, 17)]),
            (range(36, 43), [(2, 8), (2, 17)]),
            (range(43, 47), [(2, 14), (2, 17)]),
            (range(47, 49), [(2, 15), (2, 17)]),
            (range(49, 52), [(2, 16), (2, 17)]),
            (range(52, 53), [(2, 17)]),
        ]
    ),
    ("resnet34", 16): _expand(
        [
            (range(0, 3), [(1, 0), (1, 1), (2, 0), (3, 0), (3, 2)]),
            (range(3, 7), [(1, 1), (2, 0), (3, 0), (3, 2)]),
            (range(7, 13), [(2, 1), (3, 0), (3, 1)]),
            (range(13, 14), [(3, 1), (3, 1), (3, 2)]),  # block (3,1) twice, as the authors' table has it
            (range(14, 15), [(3, 1), (3, 2)]),
        ]
    ),
    ("resnet101", 33): _expand(
        [
            (range(0, 3), [(1, 0), (2, 0), (3, 0), (3, 2)]),
            (range(3, 7), [(2, 0), (3, 0), (3, 1)]),
            (range(7, 30), [(3, 0), (3, 1)]),
            (range(30, 32), [(3, 1), (3, 2)]),
        ]
    ),
}
assert set(REFERENCE_LEAPS) <= set(REFERENCE_SPLITS)


def _shape_in(backbone: Backbone, part: int) -> tuple[int, ...]:
    """The feature shape (without batch) a part receives: (C, H, W) or, for tokens, (N, D)."""
    return backbone.part_info[part - 1].shape


def _shape_out(backbone: Backbone, part: int) -> tuple[int, ...]:
    return backbone.part_info[part].shape


def check_leaps(backbone: Backbone, module_last_part: int, leap_parts: list[int]) -> None:
    """Raise ConfigError unless `leap_parts` (blocks, not the stem) is a shape-consistent chain on the
    output of part `module_last_part`."""
    if not leap_parts:
        raise ConfigError(f"the leap list after part {module_last_part} is empty")
    shape = _shape_out(backbone, module_last_part)
    for part in leap_parts:
        if part < 1:
            raise ConfigError(f"leap list {leap_parts} names the stem; a leap list holds blocks only")
        if _shape_in(backbone, part) != shape:
            name = backbone.part_info[part].name
            raise ConfigError(
                f"leap block {name} expects input of shape {_shape_in(backbone, part)} but receives {shape}"
            )
        shape = _shape_out(backbone, part)


def generate_leaps(backbone: Backbone, module_last_part: int, max_length: int = 4) -> list[int]:
    """A leap list (part numbers) for a module whose output is part `module_last_part`."""
    later = list(range(module_last_part + 1, len(backbone.part_info)))
    if not later:
        raise ConfigError("the last module has no later blocks to leap to")
    changing = [p for p in later if _shape_in(backbone, p) != _shape_out(backbone, p)]
    final_shape = _shape_out(backbone, later[-1])
    chosen = set(changing) | {later[-1]}
    # Candidates that keep the chain valid: blocks of the final shape after the last shape change.
    start = changing[-1] + 1 if changing else later[0]
    fill = [p for p in later if p >= start and p not in chosen and _shape_in(backbone, p) == final_shape]
    free = max(0, max_length - len(chosen))
    if free and fill:
        # Spread the extra blocks evenly over the final stage (the authors pick e.g. (2,2) of (2,0..4)).
        step = len(fill) / free
        chosen |= (
            {fill[min(len(fill) - 1, int(step * k + step / 2))] for k in range(free)} if free < len(fill) else set(fill)
        )
    leaps = sorted(chosen)
    check_leaps(backbone, module_last_part, leaps)
    return leaps


def leap_lists(
    backbone: Backbone, arch: str, module_parts: list[list[int]], modules_with_lam: list[int], mode: str
) -> tuple[dict[int, list[int]], str]:
    """(leap lists as part numbers for the modules in `modules_with_lam`, "preset" or "generated").

    `mode`: auto (the authors' table when this is the split it was written for, else generated),
    reference (that table, or an error), generated."""
    num_modules = len(module_parts)
    has_table = (arch, num_modules) in REFERENCE_LEAPS
    preset = REFERENCE_LEAPS.get((arch, num_modules)) if module_parts == reference_split(arch, num_modules) else None
    if mode == "reference" and (preset is None or not has_table):
        available = ", ".join(f"{a} K={k}" for a, k in REFERENCE_LEAPS)
        if module_parts[0] == [0]:  # the stem is a module of its own: no authors' split does that
            reason = (
                "method.stem_separate = true, and the authors' leap tables are all for splits with the stem "
                "in the first module; use method.stem_separate=false (with method.split=reference)"
            )
        elif has_table:
            reason = (
                f"the authors' {arch} K={num_modules} table was written for their split only, and this run "
                "uses another (balanced, or uniform where it differs); set method.split=reference"
            )
        else:
            reason = f"the authors wrote no leap table for {arch} K={num_modules} (they did for: {available})"
        raise ConfigError(f"mlaan.leaps = reference, but {reason}; or use mlaan.leaps=auto or generated")
    use_preset = preset is not None and mode != "generated"
    lists = {}
    for i in modules_with_lam:
        last = module_parts[i][-1]
        if use_preset:
            parts = [backbone.block_part(stage, index) for stage, index in preset[i]]
            check_leaps(backbone, last, parts)
        else:
            parts = generate_leaps(backbone, last)
        lists[i] = parts
    return lists, "preset" if use_preset else "generated"
