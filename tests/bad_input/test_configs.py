"""Configs and search specs parse safely: every YAML a user gives (training config, search spec, the base
config a spec names, ``--set`` values) is read by ``dedn.safe_yaml`` within a size limit, as UTF-8, with alias
bombs refused while composing; click's usage errors come out in the same form. Each case runs the real CLI in
a fresh process: one line ``error: <file>: <field>: <rule>``, exit status 2, nothing written. Nothing trains."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dedn.safe_yaml import MAX_BYTES, MAX_NODES
from tests.helpers import TINY_CONFIG, refused

# a billion laughs: nine levels of nine aliases each, 9**9 leaves once expanded
BOMB = "".join(
    f"{a}: &{a} [{', '.join(['x'] * 9 if i == 0 else [f'*{chr(ord(a) - 1)}'] * 9)}]\n"
    for i, a in enumerate("abcdefghi")
)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The working folder: the bad files, and nothing else (a refused command leaves it as it was)."""
    return tmp_path


def _train(work: Path, store: Path, config: Path, *extra: str, file: str | Path, field: str) -> str:
    args = ["train", "-c", str(config), "--store", str(store), "--no-progress", *extra]
    return refused(args, cwd=work, watch=[work, store], file=file, field=field)


def _search(work: Path, store: Path, spec: Path, *extra: str, file: str | Path, field: str) -> str:
    args = ["search", "-c", str(spec), "--store", str(store), "--storage-path", str(work / "runs"), *extra]
    return refused(args, cwd=work, watch=[work, store], file=file, field=field)


def _config(work: Path, body: str | bytes, name: str = "bad.yaml") -> Path:
    p = work / name
    if isinstance(body, bytes):
        p.write_bytes(body)
    else:
        p.write_text(body)
    return p


def _spec(
    work: Path, base_body: str, spec_body: str = "params:\n  optim.lr: {type: uniform, low: 1.0e-4, high: 1.0e-3}\n"
) -> Path:
    (work / "base.yaml").write_text(base_body)
    spec = work / "spec.yaml"
    spec.write_text("base: base.yaml\nnum_samples: 1\n" + spec_body)
    return spec


# --- training configs (dedn train) ------------------------------------------------------------------------


def test_alias_bomb_in_a_training_config(work: Path, tiny_store: Path) -> None:
    from dedn.config import load_config
    from dedn.errors import DednInputError

    cfg = _config(work, TINY_CONFIG.read_text() + BOMB)
    start = time.perf_counter()
    with pytest.raises(DednInputError, match="alias"):
        load_config(cfg)
    assert time.perf_counter() - start < 1.0  # refused while composing, nothing expanded
    line = _train(work, tiny_store, cfg, file=cfg, field="yaml")
    assert str(MAX_NODES) in line and "alias" in line


def test_oversize_config(work: Path, tiny_store: Path) -> None:
    cfg = _config(work, TINY_CONFIG.read_text() + ("#" * 99 + "\n") * (MAX_BYTES // 100 + 1))
    assert "over the limit" in _train(work, tiny_store, cfg, file=cfg, field="size")


def test_non_utf8_config(work: Path, tiny_store: Path) -> None:
    cfg = _config(work, TINY_CONFIG.read_bytes() + b"# caf\xe9\n")
    assert "UTF-8" in _train(work, tiny_store, cfg, file=cfg, field="encoding")


def test_yaml_syntax_error(work: Path, tiny_store: Path) -> None:
    cfg = _config(work, "optim:\n  lr: 0.001\n batch_size: 32\n")
    line = _train(work, tiny_store, cfg, file=cfg, field="yaml")
    assert "line 3, column" in line


def test_top_level_a_list(work: Path, tiny_store: Path) -> None:
    cfg = _config(work, "- optim.lr: 0.001\n- seed: 0\n")
    assert "mapping" in _train(work, tiny_store, cfg, file=cfg, field="top level")


def test_unknown_key(work: Path, tiny_store: Path) -> None:
    cfg = _config(work, TINY_CONFIG.read_text().replace("optim:\n", "optim:\n  colour: blue\n"))
    assert "Extra inputs" in _train(work, tiny_store, cfg, file=cfg, field="optim.colour")


def test_wrong_type(work: Path, tiny_store: Path) -> None:
    cfg = _config(work, TINY_CONFIG.read_text().replace("lr: 0.001", "lr: fast"))
    _train(work, tiny_store, cfg, file=cfg, field="optim.lr")


def test_set_without_equals(work: Path, tiny_store: Path) -> None:
    _train(work, tiny_store, TINY_CONFIG, "--set", "optim.lr", file="--set", field="optim.lr")


def test_set_with_an_unknown_key(work: Path, tiny_store: Path) -> None:
    # the file is fine: the error names the --set that put the key there
    _train(
        work, tiny_store, TINY_CONFIG, "--set", "optim.colour=blue", file=f"{TINY_CONFIG} --set", field="optim.colour"
    )


# --- search specs and their base configs (dedn search) ----------------------------------------------------


def test_alias_bomb_in_a_search_spec(work: Path, tiny_store: Path) -> None:
    spec = _spec(work, TINY_CONFIG.read_text())
    spec.write_text(spec.read_text() + BOMB)
    start = time.perf_counter()
    _search(work, tiny_store, spec, file=spec, field="yaml")
    assert time.perf_counter() - start < 5.0


def test_alias_bomb_in_the_base_config(work: Path, tiny_store: Path) -> None:
    spec = _spec(work, TINY_CONFIG.read_text() + BOMB)
    _search(work, tiny_store, spec, file=(work / "base.yaml").resolve(), field="yaml")


def test_spec_whose_base_config_is_invalid(work: Path, tiny_store: Path) -> None:
    spec = _spec(work, TINY_CONFIG.read_text().replace("batch_size: 32", "batch_size: many"))
    line = _search(work, tiny_store, spec, file=(work / "base.yaml").resolve(), field="optim.batch_size")
    assert "params." not in line  # the base is at fault, not the sampled parameter


def test_spec_whose_base_config_is_missing(work: Path, tiny_store: Path) -> None:
    spec = _spec(work, TINY_CONFIG.read_text())
    (work / "base.yaml").unlink()
    assert "not found" in _search(work, tiny_store, spec, file=spec, field="base")


def test_spec_top_level_a_string(work: Path, tiny_store: Path) -> None:
    spec = _config(work, "just some words\n", "spec.yaml")
    _search(work, tiny_store, spec, file=spec, field="top level")


def test_resume_of_a_folder_that_does_not_exist(work: Path, tiny_store: Path) -> None:
    """``--resume runs/<name>`` (the README's form) of a folder that is not there is named as a folder, not refused
    as a bad single name."""
    spec = _spec(work, TINY_CONFIG.read_text())
    missing = "runs/does-not-exist"
    line = _search(work, tiny_store, spec, "--resume", missing, file=missing, field="--resume")
    assert "no such folder" in line and "single folder name" not in line


def test_a_bad_name_is_refused_before_any_address_is_tried(work: Path, tiny_store: Path) -> None:
    spec = _spec(work, TINY_CONFIG.read_text())
    started = time.monotonic()
    # 192.0.2.1 (TEST-NET-1) answers nobody: trying it would take the probe's 5 s
    line = _search(work, tiny_store, spec, "--name", "../x", "--address", "192.0.2.1:6379", file="../x", field="--name")
    assert "single folder name" in line and time.monotonic() - started < 60


def test_resume_of_a_search_record_that_is_not_json(work: Path, tiny_store: Path) -> None:
    spec = _spec(work, TINY_CONFIG.read_text())
    exp = work / "runs" / "broken"
    exp.mkdir(parents=True)
    (exp / "search.json").write_text("{not json")
    line = _search(work, tiny_store, spec, "--resume", str(exp), file=exp / "search.json", field="options")
    assert "not the record of a dedn search" in line and "resume.sig" not in line


@pytest.mark.parametrize("option", ["--gpus-per-trial", "--cpus-per-trial"])
def test_a_trial_larger_than_this_machine(work: Path, tiny_store: Path, option: str) -> None:
    """Without --address the search starts a local Ray instance, which would wait forever for a trial it can never
    place: refused before anything exists, naming the option, what was asked and what the machine has."""
    import os

    import torch

    has = torch.cuda.device_count() if option == "--gpus-per-trial" else os.cpu_count() or 1
    spec = _spec(work, TINY_CONFIG.read_text())
    line = _search(work, tiny_store, spec, option, str(has + 1), file="dedn search", field=option)
    assert f"asks {has + 1} " in line and line.endswith(f"has {has}")


# --- click's usage errors ---------------------------------------------------------------------------------


def test_unknown_option(work: Path, tiny_store: Path) -> None:
    line = _train(work, tiny_store, TINY_CONFIG, "--colour", "blue", file="dedn train", field="--colour")
    assert "No such option" in line


def test_bad_int_value(work: Path, tiny_store: Path) -> None:
    spec = _spec(work, TINY_CONFIG.read_text())
    line = _search(work, tiny_store, spec, "--population", "abc", file="dedn search", field="--population")
    assert "'abc'" in line


def test_missing_required_option(work: Path, tiny_store: Path) -> None:
    args = ["train", "--store", str(tiny_store)]
    line = refused(args, cwd=work, watch=[work, tiny_store], file="dedn train", field="--config")
    assert "Missing option" in line


# --- side files of a conversion --------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--val-classes", "--attribute-names", "--attribute-vectors"])
def test_a_missing_side_file_of_a_conversion(work: Path, option: str) -> None:
    """Before any input is read: the option and the file it names, not a FileNotFoundError traceback."""
    (work / "maps.hdf5").write_bytes(b"")  # never opened: the side files are checked first
    missing = work / "valclasses1.txt"
    args = ["data", "convert", "hdf5", "--features", "maps.hdf5", option, str(missing), "--out", str(work / "store")]
    line = refused(args, cwd=work, watch=[work], file=missing, field=option)
    assert line.endswith("no such file"), line


# --- what only the store or the machine can refute names the config's file ---------------------------------


def test_a_config_the_store_refutes_names_the_configs_file(work: Path, tiny_store: Path) -> None:
    config = _config(work, TINY_CONFIG.read_text(), "mine.yaml")
    kmeans = ("--set", "model.clusters=kmeans", "--set", "model.kmeans_q=999")
    line = _train(work, tiny_store, config, *kmeans, file=config, field="model.kmeans_q")
    assert "must be <= D=" in line
    line = _train(work, tiny_store, config, "--set", "model.clusters=nosuch", file=config, field="model.clusters")
    assert "must be a preset of the store" in line


def test_cuda_on_a_machine_without_it_names_the_configs_file(work: Path, tiny_store: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    config = _config(work, TINY_CONFIG.read_text(), "mine.yaml")
    line = _train(work, tiny_store, config, "--set", "device=cuda", file=config, field="device")
    assert "no CUDA device" in line


@pytest.mark.parametrize("objective", ["AUC", "U@S>=1.5", "U@U>=0.5", "S@U>=x"])
def test_an_objective_outside_the_rule_is_one_line(work: Path, tiny_store: Path, objective: str) -> None:
    spec = _spec(work, TINY_CONFIG.read_text())
    spec.write_text(spec.read_text() + f'objective: "{objective}"\n')
    line = _search(work, tiny_store, spec, file=spec, field="objective")
    assert "must be H, AUSUC, U@S>=x or S@U>=x with x in [0, 1]" in line
    config = _config(work, TINY_CONFIG.read_text())
    where = f"{config} --set"  # the file is fine: the error names the --set that put the value there
    line = _train(
        work, tiny_store, config, "--set", f"inference.objective={objective}", file=where, field="inference.objective"
    )
    assert "must be H, AUSUC, U@S>=x or S@U>=x" in line
