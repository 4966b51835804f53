"""Writing a feature store: ``StoreWriter`` streams images in and validates the whole at the end.

The layout written is described in ``dedn.data.schema``. Writers build the store in a temporary sibling
folder and rename it into place at the end, so a failure never leaves a half-written store.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
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
    IMAGES,
    META,
    AttributeTable,
    ClassTable,
    FiniteTally,
    StoreMeta,
    check_split_classes,
    table_stat,
)
from dedn.data.splits import SPLITS
from dedn.errors import DednInputError, DednOutputError
from dedn.outputs import STORAGE_ERRNOS, temp_sibling, writing

ROW_GROUP_BYTES = 8 << 20


def _fsl(values: np.ndarray, width: int, value_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


class StoreWriter:
    """Streams images into a new store; ``close()`` validates the whole and renames it into place.

    Use as a context manager: an exception inside the block removes the temporary folder; so does a
    refusal in ``close()``. Non-finite feature values (NaN/inf, or values overflowing the store dtype)
    are counted as chunks arrive and ``close()`` refuses the store with their count and the first image
    holding one; a store that closes records ``finite: true`` in meta.json.

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
        self._tmp = temp_sibling(self.out)
        self._schema = pa.schema(
            [
                ("image_id", pa.string()),
                ("label", pa.int32()),
                ("split", pa.string()),
                ("features", pa.list_(ARROW_FLOAT[dtype], self._width)),
            ]
        )
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self._tmp / IMAGES, self._schema, compression="none", write_statistics=["label", "split"]
        )
        self._hashes = ImageHashes()
        self._finite = FiniteTally()
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
        ids = [f"{first + i}" for i in range(n)] if image_ids is None else [str(s) for s in image_ids]
        if len(ids) != n:
            raise DednInputError(self.source, "image_id", f"need one id per image ({n}), got {len(ids)}")
        with np.errstate(over="ignore"):  # values beyond float16 become inf, counted just below
            feats = np.ascontiguousarray(features, dtype=self.dtype).reshape(n, self._width)
        self._finite.update(feats, first, ids)
        self._num_images += n
        if self._finite.values:
            return  # the store will be refused at close(); the count goes on, nothing more is written
        np.add.at(self._counts, (splits.astype(np.int64), labels.astype(np.int64)), 1)
        self._hashes.update(feats, labels, splits, ids)
        split_names = np.asarray(SPLITS, dtype=object)[splits.astype(np.int64)]
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(ids, pa.string()),
                pa.array(labels.astype(np.int32)),
                pa.array(split_names, pa.string()),
                _fsl(feats, self._width, ARROW_FLOAT[self.dtype]),
            ],
            schema=self._schema,
        )
        self._pending.append(batch)
        self._pending_rows += n
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
        """Validate the whole store, write the small tables and meta.json, rename into place.

        On a refusal (DednInputError) or any other failure the temporary folder is removed."""
        if self.meta is not None:
            return self.meta
        with writing(self.out):
            try:
                return self._finish()
            except BaseException:
                self.abort()
                raise

    def _finish(self) -> StoreMeta:
        assert self._writer is not None
        self._finite.check(self.source, f" (NaN/inf in the input, or values overflowing {self.dtype})")
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()
        self._writer = None
        check_split_classes(self._counts, self.classes, self.source)
        self._write_small_tables()
        counts = {s: int(self._counts[i].sum()) for i, s in enumerate(SPLITS)}
        fingerprint = content_fingerprint(self.shape, self.dtype, self.classes, self.attributes, self._hashes)
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
            finite=True,
            files={f: table_stat(self._tmp / f) for f in (CLASSES, ATTRIBUTES, IMAGES)},
        )
        (self._tmp / META).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self._tmp, self.out)
        self.meta = meta
        return meta

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
            if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
                raise DednOutputError(self.out, "--out", exc) from exc
        else:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise


__all__ = ["ROW_GROUP_BYTES", "StoreWriter"]
