from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dedn.data import SPLITS, open_store
from dedn.data.store import StoreWriter
from dedn.errors import DednInputError

from .helpers import make_tables, valid_rows, write_store


def _feats(n: int, shape=(3, 2, 2), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_is_exact_and_streams_in_row_groups(tmp_path: Path, dtype: str) -> None:
    labels, splits = valid_rows()
    feats = _feats(len(labels))
    w = write_store(tmp_path / "s", feats, labels, splits, dtype=dtype)
    store = open_store(tmp_path / "s")
    got = store.features()
    assert got.dtype == np.dtype(dtype) and got.shape == feats.shape
    np.testing.assert_array_equal(got, feats.astype(dtype))
    np.testing.assert_array_equal(store.labels, labels)
    np.testing.assert_array_equal(store.splits, splits)
    assert not got.flags.writeable
    assert pq.ParquetFile(tmp_path / "s" / "images.parquet").num_row_groups == -(-len(labels) // 4)
    classes, attributes = make_tables()
    np.testing.assert_array_equal(store.classes.attributes, classes.attributes)
    np.testing.assert_array_equal(store.attributes.vectors, attributes.vectors)
    assert store.classes.names == classes.names
    np.testing.assert_array_equal(store.attributes.presets["manual"][1], attributes.presets["manual"][1])
    assert w.meta is not None and store.verify() == w.meta.fingerprint
    assert store.meta.split_counts == {s: int((splits == i).sum()) for i, s in enumerate(SPLITS)}
    # groups
    assert sorted(store.indices("trainval").tolist()) == sorted(np.flatnonzero(np.isin(splits, [0, 1, 2])).tolist())


def test_blocks_are_zero_copy_views_of_arrow_memory(tmp_path: Path) -> None:
    labels, splits = valid_rows()
    write_store(tmp_path / "s", _feats(len(labels)), labels, splits)
    blocks = list(open_store(tmp_path / "s").iter_feature_blocks())
    assert all(not b.flags.owndata and b.base is not None for b in blocks)


def test_fingerprint_tracks_content(tmp_path: Path) -> None:
    labels, splits = valid_rows()
    feats = _feats(len(labels))
    a = write_store(tmp_path / "a", feats, labels, splits).meta
    b = write_store(tmp_path / "b", feats, labels, splits).meta
    feats2 = feats.copy()
    feats2[5, 0, 0, 0] += 1.0
    c = write_store(tmp_path / "c", feats2, labels, splits).meta
    assert a is not None and b is not None and c is not None
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_tampered_store_fails_verification(tmp_path: Path) -> None:
    labels, splits = valid_rows()
    write_store(tmp_path / "s", _feats(len(labels)), labels, splits)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["fingerprint"] = "0" * 32
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DednInputError, match="fingerprint"):
        open_store(tmp_path / "s").verify()


def _expect_refused(tmp_path: Path, feats, labels, splits, match: str) -> None:
    out = tmp_path / "bad"
    with pytest.raises(DednInputError, match=match) as e:
        write_store(out, feats, labels, splits)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert not any(p.name.startswith(".bad.tmp") for p in tmp_path.iterdir()), "temporary folder left behind"


def test_bad_rows_are_refused_without_partial_output(tmp_path: Path) -> None:
    labels, splits = valid_rows()
    n = len(labels)
    f = _feats(n)
    nan = f.copy()
    nan[7, 1, 0, 1] = np.nan
    _expect_refused(tmp_path, nan, labels, splits, r"features: values must be finite, image 7")
    inf = f.copy()
    inf[2] = np.inf
    _expect_refused(tmp_path, inf, labels, splits, "finite")
    _expect_refused(tmp_path, f.astype(np.int32), labels, splits, "floating point")
    bad = labels.copy()
    bad[4] = 9
    _expect_refused(tmp_path, f, bad, splits, r"labels: class index must lie in \[0, 4\), image 4 has 9")
    # an unseen-class (3) image in train
    sp = splits.copy()
    sp[-1] = 0
    _expect_refused(tmp_path, f, labels, sp, "train must hold seen")
    # a val-unseen class (0) image in val_seen
    sp = splits.copy()
    sp[0] = 1
    _expect_refused(tmp_path, f, labels, sp, "val_seen must hold seen, non-validation")
    # a seen class in test_unseen
    sp = splits.copy()
    sp[2] = 4
    _expect_refused(tmp_path, f, labels, sp, "test_unseen must hold unseen classes only")
    # an empty class
    keep = labels != 2
    _expect_refused(tmp_path, f[keep], labels[keep], splits[keep], r"every class needs at least one image, class 2")
    # a feature-shape disagreement inside the stream
    classes, attributes = make_tables()
    writer = StoreWriter(tmp_path / "shape", name="x", classes=classes, attributes=attributes, shape=(3, 2, 2))
    with pytest.raises(DednInputError, match=r"\(N, C, H, W\) = \(N, 3, 2, 2\)"), writer as w:
        w.write(f[:3], labels[:3], splits[:3])
        w.write(_feats(3, (3, 1, 4)), labels[3:6], splits[3:6])
    assert not (tmp_path / "shape").exists()


def test_bad_tables_are_refused(tmp_path: Path) -> None:
    classes, attributes = make_tables()
    short = type(attributes)(attributes.names, attributes.vectors[:2], {})
    with pytest.raises(DednInputError, match=r"attribute vectors: must be \(D=3, G\)"):
        StoreWriter(tmp_path / "x", name="x", classes=classes, attributes=short, shape=(1, 1, 1))
    nan_att = type(classes)(classes.names, classes.seen, classes.val_unseen, classes.attributes * np.nan)
    with pytest.raises(DednInputError, match="finite"):
        StoreWriter(tmp_path / "x", name="x", classes=nan_att, attributes=attributes, shape=(1, 1, 1))
    with pytest.raises(DednInputError, match="dtype"):
        StoreWriter(tmp_path / "x", name="x", classes=classes, attributes=attributes, shape=(1, 1, 1), dtype="int8")
    assert not (tmp_path / "x").exists()


def test_truncated_or_missing_files_are_named(tmp_path: Path) -> None:
    labels, splits = valid_rows()
    write_store(tmp_path / "s", _feats(len(labels)), labels, splits)
    images = tmp_path / "s" / "images.parquet"
    data = images.read_bytes()
    images.write_bytes(data[: len(data) // 2])
    with pytest.raises(DednInputError, match=r"images.parquet: file: not a readable Parquet file \(truncated"):
        open_store(tmp_path / "s").features()
    (tmp_path / "s" / "classes.parquet").unlink()
    with pytest.raises(DednInputError, match=r"classes.parquet: file: missing"):
        open_store(tmp_path / "s")


def test_existing_output_is_not_replaced_unless_asked(tmp_path: Path) -> None:
    labels, splits = valid_rows()
    write_store(tmp_path / "s", _feats(len(labels)), labels, splits)
    with pytest.raises(DednInputError, match="already exists"):
        write_store(tmp_path / "s", _feats(len(labels)), labels, splits)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_store_gets_the_users_umask_permissions_not_the_temporary_folders(tmp_path: Path, umask: int) -> None:
    import os

    labels, splits = valid_rows()
    old = os.umask(umask)
    try:
        write_store(tmp_path / "s", np.zeros((labels.size, 2, 1, 1), np.float32), labels, splits)
    finally:
        os.umask(old)
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o777 & ~umask  # mkdtemp alone would give 0o700
