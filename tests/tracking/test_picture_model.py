"""The model that takes pictures, from PIL-drawn images to ``curl``: extract a store (``tests.images``), search it (tiny spec), promote (the trunk packaged, the test figures reproduced from
the pictures too), then ``mlflow models serve`` (a real process on a free loopback port) answers every test picture as
``dedn predict`` answers on its stored features, ``dedn predict --images`` agrees, and bad pictures get a 400 of one
line while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tests.helpers import cli_argv, served_model, write_spec
from tests.images import ImageSet, make_images

pytestmark = pytest.mark.slow  # an extraction and a real search (Ray) to promote from: the slow tier

SIZE = 64
MODEL = "dedn-pictures"
# a picture's scores from the served model against its stored features: the trunk's float32 sums differ with the batch a
# picture is in (one picture per request, sixteen in extraction), and now and then a feature rounds to the neighbouring
# float16; the head's score moves by ~1e-5 relative then
TOL = 2e-4
SPEC = """
num_samples: 2
max_concurrent_trials: 1
params:
  optim.lr: {type: loguniform, low: 1.0e-3, high: 3.0e-3}
scheduler: {type: fifo}
"""


class Promoted:
    def __init__(self, folder: Path, images: ImageSet, store: Path, uri: str, promote_output: str) -> None:
        self.folder, self.images, self.store, self.uri, self.promote_output = folder, images, store, uri, promote_output


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run(cli_argv(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory) -> Promoted:
    from cli.main import cli
    from tuning.search import SearchOptions, run_search

    folder = tmp_path_factory.mktemp("pictures")
    images = make_images(folder, per_class=16)  # 96 pictures
    store = folder / "store"
    extract = ["data", "extract", "--images", str(images.root), "--image-list", str(images.image_list)]
    extract += ["--att-splits", str(images.att_splits), "--weights", str(images.weights), "--size", str(SIZE)]
    _cli(*extract, "--out", str(store), "--workers", "1", cwd=folder)
    spec = write_spec(folder, store, epochs=2, body=SPEC)
    base = folder / "base.yaml"
    base.write_text(base.read_text().replace("clusters: manual", "clusters: kmeans\n  kmeans_q: 3"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    opts = SearchOptions(spec_path=str(spec), name="pics", storage_path=str(folder / "runs"), tracking_uri=uri)
    assert run_search(opts).not_logged == []
    args = ["promote", "--experiment", "pics", "--model-name", MODEL, "--tracking-uri", uri]
    r = CliRunner().invoke(cli, [*args, "--images", str(images.root)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return Promoted(folder, images, store, uri, r.output)


def _stored_predictions(p: Promoted, out: Path) -> pd.DataFrame:
    """``dedn predict`` on the store's test features: the answer every picture path must give."""
    _cli("predict", "--model", f"models:/{MODEL}@champion", "--data", str(p.store), "--split", "test",
         "--out", str(out), "--tracking-uri", p.uri, cwd=out.parent)  # fmt: skip
    df = pd.read_parquet(out)
    # the tiny model puts most pictures in one class; their scores tell them apart (spread far wider than TOL), and
    # every path must match them
    assert df["score"].nunique() > len(df) // 2 and np.ptp(df["score"]) > 50 * TOL * df["score"].abs().max()
    return df


def test_promote_packages_the_trunk_and_checks_the_figures_from_the_pictures(
    promoted: Promoted, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from dedn.classifier import TRUNK_FILE
    from dedn.trunk import sha256_file
    from tracking.store import mlflow_uris

    assert "(from the pictures too) reproduced" in promoted.promote_output
    client = MlflowClient(promoted.uri, registry_uri=promoted.uri)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.tags["dedn.input"] == "image"
    with mlflow_uris(promoted.uri):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path)))
    inputs = model.metadata.get_input_schema()
    assert [(c.type.name, c.name) for c in inputs.inputs] == [("binary", "image")]
    meta = json.loads(next(local.rglob("checkpoint.json")).read_text())
    assert meta["input"] == "image" and meta["extraction"]["size"] == SIZE
    assert meta["extraction"]["weights_sha256"] == sha256_file(promoted.images.weights)
    # the packaged trunk is the extraction's weights, fc aside, tensor for tensor
    import torch
    from safetensors.torch import load_file

    packaged = load_file(str(next(local.rglob(TRUNK_FILE))))
    original = torch.load(promoted.images.weights, weights_only=True)
    assert set(packaged) == {k for k in original if not k.startswith("fc.")}
    assert all(torch.equal(packaged[k], original[k]) for k in packaged)


@pytest.fixture(scope="module")
def server(promoted: Promoted, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with served_model(
        f"models:/{MODEL}@champion", promoted.uri, tmp_path_factory.mktemp("serve") / "serve.log"
    ) as port:
        yield port


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_every_test_picture_sent_with_curl_gets_the_class_of_its_stored_features(
    promoted: Promoted, server: int, tmp_path: Path
) -> None:
    expected = _stored_predictions(promoted, tmp_path / "stored.parquet")
    for row in expected.itertuples():
        picture = promoted.images.root / row.image_id
        body = tmp_path / "body.json"
        body.write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": [[_b64(picture.read_bytes())]]}}))
        r = subprocess.run(
            ["curl", "-s", "-S", "-f", "-H", "Content-Type: application/json", "--data-binary", f"@{body}",
             f"http://127.0.0.1:{server}/invocations"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        (answer,) = json.loads(r.stdout)["predictions"]
        assert (answer["class_index"], answer["class_name"]) == (row.class_index, row.class_name), row.image_id
        assert answer["seen"] == row.seen
        assert answer["score"] == pytest.approx(row.score, rel=TOL)
    # the whole split in one request, as records: one prediction object per picture, in order
    records = [{"image": _b64((promoted.images.root / i).read_bytes())} for i in expected["image_id"]]
    status, answer = _post(server, {"dataframe_records": records})
    assert status == 200
    assert [a["class_index"] for a in answer["predictions"]] == expected["class_index"].tolist()


def test_dedn_predict_images_gives_the_served_models_predictions(
    promoted: Promoted, server: int, tmp_path: Path
) -> None:
    every = pd.read_csv(promoted.images.image_list)
    listed = tmp_path / "pictures.csv"
    every[["image_file"]].to_csv(listed, index=False)  # no labels: pictures as a user has them
    out = tmp_path / "preds.parquet"
    r = _cli("predict", "--model", f"models:/{MODEL}@champion", "--images", str(promoted.images.root),
             "--image-list", str(listed), "--out", str(out), "--tracking-uri", promoted.uri, cwd=tmp_path)  # fmt: skip
    assert f"wrote {len(every)} predictions" in r.stdout
    got = pd.read_parquet(out)
    assert list(got.columns) == ["image_id", "true_class", "class_index", "class_name", "score", "seen"]
    assert got["image_id"].tolist() == every["image_file"].tolist() and got["true_class"].isna().all()
    records = [{"image": _b64((promoted.images.root / f).read_bytes())} for f in every["image_file"]]
    status, answer = _post(server, {"dataframe_records": records})
    assert status == 200
    served = pd.DataFrame(answer["predictions"])
    np.testing.assert_array_equal(got["class_index"].to_numpy(), served["class_index"].to_numpy())
    assert got["class_name"].tolist() == served["class_name"].tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), served["score"].to_numpy(), rtol=TOL)
    # labelled: the figures of the test split's pictures are those of the stored features
    test_ids = set(_stored_predictions(promoted, tmp_path / "stored.parquet")["image_id"])
    labelled = tmp_path / "test.csv"
    every[every["image_file"].isin(test_ids)].to_csv(labelled, index=False)
    r = _cli("predict", "--model", f"models:/{MODEL}@champion", "--images", str(promoted.images.root),
             "--image-list", str(labelled), "--out", str(tmp_path / "t.csv"), "--tracking-uri", promoted.uri,
             cwd=tmp_path)  # fmt: skip
    r2 = _cli("predict", "--model", f"models:/{MODEL}@champion", "--data", str(promoted.store), "--split", "test",
              "--out", str(tmp_path / "s.csv"), "--tracking-uri", promoted.uri, cwd=tmp_path)  # fmt: skip
    figures = r.stdout.split("on the pictures: ")[1].strip()
    assert figures == r2.stdout.split("on test: ")[1].strip()


def _png(mode: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_pictures_get_a_400_of_one_line_and_the_server_keeps_serving(promoted: Promoted, server: int) -> None:
    good = next(p for p in sorted(promoted.images.root.rglob("*.jpg"))).read_bytes()
    bad = {
        "text": (b"this is not a picture", "not a picture in a supported format"),
        "truncated JPEG": (good[: len(good) // 2], "cannot be decoded"),
        "100-megapixel bomb": (_png("L", (10_000, 10_000)), "10000x10000 pixels is over the limit of 64 megapixels"),
        "16-bit mode": (_png("I;16", (20, 20)), "mode 'I;16' is not supported"),
    }
    for what, (data, rule) in bad.items():
        status, answer = _post(
            server, {"dataframe_split": {"columns": ["image"], "data": [[_b64(good)], [_b64(data)]]}}
        )
        assert status == 400, what
        message = answer["message"]
        assert message.startswith("row 1: image: ") and rule in message, (what, message)
        assert "\n" not in message and "Traceback" not in json.dumps(answer), what  # one line, no trace
        status, answer = _post(server, {"dataframe_split": {"columns": ["image"], "data": [[_b64(good)]]}})
        assert status == 200 and len(answer["predictions"]) == 1, what  # still serving
    status, answer = _post(server, {"dataframe_split": {"columns": ["image"], "data": [["not base64 !!"]]}})
    assert status == 400 and "base64" in answer["message"]


def test_promote_refuses_weights_of_another_trunk_and_registers_features_when_asked(
    promoted: Promoted, tmp_path: Path
) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    from cli.main import cli
    from dedn.data.pictures import random_weights

    other = tmp_path / "other.pth"
    torch.save(random_weights(seed=1), other)
    client = MlflowClient(promoted.uri, registry_uri=promoted.uri)
    before = len(client.search_model_versions(f"name='{MODEL}'"))
    args = ["promote", "--experiment", "pics", "--model-name", MODEL, "--tracking-uri", promoted.uri]
    r = CliRunner().invoke(cli, [*args, "--weights", str(other)])
    assert r.exit_code == 2
    line = r.output.strip().splitlines()[-1]
    assert line.startswith(f"error: {other}: --weights: SHA-256 ") and "extracted with" in line
    assert len(client.search_model_versions(f"name='{MODEL}'")) == before  # nothing registered
    r = CliRunner().invoke(cli, [*args, "--input", "features", "--alias", "features"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    version = client.get_model_version_by_alias(MODEL, "features")
    assert version.tags["dedn.input"] == "features"
    assert version.version != client.get_model_version_by_alias(MODEL, "champion").version


def test_predict_images_refuses_a_missing_or_broken_picture_in_one_line(promoted: Promoted, tmp_path: Path) -> None:
    import shutil

    from tests.helpers import refused

    folder = tmp_path / "pictures"
    shutil.copytree(promoted.images.root, folder)
    listed = pd.read_csv(promoted.images.image_list)
    missing = tmp_path / "missing.csv"
    pd.concat([listed, pd.DataFrame({"image_file": ["nowhere/x.jpg"], "label": [1]})]).to_csv(missing, index=False)
    args = [
        "predict",
        "--model",
        f"models:/{MODEL}@champion",
        "--images",
        str(folder),
        "--out",
        str(tmp_path / "p.csv"),
    ]
    line = refused([*args, "--image-list", str(missing), "--tracking-uri", promoted.uri], cwd=tmp_path,
                   watch=[tmp_path], file=missing, field="image_file")  # fmt: skip
    assert f"row {len(listed) + 1} (nowhere/x.jpg) is not a file under" in line
    bad = next(f for f in listed["image_file"] if f.endswith(".jpg"))
    data = (folder / bad).read_bytes()
    (folder / bad).write_bytes(data[: len(data) // 2])
    line = refused([*args, "--image-list", str(promoted.images.image_list), "--tracking-uri", promoted.uri],
                   cwd=tmp_path, watch=[], file=folder.resolve() / bad, field="image", timeout=300)  # fmt: skip
    assert "cannot be" in line and not (tmp_path / "p.csv").exists()


def test_promote_refuses_a_test_picture_it_cannot_decode_naming_the_file(promoted: Promoted, tmp_path: Path) -> None:
    import shutil

    from mlflow.tracking import MlflowClient

    from cli.main import cli
    from dedn.data import open_store

    folder = tmp_path / "pictures"
    shutil.copytree(promoted.images.root, folder)
    s = open_store(promoted.store)
    bad = folder / s.image_ids[s.indices("test")[-1]]  # the last: the pictures before it decode
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    client = MlflowClient(promoted.uri, registry_uri=promoted.uri)
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    args = ["promote", "--experiment", "pics", "--model-name", MODEL, "--tracking-uri", promoted.uri]
    r = CliRunner().invoke(cli, [*args, "--images", str(folder)])
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith(f"error: {bad}: image: cannot be decoded"), line
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion  # the alias stays


def test_a_request_row_that_names_a_file_is_refused_not_opened(promoted: Promoted, tmp_path: Path) -> None:
    """The pictures a model is served are bytes only: a row holding a path to a picture on the serving machine is
    refused (the decoder would open it), naming the row; the same picture's bytes are taken."""
    from types import SimpleNamespace

    from dedn.classifier import PictureError
    from tracking.pyfunc_model import BadRow, DednModel
    from tracking.served_model import check_model_folder, fetched_model

    picture = next(p for p in sorted(promoted.images.root.rglob("*.jpg")))
    uri = f"models:/{MODEL}@champion"
    with fetched_model(uri, promoted.uri) as folder:
        model = DednModel()
        model.load_context(SimpleNamespace(artifacts={"checkpoint": str(check_model_folder(folder, uri)[0])}))
    got = model.predict(None, pd.DataFrame({"image": [picture.read_bytes()]}))
    assert len(got) == 1 and got["class_index"][0] >= 0
    for row in (str(picture), picture):
        with pytest.raises(PictureError) as caught:
            model.classifier.prepare([picture.read_bytes(), row])
        assert caught.value.row == 1 and "must be an encoded picture" in caught.value.rule
        with pytest.raises(BadRow, match=r"^row 1: image: must be an encoded picture"):
            model.predict(None, pd.DataFrame({"image": [picture.read_bytes(), row]}))
