"""Converters from the standard benchmark files to the feature store (``dedn data convert``).

- xlsa17: ``att_splits.mat`` + ``res101.mat`` (pooled 2048-d features; stored as C=2048, H=W=1 maps).
- HDF5 feature maps written by the DAZLE/MSDN/DEDN preprocessing scripts (``feature_map`` N x C x h x w,
  ``labels`` and ``*_loc`` 0-based, ``att``/``original_att`` K x D, ``w2v_att`` D x 300).

Both stream the features in chunks of ``chunk_rows`` images (memory ~ one chunk plus one row group),
validate every header-level fact before reading a feature, and write through ``StoreWriter``
(temporary folder, renamed at the end).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dedn import __version__
from dedn.data.benchmark_files import (
    Benchmark,
    read_attribute_names,
    read_benchmark,
    read_class_list,
    read_split_file,
)
from dedn.data.progress import Progress, no_progress
from dedn.data.safe_pickle import load_array_pickle
from dedn.data.schema import AttributeTable, ClassTable, StoreMeta
from dedn.data.splits import TEST_UNSEEN, assign_splits, standard_from_locs
from dedn.data.writer import StoreWriter
from dedn.errors import DednInputError
from dedn.partitions import presets_for


def l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def build_tables(
    *,
    source: str,
    name: str,
    class_names: list[str],
    att: np.ndarray,
    labels: np.ndarray,
    locs: dict[str, np.ndarray],
    val_classes: list[int] | None,
    attribute_names: list[str] | None,
    attribute_vectors: np.ndarray | None,
    seed: int,
    val_fraction: float,
) -> tuple[ClassTable, AttributeTable, np.ndarray]:
    """Class and attribute tables plus the per-image split codes; checks every cross-file fact.

    Unseen classes are those with a test_unseen image, the rest are seen. Images in no standard split
    are dropped (code -1).
    """
    k, d = att.shape
    if len(class_names) != k:
        raise DednInputError(source, "class names", f"need K={k} names to match att, got {len(class_names)}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        bad = int(np.flatnonzero((labels < 0) | (labels >= k))[0])
        raise DednInputError(source, "labels", f"class index must lie in [0, {k}), image {bad} has {int(labels[bad])}")
    if not np.isfinite(att).all():
        raise DednInputError(source, "att", "class attribute values must be finite (found NaN/inf)")
    standard = standard_from_locs(labels.size, locs, source)
    seen = np.ones(k, dtype=bool)
    seen[labels[standard == TEST_UNSEEN]] = False  # test_unseen defines the unseen classes
    splits, val_unseen = assign_splits(
        labels, standard, seen, val_unseen_classes=val_classes, seed=seed, val_fraction=val_fraction, source=source
    )
    if attribute_vectors is None:
        attribute_vectors = np.eye(d)  # no semantic vectors given: one-hot, G = D
    if attribute_vectors.shape[0] != d:
        raise DednInputError(
            source, "attribute vectors", f"must be (D={d}, G) to match att, got {attribute_vectors.shape}"
        )
    names = attribute_names if attribute_names is not None else [f"attribute_{i}" for i in range(d)]
    classes = ClassTable(
        names=list(class_names), seen=seen, val_unseen=val_unseen, attributes=l2_rows(att).astype(np.float32)
    )
    attributes = AttributeTable(
        names=list(names),
        vectors=attribute_vectors.astype(np.float32),
        presets=presets_for(name, d),
    )
    return classes, attributes, splits


def _write_rows(
    writer: StoreWriter,
    chunks: Iterator[tuple[int, np.ndarray]],
    labels: np.ndarray,
    splits: np.ndarray,
    ids: list[str],
    progress: Progress,
    total_chunks: int,
) -> None:
    """Write (start_row, features) chunks, dropping images that belong to no split."""
    for start, feats in progress(chunks, total_chunks, f"convert {writer.name}"):
        rows = np.arange(start, start + feats.shape[0])
        keep = splits[rows] >= 0
        if not keep.all():
            feats, rows = feats[keep], rows[keep]
        writer.write(feats, labels[rows], splits[rows], [ids[i] for i in rows])


def _provenance(converter: str, inputs: dict[str, str], seed: int, val_fraction: float) -> dict[str, Any]:
    """The ``provenance`` entry of meta.json for a converted store."""
    return {
        "converter": converter,
        "inputs": inputs,
        "dedn_version": __version__,
        "seed": seed,
        "val_fraction": val_fraction,
    }


def read_res101_lists(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``labels`` and ``image_files`` of an xlsa17 ``res101.mat`` (without its features); one DednInputError when
    the file is missing, unreadable or lacks a ``required`` key."""
    if not path.is_file():
        raise DednInputError(path, "file", "not found")
    import scipy.io

    try:
        small: dict[str, np.ndarray] = scipy.io.loadmat(path, variable_names=["labels", "image_files"])
    except (ValueError, OSError, TypeError, NotImplementedError) as e:
        raise DednInputError(path, "file", f"not a readable MATLAB v5 file: {e}") from None
    for key in required:
        if key not in small:
            raise DednInputError(path, key, "missing key in res101.mat (the xlsa17 layout)")
    return small


def convert_xlsa17(
    att_splits: str | os.PathLike[str],
    res101: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    val_classes: str | os.PathLike[str] | None = None,
    attribute_names: str | os.PathLike[str] | None = None,
    attribute_vectors: str | os.PathLike[str] | None = None,
    dtype: str = "float16",
    chunk_rows: int = 2048,
    seed: int = 0,
    val_fraction: float = 0.2,
    overwrite: bool = False,
    progress: Progress = no_progress,
) -> StoreMeta:
    """Convert xlsa17 ``att_splits.mat`` + ``res101.mat`` (features 2048 x N, labels 1-based)."""
    from dedn.data.matv5 import MatrixStream

    bench = read_benchmark(
        split_file=att_splits,
        val_classes=val_classes,
        attribute_names=attribute_names,
        attribute_vectors=attribute_vectors,
        name=name,
    )
    res = Path(res101)
    small = read_res101_lists(res, ("labels",))
    labels = np.asarray(small["labels"]).reshape(-1).astype(np.int64) - 1  # stored 1-based
    feats = MatrixStream(res, "features")
    c, n = feats.shape
    if n != labels.size:
        raise DednInputError(
            res, "features", f"must be C x N with N = len(labels) = {labels.size} (xlsa17 layout), got {feats.shape}"
        )
    if "image_files" in small:
        ids = [str(np.asarray(x).reshape(-1)[0]) for x in small["image_files"].reshape(-1)]
    elif bench.image_files is not None and len(bench.image_files) == n:
        ids = bench.image_files
    else:
        ids = [str(i) for i in range(n)]
    classes, attributes, splits = tables_for(bench, labels, str(bench.split_file.path), seed, val_fraction)
    provenance = _provenance("xlsa17", {**bench.sources, "res101": str(res)}, seed, val_fraction)

    def chunks() -> Iterator[tuple[int, np.ndarray]]:
        start = 0
        for block in feats.iter_columns(chunk_rows):  # (C, c)
            yield start, np.ascontiguousarray(block.T).reshape(-1, c, 1, 1)  # cast once, by the writer
            start += block.shape[1]

    with StoreWriter(
        out,
        name=bench.name,
        classes=classes,
        attributes=attributes,
        shape=(c, 1, 1),
        dtype=dtype,
        provenance=provenance,
        overwrite=overwrite,
        source=str(res),
    ) as writer:
        _write_rows(writer, chunks(), labels, splits, ids, progress, -(-n // chunk_rows))
    assert writer.meta is not None
    return writer.meta


def tables_for(
    bench: Benchmark, labels: np.ndarray, source: str, seed: int, val_fraction: float
) -> tuple[ClassTable, AttributeTable, np.ndarray]:
    sf = bench.split_file
    return build_tables(
        source=source,
        name=bench.name,
        class_names=sf.class_names,
        att=sf.att,
        labels=labels,
        locs=sf.locs,
        val_classes=bench.val_classes,
        attribute_names=bench.attribute_names,
        attribute_vectors=bench.attribute_vectors,
        seed=seed,
        val_fraction=val_fraction,
    )


HDF5_KEYS = ("feature_map", "labels", "trainval_loc", "test_seen_loc", "test_unseen_loc", "att")


def _open_hdf5(path: Path) -> Any:
    """The HDF5 file at ``path``, opened read-only (an ``h5py.File``, usable as a context manager)."""
    import h5py

    if not path.is_file():
        raise DednInputError(path, "file", "not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DednInputError(path, "file", f"not a readable HDF5 file: {e}") from None


def _read_hdf5_arrays(h5: Any, path: Path) -> tuple[Any, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Check the required keys; return the (lazy) feature-map dataset, labels, att and split locations."""
    for key in HDF5_KEYS:
        if key not in h5:
            raise DednInputError(path, key, "missing key in the feature-map file")
    fm = h5["feature_map"]
    if fm.ndim != 4:
        raise DednInputError(path, "feature_map", f"must be N x C x h x w, got shape {fm.shape}")
    if not np.issubdtype(fm.dtype, np.floating):
        raise DednInputError(path, "feature_map", f"must be floating point, got dtype {fm.dtype}")
    n = int(fm.shape[0])
    labels = np.asarray(h5["labels"]).reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer) and not np.all(np.mod(labels, 1) == 0):
        raise DednInputError(path, "labels", f"must be integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size != n:
        raise DednInputError(path, "labels", f"need one label per feature map (N={n}), got {labels.size}")
    att = np.asarray(h5["att"], dtype=np.float64)
    if att.ndim != 2:
        raise DednInputError(path, "att", f"must be K x D, got shape {att.shape}")
    locs = {
        s: np.asarray(h5[f"{s}_loc"]).reshape(-1).astype(np.int64) for s in ("trainval", "test_seen", "test_unseen")
    }
    return fm, labels, att, locs


def _hdf5_attribute_vectors(
    h5: Any, attribute_vectors: str | os.PathLike[str] | None, d: int, src: str, sources: dict[str, str]
) -> np.ndarray | None:
    """The file's ``w2v_att``, else the ``*_attribute.pkl`` given (recorded in ``sources``), else None."""
    vectors = np.asarray(h5["w2v_att"], dtype=np.float64) if "w2v_att" in h5 else None
    if vectors is None and attribute_vectors is not None:
        vectors = load_array_pickle(attribute_vectors).astype(np.float64)
        sources["attribute_vectors"] = str(attribute_vectors)
    if vectors is not None and (vectors.ndim != 2 or vectors.shape[0] != d):
        vsrc = str(attribute_vectors) if "attribute_vectors" in sources else src
        raise DednInputError(vsrc, "attribute vectors", f"must be (D={d}, G) to match att, got {vectors.shape}")
    return vectors


def _hdf5_class_names(
    att_splits: str | os.PathLike[str] | None, k: int, path: Path, sources: dict[str, str]
) -> list[str]:
    """Class names from ``att_splits`` (recorded in ``sources``) when given, else ``class_000``..."""
    if att_splits is None:
        return [f"class_{i:03d}" for i in range(k)]
    sf = read_split_file(att_splits)
    if len(sf.class_names) != k:
        raise DednInputError(
            att_splits,
            "allclasses_names",
            f"need K={k} names to match {path.name}'s att, got {len(sf.class_names)}",
        )
    sources["att_splits"] = str(att_splits)
    return sf.class_names


def _hdf5_attribute_names(attribute_names: str | os.PathLike[str] | None, d: int) -> list[str] | None:
    """Attribute names from a names file, checked against D; None when no file is given."""
    names = read_attribute_names(attribute_names) if attribute_names is not None else None
    if names is not None and len(names) != d:
        raise DednInputError(
            attribute_names or "", "attribute names", f"need D={d} names to match att, got {len(names)}"
        )
    return names


def convert_hdf5(
    features: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    att_splits: str | os.PathLike[str] | None = None,
    val_classes: str | os.PathLike[str] | None = None,
    attribute_names: str | os.PathLike[str] | None = None,
    attribute_vectors: str | os.PathLike[str] | None = None,
    dtype: str = "float16",
    chunk_rows: int = 256,
    seed: int = 0,
    val_fraction: float = 0.2,
    overwrite: bool = False,
    progress: Progress = no_progress,
) -> StoreMeta:
    """Convert a DAZLE/MSDN/DEDN feature-map HDF5 file (0-based labels and locations).

    Class names come from ``att_splits`` (its ``allclasses_names``) when given; validation classes
    from ``val_classes`` (needs class names); attribute vectors from the file's ``w2v_att`` or an
    ``*_attribute.pkl`` (restricted unpickler); attribute names from a names file.
    """
    path = Path(features)
    src = str(path)
    with _open_hdf5(path) as h5:
        fm, labels, att, locs = _read_hdf5_arrays(h5, path)
        n, c, hh, ww = (int(s) for s in fm.shape)
        k, d = att.shape
        sources = {"features": src}
        vectors = _hdf5_attribute_vectors(h5, attribute_vectors, d, src, sources)
        class_names = _hdf5_class_names(att_splits, k, path, sources)
        vc = read_class_list(val_classes, class_names) if val_classes is not None else None
        names = _hdf5_attribute_names(attribute_names, d)
        ds_name = name or path.stem.split("_")[0]
        classes, attributes, splits = build_tables(
            source=src,
            name=ds_name,
            class_names=class_names,
            att=att,
            labels=labels,
            locs=locs,
            val_classes=vc,
            attribute_names=names,
            attribute_vectors=vectors,
            seed=seed,
            val_fraction=val_fraction,
        )
        provenance = _provenance("hdf5", sources, seed, val_fraction)

        def chunks() -> Iterator[tuple[int, np.ndarray]]:
            for start in range(0, n, chunk_rows):
                yield start, np.asarray(fm[start : start + chunk_rows])

        with StoreWriter(
            out,
            name=ds_name,
            classes=classes,
            attributes=attributes,
            shape=(c, hh, ww),
            dtype=dtype,
            provenance=provenance,
            overwrite=overwrite,
            source=src,
        ) as writer:
            _write_rows(writer, chunks(), labels, splits, [str(i) for i in range(n)], progress, -(-n // chunk_rows))
    assert writer.meta is not None
    return writer.meta


__all__ = ["HDF5_KEYS", "build_tables", "convert_hdf5", "convert_xlsa17", "l2_rows", "read_res101_lists", "tables_for"]
