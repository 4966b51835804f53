"""What ``dedn predict`` reads and writes, besides the model: the picture list it takes, the check that a store fits a
model, and the predictions file (one row per image: ``image_id``, ``true_class``, ``class_index``, ``class_name``,
``score``, ``seen``; Parquet or CSV by the output's suffix, written to a temporary sibling and renamed)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from dedn.errors import DednInputError
from dedn.metrics import gzsl_metrics
from dedn.outputs import writing

__all__ = ["check_prediction_out", "check_store_matches", "read_picture_list", "write_predictions"]


def check_prediction_out(out: Path) -> None:
    if out.suffix not in (".parquet", ".csv"):
        raise DednInputError(out, "--out", "must end in .parquet or .csv")


def check_store_matches(meta: dict[str, Any], store: Any) -> None:
    """Refuse a store whose feature shape or attribute set differs from the model's (its ``checkpoint.json``)."""
    if list(store.meta.feature_shape) != list(meta["feature_shape"]):
        rule = f"shape {store.meta.feature_shape} does not match the model's {tuple(meta['feature_shape'])}"
        raise DednInputError(store.path, "features", rule)
    if store.attributes.names != meta["attribute_names"]:
        n = len(meta["attribute_names"])
        rule = f"attribute set ({store.meta.num_attributes}) does not match the model's ({n} attributes)"
        raise DednInputError(store.path, "attributes", rule)


def write_predictions(
    out: Path, image_ids: list[str], labels: np.ndarray, meta: dict[str, Any], index: np.ndarray, score: np.ndarray,
    figures: bool = True, label_names: list[str] | None = None,
) -> tuple[int, dict[str, float] | None]:  # fmt: skip
    """Write the predictions (``labels`` 0-based, -1 where unknown, named by ``label_names``, by default the model's
    class names; ``meta`` the model's ``checkpoint.json``); the number of rows and, with ``figures`` when every image
    is labelled, the GZSL U, S, H of the predictions."""
    import pandas as pd

    names, seen = list(meta["class_names"]), np.asarray(meta["seen"], dtype=bool)
    true = label_names if label_names is not None else names
    df = pd.DataFrame({
        "image_id": image_ids,
        "true_class": [true[k] if k >= 0 else None for k in labels],
        "class_index": index,
        "class_name": np.asarray(names, dtype=object)[index],
        "score": score,
        "seen": seen[index],
    })  # fmt: skip
    tmp = out.with_name(f".{out.name}.tmp")
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            (df.to_parquet if out.suffix == ".parquet" else df.to_csv)(tmp, index=False)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if not figures or not len(df) or (labels < 0).any():
        return len(df), None
    return len(df), gzsl_metrics(index, labels, np.flatnonzero(seen), np.flatnonzero(~seen))


def read_picture_list(path: Path, images: Path, class_names: list[str]) -> tuple[list[str], np.ndarray]:
    """(files as listed, 0-based labels or -1) of ``dedn predict --images``: the extraction's image lists (a CSV
    ``image_file,label`` or the xlsa17 ``res101.mat``), or a CSV with ``image_file`` alone; every file checked to be
    under ``images`` before any is read."""
    from dedn.data.extract import read_image_list

    if not path.is_file():
        raise DednInputError(path, "--image-list", "not found")
    if path.suffix.lower() == ".mat":
        files, labels = read_image_list(path, len(class_names))
    else:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if "image_file" not in header:
            raise DednInputError(path, "header", "must have a column image_file (and label, 1-based, optional)")
        if "label" in header:
            files, labels = read_image_list(path, len(class_names))
        else:
            with path.open(newline="") as f:
                files = [row["image_file"] for row in csv.DictReader(f)]
            labels = np.full(len(files), -1, dtype=np.int64)
    if not files:
        raise DednInputError(path, "image_file", "lists no picture")
    root = images.resolve()
    if not root.is_dir():
        raise DednInputError(images, "--images", "no such folder")
    for i, name in enumerate(files):
        if not (root / name).is_file():
            raise DednInputError(path, "image_file", f"row {i + 1} ({name}) is not a file under {root}")
    return files, labels
