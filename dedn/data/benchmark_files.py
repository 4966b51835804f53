"""Readers for the standard benchmark metadata files (xlsa17 split files and their companions).

``read_benchmark`` gathers, for one dataset folder laid out like ``../shared/data/zsl/CUB``:
class names, the class attribute matrix, the standard splits, per-image labels, validation classes,
attribute names and attribute semantic vectors. Everything returned is 0-based.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from dedn.data.safe_pickle import load_array_pickle
from dedn.errors import DednInputError

ATTRIBUTE_NAME_FILES = ("attributes.txt", "predicates.txt", "attributes.mat")


@dataclass
class SplitFile:
    """Contents of an ``att_splits.mat``: att (K, D) L2-normalised rows, original_att (K, D), locs 0-based."""

    path: Path
    class_names: list[str]
    att: np.ndarray
    original_att: np.ndarray
    locs: dict[str, np.ndarray]


@dataclass
class Benchmark:
    """A dataset's metadata; ``labels``/``image_files`` may be None when no image list is known."""

    name: str
    split_file: SplitFile
    labels: np.ndarray | None
    image_files: list[str] | None
    val_classes: list[int] | None
    attribute_names: list[str]
    attribute_vectors: np.ndarray | None
    sources: dict[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.split_file.class_names)

    @property
    def num_attributes(self) -> int:
        return int(self.split_file.att.shape[1])


def _loadmat(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DednInputError(path, "file", "not found")
    try:
        return scipy.io.loadmat(path, variable_names=names)
    except (ValueError, OSError, TypeError, NotImplementedError) as e:
        raise DednInputError(path, "file", f"not a readable MATLAB v5 file: {e}") from None


def _cell_strings(cell: np.ndarray) -> list[str]:
    return [str(np.asarray(c).reshape(-1)[0]) if np.asarray(c).size else "" for c in cell.reshape(-1)]


def read_split_file(path: str | os.PathLike[str]) -> SplitFile:
    """Read ``att_splits.mat``; raises DednInputError for a missing key or inconsistent shapes."""
    p = Path(path)
    m = _loadmat(p)
    for key in ("att", "allclasses_names", "trainval_loc", "test_seen_loc", "test_unseen_loc"):
        if key not in m:
            raise DednInputError(p, key, "missing key in the split file")
    att = np.asarray(m["att"], dtype=np.float64).T  # stored D x K
    names = _cell_strings(m["allclasses_names"])
    if att.shape[0] != len(names):
        raise DednInputError(
            p, "att", f"columns must match allclasses_names (K={len(names)}), got att of shape {att.T.shape}"
        )
    original = np.asarray(m["original_att"], dtype=np.float64).T if "original_att" in m else att.copy()
    if original.shape != att.shape:
        raise DednInputError(p, "original_att", f"must have the shape of att {att.T.shape}, got {original.T.shape}")
    locs = {}
    for split in ("trainval", "test_seen", "test_unseen"):
        raw = np.asarray(m[f"{split}_loc"]).reshape(-1).astype(np.int64)
        if raw.size and raw.min() < 1:
            raise DednInputError(p, f"{split}_loc", "indices are 1-based and must be >= 1")
        locs[split] = raw - 1
    return SplitFile(path=p, class_names=names, att=att, original_att=original, locs=locs)


def read_image_labels(path: str | os.PathLike[str], num_classes: int) -> tuple[list[str], np.ndarray]:
    """Read ``image_labels.csv`` (image_file, 1-based label) -> (files, 0-based labels)."""
    p = Path(path)
    if not p.is_file():
        raise DednInputError(p, "file", "not found")
    files: list[str] = []
    labels: list[int] = []
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image_file", "label"} <= set(reader.fieldnames):
            raise DednInputError(p, "header", "must have columns image_file,label")
        for i, row in enumerate(reader):
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise DednInputError(p, "label", f"must be an integer, row {i + 1} has {row['label']!r}") from None
            if not 1 <= label <= num_classes:
                raise DednInputError(
                    p, "label", f"1-based class index must lie in [1, {num_classes}], row {i + 1} has {label}"
                )
            files.append(row["image_file"])
            labels.append(label - 1)
    return files, np.asarray(labels, dtype=np.int64)


def read_class_list(path: str | os.PathLike[str], class_names: list[str]) -> list[int]:
    """Read a class-name list (one per line) into class indices; unknown names are refused."""
    p = Path(path)
    lookup = {n: i for i, n in enumerate(class_names)}
    out = []
    for line_no, line in enumerate(p.read_text().splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name not in lookup:
            raise DednInputError(p, "class name", f"must be one of allclasses_names, line {line_no} has {name!r}")
        out.append(lookup[name])
    return out


def read_attribute_names(path: str | os.PathLike[str]) -> list[str]:
    """Attribute names from ``attributes.txt`` / ``predicates.txt`` ("<index> <name>") or SUN's ``attributes.mat``."""
    p = Path(path)
    if p.suffix == ".mat":
        m = _loadmat(p)
        if "attributes" not in m:
            raise DednInputError(p, "attributes", "missing key in the attribute-name file")
        return _cell_strings(m["attributes"])
    if not p.is_file():
        raise DednInputError(p, "file", "not found")
    names = []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        names.append(parts[1].strip() if len(parts) == 2 and parts[0].isdigit() else line.strip())
    return names


def find_companion(folder: Path, candidates: tuple[str, ...] | list[str]) -> Path | None:
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    return None


def read_benchmark(
    folder: str | os.PathLike[str] | None = None,
    *,
    split_file: str | os.PathLike[str] | None = None,
    image_labels: str | os.PathLike[str] | None = None,
    val_classes: str | os.PathLike[str] | None = None,
    attribute_names: str | os.PathLike[str] | None = None,
    attribute_vectors: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> Benchmark:
    """Read a dataset's metadata; files not given explicitly are looked up in ``folder``.

    Companions found beside ``att_splits.mat``: ``image_labels.csv``, ``valclasses1.txt``,
    ``attributes.txt``/``predicates.txt``/``attributes.mat`` and ``*_attribute.pkl``.
    """
    base = Path(folder) if folder is not None else Path(split_file).parent if split_file else None
    if split_file is None:
        if base is None:
            raise DednInputError("<benchmark>", "att_splits.mat", "give a folder or the split file")
        split_file = base / "att_splits.mat"
    sf = read_split_file(split_file)
    folder_path = base or sf.path.parent
    ds_name = name or folder_path.name
    sources = {"att_splits": str(sf.path)}

    labels = files = None
    il = Path(image_labels) if image_labels else find_companion(folder_path, ("image_labels.csv",))
    if il is not None:
        files, labels = read_image_labels(il, len(sf.class_names))
        sources["image_labels"] = str(il)

    vc_path = Path(val_classes) if val_classes else find_companion(folder_path, ("valclasses1.txt",))
    vc = read_class_list(vc_path, sf.class_names) if vc_path is not None else None
    if vc_path is not None:
        sources["val_classes"] = str(vc_path)

    d = sf.att.shape[1]
    an_path = Path(attribute_names) if attribute_names else find_companion(folder_path, ATTRIBUTE_NAME_FILES)
    if an_path is not None:
        names = read_attribute_names(an_path)
        if len(names) != d:
            raise DednInputError(an_path, "attribute names", f"need D={d} names to match att, got {len(names)}")
        sources["attribute_names"] = str(an_path)
    else:
        names = [f"attribute_{i}" for i in range(d)]

    vec_path = Path(attribute_vectors) if attribute_vectors else None
    if vec_path is None:
        pkls = sorted(folder_path.glob("*_attribute.pkl"))
        vec_path = pkls[0] if pkls else None
    vectors = None
    if vec_path is not None:
        vectors = load_array_pickle(vec_path).astype(np.float64)
        if vectors.ndim != 2 or vectors.shape[0] != d:
            raise DednInputError(vec_path, "attribute vectors", f"must be (D={d}, G) to match att, got {vectors.shape}")
        sources["attribute_vectors"] = str(vec_path)
    return Benchmark(
        name=ds_name,
        split_file=sf,
        labels=labels,
        image_files=files,
        val_classes=vc,
        attribute_names=names,
        attribute_vectors=vectors,
        sources=sources,
    )


__all__ = [
    "ATTRIBUTE_NAME_FILES",
    "Benchmark",
    "SplitFile",
    "find_companion",
    "read_attribute_names",
    "read_benchmark",
    "read_class_list",
    "read_image_labels",
    "read_split_file",
]
