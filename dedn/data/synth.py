"""Semi-synthetic benchmarks: the real structure of CUB/SUN/AWA2 with planted feature maps.

Generative model (every draw from one ``numpy.random.default_rng(seed)``, in a fixed order):

1. Clusters. Attributes are grouped by the dataset's manual preset (or the built-in's own groups).
   Cluster q gets a centre on the H x W grid; its footprint is a Gaussian bump
   ``m_q(r) = exp(-|r - centre_q|^2 / (2 * footprint^2))`` (footprint in cells, default max(H, W)/4).
   Each attribute's footprint is its cluster's, shifted by up to one cell at random: CUB head
   attributes live in one region of the map, wing attributes in another.
2. Directions. Attribute d has a unit direction ``u_d`` in channel space (Gaussian, normalised).
3. Presence. Image i of class k shows attribute d with probability ``p_kd`` = the class's attribute
   strength scaled to [0, 1] (``original_att``: CUB and AWA2 / 100, missing -1 -> 0; SUN as is), so
   attributes, not class identity, explain the image.
4. Features. ``F_i = signal * sum_d z_id * u_d (x) m_d + noise * N(0, 1)`` (C x H x W), then stored in
   the store's dtype.

Unseen classes keep their real test-unseen images only: no training image of an unseen class exists.
Same seed and knobs give the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dedn import __version__
from dedn.data.benchmark_files import Benchmark, read_benchmark
from dedn.data.convert import build_tables
from dedn.data.progress import Progress, no_progress
from dedn.data.schema import AttributeTable, StoreMeta
from dedn.data.splits import TEST_SEEN, TEST_UNSEEN, TRAINVAL
from dedn.data.writer import StoreWriter
from dedn.errors import DednInputError
from dedn.partitions import presets_for


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator. Defaults train on a 2-core CPU in minutes at CUB scale."""

    channels: int = 64
    height: int = 7
    width: int = 7
    noise: float = 0.5
    signal: float = 1.0
    footprint: float | None = None  # Gaussian width in cells; None -> max(H, W) / 4
    seed: int = 0
    dtype: str = "float16"
    val_fraction: float = 0.2


@dataclass(frozen=True)
class BuiltinConfig:
    """The tiny built-in dataset: no external file needed (the quick start uses it)."""

    num_seen: int = 15
    num_unseen: int = 5
    num_clusters: int = 4
    attributes_per_cluster: int = 6
    semantic_dim: int = 16
    images_per_class: int = 30
    test_seen_fraction: float = 0.2


TINY = SynthConfig(channels=32, height=4, width=4)


def _strengths(bench: Benchmark) -> np.ndarray:
    """Class attribute strengths in [0, 1] from original_att (K, D)."""
    raw = np.clip(bench.split_file.original_att, 0.0, None)  # AWA2 marks missing as -1
    scale = 100.0 if raw.max() > 1.0 else 1.0
    return np.clip(raw / scale, 0.0, 1.0)


def attribute_patterns(cluster_ids: np.ndarray, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """(D, C*H*W) planted pattern u_d (x) m_d of each attribute."""
    d = cluster_ids.size
    q = int(cluster_ids.max()) + 1
    h, w = cfg.height, cfg.width
    sigma = cfg.footprint if cfg.footprint is not None else max(h, w) / 4.0
    centres = np.stack([rng.uniform(0, h - 1, q), rng.uniform(0, w - 1, q)], axis=1)  # (Q, 2)
    jitter = rng.uniform(-1.0, 1.0, (d, 2))
    centre = centres[cluster_ids] + jitter  # (D, 2)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)  # (R, 2)
    dist2 = ((grid[None, :, :] - centre[:, None, :]) ** 2).sum(-1)  # (D, R)
    foot = np.exp(-dist2 / (2 * sigma**2))
    foot /= foot.max(axis=1, keepdims=True)
    u = rng.standard_normal((d, cfg.channels))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return (u[:, :, None] * foot[:, None, :]).reshape(d, -1)  # (D, C*R)


def _generate(
    labels: np.ndarray,
    strengths: np.ndarray,
    patterns: np.ndarray,
    cfg: SynthConfig,
    rng: np.random.Generator,
    chunk_rows: int,
) -> Iterator[tuple[int, np.ndarray]]:
    shape = (cfg.channels, cfg.height, cfg.width)
    for start in range(0, labels.size, chunk_rows):
        lab = labels[start : start + chunk_rows]
        z = rng.random((lab.size, strengths.shape[1])) < strengths[lab]  # (n, D)
        feats = cfg.signal * (z.astype(np.float64) @ patterns)
        feats += cfg.noise * rng.standard_normal(feats.shape)
        yield start, feats.astype(np.float32).reshape(lab.size, *shape)


def synth_from_benchmark(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: SynthConfig = SynthConfig(),
    *,
    name: str | None = None,
    chunk_rows: int = 1024,
    overwrite: bool = False,
    progress: Progress = no_progress,
) -> StoreMeta:
    """A store with the real classes, attribute matrix, splits, per-class image counts, attribute names
    and vectors of the benchmark in ``folder`` (``att_splits.mat`` and companions), planted features."""
    bench = read_benchmark(folder, name=name)
    if bench.labels is None or bench.image_files is None:
        raise DednInputError(Path(folder) / "image_labels.csv", "file", "needed for per-image labels, not found")
    source = str(bench.split_file.path)
    classes, attributes, splits = build_tables(
        source=source,
        name=bench.name,
        class_names=bench.split_file.class_names,
        att=bench.split_file.att,
        labels=bench.labels,
        locs=bench.split_file.locs,
        val_classes=bench.val_classes,
        attribute_names=bench.attribute_names,
        attribute_vectors=bench.attribute_vectors,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
    )
    d = bench.num_attributes
    presets = presets_for(bench.name, d)
    cluster_ids = presets["manual"][1] if "manual" in presets else np.arange(d) % 4
    rng = np.random.default_rng(cfg.seed)
    patterns = attribute_patterns(cluster_ids, cfg, rng)
    keep = np.flatnonzero(splits >= 0)
    labels = bench.labels[keep]
    provenance = {
        "generator": "semi-synthetic",
        "structure": bench.sources,
        "config": asdict(cfg),
        "dedn_version": __version__,
    }
    with StoreWriter(
        out,
        name=f"synth-{bench.name}",
        classes=classes,
        attributes=attributes,
        shape=(cfg.channels, cfg.height, cfg.width),
        dtype=cfg.dtype,
        provenance=provenance,
        overwrite=overwrite,
        source=source,
    ) as writer:
        gen = _generate(labels, _strengths(bench), patterns, cfg, rng, chunk_rows)
        for start, feats in progress(gen, -(-labels.size // chunk_rows), f"synth {bench.name}"):
            rows = keep[start : start + feats.shape[0]]
            writer.write(feats, bench.labels[rows], splits[rows], [bench.image_files[i] for i in rows])
    assert writer.meta is not None
    return writer.meta


def builtin_structure(b: BuiltinConfig, seed: int) -> dict[str, np.ndarray | list[str] | list[int]]:
    """Classes, strengths, semantic vectors, labels and standard splits of the built-in dataset."""
    rng = np.random.default_rng([seed, 1])
    k = b.num_seen + b.num_unseen
    d = b.num_clusters * b.attributes_per_cluster
    cluster_ids = np.repeat(np.arange(b.num_clusters), b.attributes_per_cluster)
    # Each class turns on about a third of the attributes; strengths 0.9 on, 0.05 off.
    on = rng.random((k, d)) < 0.35
    on[np.arange(k), rng.integers(0, d, k)] = True
    strengths = np.where(on, 0.9, 0.05)
    centres = rng.standard_normal((b.num_clusters, b.semantic_dim)) * 2.0
    vectors = centres[cluster_ids] + rng.standard_normal((d, b.semantic_dim))
    labels = np.repeat(np.arange(k), b.images_per_class)
    standard = np.full(labels.size, TRAINVAL, dtype=np.int8)
    for c in range(k):
        rows = np.flatnonzero(labels == c)
        if c >= b.num_seen:
            standard[rows] = TEST_UNSEEN
        else:
            n_test = max(1, int(round(b.test_seen_fraction * rows.size)))
            standard[rng.choice(rows, n_test, replace=False)] = TEST_SEEN
    return {
        "class_names": [f"class_{c:02d}" for c in range(k)],
        "strengths": strengths,
        "vectors": vectors,
        "cluster_ids": cluster_ids,
        "labels": labels,
        "standard": standard,
        "attribute_names": [f"c{cluster_ids[i]}_attr{i:02d}" for i in range(d)],
    }


def synth_builtin(
    out: str | os.PathLike[str],
    cfg: SynthConfig = TINY,
    builtin: BuiltinConfig = BuiltinConfig(),
    *,
    chunk_rows: int = 1024,
    overwrite: bool = False,
    progress: Progress = no_progress,
) -> StoreMeta:
    """The tiny built-in dataset (20 classes, 24 attributes in 4 clusters), planted as above."""
    s = builtin_structure(builtin, cfg.seed)
    labels = np.asarray(s["labels"])
    standard = np.asarray(s["standard"])
    locs = {
        name: np.flatnonzero(standard == code) for code, name in enumerate(("trainval", "test_seen", "test_unseen"))
    }
    strengths = np.asarray(s["strengths"])
    cluster_ids = np.asarray(s["cluster_ids"])
    classes, attributes, splits = build_tables(
        source="<builtin>",
        name="tiny",
        class_names=list(s["class_names"]),  # type: ignore[arg-type]
        att=strengths,
        labels=labels,
        locs=locs,
        val_classes=None,
        attribute_names=list(s["attribute_names"]),  # type: ignore[arg-type]
        attribute_vectors=np.asarray(s["vectors"]),
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
    )
    q = int(cluster_ids.max()) + 1
    names = [f"group{i}" for i in range(q)]
    half = ([f"group{i}+group{i + 1}" if i + 1 < q else f"group{i}" for i in range(0, q, 2)], cluster_ids // 2)
    attributes = AttributeTable(
        names=attributes.names, vectors=attributes.vectors, presets={"manual": (names, cluster_ids), "half": half}
    )
    rng = np.random.default_rng(cfg.seed)
    patterns = attribute_patterns(cluster_ids, cfg, rng)
    provenance = {
        "generator": "semi-synthetic",
        "structure": {"builtin": asdict(builtin)},
        "config": asdict(cfg),
        "dedn_version": __version__,
    }
    with StoreWriter(
        out,
        name="tiny",
        classes=classes,
        attributes=attributes,
        shape=(cfg.channels, cfg.height, cfg.width),
        dtype=cfg.dtype,
        provenance=provenance,
        overwrite=overwrite,
        source="<builtin>",
    ) as writer:
        for start, feats in progress(_generate(labels, strengths, patterns, cfg, rng, chunk_rows), 1, "synth tiny"):
            rows = np.arange(start, start + feats.shape[0])
            writer.write(feats, labels[rows], splits[rows], [f"tiny_{i:05d}" for i in rows])
    assert writer.meta is not None
    return writer.meta


__all__ = [
    "TINY",
    "BuiltinConfig",
    "SynthConfig",
    "attribute_patterns",
    "builtin_structure",
    "synth_builtin",
    "synth_from_benchmark",
]
