"""Attribute partitions for the fine expert: manual tables, "half" presets, k-means, user-given.

A partition is a (D,) int array of cluster ids in [0, Q), every cluster non-empty. Manual tables are
the spec's table 1 (0-based attribute indices, ranges inclusive). "half" merges neighbouring manual
clusters pairwise in table order (CUB 6 -> 3, SUN 4 -> 2, AWA2 4 -> 2), the paper's figure 4d.
"released" (SUN only) is the grouping the authors' released SUN code actually builds, sizes 64/27/9/2:
its indicator is written with ``65-74`` and ``74-77`` (negative single indices) where slices were meant,
so only attributes 93, 85 and 99 join the environment and light groups besides 77-84. Released SUN
checkpoints were trained with it; the paper's table 1 (``manual``) stays the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dedn.errors import DednInputError

if TYPE_CHECKING:
    from dedn.config import TrainConfig
    from dedn.data.store import FeatureStore

Ranges = list[tuple[int, int]]

MANUAL_TABLES: dict[str, dict[str, Ranges]] = {
    "CUB": {
        "head": [(0, 8), (94, 104), (120, 166), (182, 196), (278, 307)],
        "torso": [(24, 72), (105, 119), (197, 211), (236, 239), (244, 247)],
        "wing": [(9, 23), (212, 216), (308, 311)],
        "tail": [(73, 93), (167, 181), (240, 243)],
        "leg": [(263, 277)],
        "whole": [(217, 235), (248, 262)],
    },
    "SUN": {
        "function": [(0, 37)],
        "instance": [(38, 64)],
        "environment": [(65, 73), (77, 84)],
        "light": [(74, 76), (85, 101)],
    },
    "AWA2": {
        "texture": [(0, 17)],
        "organ": [(18, 32)],
        "abstract": [(33, 63), (78, 84)],
        "environment": [(64, 77)],
    },
}
NUM_ATTRIBUTES = {"CUB": 312, "SUN": 102, "AWA2": 85}

# The released SUN code's indicator, as it evaluates (0-based, inclusive): everything not listed is group 0.
RELEASED_TABLES: dict[str, dict[str, Ranges]] = {
    "SUN": {
        "function": [(0, 37), (65, 76), (86, 92), (94, 98), (100, 101)],
        "instance": [(38, 64)],
        "environment": [(77, 84), (93, 93)],
        "light": [(85, 85), (99, 99)],
    },
}


def _ranges_to_ids(table: dict[str, Ranges], num_attributes: int) -> np.ndarray:
    ids = np.full(num_attributes, -1, dtype=np.int64)
    for q, ranges in enumerate(table.values()):
        for lo, hi in ranges:
            ids[lo : hi + 1] = q
    return ids


def validate_partition(ids: np.ndarray | Sequence[int], num_attributes: int, source: str = "clusters") -> np.ndarray:
    """Check that ``ids`` assigns each of D attributes to exactly one of Q non-empty clusters 0..Q-1."""
    arr = np.asarray(ids)
    if arr.shape != (num_attributes,) or not np.issubdtype(arr.dtype, np.integer):
        raise DednInputError(
            source,
            "partition",
            f"must give one integer cluster id per attribute (D={num_attributes}), got {arr.dtype}{arr.shape}",
        )
    if arr.min() < 0:
        missing = int(np.flatnonzero(arr < 0)[0])
        raise DednInputError(source, "partition", f"must cover every attribute, attribute {missing} has no cluster")
    q = int(arr.max()) + 1
    empty = np.setdiff1d(np.arange(q), arr)
    if empty.size:
        raise DednInputError(
            source, "partition", f"cluster ids must be 0..Q-1 with none empty, cluster {int(empty[0])} is empty"
        )
    return arr.astype(np.int64)


def partition_from_groups(groups: Sequence[Sequence[int]], num_attributes: int, source: str = "clusters") -> np.ndarray:
    """A user-given partition as lists of attribute indices; each attribute exactly once."""
    ids = np.full(num_attributes, -1, dtype=np.int64)
    for q, group in enumerate(groups):
        for a in group:
            if not 0 <= int(a) < num_attributes:
                raise DednInputError(source, "partition", f"attribute index must lie in [0, {num_attributes}), got {a}")
            if ids[int(a)] >= 0:
                raise DednInputError(
                    source,
                    "partition",
                    f"clusters must be disjoint, attribute {a} is in clusters {ids[int(a)]} and {q}",
                )
            ids[int(a)] = q
    return validate_partition(ids, num_attributes, source)


def manual_preset(dataset: str) -> tuple[list[str], np.ndarray]:
    """Cluster names and (D,) ids of the spec's manual table for CUB, SUN or AWA2."""
    table = MANUAL_TABLES[dataset]
    ids = _ranges_to_ids(table, NUM_ATTRIBUTES[dataset])
    return list(table), validate_partition(ids, NUM_ATTRIBUTES[dataset], f"manual preset {dataset}")


def half_preset(names: list[str], ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Merge clusters pairwise in order (0+1, 2+3, ...): Q -> ceil(Q/2)."""
    q = len(names)
    merged = [f"{names[i]}+{names[i + 1]}" if i + 1 < q else names[i] for i in range(0, q, 2)]
    return merged, ids // 2


def presets_for(dataset: str, num_attributes: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """The manual and half presets (and SUN's ``released``) when ``dataset`` is CUB, SUN or AWA2 with its
    attribute count; {} otherwise."""
    key = dataset.upper()
    if NUM_ATTRIBUTES.get(key) != num_attributes:
        return {}
    names, ids = manual_preset(key)
    presets = {"manual": (names, ids), "half": half_preset(names, ids)}
    if key in RELEASED_TABLES:
        table = RELEASED_TABLES[key]
        presets["released"] = (
            list(table),
            validate_partition(_ranges_to_ids(table, num_attributes), num_attributes, f"released preset {key}"),
        )
    return presets


def kmeans_partition(vectors: np.ndarray, num_clusters: int, seed: int = 0) -> np.ndarray:
    """K-means (scikit-learn, seeded) on the L2-normalised rows of V (D, G); ids relabelled by first use."""
    from sklearn.cluster import KMeans

    d = vectors.shape[0]
    if not 1 <= num_clusters <= d:
        raise DednInputError("clusters", "kmeans", f"Q must lie in [1, D={d}], got {num_clusters}")
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    km = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit(v)
    raw = km.labels_.astype(np.int64)
    # Relabel so cluster 0 holds attribute 0, etc.: the same partition gives the same ids.
    _, first = np.unique(raw, return_index=True)
    order = np.argsort(first)
    relabel = np.empty(num_clusters, dtype=np.int64)
    relabel[order] = np.arange(num_clusters)
    return validate_partition(relabel[raw], d, "kmeans")


def resolve_partition(cfg: TrainConfig, store: FeatureStore) -> np.ndarray:
    """(D,) cluster ids from the config's ``model.clusters`` for this store."""
    m, d = cfg.model, store.meta.num_attributes
    if isinstance(m.clusters, list):
        return partition_from_groups(m.clusters, d, "model.clusters")
    if m.clusters == "kmeans":
        assert m.kmeans_q is not None
        if m.kmeans_q > d:
            raise DednInputError("config", "model.kmeans_q", f"must be <= D={d}, got {m.kmeans_q}")
        return kmeans_partition(store.attributes.vectors, m.kmeans_q, seed=cfg.seed)
    if m.clusters == "single":
        return np.zeros(d, dtype=np.int64)
    if m.clusters == "singletons":
        return np.arange(d, dtype=np.int64)
    if m.clusters not in store.attributes.presets:
        raise DednInputError(
            "config",
            "model.clusters",
            f"must be a preset of the store {sorted(store.attributes.presets)}, kmeans, single or singletons, "
            f"got {m.clusters!r}",
        )
    return validate_partition(store.attributes.presets[m.clusters][1], d, "model.clusters")


__all__ = [
    "MANUAL_TABLES",
    "NUM_ATTRIBUTES",
    "RELEASED_TABLES",
    "half_preset",
    "kmeans_partition",
    "manual_preset",
    "partition_from_groups",
    "presets_for",
    "resolve_partition",
    "validate_partition",
]
