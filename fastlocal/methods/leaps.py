"""Leap lists of MLAAN's LAM heads: which later backbone blocks module i's LAM copies (SPEC 3.4, 4.3).

A leap list must be a chain the shapes allow: its first block accepts module i's output, and each
following block accepts the output of the one before. Presets reproduce the reference's tables (for
the reference split only); `generate_leaps` builds a list for any backbone and K with the same rule:
take every shape-changing block after the module (so the chain reaches the last stage's width and
resolution), end at the last block, and fill up to four blocks with blocks of the final shape.
"""

from __future__ import annotations

from fastlocal.config import ConfigError
from fastlocal.models import Backbone

Block = tuple[int, int]


def _expand(table: list[tuple[range, list[Block]]]) -> dict[int, list[Block]]:
    return {m: blocks for modules, blocks in table for m in modules}


A = [(1, 0), (2, 0), (2, 2), (2, 4)]
B = [(1, 0), (2, 0), (2, 3), (2, 4)]
C = [(2, 0), (2, 2), (2, 3), (2, 4)]
# (arch, K) -> {module: leap blocks}, 0-based (stage, index), SPEC 4.3.
REFERENCE_LEAPS: dict[tuple[str, int], dict[int, list[Block]]] = {
    ("resnet32", 15): _expand([
        (range(0, 2), A), (range(2, 3), B), (range(3, 4), A), (range(4, 5), B), (range(5, 10), C),
        (range(10, 11), [(2, 1), (2, 2), (2, 4)]), (range(11, 12), [(2, 2), (2, 3), (2, 4)]),
        (range(12, 13), [(2, 3), (2, 4)]), (range(13, 14), [(2, 4)]),
    ]),
    ("resnet32", 8): _expand([
        (range(0, 2), A), (range(2, 3), B), (range(3, 5), C), (range(5, 6), [(2, 2), (2, 3), (2, 4)]),
        (range(6, 7), [(2, 3), (2, 4)]),
    ]),
    ("resnet110", 54): _expand([
        (range(0, 18), [(1, 0), (2, 0), (2, 2), (2, 17)]), (range(18, 35), [(2, 0), (2, 2), (2, 3), (2, 17)]),
        (range(35, 36), [(2, 0), (2, 3), (2, 4), (2, 17)]), (range(36, 43), [(2, 8), (2, 17)]),
        (range(43, 47), [(2, 14), (2, 17)]), (range(47, 49), [(2, 15), (2, 17)]),
        (range(49, 52), [(2, 16), (2, 17)]), (range(52, 53), [(2, 17)]),
    ]),
}


def _shape_in(backbone: Backbone, part: int) -> tuple[int, ...]:
    """The feature shape (without batch) a part receives: (C, H, W) or, for tokens, (N, D)."""
    return backbone.part_info[part - 1].shape


def _shape_out(backbone: Backbone, part: int) -> tuple[int, ...]:
    return backbone.part_info[part].shape


def check_leaps(backbone: Backbone, module_last_part: int, leap_parts: list[int]) -> None:
    """Raise ConfigError unless `leap_parts` is a shape-consistent chain after `module_last_part`."""
    if not leap_parts:
        raise ConfigError(f"the leap list after part {module_last_part} is empty")
    shape = _shape_out(backbone, module_last_part)
    previous = module_last_part
    for part in leap_parts:
        if part <= previous:
            raise ConfigError(f"leap list {leap_parts} is not increasing after part {module_last_part}")
        if _shape_in(backbone, part) != shape:
            name = backbone.part_info[part].name
            raise ConfigError(f"leap block {name} expects input of shape {_shape_in(backbone, part)} "
                              f"but receives {shape}")
        shape = _shape_out(backbone, part)
        previous = part


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
        # Spread the extra blocks evenly over the final stage (the reference picks e.g. (2,2) of (2,0..4)).
        step = len(fill) / free
        chosen |= {fill[min(len(fill) - 1, int(step * k + step / 2))] for k in range(free)} if free < len(fill) \
            else set(fill)
    leaps = sorted(chosen)
    check_leaps(backbone, module_last_part, leaps)
    return leaps


def leap_lists(backbone: Backbone, arch: str, module_parts: list[list[int]], modules_with_lam: list[int],
               mode: str, stem_separate: bool) -> dict[int, list[int]]:
    """Leap lists (part numbers) for the modules in `modules_with_lam`."""
    num_modules = len(module_parts)
    preset = None
    if not stem_separate and (arch, num_modules) in REFERENCE_LEAPS:
        preset = REFERENCE_LEAPS[(arch, num_modules)]
    if mode == "reference" and preset is None:
        available = ", ".join(f"{a} K={k}" for a, k in REFERENCE_LEAPS)
        raise ConfigError(f"mlaan.leaps = reference, but the reference has no leap table for {arch} K={num_modules} "
                          f"(it has: {available}, uniform split); use mlaan.leaps=auto or generated")
    lists = {}
    for i in modules_with_lam:
        last = module_parts[i][-1]
        if preset is not None and mode != "generated":
            parts = [backbone.block_part(stage, index) for stage, index in preset[i]]
            check_leaps(backbone, last, parts)
        else:
            parts = generate_leaps(backbone, last)
        lists[i] = parts
    return lists
