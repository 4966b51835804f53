"""Outputs never destroy inputs: every ``--out`` (train, predict, data synth/convert) and ``search --name`` is
checked before any work, through the real CLI in a fresh process. A refusal is one line, exit status 2,
nothing written; a previous output of the same command is replaced only with --overwrite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dedn.outputs import MARKER
from tests.helpers import TINY_CONFIG, cli_argv, refused, write_spec

TRAIN = ["train", "-c", str(TINY_CONFIG), "--set", "device=cpu", "--no-progress"]
FAST = ["--set", "optim.epochs=1"]


@pytest.fixture
def store(tmp_path: Path, tiny_store: Path) -> Path:
    """A private copy of the tiny store, the input whose destruction the tests look for."""
    dst = tmp_path / "data" / "tiny"
    shutil.copytree(tiny_store, dst)
    return dst


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """An empty working folder for the command (never an ancestor of the inputs)."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def _ok(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cli_argv(*args), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


# --- dedn train --out -------------------------------------------------------------------------------------


def test_train_out_is_the_store(store: Path, work: Path) -> None:
    line = refused(
        [*TRAIN, "--store", str(store), "--out", str(store), "--overwrite"],
        cwd=work,
        watch=[store],
        file=store,
        field="--out",
    )
    assert "input" in line


def test_train_out_inside_the_store(store: Path, work: Path) -> None:
    out = store / "ckpt"
    refused([*TRAIN, "--store", str(store), "--out", str(out)], cwd=work, watch=[store], file=out, field="--out")


def test_train_out_is_the_config(tmp_path: Path, store: Path, work: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    shutil.copy(TINY_CONFIG, cfg)
    args = ["train", "-c", str(cfg), "--store", str(store), "--out", str(cfg), "--overwrite"]
    refused(args, cwd=work, watch=[tmp_path], file=cfg, field="--out")


def test_train_out_is_the_working_folder(tmp_path: Path, store: Path) -> None:
    """From a project folder, ``--out .`` would have removed the folder's files."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine\n")
    refused([*TRAIN, "--store", str(store), "--out", "."], cwd=project, watch=[project, store], file=".", field="--out")


def test_train_out_is_an_ancestor_of_the_working_folder(tmp_path: Path, store: Path, work: Path) -> None:
    inner = work / "a" / "b"
    inner.mkdir(parents=True)
    line = refused(
        [*TRAIN, "--store", str(store), "--out", str(work)], cwd=inner, watch=[work, store], file=work, field="--out"
    )
    assert "current folder" in line


def test_train_out_is_an_ancestor_of_the_store(store: Path, work: Path) -> None:
    data = store.parent
    line = refused(
        [*TRAIN, "--store", str(store), "--out", str(data), "--overwrite"],
        cwd=work,
        watch=[data],
        file=data,
        field="--out",
    )
    assert "contains an input" in line


def test_train_out_existing_foreign_folder_even_with_overwrite(tmp_path: Path, store: Path, work: Path) -> None:
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "paper.tex").write_text("\\documentclass{article}\n")
    line = refused(
        [*TRAIN, "--store", str(store), "--out", str(mine), "--overwrite"],
        cwd=work,
        watch=[mine, store],
        file=mine,
        field="--out",
    )
    assert MARKER in line


def test_train_out_existing_folder_without_overwrite(tmp_path: Path, store: Path, work: Path) -> None:
    prev = tmp_path / "ckpt"
    prev.mkdir()
    (prev / "model.safetensors").write_bytes(b"x")
    (prev / MARKER).write_text(json.dumps({"command": "dedn train", "files": ["model.safetensors"]}))
    line = refused(
        [*TRAIN, "--store", str(store), "--out", str(prev)], cwd=work, watch=[prev], file=prev, field="--out"
    )
    assert "already exists" in line and "--overwrite" in line


def test_train_out_previous_output_holding_a_foreign_file(tmp_path: Path, store: Path, work: Path) -> None:
    prev = tmp_path / "ckpt"
    prev.mkdir()
    (prev / "model.safetensors").write_bytes(b"x")
    (prev / "my-notes.txt").write_text("not dedn's\n")
    (prev / MARKER).write_text(json.dumps({"command": "dedn train", "files": ["model.safetensors"]}))
    line = refused(
        [*TRAIN, "--store", str(store), "--out", str(prev), "--overwrite"],
        cwd=work,
        watch=[prev],
        file=prev,
        field="--out",
    )
    assert "my-notes.txt" in line


def test_train_out_under_a_file(tmp_path: Path, store: Path, work: Path) -> None:
    (tmp_path / "plain").write_text("a file\n")
    out = tmp_path / "plain" / "ckpt"
    line = refused(
        [*TRAIN, "--store", str(store), "--out", str(out)], cwd=work, watch=[tmp_path], file=out, field="--out"
    )
    assert "not a folder" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_out_in_a_read_only_folder(tmp_path: Path, store: Path, work: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = refused(
            [*TRAIN, "--store", str(store), "--out", str(ro / "ckpt")],
            cwd=work,
            watch=[ro],
            file=ro / "ckpt",
            field="--out",
        )
        assert "not writable" in line
    finally:
        ro.chmod(0o755)


@pytest.mark.slow  # a full scenario (search, server or compile): the slow tier
def test_train_twice_with_overwrite_replaces_its_own_output(store: Path, work: Path) -> None:
    out = work / "ckpt"
    _ok([*TRAIN, *FAST, "--store", str(store), "--out", str(out)], work)
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "dedn train" and "model.safetensors" in marker["files"]
    (out / "model.safetensors").write_bytes(b"stale")  # a file the second run must replace
    _ok([*TRAIN, *FAST, "--store", str(store), "--out", str(out), "--overwrite"], work)
    assert (out / "model.safetensors").read_bytes() != b"stale"
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *marker["files"]])
    assert not [p for p in work.iterdir() if p.name.startswith(".")], "temporary folders left behind"


# --- dedn predict --out (refused before the model is loaded: any --model will do) ---------------------------


def _predict(store: Path, out: Path | str, tmp_path: Path, *extra: str) -> list[str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return [
        "predict",
        "--model",
        "models:/absent@champion",
        "--data",
        str(store),
        "--out",
        str(out),
        "--tracking-uri",
        uri,
        *extra,
    ]


def test_predict_out_is_the_store_image_table(tmp_path: Path, store: Path, work: Path) -> None:
    out = store / "images.parquet"
    refused(_predict(store, out, tmp_path, "--overwrite"), cwd=work, watch=[store], file=out, field="--out")


def test_predict_out_inside_the_store(tmp_path: Path, store: Path, work: Path) -> None:
    out = store / "preds.csv"
    refused(_predict(store, out, tmp_path), cwd=work, watch=[store], file=out, field="--out")


def test_predict_out_is_the_tracking_store(tmp_path: Path, store: Path, work: Path) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"SQLite format 3\x00")
    refused(_predict(store, db, tmp_path, "--overwrite"), cwd=work, watch=[tmp_path], file=db, field="--out")


def test_predict_out_existing_file_without_overwrite(tmp_path: Path, store: Path, work: Path) -> None:
    out = work / "preds.csv"
    out.write_text("image_id\n")
    line = refused(_predict(store, out, tmp_path), cwd=work, watch=[work], file=out, field="--out")
    assert "--overwrite" in line


# --- dedn data synth / convert --out --------------------------------------------------------------------------


def test_synth_out_existing_non_store_folder_with_overwrite(tmp_path: Path, work: Path) -> None:
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"\xff\xd8")
    line = refused(
        ["data", "synth", "--builtin", "--out", str(mine), "--overwrite"],
        cwd=work,
        watch=[mine],
        file=mine,
        field="--out",
    )
    assert "meta.json" in line


def test_synth_out_is_the_working_folder(tmp_path: Path, store: Path) -> None:
    """Even a working folder that is itself a dedn store is not replaced."""
    refused(
        ["data", "synth", "--builtin", "--out", ".", "--overwrite"], cwd=store, watch=[store], file=".", field="--out"
    )


def test_synth_out_is_the_source_folder(store: Path, work: Path) -> None:
    line = refused(
        ["data", "synth", "--from", str(store), "--out", str(store), "--overwrite"],
        cwd=work,
        watch=[store],
        file=store,
        field="--out",
    )
    assert "input" in line


def test_synth_out_contains_the_source_folder(store: Path, work: Path) -> None:
    data = store.parent
    refused(
        ["data", "synth", "--from", str(store), "--out", str(data), "--overwrite"],
        cwd=work,
        watch=[data],
        file=data,
        field="--out",
    )


def test_synth_store_with_a_foreign_file_is_not_replaced(store: Path, work: Path) -> None:
    (store / "README.txt").write_text("my notes\n")
    refused(
        ["data", "synth", "--builtin", "--out", str(store), "--overwrite"],
        cwd=work,
        watch=[store],
        file=store,
        field="--out",
    )


def test_convert_out_is_an_input_file(tmp_path: Path, work: Path) -> None:
    feats = tmp_path / "res101.mat"
    feats.write_bytes(b"MATLAB 5.0")
    args = [
        "data",
        "convert",
        "xlsa17",
        "--att-splits",
        str(tmp_path / "att_splits.mat"),
        "--features",
        str(feats),
        "--out",
        str(feats),
        "--overwrite",
    ]
    refused(args, cwd=work, watch=[tmp_path], file=feats, field="--out")


def test_synth_twice_with_overwrite_replaces_its_own_store(store: Path, work: Path) -> None:
    before = (store / "meta.json").stat().st_mtime_ns
    _ok(["data", "synth", "--builtin", "--out", str(store), "--overwrite"], work)
    assert (store / "meta.json").stat().st_mtime_ns != before
    assert not [p for p in store.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


# --- dedn search --name ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", "..", ".", "a\\b", ""])
def test_search_name_is_one_path_component(tmp_path: Path, tiny_store: Path, name: str) -> None:
    spec = write_spec(tmp_path, tiny_store, epochs=1, body="num_samples: 1\n")
    storage = tmp_path / "deep" / "er" / "runs"
    storage.mkdir(parents=True)
    args = ["search", "-c", str(spec), "--name", name, "--storage-path", str(storage), "--no-tracking"]
    refused(args, cwd=tmp_path, watch=[tmp_path, Path("/abs")], file=name or "''", field="--name")
