"""Reading a feature store: ``open_store`` and ``FeatureStore``.

The layout read is described in ``dedn.data.schema``. Small tables load at once; features load on
demand, row group by row group. This module is also the store's public face: it re-exports the table
types (``dedn.data.schema``) and ``StoreWriter`` (``dedn.data.writer``), so
``from dedn.data.store import ...`` reaches the whole store API.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedn.data.fingerprint import ImageHashes, content_fingerprint
from dedn.data.schema import (
    ATTRIBUTES,
    CLASS_COLUMNS,
    CLASSES,
    IMAGE_COLUMNS,
    IMAGES,
    META,
    AttributeTable,
    ClassTable,
    FiniteTally,
    StoreMeta,
    attribute_columns,
    check_split_classes,
    split_class_counts,
    table_stat,
)
from dedn.data.splits import SPLIT_GROUPS, SPLITS
from dedn.data.validate import check_columns, check_dimensions, check_split_counts, no_nulls, read_meta
from dedn.data.writer import StoreWriter
from dedn.errors import DednInputError


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise DednInputError(path, "file", "missing from the store")
    try:
        return pq.ParquetFile(path).read(columns=columns)  # lighter than the dataset API of read_table
    except (pa.ArrowException, OSError) as e:
        raise DednInputError(path, "file", f"not a readable Parquet file (truncated or corrupt): {e}") from None


def _fsl_numpy(col: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False)).reshape(-1, width)


class FeatureStore:
    """A store opened for reading. Small tables load at once; features load on demand.

    Attributes:
        meta: StoreMeta from meta.json.
        classes: ClassTable (K classes, D attributes).
        attributes: AttributeTable (D attributes, G semantic dims, presets).
        labels: (N,) int32 class per image. splits: (N,) int8 codes into SPLITS. image_ids: list of N str.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open and check the store (``dedn.data.validate``): meta.json's fields, every table's columns and
        types, meta.json's dimensions and counts against the tables, labels and split names; the feature
        column is not read. Raises DednInputError naming the file at fault."""
        self.path = Path(path)
        if not self.path.is_dir():
            raise DednInputError(self.path, "store", "is not a feature-store folder")
        meta_path = self.path / META
        self.meta = m = read_meta(meta_path)
        classes_path, attributes_path, images_path = self.path / CLASSES, self.path / ATTRIBUTES, self.path / IMAGES
        ct = _read_table(classes_path)
        check_columns(classes_path, ct.schema, CLASS_COLUMNS)
        at = _read_table(attributes_path)
        check_columns(attributes_path, at.schema, attribute_columns(list(m.presets)))
        images_file = self._open_images(images_path)
        self._images_file: pq.ParquetFile | None = images_file
        check_columns(images_path, images_file.schema_arrow, IMAGE_COLUMNS)
        check_dimensions(self.path, meta_path, m, ct, at, images_file.schema_arrow, images_file.metadata.num_rows)
        for name in ("name", "seen", "val_unseen", "attributes"):
            no_nulls(classes_path, name, ct.column(name))
        for name in ("name", "vector", *(f"cluster_{p}" for p in m.presets)):
            no_nulls(attributes_path, name, at.column(name))
        d = m.num_attributes
        self.classes = ClassTable(
            names=[str(n) for n in ct.column("name").to_pylist()],
            seen=ct.column("seen").to_numpy().astype(bool),
            val_unseen=ct.column("val_unseen").to_numpy().astype(bool),
            attributes=_fsl_numpy(ct.column("attributes"), d).astype(np.float32),
        )
        presets = {p: (names, at.column(f"cluster_{p}").to_numpy().astype(np.int64)) for p, names in m.presets.items()}
        self.attributes = AttributeTable(
            names=[str(n) for n in at.column("name").to_pylist()],
            vectors=_fsl_numpy(at.column("vector"), m.semantic_dim).astype(np.float32),
            presets=presets,
        )
        self.classes.validate(str(classes_path))
        self.attributes.validate(str(attributes_path), d)
        small = _read_table(images_path, ["image_id", "label", "split"])
        for name in ("image_id", "label", "split"):
            no_nulls(images_path, name, small.column(name))
        self.image_ids: list[str] = [str(i) for i in small.column("image_id").to_pylist()]
        self.labels = small.column("label").to_numpy().astype(np.int32)
        bad_label = np.flatnonzero((self.labels < 0) | (self.labels >= m.num_classes))
        if bad_label.size:
            i = int(bad_label[0])
            raise DednInputError(
                images_path,
                "label",
                f"class index must lie in [0, {m.num_classes}), image {i} (id {self.image_ids[i]!r}) has "
                f"{int(self.labels[i])}",
            )
        split_names = small.column("split").to_pylist()
        lookup = {s: i for i, s in enumerate(SPLITS)}
        codes = np.fromiter((lookup.get(s, -1) for s in split_names), dtype=np.int8, count=len(split_names))
        bad_split = np.flatnonzero(codes < 0)
        if bad_split.size:
            i = int(bad_split[0])
            raise DednInputError(
                images_path,
                "split",
                f"must be one of {SPLITS}, image {i} (id {self.image_ids[i]!r}) has {split_names[i]!r}",
            )
        self.splits = codes
        check_split_counts(meta_path, m, self.splits)
        counts = split_class_counts(self.labels, self.splits, m.num_classes)
        check_split_classes(counts, self.classes, str(images_path))
        self._features: np.ndarray | None = None
        if self.changed_since_written():
            self.verify()  # every value finite and the content the fingerprint's, else one line naming the file

    def changed_since_written(self) -> bool:
        """Whether a table's size or modification time differs from what meta.json recorded when the store was
        written (a copy that did not keep times reads as changed too; ``verify`` then settles it)."""
        for name, recorded in self.meta.files.items():
            try:
                if table_stat(self.path / name) != list(recorded):
                    return True
            except OSError:
                return True
        return False

    @classmethod
    def from_parts(
        cls,
        path: str | os.PathLike[str],
        meta: StoreMeta,
        classes: ClassTable,
        attributes: AttributeTable,
        labels: np.ndarray,
        splits: np.ndarray,
        image_ids: list[str],
        features: np.ndarray,
    ) -> FeatureStore:
        """A store view over arrays already in memory (e.g. read from Ray's object store); no file is read.

        features (N, C, H, W) in the store dtype; it is used as given (zero-copy)."""
        if features.shape != (meta.num_images, *meta.feature_shape):
            raise DednInputError(
                path, "features", f"must be {(meta.num_images, *meta.feature_shape)}, got {features.shape}"
            )
        self = cls.__new__(cls)
        self.path, self.meta, self.classes, self.attributes = Path(path), meta, classes, attributes
        self.labels, self.splits, self.image_ids = labels, splits, image_ids
        self._features = features
        self._images_file = None
        return self

    def parts(self) -> dict[str, Any]:
        """The small parts of the store (everything but the features), picklable."""
        return {
            "path": str(self.path),
            "meta": self.meta,
            "classes": self.classes,
            "attributes": self.attributes,
            "labels": self.labels,
            "splits": self.splits,
            "image_ids": self.image_ids,
        }

    @staticmethod
    def _open_images(path: Path) -> pq.ParquetFile:
        if not path.is_file():
            raise DednInputError(path, "file", "missing from the store")
        try:
            # No memory map: mapped pages would count toward resident memory beside the output array.
            return pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DednInputError(path, "file", f"not a readable Parquet file (truncated or corrupt): {e}") from None

    # -- views -------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return self.meta.num_images

    def indices(self, split: str) -> np.ndarray:
        """Row indices (int64) of a split or group: one of SPLITS, 'trainval', 'val', 'test'."""
        if split not in SPLIT_GROUPS:
            raise DednInputError(self.path, "split", f"must be one of {sorted(SPLIT_GROUPS)}, got {split!r}")
        codes = [SPLITS.index(s) for s in SPLIT_GROUPS[split]]
        return np.flatnonzero(np.isin(self.splits, codes))

    def features(self) -> np.ndarray:
        """All feature maps as one (N, C, H, W) array in the stored dtype, read once and cached.

        The array is filled row group by row group (each ~8 MB, freed before the next), so loading
        holds one copy of the features plus one row group; it is returned read-only.
        """
        if self._features is None:
            m = self.meta
            out = np.empty((m.num_images, m.channels * m.height * m.width), dtype=m.dtype)
            row = 0
            for block in self.iter_feature_blocks():
                out[row : row + block.shape[0]] = block
                row += block.shape[0]
            out.flags.writeable = False
            self._features = out.reshape(m.num_images, m.channels, m.height, m.width)
        return self._features

    def release_features(self) -> None:
        """Drop the cached feature array (it can be read again)."""
        self._features = None

    def iter_feature_blocks(self) -> Iterator[np.ndarray]:
        """Yield (rows, C*H*W) views of each row group, zero-copy from Arrow."""
        width = self.meta.channels * self.meta.height * self.meta.width
        pf = self._images_file if self._images_file is not None else self._open_images(self.path / IMAGES)
        for i in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(i, columns=["features"])
            except (pa.ArrowException, OSError) as e:
                raise DednInputError(
                    self.path / IMAGES, "features", f"row group {i} is unreadable (truncated or corrupt): {e}"
                ) from None
            chunks = table.column(0).chunks
            nulls = sum(c.null_count + c.flatten().null_count for c in chunks)
            if nulls:
                raise DednInputError(
                    self.path / IMAGES, "features", f"row group {i} holds {nulls} missing (null) feature value(s)"
                )
            blocks = [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, width) for c in chunks]
            del table
            while blocks:
                yield blocks.pop(0)
            pa.default_memory_pool().release_unused()  # give the row group back before the next one

    def verify(self) -> str:
        """Re-read everything, check finiteness, recompute and return the fingerprint.

        Raises DednInputError when it differs from meta.json or a value is not finite.
        """
        hashes = ImageHashes()
        tally = FiniteTally()
        row = 0
        for block in self.iter_feature_blocks():
            tally.update(block, row, self.image_ids[row : row + block.shape[0]])
            hashes.parts[0].update(np.ascontiguousarray(block).tobytes())
            row += block.shape[0]
        tally.check(self.path / IMAGES)
        hashes.update(np.empty(0, np.uint8), self.labels, self.splits, self.image_ids)
        m = self.meta
        found = content_fingerprint(m.feature_shape, m.dtype, self.classes, self.attributes, hashes)
        if found != m.fingerprint:
            raise DednInputError(
                self.path / META,
                "fingerprint",
                f"content does not match the recorded fingerprint ({m.fingerprint} recorded, {found} found)",
            )
        return found

    def check_finite(self) -> None:
        """One streaming pass over the features (row group by row group, or over the cached array in blocks):
        raises one DednInputError naming images.parquet, ``features``, the number of NaN/inf values and the
        first image holding one. For stores written before the writer checked (meta.json without ``finite``)."""
        tally = FiniteTally()
        row = 0
        if self._features is not None:
            flat = self._features.reshape(self.meta.num_images, -1)
            step = max(1, (8 << 20) // max(1, flat.shape[1] * flat.itemsize))
            blocks: Iterator[np.ndarray] = (flat[i : i + step] for i in range(0, flat.shape[0], step))
        else:
            blocks = self.iter_feature_blocks()
        for block in blocks:
            tally.update(block, row, self.image_ids[row : row + block.shape[0]])
            row += block.shape[0]
        tally.check(self.path / IMAGES)

    def class_counts(self, split: str) -> np.ndarray:
        """(K,) number of images of each class in a split or group."""
        return np.bincount(self.labels[self.indices(split)], minlength=self.meta.num_classes)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def open_store(path: str | os.PathLike[str]) -> FeatureStore:
    """Open a store folder and check its layout (cheap: schemas and the small tables, not the features);
    raises DednInputError naming the file, field and rule on bad content."""
    return FeatureStore(path)


__all__ = [
    # defined here
    "FeatureStore",
    "open_store",
    # re-exported from dedn.data.schema and dedn.data.writer
    "AttributeTable",
    "ClassTable",
    "StoreMeta",
    "StoreWriter",
]
