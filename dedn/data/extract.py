"""From images to a feature store (``dedn data extract``), the parts without Ray: the plan (every input checked
before any image is read), the shards an extraction writes as it goes, and the store assembled from them.

An extraction works in ``<out>.extracting`` beside the store: ``plan.json`` (what it extracts, and how) and one
Parquet shard per ``shard_rows`` images, each written to a temporary name and renamed, so an interrupted extraction
resumes with the shards not yet written. The store is then written from the shards in order by ``StoreWriter`` (the
writer ``data convert`` uses) and the work folder removed."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedn import __version__
from dedn.data.benchmark_files import read_benchmark, read_image_labels
from dedn.data.convert import read_res101_lists, tables_for
from dedn.data.progress import Progress, no_progress
from dedn.data.schema import AttributeTable, ClassTable, StoreMeta
from dedn.data.writer import StoreWriter
from dedn.errors import DednInputError
from dedn.outputs import temp_sibling
from dedn.trunk import CHANNELS, load_trunk_weights, preprocessing, sha256_file

DATASET_FOLDERS = ("CUB_200_2011", "Animals_with_Attributes2")
"""An absolute path of the xlsa17 ``res101.mat`` keeps the part from its last component named one of these, else
from its last ``images`` component (SUN), as the released preprocessing does; relative paths (a CSV) are kept."""
PLAN = "plan.json"
SHARD_BYTES = 64 << 20  # features held per shard before it is written


def kept_path(name: str, source: Path) -> str:
    """The part of an image list entry resolved under ``--images`` (see DATASET_FOLDERS)."""
    if not name.startswith("/"):
        return name
    parts = name.split("/")
    for anchors in (DATASET_FOLDERS, ("images",)):
        at = [i for i, p in enumerate(parts) if p in anchors]
        if at:
            return "/".join(parts[at[-1] :])
    raise DednInputError(
        source, "image_files", f"absolute path {name!r} has no {'/'.join(DATASET_FOLDERS)} or images folder to keep"
    )


def read_image_list(path: Path, num_classes: int) -> tuple[list[str], np.ndarray]:
    """(image files as kept, 0-based labels) from the xlsa17 ``res101.mat`` (``image_files``, 1-based ``labels``) or a
    CSV ``image_file,label`` (1-based)."""
    if path.suffix.lower() != ".mat":
        return read_image_labels(path, num_classes)
    mat = read_res101_lists(path, ("image_files", "labels"))
    files = [str(np.asarray(x).reshape(-1)[0]) for x in mat["image_files"].reshape(-1)]
    labels = np.asarray(mat["labels"]).reshape(-1).astype(np.int64) - 1
    if labels.size != len(files):
        raise DednInputError(path, "labels", f"need one per image file ({len(files)}), got {labels.size}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        why = f"1-based class index must lie in [1, {num_classes}], image {bad} has {int(labels[bad]) + 1}"
        raise DednInputError(path, "labels", why)
    return [kept_path(f, path) for f in files], labels


def feature_side(size: int) -> int:
    """The side of the trunk's feature map for ``size`` x ``size`` images (five halvings, each rounding up)."""
    side = size
    for _ in range(5):
        side = (side - 1) // 2 + 1
    return side


@dataclass
class ExtractPlan:
    """What one extraction does: ``files`` (absolute) of the images kept (those in a split), in store order."""

    out: Path
    name: str
    files: list[Path]
    ids: list[str]
    labels: np.ndarray
    splits: np.ndarray
    classes: ClassTable
    attributes: AttributeTable
    size: int
    dtype: str
    weights: Path
    weights_sha256: str
    shard_rows: int
    sources: dict[str, str]
    seed: int
    val_fraction: float

    @property
    def shape(self) -> tuple[int, int, int]:
        side = feature_side(self.size)
        return (CHANNELS, side, side)

    @property
    def num_shards(self) -> int:
        return -(-len(self.files) // self.shard_rows)

    def shard_range(self, i: int) -> range:
        return range(i * self.shard_rows, min((i + 1) * self.shard_rows, len(self.files)))

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + ".extracting")

    def settings(self) -> dict[str, Any]:
        """What must not change between an extraction and its ``--resume`` (plan.json), and what meta.json keeps."""
        return {
            "trunk": "resnet101 (torchvision layout, avgpool and fc dropped)",
            "weights_sha256": self.weights_sha256,
            "size": self.size,
            "dtype": self.dtype,
            "preprocessing": preprocessing(self.size),
            "num_images": len(self.files),
            "shard_rows": self.shard_rows,
            "images": [str(f) for f in self.files],
        }


def plan_extraction(
    *,
    images: Path,
    image_list: Path,
    att_splits: Path,
    out: Path,
    weights: Path,
    size: int | None = None,
    dtype: str = "float16",
    name: str | None = None,
    val_classes: Path | None = None,
    attribute_names: Path | None = None,
    attribute_vectors: Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    shard_rows: int | None = None,
) -> ExtractPlan:
    """Check every input before any image is read: the split file and companions, the image list (its length and
    labels against the split file and a companion ``image_labels.csv``), that every image in a split exists under
    ``images``, and the weights (a ResNet-101 state_dict). One DednInputError naming the file, field and rule."""
    bench = read_benchmark(
        split_file=att_splits,
        val_classes=val_classes,
        attribute_names=attribute_names,
        attribute_vectors=attribute_vectors,
        name=name,
    )
    sf = bench.split_file
    files, labels = read_image_list(image_list, len(sf.class_names))
    known = [int(v.max()) + 1 for v in sf.locs.values() if v.size]
    if known and max(known) > len(files):
        why = f"{len(files)} images listed, but {sf.path.name} indexes image {max(known)} (1-based)"
        raise DednInputError(image_list, "image count", why)
    if bench.labels is not None and "image_labels" in bench.sources:
        other = Path(bench.sources["image_labels"])
        if other.resolve() != image_list.resolve() and not np.array_equal(bench.labels, labels):
            why = f"labels differ from {other} (beside {sf.path.name}): {len(files)} vs {bench.labels.size} images"
            if bench.labels.size == labels.size:
                first = int(np.flatnonzero(bench.labels != labels)[0])
                why = f"labels differ from {other} (beside {sf.path.name}) first at image {first + 1}"
            raise DednInputError(image_list, "labels", why)
    classes, attributes, splits = tables_for(bench, labels, str(image_list), seed, val_fraction)
    keep = np.flatnonzero(splits >= 0)
    root = images.resolve()
    if not root.is_dir():
        raise DednInputError(images, "--images", "no such folder")
    paths = [root / files[i] for i in keep]
    for i, p in zip(keep, paths, strict=True):
        if not p.is_file():
            raise DednInputError(
                image_list, "image_file", f"image {int(i) + 1} ({files[i]}) is not a file under {root}"
            )
    state = load_trunk_weights(weights)
    del state
    size = size or (224 if bench.name.upper().startswith("AWA") else 448)
    side = feature_side(size)
    row_bytes = CHANNELS * side * side * np.dtype(dtype).itemsize
    sources = {**bench.sources, "image_list": str(image_list), "images": str(root), "weights": str(weights)}
    return ExtractPlan(
        out=out,
        name=bench.name,
        files=paths,
        ids=[files[i] for i in keep],
        labels=labels[keep],
        splits=splits[keep],
        classes=classes,
        attributes=attributes,
        size=size,
        dtype=dtype,
        weights=Path(weights),
        weights_sha256=sha256_file(weights),
        shard_rows=shard_rows or max(1, SHARD_BYTES // row_bytes),
        sources=sources,
        seed=seed,
        val_fraction=val_fraction,
    )


def open_work(plan: ExtractPlan, resume: bool) -> list[int]:
    """Make the work folder (atomically, with plan.json), or with ``resume`` find it again with the same plan; the
    shards still to write."""
    work, settings = plan.work, plan.settings()
    if resume:
        if not (work / PLAN).is_file():
            raise DednInputError(work, "--resume", "no interrupted extraction here: start it without --resume")
        try:
            old = json.loads((work / PLAN).read_text())
        except (OSError, ValueError) as e:
            raise DednInputError(work / PLAN, "plan", f"not readable JSON ({e})") from None
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            raise DednInputError(work / PLAN, changed[0], "differs from this command's; resume with the same inputs")
        return [i for i in range(plan.num_shards) if not shard_path(work, i).is_file()]
    if work.exists():
        raise DednInputError(work, "--out", "an interrupted extraction is here: pass --resume to continue it")
    work.parent.mkdir(parents=True, exist_ok=True)  # --out data/cub with no data/ yet
    tmp = temp_sibling(work)
    (tmp / PLAN).write_text(json.dumps(settings) + "\n")
    os.replace(tmp, work)
    return list(range(plan.num_shards))


def shard_path(work: Path, i: int) -> Path:
    return work / f"shard-{i:06d}.parquet"


def write_shard(work: Path, i: int, features: np.ndarray, dtype: str) -> None:
    """Shard ``i``: its images' features (n, C*H*W) in ``dtype``, written whole or not at all."""
    flat = pa.array(np.ascontiguousarray(features, dtype=dtype).reshape(-1))
    table = pa.table({"features": pa.FixedSizeListArray.from_arrays(flat, features.shape[1])})
    dest = shard_path(work, i)
    tmp = dest.with_name(f".{dest.name}.tmp")
    pq.write_table(table, tmp, compression="none")
    os.replace(tmp, dest)


def _shards(plan: ExtractPlan) -> Iterator[tuple[int, np.ndarray]]:
    c, h, w = plan.shape
    for i in range(plan.num_shards):
        col = pq.read_table(shard_path(plan.work, i)).column("features").combine_chunks()
        yield plan.shard_range(i).start, col.values.to_numpy(zero_copy_only=False).reshape(-1, c, h, w)


def assemble(plan: ExtractPlan, progress: Progress = no_progress, overwrite: bool = False) -> StoreMeta:
    """The store from the shards, in order (memory: one shard), then the work folder removed."""
    settings = {k: v for k, v in plan.settings().items() if k not in ("images", "shard_rows")}
    provenance = {
        "converter": "extract",
        "inputs": plan.sources,
        "dedn_version": __version__,
        "seed": plan.seed,
        "val_fraction": plan.val_fraction,
        "extraction": settings,
    }
    with StoreWriter(
        plan.out,
        name=plan.name,
        classes=plan.classes,
        attributes=plan.attributes,
        shape=plan.shape,
        dtype=plan.dtype,
        provenance=provenance,
        overwrite=overwrite,
        source=str(plan.work),
    ) as writer:
        for start, feats in progress(_shards(plan), plan.num_shards, f"write {plan.out.name}"):
            rows = slice(start, start + feats.shape[0])
            writer.write(feats, plan.labels[rows], plan.splits[rows], plan.ids[rows])
    shutil.rmtree(plan.work)
    assert writer.meta is not None
    return writer.meta


def store_params(provenance: dict[str, Any]) -> dict[str, str]:
    """The MLflow params naming how an extracted store's features were made (empty for other stores)."""
    ex = provenance.get("extraction") or {}
    keys = ("trunk", "weights_sha256", "size", "dtype", "preprocessing")
    return {f"store.{k}": str(ex[k]) for k in keys if k in ex}


__all__ = [
    "DATASET_FOLDERS",
    "ExtractPlan",
    "assemble",
    "feature_side",
    "kept_path",
    "open_work",
    "plan_extraction",
    "read_image_list",
    "shard_path",
    "store_params",
    "write_shard",
]
