"""Presets against the authors' tables, typed here by hand from docs/method.md#splits-and-leap-tables
(modules as 'first-last', blocks as 'stage.index'); never read from fastlocal's own tables."""

import pytest

from fastlocal.config import ConfigError
from fastlocal.methods.leaps import check_leaps, leap_lists
from fastlocal.models import build_backbone
from fastlocal.split import split_parts

AUTHORS_LEAPS = {
    ("resnet32", 15): """
        0-1: 1.0 2.0 2.2 2.4
        2: 1.0 2.0 2.3 2.4
        3: 1.0 2.0 2.2 2.4
        4: 1.0 2.0 2.3 2.4
        5-9: 2.0 2.2 2.3 2.4
        10: 2.1 2.2 2.4
        11: 2.2 2.3 2.4
        12: 2.3 2.4
        13: 2.4""",
    ("resnet32", 8): """
        0-1: 1.0 2.0 2.2 2.4
        2: 1.0 2.0 2.3 2.4
        3-4: 2.0 2.2 2.3 2.4
        5: 2.2 2.3 2.4
        6: 2.3 2.4""",
    ("resnet110", 54): """
        0-17: 1.0 2.0 2.2 2.17
        18-34: 2.0 2.2 2.3 2.17
        35: 2.0 2.3 2.4 2.17
        36-42: 2.8 2.17
        43-46: 2.14 2.17
        47-48: 2.15 2.17
        49-51: 2.16 2.17
        52: 2.17""",
    ("resnet110", 32): """
        0-10: 1.0 2.0 2.2 2.17
        11-20: 2.0 2.2 2.3 2.17
        21: 2.0 2.3 2.4 2.17
        22-25: 2.8 2.17
        26-27: 2.14 2.17
        28: 2.15 2.17
        29: 2.16 2.17
        30: 2.17""",
    ("resnet34", 16): """
        0-2: 1.0 1.1 2.0 3.0 3.2
        3-6: 1.1 2.0 3.0 3.2
        7-12: 2.1 3.0 3.1
        13: 3.1 3.1 3.2
        14: 3.1 3.2""",
    ("resnet101", 33): """
        0-2: 1.0 2.0 3.0 3.2
        3-6: 2.0 3.0 3.1
        7-29: 3.0 3.1
        30-31: 3.1 3.2""",
}

# The authors' splits as module sizes in parts (the stem is a part of module 0).
AUTHORS_SPLIT_SIZES = {
    ("resnet32", 15): [2] + [1] * 14,
    ("resnet32", 8): [2, 2, 2, 2, 2, 2, 2, 2],
    ("resnet110", 54): [2] + [1] * 53,
    ("resnet110", 32): [3, 1, 2, 1, 2, 2, 2, 2, 1, 2, 1, 2, 1, 2, 1, 2, 2, 2, 2, 1, 2, 1, 2, 2, 1, 2, 1, 2, 2, 2, 2, 2],
    ("resnet34", 16): [2] + [1] * 15,
    ("resnet101", 33): [2] + [1] * 32,
}


def typed_table(text: str) -> dict[int, list[str]]:
    table = {}
    for line in text.strip().splitlines():
        modules, blocks = line.split(":")
        first, _, last = modules.strip().partition("-")
        for m in range(int(first), int(last or first) + 1):
            table[m] = blocks.split()
    return table


_BACKBONES = {}


def backbone_of(arch):
    if arch not in _BACKBONES:  # small inputs: the tables depend on block order and shapes, not on resolution
        _BACKBONES[arch] = build_backbone(arch, 10, 32)
    return _BACKBONES[arch]


@pytest.mark.parametrize("arch,k", list(AUTHORS_LEAPS))
def test_presets_are_the_authors_tables(arch, k):
    backbone = backbone_of(arch)
    names = [info.name for info in backbone.part_info]
    parts = split_parts(backbone, k, strategy="reference", arch=arch)
    assert [len(g) for g in parts] == AUTHORS_SPLIT_SIZES[(arch, k)]
    expected = typed_table(AUTHORS_LEAPS[(arch, k)])
    assert sorted(expected) == list(range(k - 1))
    lists, source = leap_lists(backbone, arch, parts, list(range(k - 1)), "reference")
    assert source == "preset"
    assert {i: [names[p] for p in leaps] for i, leaps in lists.items()} == expected


def test_resnet110_k32_split_boundaries():
    backbone = backbone_of("resnet110")
    names = [info.name for info in backbone.part_info]
    parts = split_parts(backbone, 32, strategy="reference", arch="resnet110")
    assert [names[p] for p in parts[0]] == ["stem", "0.0", "0.1"]
    assert names[parts[10][-1]] == "0.17" and names[parts[21][-1]] == "1.17"
    assert [names[p] for p in parts[31]] == ["2.16", "2.17"]


def test_uniform_split_equals_the_authors_where_the_preset_says_so():
    for arch, k in [("resnet32", 15), ("resnet32", 8), ("resnet110", 54)]:
        backbone = backbone_of(arch)
        assert [len(g) for g in split_parts(backbone, k)] == AUTHORS_SPLIT_SIZES[(arch, k)]
    # ResNet-110 K=32 is the exception: uniform gives the first 23 modules two parts.
    assert [len(g) for g in split_parts(backbone_of("resnet110"), 32)] != AUTHORS_SPLIT_SIZES[("resnet110", 32)]


@pytest.mark.parametrize(
    "arch,k,strategy,stem_separate",
    [
        ("resnet32", 8, "balanced", False),  # another split at the same K: generated, no shape error
        ("resnet110", 32, "uniform", False),  # the same K, but not the authors' split
        ("resnet32", 15, "uniform", True),  # K=15 with the stem separate is another split too
        ("resnet32", 5, "uniform", False),  # a K the authors wrote nothing for
    ],
)
def test_a_preset_is_used_only_for_its_split(arch, k, strategy, stem_separate):
    backbone = backbone_of(arch)
    parts = split_parts(backbone, k, stem_separate, strategy)
    heads = list(range(k - 1))
    lists, source = leap_lists(backbone, arch, parts, heads, "auto")
    assert source == "generated"
    for i, leaps in lists.items():
        check_leaps(backbone, parts[i][-1], leaps)
    with pytest.raises(ConfigError, match="mlaan.leaps = reference"):
        leap_lists(backbone, arch, parts, heads, "reference")


def test_reference_split_without_a_table_is_a_clear_error():
    with pytest.raises(ConfigError, match="method.split = reference.*resnet32 K=5"):
        split_parts(backbone_of("resnet32"), 5, strategy="reference", arch="resnet32")
