"""The feature store's on-disk layout and the tables it holds: a folder of three Parquet files plus ``meta.json``.

Layout (see README, "Feature store schema"):

- ``images.parquet``: ``image_id`` (string), ``label`` (int32, 0-based class), ``split`` (string, one of
  ``SPLITS``), ``features`` (fixed-size list of float16|float32, C*H*W values, C-major), written
  uncompressed in row groups of about 8 MB so large stores stream.
- ``classes.parquet``: ``name``, ``seen`` (bool), ``val_unseen`` (bool), ``attributes`` (D float32).
- ``attributes.parquet``: ``name``, ``vector`` (G float32), one ``cluster_<preset>`` int16 column per
  preset.
- ``meta.json``: name, C, H, W, dtype, format version, counts, preset cluster names, provenance, the
  content fingerprint and ``finite`` (true when the writer saw every feature value finite; stores written
  before that check lack it and are scanned once before training).

``dedn.data.writer`` writes this layout, ``dedn.data.store`` reads it (``dedn.data.validate`` checks it on
open) and ``dedn.data.fingerprint`` hashes its content.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np
import pyarrow as pa

from dedn.data.splits import SPLITS
from dedn.errors import DednInputError

FORMAT_VERSION = 1
FEATURE_DTYPES = ("float16", "float32")
IMAGES, CLASSES, ATTRIBUTES, META = "images.parquet", "classes.parquet", "attributes.parquet", "meta.json"
# The Arrow value type of the ``features`` column for each feature dtype.
ARROW_FLOAT = {"float16": pa.float16(), "float32": pa.float32()}


# -- column layout: (column, Arrow type test, the type in words) ------------------------------------------
ColumnSpec = tuple[str, Callable[[pa.DataType], bool], str]


def _is_string(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _is_float_list(t: pa.DataType) -> bool:
    return isinstance(t, pa.FixedSizeListType) and t.value_type in ARROW_FLOAT.values()


def _is_float32_list(t: pa.DataType) -> bool:
    return isinstance(t, pa.FixedSizeListType) and t.value_type == pa.float32()


IMAGE_COLUMNS: tuple[ColumnSpec, ...] = (
    ("image_id", _is_string, "string"),
    ("label", lambda t: t == pa.int32(), "int32"),
    ("split", _is_string, "string"),
    ("features", _is_float_list, "fixed_size_list<float16 or float32>[C*H*W]"),
)
CLASS_COLUMNS: tuple[ColumnSpec, ...] = (
    ("name", _is_string, "string"),
    ("seen", pa.types.is_boolean, "bool"),
    ("val_unseen", pa.types.is_boolean, "bool"),
    ("attributes", _is_float32_list, "fixed_size_list<float32>[D]"),
)


def attribute_columns(presets: Sequence[str]) -> tuple[ColumnSpec, ...]:
    """The columns of attributes.parquet for a store whose meta.json names ``presets``."""
    return (
        ("name", _is_string, "string"),
        ("vector", _is_float32_list, "fixed_size_list<float32>[G]"),
        *((f"cluster_{p}", lambda t: t == pa.int16(), "int16") for p in presets),
    )


# -- meta.json: field -> (JSON type test, the type in words); ``finite`` is optional --------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


META_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "channels": (_is_int, "an integer"),
    "height": (_is_int, "an integer"),
    "width": (_is_int, "an integer"),
    "dtype": (lambda v: isinstance(v, str), "a string"),
    "num_images": (_is_int, "an integer"),
    "num_classes": (_is_int, "an integer"),
    "num_attributes": (_is_int, "an integer"),
    "semantic_dim": (_is_int, "an integer"),
    "split_counts": (lambda v: isinstance(v, dict), "an object"),
    "presets": (lambda v: isinstance(v, dict), "an object"),
    "provenance": (lambda v: isinstance(v, dict), "an object"),
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
    "format_version": (_is_int, "an integer"),
    "finite": (lambda v: isinstance(v, bool), "true or false"),
    "files": (
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(s, list) and len(s) == 2 and all(map(_is_int, s)) for s in v.values())
        ),
        "an object of file name -> [size, mtime_ns]",
    ),
}
OPTIONAL_META_FIELDS = frozenset({"finite", "files"})


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
    # True when the writer checked every feature value finite; False for stores written before it did.
    finite: bool = False
    # Each table's [size, mtime_ns] as written: a store whose tables changed since is verified in full when opened.
    files: dict[str, list[int]] = field(default_factory=dict)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def feature_bytes(self) -> int:
        return self.num_images * self.channels * self.height * self.width * np.dtype(self.dtype).itemsize


def table_stat(path: str | PathLike[str]) -> list[int]:
    """[size, mtime_ns] of a store's table: what ``StoreMeta.files`` records and an open compares."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def split_class_counts(labels: np.ndarray, splits: np.ndarray, num_classes: int) -> np.ndarray:
    """(len(SPLITS), K) number of images of each class in each split; labels and split codes in range."""
    flat = splits.astype(np.int64) * num_classes + labels.astype(np.int64)
    return np.bincount(flat, minlength=len(SPLITS) * num_classes).reshape(len(SPLITS), num_classes)


def check_split_classes(counts: np.ndarray, classes: ClassTable, source: str) -> None:
    """Refuse a store whose splits break the GZSL protocol: a class without images, an unseen class's
    image outside test_unseen, a validation-unseen class outside val_unseen/test_seen, an empty train split.
    ``counts`` is (len(SPLITS), K) as from ``split_class_counts``."""
    per_class = counts.sum(axis=0)
    empty = np.flatnonzero(per_class == 0)
    if empty.size:
        k = int(empty[0])
        raise DednInputError(
            source, "classes", f"every class needs at least one image, class {k} ({classes.names[k]!r}) has none"
        )
    seen, val_unseen = classes.seen, classes.val_unseen
    rules = [
        ("train", ~seen | val_unseen, "train must hold seen, non-validation classes only"),
        ("val_seen", ~seen | val_unseen, "val_seen must hold seen, non-validation classes only"),
        ("val_unseen", ~val_unseen, "val_unseen must hold validation-unseen classes only"),
        ("test_seen", ~seen, "test_seen must hold seen classes only"),
        ("test_unseen", seen, "test_unseen must hold unseen classes only (unseen-class images never train)"),
    ]
    for split, forbidden, rule in rules:
        bad = np.flatnonzero(counts[SPLITS.index(split)] * forbidden)
        if bad.size:
            raise DednInputError(source, split, f"{rule}, found class {int(bad[0])}")
    if counts[SPLITS.index("train")].sum() == 0:
        raise DednInputError(source, "train", "the train split is empty")


class FiniteTally:
    """Counts non-finite feature values block by block and remembers the first image holding one, so a
    writer or a streaming pass over a store reports them all in one line."""

    def __init__(self) -> None:
        self.values = 0
        self.images = 0
        self.first_row: int | None = None
        self.first_id: str | None = None

    def update(self, block: np.ndarray, first_row: int, ids: Sequence[str]) -> None:
        """block (rows, C*H*W) of images first_row, first_row+1, ...; ids their image ids."""
        bad = ~np.isfinite(block)
        if not bad.any():
            return
        rows = bad.any(axis=1)
        self.values += int(np.count_nonzero(bad))
        self.images += int(np.count_nonzero(rows))
        if self.first_row is None:
            i = int(np.flatnonzero(rows)[0])
            self.first_row, self.first_id = first_row + i, str(ids[i])

    def check(self, source: str | PathLike[str], hint: str = "") -> None:
        """Raise one DednInputError (field ``features``) when a non-finite value was seen."""
        if self.values:
            raise DednInputError(
                source,
                "features",
                f"values must be finite, image {self.first_row} (id {self.first_id!r}) holds NaN/inf: "
                f"{self.values} non-finite value(s) in {self.images} image(s){hint}",
            )


__all__ = [
    "ARROW_FLOAT",
    "CLASS_COLUMNS",
    "IMAGE_COLUMNS",
    "META_FIELDS",
    "OPTIONAL_META_FIELDS",
    "table_stat",
    "ColumnSpec",
    "FiniteTally",
    "attribute_columns",
    "check_split_classes",
    "split_class_counts",
    "ATTRIBUTES",
    "CLASSES",
    "FEATURE_DTYPES",
    "FORMAT_VERSION",
    "IMAGES",
    "META",
    "AttributeTable",
    "ClassTable",
    "StoreMeta",
]
