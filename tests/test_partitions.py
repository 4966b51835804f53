from __future__ import annotations

import numpy as np
import pytest

from dedn.errors import DednInputError
from dedn.partitions import (
    half_preset,
    kmeans_partition,
    manual_preset,
    partition_from_groups,
    presets_for,
    validate_partition,
)
from tests.helpers import released_sun_indicator

# Paper table 1 / spec sizes.
SIZES = {
    "CUB": {"head": 112, "torso": 87, "wing": 24, "tail": 40, "leg": 15, "whole": 34},
    "SUN": {"function": 38, "instance": 27, "environment": 17, "light": 20},
    "AWA2": {"texture": 18, "organ": 15, "abstract": 38, "environment": 14},
}


@pytest.mark.parametrize("dataset", ["CUB", "SUN", "AWA2"])
def test_manual_presets_cover_every_attribute_once_with_table_sizes(dataset: str) -> None:
    names, ids = manual_preset(dataset)
    assert dict(zip(names, np.bincount(ids).tolist(), strict=True)) == SIZES[dataset]
    assert ids.size == sum(SIZES[dataset].values())


def test_spot_indices_from_the_spec() -> None:
    _, cub = manual_preset("CUB")
    # head 0-8, wing 9-23, torso 24-72, tail 73-93, leg 263-277, whole 217-235
    assert cub[0] == cub[8] == cub[94] == 0 and cub[9] == cub[23] == 2 and cub[24] == 1
    assert cub[73] == 3 and cub[263] == cub[277] == 4 and cub[217] == 5
    _, sun = manual_preset("SUN")
    assert sun[74] == sun[85] == 3 and sun[77] == 2


def test_released_sun_preset_is_the_released_codes_grouping() -> None:
    names, ids = presets_for("SUN", 102)["released"]
    assert names == ["function", "instance", "environment", "light"]
    assert np.bincount(ids).tolist() == [64, 27, 9, 2]
    assert np.array_equal(ids, released_sun_indicator())
    # The paper's table stays the manual preset; no other dataset gets a released preset.
    assert np.bincount(presets_for("SUN", 102)["manual"][1]).tolist() == [38, 27, 17, 20]
    assert "released" not in presets_for("CUB", 312) and "released" not in presets_for("AWA2", 85)


def test_half_merges_neighbours() -> None:
    names, ids = half_preset(["a", "b", "c"], np.array([0, 1, 2, 2, 1]))
    assert names == ["a+b", "c"] and ids.tolist() == [0, 0, 1, 1, 0]
    assert len(presets_for("CUB", 312)["half"][0]) == 3
    assert presets_for("CUB", 100) == {}


def test_bad_partitions_are_refused() -> None:
    with pytest.raises(DednInputError, match="attribute 2 is in clusters 0 and 1"):
        partition_from_groups([[0, 2], [1, 2]], 3)
    with pytest.raises(DednInputError, match="attribute 2 has no cluster"):
        partition_from_groups([[0], [1]], 3)
    with pytest.raises(DednInputError, match="cluster 1 is empty"):
        validate_partition([0, 2, 2], 3)
    assert partition_from_groups([[2], [0, 1]], 3).tolist() == [1, 1, 0]


def test_kmeans_is_seeded_and_finds_planted_groups() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 5
    truth = np.repeat([0, 1, 2], 5)
    v = centres[truth] + 0.1 * rng.standard_normal((15, 8))
    a = kmeans_partition(v, 3, seed=1)
    assert a.tolist() == truth.tolist()  # relabelled by first use, so ids equal the planted ones
    assert np.array_equal(a, kmeans_partition(v, 3, seed=1))
    with pytest.raises(DednInputError, match="Q must lie"):
        kmeans_partition(v, 16)
