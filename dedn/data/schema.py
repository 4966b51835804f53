"""The feature store's on-disk layout and the tables it holds: a folder of three Parquet files plus ``meta.json``.

Layout (see README, "Feature store schema"):

- ``images.parquet``: ``image_id`` (string), ``label`` (int32, 0-based class), ``split`` (string, one of
  ``SPLITS``), ``features`` (fixed-size list of float16|float32, C*H*W values, C-major), written
  uncompressed in row groups of about 8 MB so large stores stream.
- ``classes.parquet``: ``name``, ``seen`` (bool), ``val_unseen`` (bool), ``attributes`` (D float32).
- ``attributes.parquet``: ``name``, ``vector`` (G float32), one ``cluster_<preset>`` int16 column per
  preset.
- ``meta.json``: name, C, H, W, dtype, format version, counts, preset cluster names, provenance and the
  content fingerprint.

``dedn.data.writer`` writes this layout, ``dedn.data.store`` reads it and ``dedn.data.fingerprint``
hashes its content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dedn.errors import DednInputError

FORMAT_VERSION = 1
FEATURE_DTYPES = ("float16", "float32")
IMAGES, CLASSES, ATTRIBUTES, META = "images.parquet", "classes.parquet", "attributes.parquet", "meta.json"
# The Arrow value type of the ``features`` column for each feature dtype.
ARROW_FLOAT = {"float16": pa.float16(), "float32": pa.float32()}


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


__all__ = [
    "ARROW_FLOAT",
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
