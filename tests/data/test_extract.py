"""``dedn data extract`` from PIL-drawn images in the xlsa17 layout: the store's features equal a reference applied
image by image (``tests.images``), with one and two Ray workers and after an interrupted run resumed; the store is one
that ``inspect --verify`` and ``train`` take; bad input is one line before any image is read."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from dedn.data import open_store
from tests.helpers import ROOT, child_runs, cli_argv, refused, write_spec
from tests.images import ImageSet, make_images, reference_features

SIZE = 64  # 2048 x 2 x 2 features: the trunk at 448 px would take seconds per image on these CPUs


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    return make_images(tmp_path_factory.mktemp("images"), per_class=40)  # 240 pictures


@pytest.fixture(scope="module")
def reference(images: ImageSet) -> dict[str, np.ndarray]:
    """The reference features of every listed image, by its listed name."""
    feats = reference_features(images, SIZE, images.files)
    return dict(zip(images.files, feats, strict=True))


def _args(images: ImageSet, out: Path, *extra: str) -> list[str]:
    return [
        "data", "extract", "--images", str(images.root), "--image-list", str(images.image_list),
        "--att-splits", str(images.att_splits), "--weights", str(images.weights), "--size", str(SIZE),
        "--out", str(out), *extra,
    ]  # fmt: skip


def _extract(images: ImageSet, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cwd = next(p for p in out.parents if p.is_dir())
    r = subprocess.run(cli_argv(*_args(images, out, *extra)), cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr[-3000:]
    return r


def _equal_to_reference(out: Path, reference: dict[str, np.ndarray], rtol: float, atol: float) -> None:
    s = open_store(out)
    assert s.verify() == s.meta.fingerprint  # every value finite, the fingerprint what the writer recorded
    ids = list(s.image_ids)
    assert sorted(ids) == sorted(reference)  # every image of the list is in a split here, each once
    want = np.stack([reference[i] for i in ids])
    np.testing.assert_allclose(s.features().astype(np.float32), want, rtol=rtol, atol=atol)


def test_one_worker_float32_equals_the_reference_and_the_store_is_like_any_other(
    images: ImageSet, reference: dict[str, np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "data" / "store"  # data/ does not exist yet
    r = _extract(images, out, "--dtype", "float32", "--workers", "1")
    assert f"wrote {out} (240 images, 2048x2x2 features" in r.stdout
    _equal_to_reference(out, reference, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["store"]  # the work folder is gone
    s = open_store(out)
    ex = s.meta.provenance["extraction"]
    import hashlib

    assert ex["weights_sha256"] == hashlib.sha256(images.weights.read_bytes()).hexdigest()
    assert (ex["size"], ex["dtype"]) == (SIZE, "float32") and "centre crop 64x64" in ex["preprocessing"]
    shown = subprocess.run(cli_argv("data", "inspect", str(out), "--verify"), capture_output=True, text=True)
    assert shown.returncode == 0 and "(verified)" in shown.stdout
    assert f"weights sha256 {ex['weights_sha256']}" in shown.stdout and f"{SIZE} px" in shown.stdout
    cfg = ROOT / "configs" / "tiny.yaml"
    sets = ["model.clusters=kmeans", "model.kmeans_q=3", "optim.epochs=2", "device=cpu"]
    train = ["train", "-c", str(cfg), "--store", str(out), "--out", str(tmp_path / "ckpt"), "--no-progress"]
    t = subprocess.run(cli_argv(*train, *[x for s in sets for x in ("--set", s)]), capture_output=True, text=True)
    assert t.returncode == 0 and "test once, configured inference" in t.stdout, t.stderr[-2000:]


@pytest.mark.slow
def test_two_workers_float16_equal_the_reference(
    images: ImageSet, reference: dict[str, np.ndarray], tmp_path: Path
) -> None:
    _extract(images, tmp_path / "store", "--dtype", "float16", "--workers", "2", "--batch-size", "8")
    _equal_to_reference(tmp_path / "store", reference, rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_an_interrupted_extraction_resumes_into_the_store_an_uninterrupted_one_writes(
    images: ImageSet, reference: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """SIGKILL to the extraction's process group once a few shards are written; --resume writes only the others
    and ends with the same store (same fingerprint) as an extraction never stopped."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = tmp_path / "a" / "store"
    _extract(images, whole, "--dtype", "float32", "--shard-size", "16")
    out = tmp_path / "b" / "store"
    work = out.with_name("store.extracting")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    argv = cli_argv(*_args(images, out, "--dtype", "float32", "--shard-size", "16", "--batch-size", "4"))
    proc = subprocess.Popen(argv, cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while len(list(work.glob("shard-*.parquet"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "the extraction ended before three shards"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = {p.name: p.stat().st_mtime_ns for p in work.glob("shard-*.parquet")}
    assert 3 <= len(written) < 15 and not out.exists()
    r = subprocess.run(cli_argv(*_args(images, out, "--dtype", "float32", "--shard-size", "16")), cwd=out.parent,
                       env=env, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "pass --resume to continue it" in r.stderr, r.stderr[-2000:]
    _extract(images, out, "--dtype", "float32", "--shard-size", "16", "--resume")
    assert not work.exists()
    assert open_store(out).meta.fingerprint == open_store(whole).meta.fingerprint
    _equal_to_reference(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_truncated_image_stops_the_extraction_in_one_line_naming_it(images: ImageSet, tmp_path: Path) -> None:
    import shutil

    copy = ImageSet(
        tmp_path / "images", images.image_list, images.att_splits, images.weights, images.files, images.labels
    )
    shutil.copytree(images.root, copy.root)
    bad = next(f for f in images.files if f.endswith(".jpg"))
    data = (copy.root / bad).read_bytes()
    (copy.root / bad).write_bytes(data[: len(data) // 2])
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "store"
    refused(_args(copy, out), cwd=tmp_path, watch=[], file=copy.root / bad, field="image", timeout=300)
    assert not out.exists()


def _with_rows(images: ImageSet, path: Path, change: dict[int, tuple[str, int]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_file", "label"])
        for i, (name, k) in enumerate(zip(images.files, images.labels, strict=True)):
            w.writerow(change.get(i, (name, int(k) + 1)))
    return path


def test_bad_input_is_one_line_before_any_image_is_read(
    images: ImageSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = [images.root.parent, tmp_path]
    out = tmp_path / "store"

    # a listed image that is not there
    missing = _with_rows(images, tmp_path / "missing.csv", {5: ("CUB_200_2011/images/none.jpg", 1)})
    args = _args(images, out)
    args[args.index("--image-list") + 1] = str(missing)
    line = refused(args, cwd=tmp_path, watch=watch, file=missing, field="image_file")
    assert "image 6 (CUB_200_2011/images/none.jpg) is not a file under" in line

    # an image list that disagrees with the labels beside the split file
    relabelled = _with_rows(images, tmp_path / "relabelled.csv", {7: (images.files[7], 3)})
    args[args.index("--image-list") + 1] = str(relabelled)
    line = refused(args, cwd=tmp_path, watch=watch, file=relabelled, field="labels")
    assert "first at image 8" in line

    # an image list shorter than the split file's indexes
    short = tmp_path / "short.csv"
    short.write_text("".join(relabelled.read_text().splitlines(keepends=True)[:100]))
    args[args.index("--image-list") + 1] = str(short)
    line = refused(args, cwd=tmp_path, watch=watch, file=short, field="image count")
    assert "99 images listed" in line

    # weights of another architecture, and no weights where torch keeps them
    import torch

    from dedn.trunk import ResNetTrunk

    torch.save(ResNetTrunk(layers=(3, 4, 6, 3)).state_dict(), tmp_path / "r50.pth")
    args = _args(images, out)
    args[args.index("--weights") + 1] = str(tmp_path / "r50.pth")
    refused(args, cwd=tmp_path, watch=watch, file=tmp_path / "r50.pth", field="weights")
    args = [a for a in _args(images, out) if a not in ("--weights", str(images.weights))]
    home = tmp_path / "torch-home"
    where = home / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    line = refused(args, cwd=tmp_path, watch=watch, file=where, field="weights", env={"TORCH_HOME": str(home)})
    assert "nothing is downloaded" in line and not home.exists()


@pytest.mark.slow
def test_every_run_of_a_search_on_an_extracted_store_says_how_its_features_were_made(
    images: ImageSet, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    _extract(images, store, "--dtype", "float32")
    spec = write_spec(tmp_path, store, epochs=2, body=_SPEC)
    base = tmp_path / "base.yaml"
    base.write_text(base.read_text().replace("clusters: manual", "clusters: kmeans\n  kmeans_q: 3"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["search", "-c", str(spec), "--name", "ex", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run(cli_argv(*args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ex = open_store(store).meta.provenance["extraction"]
    want = {f"store.{k}": str(ex[k]) for k in ("trunk", "weights_sha256", "size", "dtype", "preprocessing")}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("ex").experiment_id], "tags.`dedn.experiment` = 'ex'")
    children = child_runs(uri, "ex")
    assert len(parent) == 1 and len(children) == 2
    for run in [*parent, *children]:
        assert {k: run.data.params.get(k) for k in want} == want, run.info.run_name


_SPEC = """
num_samples: 2
max_concurrent_trials: 1
params:
  optim.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}
scheduler: {type: fifo}
"""


@pytest.mark.parametrize(
    "listed, kept",
    [
        ("/BS/Deep_Fragments/work/MSc/CUB_200_2011/images/001.a/x.jpg", "CUB_200_2011/images/001.a/x.jpg"),
        ("/BS/xian/work/data/Animals_with_Attributes2//JPEGImages/antelope/a.jpg",
         "Animals_with_Attributes2//JPEGImages/antelope/a.jpg"),
        ("/BS/Deep_Fragments/work/MSc/data/SUN/images/a/abbey/s.jpg", "images/a/abbey/s.jpg"),
        ("CUB_200_2011/images/001.a/x.jpg", "CUB_200_2011/images/001.a/x.jpg"),  # relative: as it is
    ],
)  # fmt: skip
def test_absolute_xlsa17_paths_keep_the_part_the_shared_image_lists_hold(listed: str, kept: str) -> None:
    from dedn.data.extract import kept_path

    assert kept_path(listed, Path("res101.mat")) == kept


def test_an_absolute_path_without_a_dataset_folder_is_one_line() -> None:
    from dedn.data.extract import kept_path
    from dedn.errors import DednInputError

    with pytest.raises(DednInputError) as e:
        kept_path("/data/pictures/x.jpg", Path("res101.mat"))
    assert str(e.value).startswith("res101.mat: image_files: absolute path '/data/pictures/x.jpg' has no")


def test_a_res101_mat_image_list_reads_as_its_csv(images: ImageSet, tmp_path: Path) -> None:
    """xlsa17's res101.mat (absolute image_files, 1-based labels as a column): the same files and labels as the CSV."""
    import scipy.io

    from dedn.data.extract import read_image_list

    cell = np.empty((len(images.files), 1), dtype=object)
    cell[:, 0] = [f"/BS/Deep_Fragments/work/MSc/{f}" for f in images.files]
    labels = (images.labels + 1).reshape(-1, 1).astype(np.float64)
    scipy.io.savemat(tmp_path / "res101.mat", {"image_files": cell, "labels": labels, "features": np.zeros((1, 1))})
    files, got = read_image_list(tmp_path / "res101.mat", 6)
    assert files == images.files
    np.testing.assert_array_equal(got, images.labels)


def test_an_out_inside_an_input_is_refused_before_any_image_is_read(images: ImageSet, tmp_path: Path) -> None:
    """The store may not be written inside the images folder, nor over the split file: one line, nothing changed."""
    watch = [images.root.parent]
    refused(_args(images, images.root / "store"), cwd=tmp_path, watch=watch, file=images.root / "store", field="--out")
    refused(_args(images, images.att_splits), cwd=tmp_path, watch=watch, file=images.att_splits, field="--out")
