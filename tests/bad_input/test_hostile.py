"""Hostile input: nothing the project reads runs code, and a refused command leaves nothing behind.

Each case runs ``dedn`` in a fresh process (``tests.helpers.refused``): exit status 2, one line naming the
file and the field, no traceback, the watched folders unchanged. Payload pickles would create a marker
file when unpickled; the marker must never appear. One real search (1 trial, 1 epoch, tracked in a SQLite
store in a temporary folder) serves the resume and promote cases.
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import cli_argv, free_port, new_store, refused, write_spec

SPEC = """
num_samples: 1
params:
  optim.lr: {type: loguniform, low: 5.0e-4, high: 3.0e-3}
scheduler: {type: fifo}
"""


class _Payload:
    """Unpickled, it creates ``marker``: what a replaced pickle would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> dict[str, Path | str]:
    """A finished 1-trial search: its folder, the tracking store and the signing key's config folder."""
    root = tmp_path_factory.mktemp("hostile")
    spec = write_spec(root, tiny_store, epochs=1, body=SPEC)
    env = {"XDG_CONFIG_HOME": str(root / "config")}
    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = ["search", "-c", str(spec), "--name", "hostile", "--storage-path", str(root / "runs")]
    r = subprocess.run(
        cli_argv(*args, "--tracking-uri", uri, "--no-final-test"),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=400,
        env={**__import__("os").environ, **env},
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    exp = (root / "runs" / "hostile").resolve()
    assert (exp / "tuner.pkl").is_file() and (exp / "resume.sig").is_file()
    assert (root / "config" / "dedn" / "resume.key").stat().st_mode & 0o777 == 0o600
    return {"root": root, "exp": exp, "spec": spec, "uri": uri, "config": root / "config"}


@pytest.mark.slow  # a full scenario (search, server or compile): the slow tier
def test_resume_verifies_the_state_ray_unpickles(searched: dict) -> None:
    root, exp, config = searched["root"], searched["exp"], searched["config"]
    env = {"XDG_CONFIG_HOME": str(config)}
    resume = ["search", "-c", str(searched["spec"]), "--resume", str(exp), "--no-final-test"]
    marker = root / "pwned-tuner"

    # a replaced tuner.pkl: refused before Ray unpickles it
    tuner = exp / "tuner.pkl"
    original = tuner.read_bytes()
    tuner.write_bytes(_payload(marker))
    try:
        refused(resume, cwd=root, watch=[exp, config], file=tuner, field="signature", env=env)
    finally:
        tuner.write_bytes(original)
    assert not marker.exists()

    # a pickle dropped into a trial folder (Tune unpickles a trial's error.pkl)
    trial = next(p.parent for p in exp.glob("*/params.json"))
    dropped = trial / "error.pkl"
    dropped.write_bytes(_payload(marker))
    try:
        refused(resume, cwd=root, watch=[exp, config], file=dropped, field="signature", env=env)
    finally:
        dropped.unlink()
    assert not marker.exists()

    # no signature file at all
    sig = exp / "resume.sig"
    aside = root / "resume.sig.aside"
    shutil.move(sig, aside)
    try:
        refused(resume, cwd=root, watch=[exp, config], file=sig, field="signature", env=env)
    finally:
        shutil.move(aside, sig)

    # a trial checkpoint replaced by a pickle of code: loaded as tensors only, refused in one line naming it
    state = next(exp.glob("*/checkpoint_*/state.pt"))
    original = state.read_bytes()
    state.write_bytes(_payload(marker))
    try:
        line = refused(resume, cwd=root, watch=[exp, config], file=state, field="checkpoint", env=env)
        assert "UnpicklingError" in line, line
    finally:
        state.write_bytes(original)
    assert not marker.exists()

    # no key in this user's config folder: nothing can be verified, and no key is made
    other = root / "other"
    key = other / "dedn" / "resume.key"
    refused(resume, cwd=root, watch=[exp], file=key, field="signature", env={"XDG_CONFIG_HOME": str(other)})
    assert not other.exists()

    # a run of another experiment dressed up as one of this search's (its parent and key): a resume finds its runs
    # in its own MLflow experiment only, so it neither reopens, logs to nor ends it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=str(searched["uri"]))
    mine = client.search_runs([client.get_experiment_by_name("hostile").experiment_id])
    child = next(r for r in mine if "mlflow.parentRunId" in r.data.tags)
    decoy_tags = {k: child.data.tags[k] for k in ("mlflow.parentRunId", "dedn.trial_id")}
    foreign = client.create_run(client.create_experiment("victim"), tags=decoy_tags).info.run_id

    # the untampered folder still resumes, and stays verifiable afterwards
    r = subprocess.run(
        cli_argv(*resume),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=400,
        env={**__import__("os").environ, **env},
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert not marker.exists()
    victim = client.get_run(foreign)
    assert victim.info.status == "RUNNING" and not victim.data.metrics and not victim.data.params


@pytest.mark.slow  # needs the module's search (about a minute): the slow tier
def test_promote_refuses_a_tampered_trial_checkpoint(searched: dict) -> None:
    root = searched["root"]
    marker = root / "pwned-checkpoint"
    [state] = list((root / "mlruns").glob("*/*/artifacts/checkpoint/state.pt"))
    run_id = state.parents[2].name
    original = state.read_bytes()
    state.write_bytes(_payload(marker))
    try:
        args = ["promote", "--experiment", "hostile", "--model-name", "dedn-hostile", "--tracking-uri", searched["uri"]]
        args += ["--trial", "best"]  # the search ran without a final test: a trial's weights
        line = refused(args, cwd=root, watch=[root], file=f"runs:/{run_id}/checkpoint", field="checkpoint")
    finally:
        state.write_bytes(original)
    assert "not a trial checkpoint" in line and not marker.exists()


def _model_folder(folder: Path, mlmodel: str, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    (folder / "MLmodel").write_text(mlmodel)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def _predict(model: str | Path, store: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--model", str(model), "--data", str(store), "--out", str(out), *extra]


def test_predict_refuses_a_pickled_python_model(tmp_path: Path, tiny_store: Path) -> None:
    marker = tmp_path / "pwned-model"
    model = _model_folder(
        tmp_path / "model",
        "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n    python_model: python_model.pkl\n"
        "    cloudpickle_version: 3.1.3\n    python_version: 3.11.7\n",
        {"python_model.pkl": _payload(marker)},
    )
    line = refused(
        _predict(model, tiny_store, tmp_path / "out" / "p.csv"),
        cwd=tmp_path,
        watch=[tmp_path],
        file=model / "MLmodel",
        field="flavors.python_function.python_model",
    )
    assert "pickled python model" in line and not marker.exists()


def test_predict_refuses_a_cloudpickle_flavour(tmp_path: Path, tiny_store: Path) -> None:
    marker = tmp_path / "pwned-sklearn"
    model = _model_folder(
        tmp_path / "model",
        "flavors:\n  python_function:\n    loader_module: mlflow.sklearn\n    model_path: model.pkl\n"
        "  sklearn:\n    pickled_model: model.pkl\n    serialization_format: cloudpickle\n",
        {"model.pkl": _payload(marker)},
    )
    refused(
        _predict(model, tiny_store, tmp_path / "p.csv"),
        cwd=tmp_path,
        watch=[tmp_path],
        file=model / "MLmodel",
        field="flavors.sklearn",
    )
    assert not marker.exists()


def test_predict_refuses_foreign_code_paths(tmp_path: Path, tiny_store: Path) -> None:
    model = _model_folder(
        tmp_path / "model",
        "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.loaders.code_model\n"
        "    model_code_path: /elsewhere/pyfunc_model.py\n    code: code\n"
        "    artifacts:\n      checkpoint:\n        path: artifacts/model\n",
        {"pyfunc_model.py": b"open('pwned', 'w')\n", "code/helper.py": b"", "artifacts/model/config.yaml": b""},
    )
    refused(
        _predict(model, tiny_store, tmp_path / "p.csv"),
        cwd=tmp_path,
        watch=[tmp_path],
        file=model / "MLmodel",
        field="flavors.python_function.code",
    )
    assert not (tmp_path / "pwned").exists()


def test_predict_lists_what_the_registry_holds(tmp_path: Path, tiny_store: Path, empty_store: Path) -> None:
    uri = new_store(empty_store, tmp_path / "store" / "mlflow.db")
    line = refused(
        _predict("models:/nope@champion", tiny_store, tmp_path / "p.csv", "--tracking-uri", uri),
        cwd=tmp_path,
        watch=[tmp_path],
        file="models:/nope@champion",  # the model asked for, then the store it was looked for in
        field="--model",
    )
    assert f"no registered model 'nope' in {uri}" in line and "registered models" in line


def test_predict_takes_a_store_or_pictures_and_promote_checks_pictures_of_the_test_split(
    tmp_path: Path, tiny_store: Path
) -> None:
    both = [*_predict("models:/m@champion", tiny_store, tmp_path / "p.csv"), "--images", str(tmp_path)]
    line = refused(
        [*both, "--image-list", "x.csv"], cwd=tmp_path, watch=[tmp_path], file="dedn predict", field="--data"
    )
    assert "one of them" in line
    neither = ["predict", "--model", "models:/m@champion", "--out", str(tmp_path / "p.csv")]
    refused(neither, cwd=tmp_path, watch=[tmp_path], file="dedn predict", field="--data")
    alone = [*neither, "--images", str(tmp_path)]
    line = refused(alone, cwd=tmp_path, watch=[tmp_path], file="dedn predict", field="--image-list")
    assert "go together" in line
    promote = ["promote", "--experiment", "x", "--model-name", "m", "--trial", "best", "--images", str(tmp_path)]
    line = refused(promote, cwd=tmp_path, watch=[tmp_path], file="dedn promote", field="--images")
    assert "validation-task weights" in line


def test_promote_refuses_a_mistyped_sqlite_store_and_creates_none(tmp_path: Path, empty_store: Path) -> None:
    new_store(empty_store, tmp_path / "mlflow.db")
    typo = tmp_path / "mlfow.db"
    args = ["promote", "--experiment", "x", "--model-name", "m", "--tracking-uri", f"sqlite:///{typo}"]
    refused(args, cwd=tmp_path, watch=[tmp_path], file=typo, field="--tracking-uri")
    assert not typo.exists()
    ui = ["ui", "--port", str(free_port()), "--tracking-uri", f"sqlite:///{typo}"]
    refused(ui, cwd=tmp_path, watch=[tmp_path], file=typo, field="--tracking-uri")
    assert not typo.exists()


def test_promote_lists_the_experiments_there_are(tmp_path: Path, empty_store: Path) -> None:
    uri = new_store(empty_store, tmp_path / "mlflow.db")
    args = ["promote", "--experiment", "nope", "--model-name", "m", "--tracking-uri", uri]
    line = refused(args, cwd=tmp_path, watch=[tmp_path], file=uri, field="experiment")
    assert "no MLflow experiment named 'nope'" in line and "Default" in line


@pytest.mark.parametrize("address", ["not:a:port", "127.0.0.1:notaport", "host:0"])
def test_search_refuses_a_malformed_address_before_creating_anything(
    tmp_path: Path, tiny_store: Path, address: str, empty_store: Path
) -> None:
    new_store(empty_store, tmp_path / "mlflow.db")  # the default store (./mlflow.db): its content must not change
    spec = write_spec(tmp_path, tiny_store, epochs=1, body=SPEC)
    args = ["search", "-c", str(spec), "--name", "addr", "--storage-path", str(tmp_path / "runs")]
    refused([*args, "--address", address], cwd=tmp_path, watch=[tmp_path], file=address, field="--address")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # a full scenario (search, server or compile): the slow tier
def test_search_that_cannot_join_leaves_no_folder_and_no_run(
    tmp_path: Path, tiny_store: Path, empty_store: Path
) -> None:
    """The folder, the MLflow run and the study are made once the cluster is joined: a search that cannot join
    leaves none of them, nor a resume key."""
    from mlflow.tracking import MlflowClient

    uri = new_store(empty_store, tmp_path / "mlflow.db")
    spec = write_spec(tmp_path, tiny_store, epochs=1, body=SPEC)
    runs = tmp_path / "runs"
    runs.mkdir()
    address = f"127.0.0.1:{free_port()}"  # well formed, nobody listening
    args = ["search", "-c", str(spec), "--name", "join", "--storage-path", str(runs), "--tracking-uri", uri]
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    config = tmp_path / "config" / "dedn"  # (matplotlib may make its own folder beside it)
    refused([*args, "--address", address], cwd=tmp_path, watch=[config], file=address, field="--address", env=env)
    assert list(runs.iterdir()) == []
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("join") is None
    assert not config.exists()  # no key made for a search that never started
