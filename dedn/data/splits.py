"""Standard GZSL splits and the validation protocol built from seen classes only.

Every image gets exactly one role (``SPLITS``). ``trainval`` is ``train + val_seen + val_unseen``:
training on trainval never sees a test image, and model selection uses ``val_seen`` and
``val_unseen`` only (Xian et al. 2017, "proposed splits").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dedn.errors import DednInputError

SPLITS: tuple[str, ...] = ("train", "val_seen", "val_unseen", "test_seen", "test_unseen")
STANDARD_SPLITS: tuple[str, ...] = ("trainval", "test_seen", "test_unseen")
# Groups a caller may ask for by name, in terms of the stored roles.
SPLIT_GROUPS: dict[str, tuple[str, ...]] = {
    **{s: (s,) for s in SPLITS},
    "trainval": ("train", "val_seen", "val_unseen"),
    "val": ("val_seen", "val_unseen"),
    "test": ("test_seen", "test_unseen"),
}
TRAINVAL, TEST_SEEN, TEST_UNSEEN = 0, 1, 2
TRAIN, VAL_SEEN, VAL_UNSEEN = 0, 1, 2  # codes into SPLITS; 3 and 4 are the test splits


def standard_from_locs(num_images: int, locs: dict[str, np.ndarray], source: str) -> np.ndarray:
    """Turn 0-based ``trainval/test_seen/test_unseen`` index lists into one code per image.

    Raises DednInputError on an index out of range, an image in two splits, or an image in none.
    """
    codes = np.full(num_images, -1, dtype=np.int8)
    for code, name in enumerate(STANDARD_SPLITS):
        if name not in locs:
            raise DednInputError(source, f"{name}_loc", "missing split index list")
        idx = np.asarray(locs[name]).reshape(-1).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= num_images):
            bad = int(idx[(idx < 0) | (idx >= num_images)][0])
            raise DednInputError(source, f"{name}_loc", f"indices must lie in [0, {num_images}), got {bad}")
        if np.unique(idx).size != idx.size:
            raise DednInputError(source, f"{name}_loc", "an image index appears twice")
        taken = codes[idx] >= 0
        if taken.any():
            other = STANDARD_SPLITS[int(codes[idx][taken][0])]
            raise DednInputError(
                source,
                f"{name}_loc",
                f"splits must not overlap, image {int(idx[taken][0])} is also in {other}",
            )
        codes[idx] = code
    return codes


def assign_splits(
    labels: np.ndarray,
    standard: np.ndarray,
    seen: np.ndarray,
    *,
    val_unseen_classes: Sequence[int] | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    source: str = "<splits>",
) -> tuple[np.ndarray, np.ndarray]:
    """Build the five roles of ``SPLITS`` from the standard split of each image.

    Args:
        labels: (N,) class index per image.
        standard: (N,) codes into ``STANDARD_SPLITS``; -1 marks an image in no split (dropped later).
        seen: (K,) bool, True for seen (training) classes.
        val_unseen_classes: seen classes that act as pseudo-unseen for validation (xlsa17
            ``valclasses1.txt``); by default a seeded ``val_fraction`` of the seen classes.
        seed: seeds both draws.
        val_fraction: share of seen classes (when not given) and of each remaining class's
            training images held out as ``val_seen``.

    Returns:
        (N,) int8 codes into ``SPLITS`` (-1 where ``standard`` is -1) and (K,) bool val-unseen mask.

    Raises:
        DednInputError: an unseen-class image in trainval, a seen-class image in test_unseen, an
        unseen-class image in test_seen, or a val-unseen class that is not seen.
    """
    labels = np.asarray(labels)
    seen = np.asarray(seen, dtype=bool)
    num_classes = seen.size
    checks = [
        (TRAINVAL, ~seen, "trainval", "trainval must hold seen classes only"),
        (TEST_SEEN, ~seen, "test_seen", "test_seen must hold seen classes only"),
        (TEST_UNSEEN, seen, "test_unseen", "test_unseen must hold unseen classes only"),
    ]
    for code, bad_classes, field, rule in checks:
        in_split = standard == code
        bad = in_split & bad_classes[labels]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DednInputError(source, field, f"{rule}, image {i} has class {int(labels[i])}")

    rng = np.random.default_rng(seed)
    seen_idx = np.flatnonzero(seen)
    if val_unseen_classes is None:
        n_val = int(round(val_fraction * seen_idx.size)) if seen_idx.size >= 2 else 0
        n_val = max(n_val, 1) if seen_idx.size >= 2 else 0
        chosen = np.sort(rng.choice(seen_idx, size=n_val, replace=False)) if n_val else seen_idx[:0]
    else:
        chosen = np.asarray(sorted(set(int(c) for c in val_unseen_classes)), dtype=np.int64)
        if chosen.size and (chosen.min() < 0 or chosen.max() >= num_classes):
            raise DednInputError(source, "val_classes", f"class indices must lie in [0, {num_classes})")
        not_seen = chosen[~seen[chosen]]
        if not_seen.size:
            raise DednInputError(
                source, "val_classes", f"validation classes must be seen classes, got unseen class {int(not_seen[0])}"
            )
    val_unseen = np.zeros(num_classes, dtype=bool)
    val_unseen[chosen] = True

    out = np.full(labels.shape, -1, dtype=np.int8)
    out[standard == TEST_SEEN] = SPLITS.index("test_seen")
    out[standard == TEST_UNSEEN] = SPLITS.index("test_unseen")
    trainval = standard == TRAINVAL
    out[trainval & val_unseen[labels]] = VAL_UNSEEN
    for k in seen_idx:
        if val_unseen[k]:
            continue
        rows = np.flatnonzero(trainval & (labels == k))
        n_hold = int(round(val_fraction * rows.size))
        n_hold = min(max(n_hold, 1), rows.size - 1) if rows.size >= 2 else 0
        held = rng.choice(rows, size=n_hold, replace=False) if n_hold else rows[:0]
        out[rows] = TRAIN
        out[held] = VAL_SEEN
    return out, val_unseen


__all__ = [
    "SPLITS",
    "SPLIT_GROUPS",
    "STANDARD_SPLITS",
    "TEST_SEEN",
    "TEST_UNSEEN",
    "TRAIN",
    "TRAINVAL",
    "VAL_SEEN",
    "VAL_UNSEEN",
    "assign_splits",
    "standard_from_locs",
]
