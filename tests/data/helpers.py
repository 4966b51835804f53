"""Small store builders shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dedn.data.store import AttributeTable, ClassTable, StoreWriter


def make_tables(k: int = 4, d: int = 3, g: int = 2, seed: int = 0) -> tuple[ClassTable, AttributeTable]:
    rng = np.random.default_rng(seed)
    seen = np.array([True] * (k - 1) + [False])
    val_unseen = np.zeros(k, dtype=bool)
    val_unseen[0] = True
    classes = ClassTable([f"c{i}" for i in range(k)], seen, val_unseen, rng.random((k, d)).astype(np.float32))
    attributes = AttributeTable(
        [f"a{i}" for i in range(d)],
        rng.random((d, g)).astype(np.float32),
        {"manual": (["x", "y"], np.array([0, 1] + [1] * (d - 2)))},
    )
    return classes, attributes


def valid_rows(k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Labels and split codes satisfying every rule for make_tables(k): class 0 val-unseen, class k-1 unseen."""
    labels, splits = [], []
    for c in range(k):
        if c == 0:
            labels += [0, 0]
            splits += [2, 3]  # val_unseen, test_seen
        elif c == k - 1:
            labels += [c, c]
            splits += [4, 4]  # test_unseen
        else:
            labels += [c, c, c]
            splits += [0, 1, 3]  # train, val_seen, test_seen
    return np.array(labels), np.array(splits)


def write_store(
    out: Path,
    features: np.ndarray,
    labels: np.ndarray,
    splits: np.ndarray,
    *,
    dtype: str = "float32",
    row_group_rows: int = 4,
    chunk: int = 3,
) -> StoreWriter:
    classes, attributes = make_tables()
    with StoreWriter(
        out,
        name="hand",
        classes=classes,
        attributes=attributes,
        shape=features.shape[1:],
        dtype=dtype,
        row_group_rows=row_group_rows,
    ) as w:
        for s in range(0, len(labels), chunk):
            w.write(features[s : s + chunk], labels[s : s + chunk], splits[s : s + chunk])
    return w
