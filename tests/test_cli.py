"""The real ``dedn`` CLI, in-process, on tiny stores in temporary folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner

from cli.main import cli
from dedn.data import open_store
from dedn.data.benchmark_files import read_image_labels
from tests.helpers import TINY_CONFIG, zsl_dir


def _run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _all_commands(group, prefix=()):  # type: ignore[no-untyped-def]
    import click

    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, (*prefix, name))


def test_every_command_help_ends_with_examples() -> None:
    code, out, _ = _run("--help")
    assert code == 0 and "data" in out
    for path, _cmd in _all_commands(cli):
        code, out, _ = _run(*path, "--help")
        assert code == 0
        assert "Examples:" in out and "dedn " in out.split("Examples:")[1], path


def test_synth_then_inspect(tmp_path: Path) -> None:
    code, out, _ = _run("data", "synth", "--builtin", "--out", str(tmp_path / "t"))
    assert code == 0 and "600 images" in out
    code, out, _ = _run("data", "inspect", str(tmp_path / "t"), "--verify")
    s = open_store(tmp_path / "t")
    assert code == 0
    for split, n in s.meta.split_counts.items():
        line = next(x for x in out.splitlines() if x.startswith(split + " "))
        assert int(line.split()[1]) == n
    assert s.meta.fingerprint in out and "(verified)" in out and "manual" in out
    assert "C=32 H=4 W=4 float16" in out


def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    code, out, err = _run("data", "inspect", str(tmp_path / "none"))
    assert code == 2 and err.strip().count("\n") == 0 and err.startswith("error: ") and "store" in err
    code, _, err = _run("data", "synth", "--out", str(tmp_path / "x"))
    assert code == 2 and "--builtin/--from" in err
    _run("data", "synth", "--builtin", "--out", str(tmp_path / "t"))
    code, _, err = _run("data", "synth", "--builtin", "--out", str(tmp_path / "t"))
    assert code == 2 and "already exists" in err


def test_convert_xlsa17_from_the_cli(tmp_path: Path) -> None:
    folder = zsl_dir("AWA2")
    files, labels = read_image_labels(folder / "image_labels.csv", 50)
    feats = np.random.default_rng(0).random((3, labels.size))
    scipy.io.savemat(tmp_path / "res101.mat", {"features": feats, "labels": (labels + 1).reshape(-1, 1)})
    code, out, _ = _run(
        "data",
        "convert",
        "xlsa17",
        "--att-splits",
        str(folder / "att_splits.mat"),
        "--features",
        str(tmp_path / "res101.mat"),
        "--out",
        str(tmp_path / "s"),
        "--dtype",
        "float32",
    )
    assert code == 0, out
    s = open_store(tmp_path / "s")
    np.testing.assert_array_equal(s.features()[:, :, 0, 0], feats.T.astype(np.float32))
    code, _, err = _run(
        "data",
        "convert",
        "xlsa17",
        "--att-splits",
        str(tmp_path / "missing.mat"),
        "--features",
        str(tmp_path / "res101.mat"),
        "--out",
        str(tmp_path / "s2"),
    )
    assert code == 2 and "missing.mat: file: not found" in err and not (tmp_path / "s2").exists()


@pytest.mark.parametrize("args", [["data", "synth", "--builtin", "--out", "X", "-C", "0"]])
def test_click_rejects_bad_knobs(tmp_path: Path, args: list[str]) -> None:
    code, _, err = _run(*[a.replace("X", str(tmp_path / "o")) for a in args])
    assert code == 2 and "Invalid value" in err


def test_train_end_to_end_with_baseline(tmp_path: Path) -> None:
    import json

    _run("data", "synth", "--builtin", "--out", str(tmp_path / "t"))
    cfg = TINY_CONFIG
    code, out, err = _run(
        "train",
        "-c",
        str(cfg),
        "--store",
        str(tmp_path / "t"),
        "--set",
        "optim.epochs=2",
        "--set",
        "device=cpu",
        "--out",
        str(tmp_path / "ckpt"),
        "--baseline",
        "eszsl",
        "--no-progress",
    )
    assert code == 0, err
    for label in (
        "validation, epoch",
        "best grid point",
        "test once, configured inference",
        "paper protocol: best H/T over epochs ON TEST",
        "ESZSL test once",
    ):
        assert label in out
    meta = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert meta["fingerprint"] == open_store(tmp_path / "t").meta.fingerprint
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and (tmp_path / "ckpt" / "config.yaml").is_file()
    code, _, err = _run("train", "-c", str(cfg), "--store", str(tmp_path / "t"), "--set", "optim.lr=-1")
    assert code == 2 and "optim.lr" in err and err.count("\n") == 1
