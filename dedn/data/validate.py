"""Checking a feature store when it is opened, cheaply: meta.json's fields and their types, each table's
columns and Arrow types, and the dimensions and counts meta.json states against the tables.

Only Parquet schemas and footers and the small tables are read here, never the feature column. Every
failure is one DednInputError naming the file at fault and the field: a column missing or of the wrong
type names its Parquet file; a meta.json field that is missing, mistyped or disagrees with the tables
(a dimension, a row count, a split count) names meta.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from dedn.data.schema import (
    ARROW_FLOAT,
    ATTRIBUTES,
    CLASSES,
    FEATURE_DTYPES,
    FORMAT_VERSION,
    IMAGES,
    META_FIELDS,
    OPTIONAL_META_FIELDS,
    ColumnSpec,
    StoreMeta,
)
from dedn.data.splits import SPLITS
from dedn.errors import DednInputError


def read_meta(path: Path) -> StoreMeta:
    """Read and check meta.json on its own: JSON object, format version, every field present with its type,
    positive dimensions, a known dtype, split counts per known split, presets as lists of cluster names."""
    if not path.is_file():
        raise DednInputError(path, "file", "missing from the store")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DednInputError(path, "json", f"not valid JSON: {e}") from None
    except OSError as e:
        raise DednInputError(path, "file", f"cannot be read: {e}") from None
    if not isinstance(raw, dict):
        raise DednInputError(path, "meta", f"must be a JSON object, got {type(raw).__name__}")
    # The format version first: another version may lay out every other field differently.
    for key in ("format_version", *META_FIELDS):
        if key not in raw:
            if key in OPTIONAL_META_FIELDS:
                continue
            raise DednInputError(path, key, "missing (a required field)")
        ok, kind = META_FIELDS[key]
        if not ok(raw[key]):
            raise DednInputError(path, key, f"must be {kind}, got {json.dumps(raw[key])}")
        if key == "format_version" and raw[key] != FORMAT_VERSION:
            raise DednInputError(path, key, f"this version reads format {FORMAT_VERSION}, got {raw[key]}")
    unknown = sorted(set(raw) - set(META_FIELDS))
    if unknown:
        raise DednInputError(path, unknown[0], f"unknown field (known: {', '.join(sorted(META_FIELDS))})")
    for key in ("channels", "height", "width", "num_classes", "num_attributes", "semantic_dim"):
        if raw[key] < 1:
            raise DednInputError(path, key, f"must be >= 1, got {raw[key]}")
    if raw["num_images"] < 0:
        raise DednInputError(path, "num_images", f"must be >= 0, got {raw['num_images']}")
    if raw["dtype"] not in FEATURE_DTYPES:
        raise DednInputError(path, "dtype", f"must be one of {FEATURE_DTYPES}, got {raw['dtype']!r}")
    for split, count in raw["split_counts"].items():
        if split not in SPLITS:
            raise DednInputError(path, "split_counts", f"split names must be among {SPLITS}, got {split!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise DednInputError(path, "split_counts", f"{split}: must be an integer >= 0, got {json.dumps(count)}")
    for preset, names in raw["presets"].items():
        if not preset or not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise DednInputError(
                path, "presets", f"{preset!r}: must map a preset name to a non-empty list of cluster names"
            )
    return StoreMeta(**raw)


def check_columns(path: Path, schema: pa.Schema, columns: Sequence[ColumnSpec]) -> None:
    """Every expected column present once with its Arrow type (other columns are ignored)."""
    for name, ok, kind in columns:
        idx = schema.get_all_field_indices(name)
        if not idx:
            raise DednInputError(path, name, f"missing column (expected {kind})")
        if len(idx) > 1:
            raise DednInputError(path, name, "column appears more than once")
        t = schema.field(idx[0]).type
        if not ok(t):
            raise DednInputError(path, name, f"must be {kind}, got {t}")


def no_nulls(path: Path, name: str, col: pa.ChunkedArray) -> None:
    """Refuse missing (null) values in a small-table column, inside fixed-size lists too."""
    nulls = col.null_count
    if isinstance(col.type, pa.FixedSizeListType):
        nulls += sum(c.flatten().null_count for c in col.chunks)
    if nulls:
        raise DednInputError(path, name, f"must have no missing (null) values, found {nulls}")


def _list_size(schema: pa.Schema, name: str) -> int:
    t = schema.field(name).type
    assert isinstance(t, pa.FixedSizeListType)
    return int(t.list_size)


def check_dimensions(
    folder: Path,
    meta_path: Path,
    meta: StoreMeta,
    classes: pa.Table,
    attributes: pa.Table,
    images: pa.Schema,
    num_image_rows: int,
) -> None:
    """meta.json's dimensions and row counts against the tables (column types already checked).

    Where meta.json disagrees with a table, meta.json is named with the field; where the class attribute
    length and the attribute row count disagree with each other, the one meta.json does not back is named.
    """
    m = meta
    width = m.channels * m.height * m.width
    length = _list_size(images, "features")
    if length != width:
        dims = {"channels": m.channels, "height": m.height, "width": m.width}
        # a dimension that alone would make C*H*W equal the stored length (channels first: feature maps
        # of another backbone differ there); the rule spells out all three either way
        fits = [k for k, v in dims.items() if length % (width // v) == 0 and length // (width // v) not in (0, v)]
        field = fits[0] if fits else "channels*height*width"
        raise DednInputError(
            meta_path,
            field,
            f"channels*height*width = {m.channels}*{m.height}*{m.width} = {width} must equal the length of "
            f"each feature map in {IMAGES} ({length})",
        )
    value_type = images.field("features").type.value_type
    if value_type != ARROW_FLOAT[m.dtype]:
        stored = next(k for k, v in ARROW_FLOAT.items() if v == value_type)
        raise DednInputError(meta_path, "dtype", f"is {m.dtype!r}, but the features in {IMAGES} are {stored}")
    if num_image_rows != m.num_images:
        raise DednInputError(meta_path, "num_images", f"is {m.num_images}, but {IMAGES} has {num_image_rows} rows")
    if classes.num_rows != m.num_classes:
        raise DednInputError(meta_path, "num_classes", f"is {m.num_classes}, but {CLASSES} has {classes.num_rows} rows")
    d_classes, d_rows = _list_size(classes.schema, "attributes"), attributes.num_rows
    if d_classes != d_rows and m.num_attributes == d_rows:
        raise DednInputError(
            folder / CLASSES,
            "attributes",
            f"class attribute vectors have length {d_classes}, but {ATTRIBUTES} has {d_rows} rows "
            f"(num_attributes = {m.num_attributes} in meta.json)",
        )
    if d_classes != d_rows and m.num_attributes == d_classes:
        raise DednInputError(
            folder / ATTRIBUTES,
            "rows",
            f"has {d_rows} rows, but the class attribute vectors in {CLASSES} have length {d_classes} "
            f"(num_attributes = {m.num_attributes} in meta.json)",
        )
    if m.num_attributes != d_classes or m.num_attributes != d_rows:
        raise DednInputError(
            meta_path,
            "num_attributes",
            f"is {m.num_attributes}, but the class attribute vectors in {CLASSES} have length {d_classes} "
            f"and {ATTRIBUTES} has {d_rows} rows",
        )
    g = _list_size(attributes.schema, "vector")
    if g != m.semantic_dim:
        raise DednInputError(
            meta_path, "semantic_dim", f"is {m.semantic_dim}, but the vectors in {ATTRIBUTES} have length {g}"
        )


def check_split_counts(meta_path: Path, meta: StoreMeta, splits: np.ndarray) -> None:
    """meta.json's split_counts against the split codes read from images.parquet."""
    found = np.bincount(splits.astype(np.int64), minlength=len(SPLITS))
    for i, split in enumerate(SPLITS):
        stated = meta.split_counts.get(split, 0)
        if stated != int(found[i]):
            raise DednInputError(
                meta_path, "split_counts", f"{split} is {stated}, but {IMAGES} has {int(found[i])} {split} images"
            )


__all__ = ["check_columns", "check_dimensions", "check_split_counts", "no_nulls", "read_meta"]
