"""The registered model outside dedn: loaded with ``mlflow.pyfunc.load_model`` and served by
``mlflow models serve`` (a real process on a free loopback port), against ``dedn predict``.

A module fixture runs a small real search into a temporary SQLite store and promotes its final model; the
feature store is the built-in one, whose features are float16."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tests.helpers import served_model, write_spec

pytestmark = pytest.mark.slow  # a real search (Ray) to promote from: the slow tier

SPEC = """
num_samples: 2
max_concurrent_trials: 2
params:
  optim.lr: {type: loguniform, low: 5.0e-4, high: 3.0e-3}
scheduler: {type: fifo}
"""
MODEL = "dedn-served"


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> str:
    """The tracking URI of a store holding ``dedn-served@champion``: a real search's final model, promoted."""
    from cli.main import cli
    from tuning.search import SearchOptions, run_search

    folder = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    spec = write_spec(folder, tiny_store, epochs=2, body=SPEC)
    opts = SearchOptions(spec_path=str(spec), name="served", storage_path=str(folder / "runs"), tracking_uri=uri)
    assert run_search(opts).not_logged == []  # with its final model, the one promote registers
    args = ["promote", "--experiment", "served", "--model-name", MODEL, "--tracking-uri", uri]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return uri


def _test_features(store_path: Path) -> np.ndarray:
    from dedn.data import open_store

    store = open_store(store_path)
    x = store.features()[store.indices("test")]
    assert x.dtype == np.float16  # the store's own dtype
    return np.asarray(x)


def test_registered_model_signature_is_the_feature_tensor(promoted: str, tiny_store: Path) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from tracking.store import mlflow_uris

    with mlflow_uris(promoted):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    inputs = model.metadata.get_input_schema()
    assert [(s.type, s.shape) for s in inputs.inputs] == [(np.dtype(np.float32), (-1, 32, 4, 4))]
    x16 = _test_features(tiny_store)
    got = model.predict(x16.astype(np.float32))
    assert list(got.columns) == ["class_index", "class_name", "score", "seen"]
    assert len(got) == len(x16)
    assert got["class_index"].nunique() > 1  # a comparison of more than one constant answer
    # MLflow holds the model to its signature before it runs: another dtype, another shape
    with pytest.raises(MlflowException, match="float16"):
        model.predict(x16)
    with pytest.raises(MlflowException, match="shape"):
        model.predict(np.zeros((2, 31, 4, 4), np.float32))


def test_mlflow_models_serve_answers_as_dedn_predict(promoted: str, tiny_store: Path, tmp_path: Path) -> None:
    from cli.main import cli

    with served_model(f"models:/{MODEL}@champion", promoted, tmp_path / "serve.log") as port:
        x16 = _test_features(tiny_store)
        body = json.dumps({"inputs": x16.tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())

    out_file = tmp_path / "preds.parquet"
    args = ["predict", "--model", f"models:/{MODEL}@champion", "--data", str(tiny_store), "--split", "test"]
    r = CliRunner().invoke(cli, [*args, "--out", str(out_file), "--tracking-uri", promoted], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    expected = pd.read_parquet(out_file)

    assert list(answer) == ["predictions"]
    served = pd.DataFrame(answer["predictions"])
    assert list(served.columns) == ["class_index", "class_name", "score", "seen"]
    assert len(served) == len(expected) == len(x16)
    assert expected["class_index"].nunique() > 1
    np.testing.assert_array_equal(served["class_index"].to_numpy(), expected["class_index"].to_numpy())
    assert list(served["class_name"]) == list(expected["class_name"])
    np.testing.assert_array_equal(served["seen"].to_numpy(), expected["seen"].to_numpy())
    np.testing.assert_allclose(served["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_promote_at_an_operating_point_registers_a_model_that_predicts_its_figures(
    promoted: str, tiny_store: Path, tmp_path: Path
) -> None:
    """--at "S>=0.5": the point is the front's most U with S >= 0.5 (found here by hand); the model registered carries
    that point's shift as its calibration, and loaded as MLflow serves it reproduces the test figures promote printed."""
    import mlflow
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from cli.main import cli
    from dedn.data import open_store
    from dedn.metrics import gzsl_metrics

    client = MlflowClient(tracking_uri=promoted, registry_uri=promoted)
    parent = client.search_runs(
        [client.get_experiment_by_name("served").experiment_id], "tags.`dedn.experiment` = 'served'"
    )[0]
    front = pq.read_table(client.download_artifacts(parent.info.run_id, "front.parquet", str(tmp_path))).to_pylist()
    want = max((p for p in front if p["S"] >= 0.5), key=lambda p: p["U"])
    args = [
        "promote",
        "--experiment",
        "served",
        "--model-name",
        "dedn-at",
        "--at",
        "S>=0.5",
        "--tracking-uri",
        promoted,
    ]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"operating point S>=0.5 (validation U {want['U']:.4f}, S {want['S']:.4f})" in r.output
    version = client.get_model_version_by_alias("dedn-at", "champion")
    tags = version.tags
    assert float(tags["dedn.inference.calibration"]) == pytest.approx(want["shift"])
    assert tags["dedn.trial_id"] == want["trial_id"] and "S>=0.5" in version.description
    printed = next(line for line in r.output.splitlines() if line.startswith("test once"))
    assert [float(x) for x in printed.split()[-4:]] == pytest.approx(
        [round(100 * float(tags[f"dedn.test_{k}"]), 1) for k in ("U", "S", "H", "AUSUC")]
    )
    mlflow.set_tracking_uri(promoted)
    model = mlflow.pyfunc.load_model("models:/dedn-at@champion")
    store = open_store(tiny_store)
    rows = store.indices("test")
    pred = model.predict(np.asarray(store.features()[rows], dtype=np.float32))["class_index"].to_numpy()
    seen, unseen = np.flatnonzero(store.classes.seen), np.flatnonzero(~store.classes.seen)
    got = gzsl_metrics(pred, store.labels[rows], seen, unseen)
    for k in ("U", "S", "H"):
        assert got[k] == pytest.approx(float(tags[f"dedn.test_{k}"]), abs=1e-6), k


def test_predict_calibration_overrides_the_models_own(promoted: str, tiny_store: Path, tmp_path: Path) -> None:
    from cli.main import cli

    seen = {}
    for c in (1e6, -1e6, None):
        out = tmp_path / f"p{c}.parquet"
        args = ["predict", "--model", f"models:/{MODEL}@champion", "--data", str(tiny_store), "--out", str(out)]
        args += ["--tracking-uri", promoted] + ([] if c is None else ["--calibration", str(c)])
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        seen[c] = pd.read_parquet(out)["seen"].to_numpy()
    assert not seen[1e6].any() and seen[-1e6].all()  # +c on unseen scores: every image to an unseen class, and back
    assert 0 < seen[None].sum() < seen[None].size  # the model's own calibration mixes both


def test_a_feature_map_model_refuses_pictures_in_one_line(promoted: str, tmp_path: Path) -> None:
    from tests.helpers import refused

    (tmp_path / "pics").mkdir()
    listed = tmp_path / "pictures.csv"
    listed.write_text("image_file\nx.jpg\n")
    args = ["predict", "--model", f"models:/{MODEL}@champion", "--images", str(tmp_path / "pics")]
    args += ["--image-list", str(listed)]
    args += ["--out", str(tmp_path / "p.csv"), "--tracking-uri", promoted]
    line = refused(args, cwd=tmp_path, watch=[tmp_path], file=f"models:/{MODEL}@champion", field="--images")
    assert "takes feature maps, not pictures" in line
    promote = ["promote", "--experiment", "served", "--model-name", MODEL, "--tracking-uri", promoted]
    line = refused([*promote, "--input", "image"], cwd=tmp_path, watch=[tmp_path], file="store.json", field="--input")
    assert "not written by dedn data extract" in line
