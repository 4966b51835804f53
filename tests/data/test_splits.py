from __future__ import annotations

import numpy as np
import pytest

from dedn.data.splits import SPLITS, assign_splits, standard_from_locs
from dedn.errors import DednInputError


def _toy(seed: int = 0):
    # 10 seen classes with 3..12 trainval images and 2 test-seen each; 3 unseen classes with 4 images.
    rng = np.random.default_rng(seed)
    labels, standard = [], []
    for k in range(10):
        n = int(rng.integers(3, 13))
        labels += [k] * (n + 2)
        standard += [0] * n + [1, 1]
    for k in range(10, 13):
        labels += [k] * 4
        standard += [2] * 4
    seen = np.arange(13) < 10
    return np.array(labels), np.array(standard, dtype=np.int8), seen


def test_given_validation_classes_become_val_unseen_and_others_hold_out_a_fifth() -> None:
    labels, standard, seen = _toy()
    splits, val_unseen = assign_splits(labels, standard, seen, val_unseen_classes=[2, 7], seed=3)
    assert np.flatnonzero(val_unseen).tolist() == [2, 7]
    code = {s: i for i, s in enumerate(SPLITS)}
    for k in range(13):
        tv = (labels == k) & (standard == 0)
        got = splits[tv]
        if k in (2, 7):
            assert (got == code["val_unseen"]).all()
        elif k < 10:
            n = tv.sum()
            expected = min(max(int(round(0.2 * n)), 1), n - 1)
            assert (got == code["val_seen"]).sum() == expected
            assert (got == code["train"]).sum() == n - expected
    assert (splits[standard == 1] == code["test_seen"]).all()
    assert (splits[standard == 2] == code["test_unseen"]).all()
    # training never sees a test image or a validation class
    train = splits == code["train"]
    assert not (standard[train] != 0).any()
    assert not np.isin(labels[train], [2, 7, 10, 11, 12]).any()


def test_default_validation_classes_are_a_seeded_fifth_of_seen() -> None:
    labels, standard, seen = _toy()
    a, va = assign_splits(labels, standard, seen, seed=5)
    b, vb = assign_splits(labels, standard, seen, seed=5)
    c, vc = assign_splits(labels, standard, seen, seed=6)
    assert va.sum() == 2 and not (va & ~seen).any()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(a, c)


def test_split_rules_are_enforced() -> None:
    labels, standard, seen = _toy()
    bad = standard.copy()
    bad[np.flatnonzero(labels == 11)[0]] = 0  # an unseen-class image in trainval
    with pytest.raises(DednInputError, match=r"trainval: trainval must hold seen classes only"):
        assign_splits(labels, bad, seen)
    with pytest.raises(DednInputError, match="validation classes must be seen"):
        assign_splits(labels, standard, seen, val_unseen_classes=[11])


def test_standard_locs_must_not_overlap_or_leave_range() -> None:
    locs = {"trainval": np.array([0, 1]), "test_seen": np.array([2]), "test_unseen": np.array([3])}
    np.testing.assert_array_equal(standard_from_locs(5, locs, "f"), [0, 0, 1, 2, -1])
    with pytest.raises(DednInputError, match=r"f: test_seen_loc: splits must not overlap, image 1 is also in trainval"):
        standard_from_locs(5, {**locs, "test_seen": np.array([1])}, "f")
    with pytest.raises(DednInputError, match=r"test_unseen_loc: indices must lie in \[0, 5\), got 9"):
        standard_from_locs(5, {**locs, "test_unseen": np.array([9])}, "f")
    with pytest.raises(DednInputError, match="missing split index list"):
        standard_from_locs(5, {"trainval": locs["trainval"]}, "f")
