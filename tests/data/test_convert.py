"""Converters on the real benchmark metadata with small feature files built in the same layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from dedn.data import SPLITS, open_store
from dedn.data.benchmark_files import read_attribute_names, read_image_labels, read_split_file
from dedn.data.convert import convert_hdf5, convert_xlsa17
from dedn.data.matv5 import MatrixStream
from dedn.data.safe_pickle import load_array_pickle
from dedn.errors import DednInputError
from tests.helpers import zsl_dir

ATTRIBUTE_NAME_FILE = {"CUB": "attributes.txt", "SUN": "attributes.mat", "AWA2": "predicates.txt"}
SIZES = {"CUB": (11788, 200, 312, 150), "SUN": (14340, 717, 102, 645), "AWA2": (37322, 50, 85, 40)}


def _res101(path: Path, labels0: np.ndarray, files: list[str], c: int, compress: bool, seed: int = 0) -> np.ndarray:
    feats = np.random.default_rng(seed).random((c, labels0.size))  # xlsa17: C x N float64
    cell = np.empty((len(files), 1), dtype=object)
    cell[:, 0] = files
    scipy.io.savemat(
        path,
        {"features": feats, "labels": (labels0 + 1).reshape(-1, 1).astype(np.float64), "image_files": cell},
        do_compression=compress,
    )
    return feats


@pytest.mark.parametrize(
    "dataset",
    ["CUB", *(pytest.param(d, marks=pytest.mark.slow) for d in ("SUN", "AWA2"))],  # CUB by default
)
def test_xlsa17_conversion_keeps_every_fact_of_the_real_files(tmp_path: Path, dataset: str) -> None:
    folder = zsl_dir(dataset)
    n, k, d, n_seen = SIZES[dataset]
    sf = read_split_file(folder / "att_splits.mat")
    files, labels = read_image_labels(folder / "image_labels.csv", k)
    feats = _res101(tmp_path / "res101.mat", labels, files, c=4, compress=dataset == "SUN")
    meta = convert_xlsa17(folder / "att_splits.mat", tmp_path / "res101.mat", tmp_path / "store", chunk_rows=5000)
    s = open_store(tmp_path / "store")
    assert (meta.num_images, meta.num_classes, meta.num_attributes, meta.semantic_dim) == (n, k, d, 300)
    assert meta.feature_shape == (4, 1, 1) and s.verify() == meta.fingerprint
    np.testing.assert_array_equal(s.labels, labels)
    np.testing.assert_array_equal(s.features()[:, :, 0, 0], feats.T.astype(np.float16))
    assert s.image_ids[:3] == files[:3]
    # standard splits are exactly the 1-based locs of att_splits.mat
    raw = scipy.io.loadmat(folder / "att_splits.mat")
    for name, group in (("trainval", "trainval"), ("test_seen", "test_seen"), ("test_unseen", "test_unseen")):
        np.testing.assert_array_equal(s.indices(group), np.sort(raw[f"{name}_loc"].ravel().astype(int) - 1))
    assert s.classes.names == sf.class_names
    assert int(s.classes.seen.sum()) == n_seen
    np.testing.assert_allclose(s.classes.attributes, raw["att"].T, rtol=1e-6, atol=1e-7)
    val_names = [x.strip() for x in (folder / "valclasses1.txt").read_text().split() if x.strip()]
    assert sorted(np.array(s.classes.names)[s.classes.val_unseen]) == sorted(val_names)
    assert s.attributes.names == read_attribute_names(folder / ATTRIBUTE_NAME_FILE[dataset])
    pkl = load_array_pickle(next(folder.glob("*_attribute.pkl")))
    np.testing.assert_allclose(s.attributes.vectors, pkl, rtol=1e-6)
    # SUN also carries the released code's grouping (dedn.partitions.RELEASED_TABLES)
    assert set(s.attributes.presets) == {"manual", "half"} | ({"released"} if dataset == "SUN" else set())
    # validation protocol: val-seen is a fifth of each remaining seen class's trainval images
    tv_counts = s.class_counts("trainval")
    vs = s.class_counts("val_seen")
    for c in np.flatnonzero(s.classes.seen & ~s.classes.val_unseen)[:20]:
        assert vs[c] == min(max(round(0.2 * tv_counts[c]), 1), tv_counts[c] - 1)


def test_matrix_stream_reads_compressed_and_plain_columns_in_chunks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for compress in (False, True):
        for dtype in (np.float64, np.float32):
            x = rng.standard_normal((6, 23)).astype(dtype)
            path = tmp_path / f"m{compress}{dtype.__name__}.mat"
            scipy.io.savemat(
                path, {"before": np.arange(5.0), "features": x, "after": np.ones((2, 2))}, do_compression=compress
            )
            ms = MatrixStream(path, "features")
            assert ms.shape == (6, 23)
            chunks = list(ms.iter_columns(5))
            assert [c.shape[1] for c in chunks] == [5, 5, 5, 5, 3]
            np.testing.assert_array_equal(np.concatenate(chunks, axis=1), x)
    with pytest.raises(DednInputError, match="features_x: missing variable"):
        MatrixStream(tmp_path / "mFalsefloat64.mat", "features_x")


def _hdf5(path: Path, folder: Path, per_class: int = 2, seed: int = 0, **override: object) -> dict[str, np.ndarray]:
    """A small feature-map file in the DAZLE/MSDN/DEDN layout: per_class images of every class."""
    sf = read_split_file(folder / "att_splits.mat")
    files, labels = read_image_labels(folder / "image_labels.csv", len(sf.class_names))
    std = np.full(labels.size, -1)
    for code, name in enumerate(("trainval", "test_seen", "test_unseen")):
        std[sf.locs[name]] = code
    rng = np.random.default_rng(seed)
    pick = []
    for k in range(len(sf.class_names)):
        rows = np.flatnonzero(labels == k)
        tv, ts, tu = rows[std[rows] == 0], rows[std[rows] == 1], rows[std[rows] == 2]
        pick += list(tv[:per_class]) + list(ts[:1]) + list(tu[:per_class])
    pick = np.sort(np.array(pick))
    data = {
        "feature_map": rng.random((pick.size, 6, 2, 2)).astype(np.float32),
        "labels": labels[pick],
        "trainval_loc": np.flatnonzero(std[pick] == 0),
        "test_seen_loc": np.flatnonzero(std[pick] == 1),
        "test_unseen_loc": np.flatnonzero(std[pick] == 2),
        "att": sf.att,
        "original_att": sf.original_att,
        "w2v_att": load_array_pickle(next(folder.glob("*_attribute.pkl"))),
    }
    data.update(override)  # type: ignore[arg-type]
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            if value is not None:
                f.create_dataset(key, data=value)
    return data


@pytest.mark.parametrize("dataset", ["CUB", "SUN", "AWA2"])
def test_hdf5_conversion_streams_feature_maps(tmp_path: Path, dataset: str) -> None:
    folder = zsl_dir(dataset)
    data = _hdf5(tmp_path / "fm.hdf5", folder)
    meta = convert_hdf5(
        tmp_path / "fm.hdf5",
        tmp_path / "store",
        name=dataset,
        att_splits=folder / "att_splits.mat",
        val_classes=folder / "valclasses1.txt",
        attribute_names=folder / ATTRIBUTE_NAME_FILE[dataset],
        dtype="float32",
        chunk_rows=7,
    )
    s = open_store(tmp_path / "store")
    assert meta.feature_shape == (6, 2, 2)
    np.testing.assert_array_equal(s.features(), data["feature_map"])
    np.testing.assert_array_equal(s.labels, data["labels"])
    np.testing.assert_array_equal(s.indices("test_unseen"), data["test_unseen_loc"])
    np.testing.assert_array_equal(s.indices("trainval"), data["trainval_loc"])
    np.testing.assert_allclose(s.attributes.vectors, data["w2v_att"], rtol=1e-6)
    assert s.attributes.presets["manual"][0][0] in {"head", "function", "texture"}


def test_hdf5_bad_inputs_fail_with_one_line_and_no_output(tmp_path: Path) -> None:
    folder = zsl_dir("AWA2")
    base = _hdf5(tmp_path / "ok.hdf5", folder)
    n = base["labels"].size
    nan = base["feature_map"].copy()
    nan[5, 0, 0, 0] = np.nan
    labels_oob = base["labels"].copy()
    labels_oob[3] = 50
    overlap = np.concatenate([base["test_seen_loc"], base["trainval_loc"][:1]])
    unseen_in_tv = np.concatenate([base["trainval_loc"], base["test_unseen_loc"][:1]])
    cases = {
        "missing_labels": ({"labels": None}, r"labels: missing key"),
        "nan": ({"feature_map": nan}, r"features: values must be finite, image 5"),
        "int_features": ({"feature_map": (base["feature_map"] * 10).astype(np.int32)}, "must be floating point"),
        "labels_oob": ({"labels": labels_oob}, r"labels: class index must lie in \[0, 50\), image 3 has 50"),
        "w2v_rows": ({"w2v_att": base["w2v_att"][:80]}, r"attribute vectors: must be \(D=85, G\)"),
        "overlap": ({"test_seen_loc": overlap}, "splits must not overlap"),
        "unseen_in_trainval": (
            {"trainval_loc": unseen_in_tv, "test_unseen_loc": base["test_unseen_loc"][1:]},
            "trainval: trainval must hold seen classes only",
        ),
        "fm_rank": ({"feature_map": base["feature_map"].reshape(n, 6, 4)}, "must be N x C x h x w"),
        "short_labels": ({"labels": base["labels"][:-1]}, "need one label per feature map"),
    }
    for name, (override, pattern) in cases.items():
        src = tmp_path / f"{name}.hdf5"
        _hdf5(src, folder, **override)
        out = tmp_path / f"out_{name}"
        with pytest.raises(DednInputError, match=pattern) as e:
            convert_hdf5(src, out, chunk_rows=4)
        assert "\n" not in str(e.value) and str(e.value).startswith(str(src))
        assert not out.exists(), name
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "temporary folders left behind"
    with pytest.raises(DednInputError, match="not found"):
        convert_hdf5(tmp_path / "absent.hdf5", tmp_path / "x")
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(DednInputError, match="not a readable HDF5 file"):
        convert_hdf5(tmp_path / "junk.hdf5", tmp_path / "x")


@pytest.mark.slow  # long: the slow tier
def test_xlsa17_shape_disagreements_are_refused(tmp_path: Path) -> None:
    folder = zsl_dir("AWA2")
    files, labels = read_image_labels(folder / "image_labels.csv", 50)
    _res101(tmp_path / "short.mat", labels[:-3], files[:-3], c=2, compress=False)
    with pytest.raises(DednInputError, match="splits must not overlap|indices must lie"):
        convert_xlsa17(folder / "att_splits.mat", tmp_path / "short.mat", tmp_path / "o1")
    (tmp_path / "names.txt").write_text("\n".join(["a"] * 80))
    _res101(tmp_path / "ok.mat", labels, files, c=2, compress=False)
    with pytest.raises(DednInputError, match=r"names.txt: attribute names: need D=85 names"):
        convert_xlsa17(
            folder / "att_splits.mat", tmp_path / "ok.mat", tmp_path / "o2", attribute_names=tmp_path / "names.txt"
        )
    with pytest.raises(DednInputError, match="res101.mat: file: not found"):
        convert_xlsa17(folder / "att_splits.mat", tmp_path / "res101.mat", tmp_path / "o3")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, ("touch PWNED",))


def test_restricted_unpickler_admits_arrays_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    arr = np.arange(12.0).reshape(3, 4)
    for proto in (2, 4, 5):
        (tmp_path / f"a{proto}.pkl").write_bytes(pickle.dumps(arr, protocol=proto))
        np.testing.assert_array_equal(load_array_pickle(tmp_path / f"a{proto}.pkl"), arr)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DednInputError, match=r"evil.pkl: pickle: only numpy arrays may be unpickled, refusing global"):
        load_array_pickle(tmp_path / "evil.pkl")
    assert not (tmp_path / "PWNED").exists()
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DednInputError, match="must hold a numpy array, got dict"):
        load_array_pickle(tmp_path / "dict.pkl")
    (tmp_path / "obj.pkl").write_bytes(pickle.dumps(np.array(["x", None], dtype=object)))
    with pytest.raises(DednInputError, match="numpy arrays|numeric"):
        load_array_pickle(tmp_path / "obj.pkl")
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps(arr)[:40])
    with pytest.raises(DednInputError, match="not a readable pickle"):
        load_array_pickle(tmp_path / "trunc.pkl")


@pytest.mark.parametrize("dataset", ["CUB", "SUN", "AWA2"])
def test_real_attribute_pickles_load_safely(dataset: str) -> None:
    folder = zsl_dir(dataset)
    v = load_array_pickle(next(folder.glob("*_attribute.pkl")))
    assert v.shape == (SIZES[dataset][2], 300) and np.isfinite(v).all()
    assert len(read_attribute_names(folder / ATTRIBUTE_NAME_FILE[dataset])) == SIZES[dataset][2]
    assert SPLITS[0] == "train"
