import pytest

from fastlocal.config import ConfigError
from fastlocal.models import build_backbone
from fastlocal.split import balanced_groups, describe_split, split_parts


@pytest.fixture(scope="module")
def resnet32():
    return build_backbone("resnet32", 10, 32)


@pytest.fixture(scope="module")
def resnet110():
    return build_backbone("resnet110", 10, 32)


def test_resnet32_k8_matches_reference_table(resnet32):
    groups = split_parts(resnet32, 8)
    assert describe_split(resnet32, groups) == (
        "stem+0.0 | 0.1+0.2 | 0.3+0.4 | 1.0+1.1 | 1.2+1.3 | 1.4+2.0 | 2.1+2.2 | 2.3+2.4"
    )


def test_resnet32_k15_and_resnet110_k54_merge_stem_with_first_block(resnet32, resnet110):
    for backbone, k in ((resnet32, 15), (resnet110, 54)):
        groups = split_parts(backbone, k)
        assert groups[0] == [0, 1]
        assert all(len(g) == 1 for g in groups[1:])
        assert len(groups) == k


def test_stem_separate_gives_paper_k16(resnet32):
    groups = split_parts(resnet32, 16, stem_separate=True)
    assert groups[0] == [0] and all(len(g) == 1 for g in groups) and len(groups) == 16


@pytest.mark.parametrize("k", [1, 2, 3, 7, 15])
def test_generated_splits_are_contiguous_and_cover_all_parts(resnet32, k):
    for strategy in ("uniform", "balanced"):
        groups = split_parts(resnet32, k, strategy=strategy)
        assert len(groups) == k
        assert [p for g in groups for p in g] == list(range(16))
        assert 0 in groups[0] and 1 in groups[0]  # the stem never stands alone without stem_separate


@pytest.mark.parametrize("k,stem_separate", [(0, False), (16, False), (17, True), (1, True)])
def test_impossible_k_is_a_clear_error(resnet32, k, stem_separate):
    with pytest.raises(ConfigError, match="method.num_modules|stem_separate"):
        split_parts(resnet32, k, stem_separate=stem_separate)


def test_balanced_groups_minimise_the_largest_group():
    groups = balanced_groups([5, 1, 1, 1, 1, 1], 2)
    assert groups == [[0], [1, 2, 3, 4, 5]]
    groups = balanced_groups([1, 1, 1, 1], 4)
    assert groups == [[0], [1], [2], [3]]


def test_balanced_split_evens_out_activation_memory(resnet110):
    from fastlocal.split import part_saved_bytes

    costs = part_saved_bytes(resnet110)

    def worst(groups):
        return max(sum(costs[p] for p in g) for g in groups)

    assert worst(split_parts(resnet110, 4, strategy="balanced")) <= worst(split_parts(resnet110, 4))
