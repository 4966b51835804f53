"""Reading a feature store: ``open_store`` and ``FeatureStore``.

The layout read is described in ``dedn.data.schema``. Small tables load at once; features load on
demand, row group by row group. This module is also the store's public face: it re-exports the table
types (``dedn.data.schema``) and ``StoreWriter`` (``dedn.data.writer``), so
``from dedn.data.store import ...`` reaches the whole store API.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedn.data.fingerprint import ImageHashes, content_fingerprint
from dedn.data.schema import (
    ARROW_FLOAT,
    ATTRIBUTES,
    CLASSES,
    FEATURE_DTYPES,
    FORMAT_VERSION,
    IMAGES,
    META,
    AttributeTable,
    ClassTable,
    StoreMeta,
)
from dedn.data.splits import SPLIT_GROUPS, SPLITS
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
        self.path = Path(path)
        if not self.path.is_dir():
            raise DednInputError(self.path, "store", "is not a feature-store folder")
        meta_path = self.path / META
        if not meta_path.is_file():
            raise DednInputError(meta_path, "file", "missing from the store")
        try:
            raw = json.loads(meta_path.read_text())
            self.meta = StoreMeta(**raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise DednInputError(meta_path, "meta", f"not a valid store metadata file: {e}") from None
        if self.meta.format_version != FORMAT_VERSION:
            raise DednInputError(
                meta_path,
                "format_version",
                f"this version reads format {FORMAT_VERSION}, got {self.meta.format_version}",
            )
        if self.meta.dtype not in FEATURE_DTYPES:
            raise DednInputError(meta_path, "dtype", f"must be one of {FEATURE_DTYPES}, got {self.meta.dtype!r}")
        m = self.meta
        ct = _read_table(self.path / CLASSES)
        d = m.num_attributes
        self.classes = ClassTable(
            names=ct.column("name").to_pylist(),
            seen=ct.column("seen").to_numpy().astype(bool),
            val_unseen=ct.column("val_unseen").to_numpy().astype(bool),
            attributes=_fsl_numpy(ct.column("attributes"), d).astype(np.float32),
        )
        at = _read_table(self.path / ATTRIBUTES)
        presets = {p: (names, at.column(f"cluster_{p}").to_numpy().astype(np.int64)) for p, names in m.presets.items()}
        self.attributes = AttributeTable(
            names=at.column("name").to_pylist(),
            vectors=_fsl_numpy(at.column("vector"), m.semantic_dim).astype(np.float32),
            presets=presets,
        )
        self.classes.validate(str(self.path / CLASSES))
        self.attributes.validate(str(self.path / ATTRIBUTES), d)
        images_path = self.path / IMAGES
        images_file = self._open_images(images_path)
        self._images_file: pq.ParquetFile | None = images_file
        schema = images_file.schema_arrow
        feat_type = schema.field("features").type if "features" in schema.names else None
        width = m.channels * m.height * m.width
        if (
            not isinstance(feat_type, pa.FixedSizeListType)
            or feat_type.list_size != width
            or feat_type.value_type != ARROW_FLOAT[m.dtype]
        ):
            raise DednInputError(
                images_path,
                "features",
                f"must be fixed_size_list<{m.dtype}>[{width}] (C*H*W from meta.json), got {feat_type}",
            )
        small = _read_table(images_path, ["image_id", "label", "split"])
        if small.num_rows != m.num_images:
            raise DednInputError(
                images_path, "rows", f"meta.json says {m.num_images} images, file has {small.num_rows}"
            )
        self.image_ids: list[str] = small.column("image_id").to_pylist()
        self.labels = small.column("label").to_numpy().astype(np.int32)
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= m.num_classes):
            raise DednInputError(images_path, "label", f"class index must lie in [0, {m.num_classes})")
        split_names = small.column("split").to_pylist()
        lookup = {s: i for i, s in enumerate(SPLITS)}
        unknown = set(split_names) - set(lookup)
        if unknown:
            raise DednInputError(images_path, "split", f"must be one of {SPLITS}, got {sorted(unknown)[0]!r}")
        self.splits = np.fromiter((lookup[s] for s in split_names), dtype=np.int8, count=len(split_names))
        self._features: np.ndarray | None = None

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
            blocks = [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, width) for c in table.column(0).chunks]
            del table
            while blocks:
                yield blocks.pop(0)
            pa.default_memory_pool().release_unused()  # give the row group back before the next one

    def verify(self) -> str:
        """Re-read everything, check finiteness, recompute and return the fingerprint.

        Raises DednInputError when it differs from meta.json or a value is not finite.
        """
        hashes = ImageHashes()
        row = 0
        for block in self.iter_feature_blocks():
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad = row + int(np.flatnonzero(~finite)[0])
                raise DednInputError(
                    self.path / IMAGES, "features", f"values must be finite, image {bad} holds NaN/inf"
                )
            hashes.parts[0].update(np.ascontiguousarray(block).tobytes())
            row += block.shape[0]
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

    def class_counts(self, split: str) -> np.ndarray:
        """(K,) number of images of each class in a split or group."""
        return np.bincount(self.labels[self.indices(split)], minlength=self.meta.num_classes)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def open_store(path: str | os.PathLike[str]) -> FeatureStore:
    """Open a store folder; raises DednInputError naming the file, field and rule on bad content."""
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
