"""The Parquet feature store: a folder of three Parquet files plus ``meta.json``.

Layout (see README, "Feature store schema"):

- ``images.parquet``: ``image_id`` (string), ``label`` (int32, 0-based class), ``split`` (string, one of
  ``SPLITS``), ``features`` (fixed-size list of float16|float32, C*H*W values, C-major), written
  uncompressed in row groups of about 8 MB so large stores stream.
- ``classes.parquet``: ``name``, ``seen`` (bool), ``val_unseen`` (bool), ``attributes`` (D float32).
- ``attributes.parquet``: ``name``, ``vector`` (G float32), one ``cluster_<preset>`` int16 column per
  preset.
- ``meta.json``: name, C, H, W, dtype, format version, counts, preset cluster names, provenance and the
  content fingerprint.

Writers build the store in a temporary sibling folder and rename it into place at the end, so a
failure never leaves a half-written store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedn.data.splits import SPLIT_GROUPS, SPLITS
from dedn.errors import DednInputError

FORMAT_VERSION = 1
FEATURE_DTYPES = ("float16", "float32")
IMAGES, CLASSES, ATTRIBUTES, META = "images.parquet", "classes.parquet", "attributes.parquet", "meta.json"
ROW_GROUP_BYTES = 8 << 20
_ARROW_FLOAT = {"float16": pa.float16(), "float32": pa.float32()}


@dataclass(frozen=True)
class ClassTable:
    """Per-class facts: names (K,), seen (K,) bool, val_unseen (K,) bool, attributes (K, D) float32."""

    names: list[str]
    seen: np.ndarray
    val_unseen: np.ndarray
    attributes: np.ndarray

    def validate(self, source: str) -> None:
        k = len(self.names)
        if k == 0:
            raise DednInputError(source, "classes", "at least one class is required")
        if self.attributes.ndim != 2 or self.attributes.shape[0] != k:
            raise DednInputError(
                source, "attributes", f"class attribute matrix must be (K={k}, D), got {self.attributes.shape}"
            )
        for name, arr in (("seen", self.seen), ("val_unseen", self.val_unseen)):
            if arr.shape != (k,) or arr.dtype != np.bool_:
                raise DednInputError(source, name, f"must be a bool vector of length K={k}, got {arr.dtype}{arr.shape}")
        if not np.isfinite(self.attributes).all():
            raise DednInputError(source, "attributes", "class attribute values must be finite (found NaN/inf)")
        if len(set(self.names)) != k:
            raise DednInputError(source, "name", "class names must be unique")
        if not self.seen.any() or self.seen.all():
            raise DednInputError(source, "seen", "a GZSL store needs at least one seen and one unseen class")
        if (self.val_unseen & ~self.seen).any():
            raise DednInputError(source, "val_unseen", "validation-unseen classes must be seen classes")


@dataclass(frozen=True)
class AttributeTable:
    """Per-attribute facts: names (D,), vectors (D, G) float32, presets name -> (cluster names, (D,) ids)."""

    names: list[str]
    vectors: np.ndarray
    presets: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)

    def validate(self, source: str, num_attributes: int) -> None:
        if len(self.names) != num_attributes:
            raise DednInputError(
                source,
                "attribute names",
                f"need one name per attribute, D={num_attributes} from the class matrix, got {len(self.names)}",
            )
        if self.vectors.ndim != 2 or self.vectors.shape[0] != num_attributes:
            raise DednInputError(
                source,
                "attribute vectors",
                f"must be (D={num_attributes}, G) to match the class attribute matrix, got {self.vectors.shape}",
            )
        if not np.isfinite(self.vectors).all():
            raise DednInputError(source, "attribute vectors", "values must be finite (found NaN/inf)")
        for preset, (cluster_names, ids) in self.presets.items():
            if ids.shape != (num_attributes,):
                raise DednInputError(
                    source, f"cluster_{preset}", f"needs one cluster id per attribute (D={num_attributes})"
                )
            if ids.min() < 0 or ids.max() >= len(cluster_names):
                raise DednInputError(source, f"cluster_{preset}", f"cluster ids must lie in [0, {len(cluster_names)})")
            if np.unique(ids).size != len(cluster_names):
                raise DednInputError(source, f"cluster_{preset}", "every cluster must hold at least one attribute")


@dataclass(frozen=True)
class StoreMeta:
    """The contents of ``meta.json``."""

    name: str
    channels: int
    height: int
    width: int
    dtype: str
    num_images: int
    num_classes: int
    num_attributes: int
    semantic_dim: int
    split_counts: dict[str, int]
    presets: dict[str, list[str]]
    provenance: dict[str, Any]
    fingerprint: str
    format_version: int = FORMAT_VERSION

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def feature_bytes(self) -> int:
        return self.num_images * self.channels * self.height * self.width * np.dtype(self.dtype).itemsize


def _fsl(values: np.ndarray, width: int, value_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _hash_strings(h: Any, items: Sequence[str]) -> None:
    for s in items:
        b = s.encode()
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)


class StoreWriter:
    """Streams images into a new store; ``close()`` validates the whole and renames it into place.

    Use as a context manager: an exception inside the block removes the temporary folder.

    Example:
        with StoreWriter(out, name="CUB", classes=ct, attributes=at, shape=(64, 7, 7)) as w:
            for feats, labels, splits, ids in chunks:
                w.write(feats, labels, splits, ids)
        meta = w.meta
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        name: str,
        classes: ClassTable,
        attributes: AttributeTable,
        shape: tuple[int, int, int],
        dtype: str = "float16",
        row_group_rows: int | None = None,
        provenance: dict[str, Any] | None = None,
        overwrite: bool = False,
        source: str | None = None,
    ) -> None:
        self.out = Path(out)
        self.source = source or str(self.out)
        if dtype not in FEATURE_DTYPES:
            raise DednInputError(self.source, "dtype", f"must be one of {FEATURE_DTYPES}, got {dtype!r}")
        if len(shape) != 3 or min(shape) < 1:
            raise DednInputError(self.source, "feature shape", f"must be positive (C, H, W), got {shape}")
        if self.out.exists() and not overwrite:
            raise DednInputError(self.out, "output", "already exists (pass --overwrite to replace it)")
        classes.validate(self.source)
        attributes.validate(self.source, classes.attributes.shape[1])
        self.name, self.classes, self.attributes = name, classes, attributes
        self.shape, self.dtype = tuple(int(s) for s in shape), dtype
        self.provenance = provenance or {}
        self._width = int(np.prod(self.shape))
        row_bytes = self._width * np.dtype(dtype).itemsize
        # Row groups of ~ROW_GROUP_BYTES: reading one costs that much memory beside the output array.
        self.row_group_rows = row_group_rows or max(1, ROW_GROUP_BYTES // row_bytes)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self._schema = pa.schema(
            [
                ("image_id", pa.string()),
                ("label", pa.int32()),
                ("split", pa.string()),
                ("features", pa.list_(_ARROW_FLOAT[dtype], self._width)),
            ]
        )
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self._tmp / IMAGES, self._schema, compression="none", write_statistics=["label", "split"]
        )
        self._hashes = _ImageHashes()
        self._counts = np.zeros((len(SPLITS), len(classes.names)), dtype=np.int64)
        self._num_images = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.meta: StoreMeta | None = None

    # -- streaming -------------------------------------------------------------------------------
    def write(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        splits: np.ndarray,
        image_ids: Sequence[str] | None = None,
    ) -> None:
        """Append n images: features (n, C, H, W) float, labels (n,) int, splits (n,) codes into SPLITS."""
        n = features.shape[0]
        first = self._num_images
        if features.ndim != 4 or tuple(features.shape[1:]) != self.shape:
            raise DednInputError(
                self.source,
                "features",
                f"feature maps must be (N, C, H, W) = (N, {', '.join(map(str, self.shape))}), "
                f"got {tuple(features.shape)}",
            )
        if not np.issubdtype(features.dtype, np.floating):
            raise DednInputError(self.source, "features", f"must be floating point, got dtype {features.dtype}")
        labels = np.asarray(labels)
        splits = np.asarray(splits)
        if not np.issubdtype(labels.dtype, np.integer):
            raise DednInputError(self.source, "labels", f"must be integers, got dtype {labels.dtype}")
        if labels.shape != (n,) or splits.shape != (n,):
            raise DednInputError(self.source, "labels", f"need one label and one split per image ({n})")
        k = len(self.classes.names)
        if n and (labels.min() < 0 or labels.max() >= k):
            bad = int(np.flatnonzero((labels < 0) | (labels >= k))[0])
            raise DednInputError(
                self.source, "labels", f"class index must lie in [0, {k}), image {first + bad} has {int(labels[bad])}"
            )
        if n and (splits.min() < 0 or splits.max() >= len(SPLITS)):
            raise DednInputError(self.source, "split", f"split codes must lie in [0, {len(SPLITS)})")
        feats = np.ascontiguousarray(features, dtype=self.dtype).reshape(n, self._width)
        finite = np.isfinite(feats).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise DednInputError(
                self.source,
                "features",
                f"values must be finite, image {first + bad} holds NaN/inf (or overflows {self.dtype})",
            )
        ids = [f"{first + i}" for i in range(n)] if image_ids is None else [str(s) for s in image_ids]
        if len(ids) != n:
            raise DednInputError(self.source, "image_id", f"need one id per image ({n}), got {len(ids)}")
        np.add.at(self._counts, (splits.astype(np.int64), labels.astype(np.int64)), 1)
        self._hashes.update(feats, labels, splits, ids)
        split_names = np.asarray(SPLITS, dtype=object)[splits.astype(np.int64)]
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(ids, pa.string()),
                pa.array(labels.astype(np.int32)),
                pa.array(split_names, pa.string()),
                _fsl(feats, self._width, _ARROW_FLOAT[self.dtype]),
            ],
            schema=self._schema,
        )
        self._pending.append(batch)
        self._pending_rows += n
        self._num_images += n
        while self._pending_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, rows: int) -> None:
        assert self._writer is not None
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        head, rest = table.slice(0, rows), table.slice(rows)
        self._writer.write_table(head, row_group_size=max(rows, 1))
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows
        pa.default_memory_pool().release_unused()

    # -- finishing -------------------------------------------------------------------------------
    def close(self) -> StoreMeta:
        """Validate the whole store, write the small tables and meta.json, rename into place."""
        if self.meta is not None:
            return self.meta
        assert self._writer is not None
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()
        self._writer = None
        self._check_counts()
        self._write_small_tables()
        counts = {s: int(self._counts[i].sum()) for i, s in enumerate(SPLITS)}
        fingerprint = _fingerprint(self.shape, self.dtype, self.classes, self.attributes, self._hashes)
        meta = StoreMeta(
            name=self.name,
            channels=self.shape[0],
            height=self.shape[1],
            width=self.shape[2],
            dtype=self.dtype,
            num_images=self._num_images,
            num_classes=len(self.classes.names),
            num_attributes=int(self.classes.attributes.shape[1]),
            semantic_dim=int(self.attributes.vectors.shape[1]),
            split_counts=counts,
            presets={p: list(names) for p, (names, _) in self.attributes.presets.items()},
            provenance=self.provenance,
            fingerprint=fingerprint,
        )
        (self._tmp / META).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self._tmp, self.out)
        self.meta = meta
        return meta

    def _check_counts(self) -> None:
        per_class = self._counts.sum(axis=0)
        empty = np.flatnonzero(per_class == 0)
        if empty.size:
            k = int(empty[0])
            raise DednInputError(
                self.source,
                "classes",
                f"every class needs at least one image, class {k} ({self.classes.names[k]!r}) has none",
            )
        seen, val_unseen = self.classes.seen, self.classes.val_unseen
        rules = [
            ("train", ~seen | val_unseen, "train must hold seen, non-validation classes only"),
            ("val_seen", ~seen | val_unseen, "val_seen must hold seen, non-validation classes only"),
            ("val_unseen", ~val_unseen, "val_unseen must hold validation-unseen classes only"),
            ("test_seen", ~seen, "test_seen must hold seen classes only"),
            ("test_unseen", seen, "test_unseen must hold unseen classes only (unseen-class images never train)"),
        ]
        for split, forbidden, rule in rules:
            bad = np.flatnonzero(self._counts[SPLITS.index(split)] * forbidden)
            if bad.size:
                raise DednInputError(self.source, split, f"{rule}, found class {int(bad[0])}")
        if self._counts[SPLITS.index("train")].sum() == 0:
            raise DednInputError(self.source, "train", "the train split is empty")

    def _write_small_tables(self) -> None:
        c, a = self.classes, self.attributes
        d, g = c.attributes.shape[1], a.vectors.shape[1]
        classes = pa.table(
            {
                "name": pa.array(c.names, pa.string()),
                "seen": pa.array(c.seen),
                "val_unseen": pa.array(c.val_unseen),
                "attributes": _fsl(c.attributes.astype(np.float32), d, pa.float32()),
            }
        )
        cols: dict[str, pa.Array] = {
            "name": pa.array(a.names, pa.string()),
            "vector": _fsl(a.vectors.astype(np.float32), g, pa.float32()),
        }
        for preset, (_, ids) in a.presets.items():
            cols[f"cluster_{preset}"] = pa.array(ids.astype(np.int16))
        pq.write_table(classes, self._tmp / CLASSES)
        pq.write_table(pa.table(cols), self._tmp / ATTRIBUTES)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        else:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise


class _ImageHashes:
    """Streaming hashes of the image columns, so writing and verifying agree chunk by chunk."""

    def __init__(self) -> None:
        self.parts = [hashlib.sha256() for _ in range(4)]

    def update(self, feats: np.ndarray, labels: np.ndarray, splits: np.ndarray, ids: Sequence[str]) -> None:
        self.parts[0].update(np.ascontiguousarray(feats).tobytes())
        self.parts[1].update(np.asarray(labels).astype("<i4").tobytes())
        self.parts[2].update(np.asarray(splits).astype(np.int8).tobytes())
        _hash_strings(self.parts[3], ids)


def _fingerprint(
    shape: Sequence[int], dtype: str, classes: ClassTable, attributes: AttributeTable, images: _ImageHashes
) -> str:
    """Content hash of a store: shape, dtype, class and attribute tables, and the image columns."""
    digest = hashlib.sha256()
    digest.update(json.dumps([list(shape), dtype]).encode())
    digest.update(_table_digest(classes, attributes))
    for part in images.parts:
        digest.update(part.digest())
    return digest.hexdigest()[:32]


def _table_digest(classes: ClassTable, attributes: AttributeTable) -> bytes:
    h = hashlib.sha256()
    _hash_strings(h, classes.names)
    h.update(classes.seen.tobytes() + classes.val_unseen.tobytes())
    h.update(np.ascontiguousarray(classes.attributes, dtype="<f4").tobytes())
    _hash_strings(h, attributes.names)
    h.update(np.ascontiguousarray(attributes.vectors, dtype="<f4").tobytes())
    for preset in sorted(attributes.presets):
        names, ids = attributes.presets[preset]
        _hash_strings(h, [preset, *names])
        h.update(ids.astype("<i2").tobytes())
    return h.digest()


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
            or feat_type.value_type != _ARROW_FLOAT[m.dtype]
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
        hashes = _ImageHashes()
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
        found = _fingerprint(m.feature_shape, m.dtype, self.classes, self.attributes, hashes)
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
