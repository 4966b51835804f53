"""Bad feature stores: each tampered copy of the tiny store is refused by ``dedn train`` (and ``dedn data
inspect``) with one line naming the file at fault and the field, exit status 2, and nothing created."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedn.build import check_compatible
from dedn.config import load_config
from dedn.data import open_store
from dedn.data.store import StoreWriter
from dedn.errors import DednInputError
from tests.data.helpers import make_tables, valid_rows, write_store
from tests.helpers import TINY_CONFIG, refused

IMAGES, CLASSES, ATTRIBUTES, META = "images.parquet", "classes.parquet", "attributes.parquet", "meta.json"


# --- tampering with a copy of the tiny store ------------------------------------------------------------


def _copy(tiny_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(tiny_store, copy)
    return copy


def _table(fn: Callable[[pa.Table], pa.Table], name: str) -> Callable[[Path], None]:
    def tamper(store: Path) -> None:
        path = store / name
        pq.write_table(fn(pq.read_table(path)), path)

    return tamper


def _meta(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def tamper(store: Path) -> None:
        meta = json.loads((store / META).read_text())
        fn(meta)
        (store / META).write_text(json.dumps(meta))

    return tamper


def _set(column: str, fn: Callable[[pa.Table, pa.ChunkedArray], pa.Array]) -> Callable[[pa.Table], pa.Table]:
    def change(t: pa.Table) -> pa.Table:
        return t.set_column(t.schema.get_field_index(column), column, fn(t, t.column(column)))

    return change


def _row_value(values: list, row: int, value: object) -> list:
    values = list(values)
    values[row] = value
    return values


def _first(t: pa.Table, split: str) -> int:
    return t.column("split").to_pylist().index(split)


def _unseen_into_train(store: Path) -> None:
    """An unseen class's test image moved into train, meta.json's split counts kept in step."""
    t = pq.read_table(store / IMAGES)
    splits = _row_value(t.column("split").to_pylist(), _first(t, "test_unseen"), "train")
    pq.write_table(
        t.set_column(t.schema.get_field_index("split"), "split", pa.array(splits, pa.string())), store / IMAGES
    )

    def counts(m: dict) -> None:
        m["split_counts"]["train"] += 1
        m["split_counts"]["test_unseen"] -= 1

    _meta(counts)(store)


def _del(key: str) -> Callable[[dict], None]:
    return lambda m: m.pop(key)


def _put(key: str, value: object) -> Callable[[dict], None]:
    return lambda m: m.__setitem__(key, value)


# name -> (tamper, file at fault, field named, a piece of the rule)
CASES: dict[str, tuple[Callable[[Path], None], str, str, str]] = {
    "images_column_dropped": (_table(lambda t: t.drop_columns(["label"]), IMAGES), IMAGES, "label", "missing column"),
    "images_label_int64": (
        _table(_set("label", lambda t, c: pa.array(c.to_numpy().astype(np.int64))), IMAGES),
        IMAGES,
        "label",
        "must be int32, got int64",
    ),
    "images_features_float64": (
        _table(
            _set(
                "features",
                lambda t, c: pa.FixedSizeListArray.from_arrays(
                    pa.array(c.combine_chunks().flatten().to_numpy().astype(np.float64)), 512
                ),
            ),
            IMAGES,
        ),
        IMAGES,
        "features",
        "must be fixed_size_list<float16 or float32>",
    ),
    "label_out_of_range": (
        _table(_set("label", lambda t, c: pa.array(_row_value(c.to_pylist(), 5, 20), pa.int32())), IMAGES),
        IMAGES,
        "label",
        "class index must lie in [0, 20), image 5 (id 'tiny_00005') has 20",
    ),
    "unknown_split_name": (
        _table(_set("split", lambda t, c: pa.array(_row_value(c.to_pylist(), 3, "training"), pa.string())), IMAGES),
        IMAGES,
        "split",
        "'training'",
    ),
    "unseen_image_in_train": (_unseen_into_train, IMAGES, "train", "train must hold seen"),
    "classes_column_dropped": (_table(lambda t: t.drop_columns(["seen"]), CLASSES), CLASSES, "seen", "missing column"),
    "classes_seen_as_int": (
        _table(_set("seen", lambda t, c: pa.array(c.to_numpy().astype(np.int8))), CLASSES),
        CLASSES,
        "seen",
        "must be bool, got int8",
    ),
    "preset_column_dropped": (
        _table(lambda t: t.drop_columns(["cluster_manual"]), ATTRIBUTES),
        ATTRIBUTES,
        "cluster_manual",
        "missing column (expected int16)",
    ),
    "attribute_row_dropped": (_table(lambda t: t.slice(0, 23), ATTRIBUTES), ATTRIBUTES, "rows", "has 23 rows"),
    "meta_channels": (_meta(_put("channels", 33)), META, "channels", "33*4*4 = 528 must equal"),
    "meta_channels_string": (_meta(_put("channels", "32")), META, "channels", 'must be an integer, got "32"'),
    "meta_height": (_meta(_put("height", 5)), META, "height", "32*5*4 = 640"),
    "meta_dtype": (_meta(_put("dtype", "float32")), META, "dtype", "features in images.parquet are float16"),
    "meta_num_attributes": (_meta(_put("num_attributes", 25)), META, "num_attributes", "is 25"),
    "meta_num_images": (_meta(_put("num_images", 601)), META, "num_images", "images.parquet has 600 rows"),
    "meta_num_classes": (_meta(_put("num_classes", 19)), META, "num_classes", "classes.parquet has 20 rows"),
    "meta_semantic_dim": (_meta(_put("semantic_dim", 300)), META, "semantic_dim", "have length 16"),
    "meta_split_counts": (
        _meta(lambda m: m["split_counts"].__setitem__("test_seen", 1)),
        META,
        "split_counts",
        "test_seen is 1",
    ),
    "meta_unknown_split": (
        _meta(lambda m: m["split_counts"].__setitem__("holdout", 0)),
        META,
        "split_counts",
        "'holdout'",
    ),
    "meta_field_missing": (_meta(_del("fingerprint")), META, "fingerprint", "missing"),
    "meta_unknown_field": (_meta(_put("colour", "red")), META, "colour", "unknown field"),
    "meta_format_version": (_meta(_put("format_version", 2)), META, "format_version", "reads format 1, got 2"),
    "meta_preset_not_a_list": (_meta(lambda m: m["presets"].__setitem__("manual", "group0")), META, "presets", ""),
}


# ``dedn data inspect`` opens stores the same way; one case per file through its command line is enough
INSPECTED = {
    "images_label_int64",
    "classes_column_dropped",
    "preset_column_dropped",
    "meta_channels",
    "label_out_of_range",
}


# One case per file runs in the default tier; the rest of the matrix (a fresh CLI process each) is slow.
@pytest.mark.parametrize(
    "case", [c if c in INSPECTED else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)]
)
def test_bad_store_is_refused_by_train_and_inspect(tiny_store: Path, tmp_path: Path, case: str) -> None:
    tamper, file, field, rule = CASES[case]
    copy = _copy(tiny_store, tmp_path)
    tamper(copy)
    watch = [copy, tmp_path]
    args = ["train", "-c", str(TINY_CONFIG), "--store", str(copy), "--out", str(tmp_path / "out")]
    line = refused(args, cwd=tmp_path, watch=watch, file=copy / file, field=field)
    assert rule in line, (line, rule)
    if case in INSPECTED:
        inspect = ["data", "inspect", str(copy)]
        assert refused(inspect, cwd=tmp_path, watch=watch, file=copy / file, field=field) == line
    with pytest.raises(DednInputError) as e:
        open_store(copy)
    assert (e.value.source, e.value.field) == (str(copy / file), field)


def _nan_in_a_test_image(store: Path) -> str:
    """NaN and inf in three values of the first test_unseen image; meta.json as a store written before the
    writer checked finiteness (no ``finite`` flag). Returns that image's id."""
    t = pq.read_table(store / IMAGES)
    row = _first(t, "test_unseen")
    feats = t.column("features").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1).copy()
    feats[row, [0, 7, 100]] = [np.nan, np.inf, np.nan]
    col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
    pq.write_table(t.set_column(t.schema.get_field_index("features"), "features", col), store / IMAGES)
    _meta(_del("finite"))(store)
    _meta(_del("files"))(store)
    return str(t.column("image_id")[row])


def test_nan_features_in_an_old_store_are_refused_before_training(tiny_store: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_store, tmp_path)
    image_id = _nan_in_a_test_image(copy)
    watch = [copy, tmp_path]
    args = ["train", "-c", str(TINY_CONFIG), "--store", str(copy), "--out", str(tmp_path / "out")]
    line = refused(args, cwd=tmp_path, watch=watch, file=copy / IMAGES, field="features")
    assert f"(id '{image_id}')" in line and "3 non-finite value(s) in 1 image(s)" in line, line
    verify = ["data", "inspect", "--verify", str(copy)]
    assert refused(verify, cwd=tmp_path, watch=watch, file=copy / IMAGES, field="features") == line


def test_the_finite_scan_runs_only_for_stores_without_the_flag(tiny_store: Path, tmp_path: Path) -> None:
    assert json.loads((tiny_store / META).read_text())["finite"] is True
    cfg = load_config(TINY_CONFIG, [f"data.store={tiny_store}"]).effective()
    check_compatible(cfg, open_store(tiny_store))
    old = _copy(tiny_store, tmp_path)
    _meta(_del("finite"))(old)  # a clean store written before the flag: one pass, accepted
    _meta(_del("files"))(old)
    store = open_store(old)
    assert store.meta.finite is False
    check_compatible(cfg, store)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_store, bad)
    image_id = _nan_in_a_test_image(bad)
    with pytest.raises(DednInputError, match=rf"features: values must be finite, .*'{image_id}'") as e:
        check_compatible(cfg, open_store(bad))
    assert e.value.source == str(bad / IMAGES)
    # the same pass over features already in memory (a store handed to a Ray worker)
    s = open_store(bad)
    view = type(s).from_parts(**s.parts(), features=s.features())
    with pytest.raises(DednInputError, match="3 non-finite value"):
        view.check_finite()


# --- the writer ------------------------------------------------------------------------------------------


def _tmp_folders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_writer_counts_non_finite_values_and_refuses_the_store(tmp_path: Path) -> None:
    labels, splits = valid_rows()
    feats = np.random.default_rng(0).standard_normal((len(labels), 3, 2, 2)).astype(np.float32)
    feats[4, 0, 0, 0] = np.nan
    feats[9, 2] = np.inf  # 4 values
    with pytest.raises(DednInputError) as e:
        write_store(tmp_path / "s", feats, labels, splits, chunk=3)
    msg = str(e.value)
    assert "\n" not in msg and e.value.field == "features"
    assert "image 4 (id '4')" in msg and "5 non-finite value(s) in 2 image(s)" in msg, msg
    assert not (tmp_path / "s").exists() and not _tmp_folders(tmp_path)
    # closed by hand rather than by a with block: the same refusal, the temporary folder removed too
    classes, attributes = make_tables()
    w = StoreWriter(tmp_path / "t", name="x", classes=classes, attributes=attributes, shape=(3, 2, 2))
    w.write(feats, labels, splits, [f"img{i}" for i in range(len(labels))])
    with pytest.raises(DednInputError, match=r"image 4 \(id 'img4'\)"):
        w.close()
    assert not (tmp_path / "t").exists() and not _tmp_folders(tmp_path)
    # float32 values beyond float16's range overflow to inf: refused the same way
    big = np.abs(feats.copy())
    big[~np.isfinite(big)] = 0
    big[2, 1, 1, 1] = 1e6
    with pytest.raises(DednInputError, match="overflowing float16"):
        write_store(tmp_path / "u", big, labels, splits, dtype="float16")
    assert not (tmp_path / "u").exists() and not _tmp_folders(tmp_path)


def test_a_written_store_records_finite(tmp_path: Path) -> None:
    labels, splits = valid_rows()
    feats = np.ones((len(labels), 1, 1, 2), np.float32)
    write_store(tmp_path / "s", feats, labels, splits)
    assert json.loads((tmp_path / "s" / META).read_text())["finite"] is True
    assert open_store(tmp_path / "s").meta.finite is True


# --- a store changed after it was written ----------------------------------------------------------------


def _plant(store: Path, split: str, value: float) -> str:
    """Set one feature value of the first image of ``split`` in place, meta.json left as the writer wrote it
    (``finite: true``, the tables' sizes and times). Returns that image's id."""
    t = pq.read_table(store / IMAGES)
    row = _first(t, split)
    feats = t.column("features").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1).copy()
    feats[row, 3] = value
    col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
    pq.write_table(t.set_column(t.schema.get_field_index("features"), "features", col), store / IMAGES)
    return str(t.column("image_id")[row])


@pytest.mark.parametrize(
    ("split", "value"), [("train", np.nan), ("test_unseen", np.inf)], ids=["nan-train", "inf-test"]
)
def test_a_store_changed_after_it_was_written_is_rescanned_before_anything_starts(
    tiny_store: Path, tmp_path: Path, split: str, value: float
) -> None:
    copy = _copy(tiny_store, tmp_path)
    image_id = _plant(copy, split, value)
    meta = json.loads((copy / META).read_text())
    assert meta["finite"] is True and set(meta["files"]) == {IMAGES, "classes.parquet", "attributes.parquet"}
    work = tmp_path / "work"
    work.mkdir()
    (work / "spec.yaml").write_text(
        f"base: {TINY_CONFIG}\nnum_samples: 1\nparams:\n  optim.lr: {{type: uniform, low: 1.0e-4, high: 1.0e-3}}\n"
    )
    search = ["search", "-c", str(work / "spec.yaml"), "--store", str(copy), "--storage-path", str(work / "runs")]
    train = ["train", "-c", str(TINY_CONFIG), "--store", str(copy), "--out", str(work / "out")]
    for args in (search, train):  # no run, trial, folder or checkpoint: the working folder stays empty
        line = refused(args, cwd=work, watch=[work, copy], file=copy / IMAGES, field="features")
        assert f"(id '{image_id}')" in line and "1 non-finite value(s) in 1 image(s)" in line, line


def test_a_finite_change_is_refused_by_the_fingerprint_and_a_copy_that_kept_its_times_is_not_rescanned(
    tiny_store: Path, tmp_path: Path
) -> None:
    copy = _copy(tiny_store, tmp_path)  # shutil.copytree keeps modification times
    assert not open_store(copy).changed_since_written()
    os.utime(copy / "classes.parquet")  # touched, content as written: rescanned once, accepted
    store = open_store(copy)
    assert store.changed_since_written() and store.verify() == store.meta.fingerprint
    changed = _copy(tiny_store, tmp_path / "changed")
    _plant(changed, "train", 1e-3)
    with pytest.raises(DednInputError, match="content does not match the recorded fingerprint") as e:
        open_store(changed)
    assert (e.value.source, e.value.field) == (str(changed / META), "fingerprint")
