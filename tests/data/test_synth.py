from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dedn.data import open_store
from dedn.data.benchmark_files import read_benchmark
from dedn.data.synth import TINY, BuiltinConfig, SynthConfig, builtin_structure, synth_builtin, synth_from_benchmark
from tests.helpers import zsl_dir


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    synth_builtin(tmp_path / "a")
    synth_builtin(tmp_path / "b")
    synth_builtin(tmp_path / "c", SynthConfig(channels=32, height=4, width=4, seed=1))
    names = ["images.parquet", "classes.parquet", "attributes.parquet"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", names, shallow=False)
    assert match == names and not mismatch and not errors
    a, b = (json.loads((tmp_path / x / "meta.json").read_text()) for x in "ab")
    # meta.json differs only in when each table was written (its size and mtime, to notice a later change)
    assert {k: v for k, v in a.items() if k != "files"} == {k: v for k, v in b.items() if k != "files"}
    assert [v[0] for v in a["files"].values()] == [v[0] for v in b["files"].values()]
    assert not filecmp.cmp(tmp_path / "a" / "images.parquet", tmp_path / "c" / "images.parquet", shallow=False)


def test_builtin_unseen_classes_never_train(tiny_store: Path) -> None:
    s = open_store(tiny_store)
    unseen = np.flatnonzero(~s.classes.seen)
    assert unseen.size == 5
    assert not np.isin(s.labels[s.indices("trainval")], unseen).any()
    assert set(s.labels[s.indices("test_unseen")]) == set(unseen)
    assert s.meta.feature_shape == (TINY.channels, TINY.height, TINY.width)


def _class_means(s, classes: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    f = s.features().astype(np.float64).reshape(s.num_images, -1)
    return np.stack([f[s.labels == k].mean(0) for k in classes])


def test_attributes_explain_the_images(tmp_path: Path) -> None:
    """A linear map fitted from seen classes' attribute strengths to their mean feature maps predicts
    unseen classes' mean maps; with a shuffled attribute matrix it does not."""
    b = BuiltinConfig(num_seen=40, num_unseen=10, images_per_class=40)
    synth_builtin(tmp_path / "s", TINY, b)
    s = open_store(tmp_path / "s")
    strengths = np.asarray(builtin_structure(b, TINY.seed)["strengths"])
    seen, unseen = np.flatnonzero(s.classes.seen), np.flatnonzero(~s.classes.seen)
    y_seen, y_unseen = _class_means(s, seen), _class_means(s, unseen)

    def unseen_fit(att: np.ndarray) -> float:
        w, *_ = np.linalg.lstsq(att[seen], y_seen, rcond=None)
        pred = att[unseen] @ w
        return float(np.corrcoef(pred.ravel(), y_unseen.ravel())[0, 1])

    real = unseen_fit(strengths)
    shuffled = unseen_fit(strengths[np.random.default_rng(0).permutation(len(strengths))])
    assert real > 0.75 and shuffled < real - 0.3, (real, shuffled)


def test_attribute_footprints_follow_their_cluster(tmp_path: Path) -> None:
    """With no noise, an attribute's energy sits around its cluster's centre: attributes of one cluster
    share far more spatial overlap than attributes of different clusters."""
    from dedn.data.synth import attribute_patterns

    ids = np.repeat(np.arange(4), 5)
    cfg = SynthConfig(channels=16, height=9, width=9)
    p = attribute_patterns(ids, cfg, np.random.default_rng(0)).reshape(20, 16, 81)
    energy = (p**2).sum(1)
    energy /= np.linalg.norm(energy, axis=1, keepdims=True)
    overlap = energy @ energy.T
    same = overlap[ids[:, None] == ids[None, :]].mean()
    other = overlap[ids[:, None] != ids[None, :]].mean()
    assert same > other + 0.2


@pytest.mark.parametrize("dataset", ["CUB", "SUN", "AWA2"])
def test_real_structure_is_kept(tmp_path: Path, dataset: str) -> None:
    folder = zsl_dir(dataset)
    cfg = SynthConfig(channels=4, height=2, width=2)
    meta = synth_from_benchmark(folder, tmp_path / "s", cfg)
    s = open_store(tmp_path / "s")
    bench = read_benchmark(folder)
    assert bench.labels is not None
    in_split = np.zeros(bench.labels.size, dtype=bool)
    for locs in bench.split_file.locs.values():
        in_split[locs] = True
    np.testing.assert_array_equal(s.labels, bench.labels[in_split])
    np.testing.assert_array_equal(
        np.bincount(s.labels, minlength=meta.num_classes),
        np.bincount(bench.labels[in_split], minlength=meta.num_classes),
    )
    assert s.meta.split_counts["test_unseen"] == bench.split_file.locs["test_unseen"].size
    assert s.indices("trainval").size == bench.split_file.locs["trainval"].size
    assert s.classes.names == bench.split_file.class_names
    assert s.attributes.names == bench.attribute_names
    assert not np.isin(s.labels[s.indices("trainval")], np.flatnonzero(~s.classes.seen)).any()
    assert meta.presets["manual"] and meta.provenance["config"]["channels"] == 4
    if dataset == "SUN":  # the released code's grouping is a preset of SUN stores: --set model.clusters=released
        from dedn.config import validate_config
        from dedn.partitions import resolve_partition

        cfg = validate_config({"data": {"store": str(tmp_path / "s")}, "model": {"clusters": "released"}}, "test")
        assert np.bincount(resolve_partition(cfg, s)).tolist() == [64, 27, 9, 2]
    else:
        assert "released" not in meta.presets


def test_synth_pictures_writes_a_folder_extract_takes_the_same_for_the_same_seed(tmp_path: Path) -> None:
    import subprocess

    from dedn.data.benchmark_files import read_image_labels
    from dedn.data.pictures import CLASSES, random_weights
    from dedn.trunk import load_trunk_weights
    from tests.helpers import cli_argv, refused

    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = subprocess.run(cli_argv("data", "synth", "--pictures", "--out", str(out), "--images-per-class", "3"),
                           capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"wrote {out} (18 pictures of 6 classes" in r.stdout
        outs.append(out)
    a, b = outs
    files, labels = read_image_labels(a / "image_labels.csv", len(CLASSES))
    assert len(files) == 18 and np.bincount(labels).tolist() == [3] * 6
    assert all((a / "images" / f).is_file() for f in files)
    for p in [*(Path("images") / f for f in files), Path("image_labels.csv")]:
        assert (a / p).read_bytes() == (b / p).read_bytes(), p  # same seed, same bytes
    import scipy.io

    mats = [scipy.io.loadmat(x / "att_splits.mat") for x in (a, b)]  # its header holds the time it was written
    keys = ("att", "trainval_loc", "test_seen_loc", "test_unseen_loc")
    assert all(np.array_equal(mats[0][k], mats[1][k]) for k in keys)
    weights = load_trunk_weights(a / "weights.safetensors")  # a ResNet-101 state_dict, loaded strictly
    want = random_weights(0)
    assert all(torch.equal(weights[k], want[k]) for k in weights)
    # an existing folder that is not a previous synth --pictures output is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    args = ["data", "synth", "--pictures", "--out", str(tmp_path / "mine"), "--overwrite"]
    refused(args, cwd=tmp_path, watch=[tmp_path], file=tmp_path / "mine", field="--out")
