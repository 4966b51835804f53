"""What the benchmark scripts share: the repository root and a small class/attribute table builder.

The scripts run as ``python benchmarks/X.py``, so this folder is first on ``sys.path`` and they import it as
``from common import ROOT``. Nothing here imports from ``tests/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dedn.data.store import AttributeTable, ClassTable

ROOT = Path(__file__).resolve().parents[1]


def make_tables(k: int = 4, d: int = 3, g: int = 2, seed: int = 0) -> tuple[ClassTable, AttributeTable]:
    """k classes (class 0 validation-unseen, class k-1 unseen, the others seen), d attributes, g-dim vectors.

    A store built from these tables follows the split rules when class 0 rows go to val_unseen (2), class
    k-1 rows to test_unseen (4), and the other classes' rows to train (0) and test_seen (3).
    """
    import numpy as np

    from dedn.data.store import AttributeTable, ClassTable

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
