"""Tracking against a real ``mlflow server`` (SQLite backend, artifacts in a temporary folder) on a loopback port."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dedn.errors import DednInputError
from tests.helpers import ROOT, cli_argv, free_port, start_server, trial_rows, write_spec
from tuning.search import SearchOptions, run_search

SPEC = """
num_samples: 3
max_concurrent_trials: 2
params:
  optim.lr: {type: loguniform, low: 5.0e-4, high: 3.0e-3}
  loss.gamma: {type: loguniform, low: 1.0e-3, high: 0.3}
  model.clusters: {type: categorical, choices: [manual, half]}
scheduler: {type: fifo}
"""


@pytest.mark.slow  # a search, a server, two promotes and three predictions: the slow tier
def test_search_promote_predict_through_a_real_server(server: str, tmp_path: Path, tiny_store: Path) -> None:
    """Search, promote (trial and final model) and predict through a real MLflow server.
    Over 80 lines on purpose: one scenario, each check right after the step it checks."""
    import mlflow
    from mlflow.tracking import MlflowClient

    spec = write_spec(tmp_path, tiny_store, epochs=3, body=SPEC)
    out = run_search(
        SearchOptions(spec_path=str(spec), name="tracked", storage_path=str(tmp_path / "runs"), tracking_uri=server)
    )
    assert out.not_logged == []
    client = MlflowClient(tracking_uri=server)
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    tags = parent.data.tags
    assert tags["dedn.fingerprint"] == json.loads((tiny_store / "meta.json").read_text())["fingerprint"]
    assert tags["dedn.dataset"] == "tiny" and tags["dedn.search_spec"].endswith("spec.yaml")
    assert tags["ray.version"] and tags["optuna.version"] and tags["dedn.code_version"].startswith("0.")
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "store.json", "base_config.yaml", "epochs.parquet", "plots", "final_model"} <= top
    assert {"front.parquet", "final_model_curve.parquet"} <= top
    pngs = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert pngs == {
        f"plots/{n}.png"
        for n in (
            "val_H_per_epoch",
            "param_importance",
            "parallel_coordinates",
            "calibration_best_trial",
            "front",
            "calibration_final_model_test",
        )
    }
    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, artifact_path="plots", tracking_uri=server, dst_path=str(tmp_path / "plots")
        )
    )
    assert all((local / Path(p).name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert parent.data.metrics["test_H"] == pytest.approx(out.test["H"])  # type: ignore[index]

    # each child: its trial's sampled params, every epoch's metrics, final metrics, checkpoint
    rows = trial_rows(out.experiment)
    by_trial = {r.data.tags["dedn.trial_id"]: r for r in children}
    for trial_rows_ in rows.values():
        trial_id = trial_rows_[0]["trial_id"]
        run = by_trial[trial_id]
        config = trial_rows_[0]["config"]  # the sampled values, and the Optuna trial number (a tag)
        assert run.data.params == {k: str(v) for k, v in config.items() if k != "optuna_trial"}
        assert run.data.tags["optuna.trial_number"] == str(config["optuna_trial"])
        assert run.info.run_name == f"trial-{config['optuna_trial']:03d}"
        history = client.get_metric_history(run.info.run_id, "val_H")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (r["epoch"], pytest.approx(r["val_H"])) for r in trial_rows_
        ]
        assert run.data.metrics["best_val_H"] == pytest.approx(max(r["val_H"] for r in trial_rows_))
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint"}
        assert json.loads(run.data.tags["dedn.values"]) == {k: v for k, v in config.items() if k != "optuna_trial"}
        assert run.info.status == "FINISHED"

    # promote the best trial (--trial best) and serve it
    from cli.main import cli

    promote_args = ["promote", "--experiment", "tracked", "--model-name", "dedn-test", "--tracking-uri", server]
    promote_args += ["--trial", "best"]
    r = CliRunner().invoke(cli, promote_args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "validation figures of the trial reproduced" in r.output
    version = client.get_model_version_by_alias("dedn-test", "champion")
    best_child = max(children, key=lambda c: c.data.metrics["best_val_H"])
    assert version.run_id == best_child.info.run_id
    assert version.tags["dedn.trial_run_id"] == best_child.info.run_id
    assert version.tags["dedn.trial_id"] == best_child.data.tags["dedn.trial_id"]
    assert float(version.tags["dedn.best_val_H"]) == pytest.approx(best_child.data.metrics["best_val_H"])
    assert version.tags["dedn.fingerprint"] == tags["dedn.fingerprint"]
    r = CliRunner().invoke(cli, promote_args, catch_exceptions=False)  # again: no duplicate version
    assert r.exit_code == 0 and len(client.search_model_versions("name='dedn-test'")) == 1

    from tracking.store import mlflow_uris

    with mlflow_uris(server):  # process-wide: restored after, so that later tests do not log to this server
        model = mlflow.pyfunc.load_model("models:/dedn-test@champion")
    from dedn.build import build_model
    from dedn.data import open_store
    from dedn.model import mix_scores
    from dedn.partitions import resolve_partition
    from tuning.space import trial_config

    store = open_store(tiny_store)
    x = store.features()[store.indices("test")].astype(np.float32)
    got = model.predict(x)
    # independent check: the trial's own checkpoint, scored by hand with the trial's inference point
    ckpt = Path(
        mlflow.artifacts.download_artifacts(
            run_id=best_child.info.run_id,
            artifact_path="checkpoint",
            tracking_uri=server,
            dst_path=str(tmp_path / "trial"),
        )
    )
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)["best_model"]
    sampled = {k: json.loads(v) if v[:1] in "0123456789-" else v for k, v in best_child.data.params.items()}
    base = {
        "data": {"store": str(tiny_store)},
        **json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "base.yaml").read_text()))),
    }
    cfg = trial_config({**base, "data": {"store": str(tiny_store)}}, sampled).effective()
    ref = build_model(cfg, store, resolve_partition(cfg, store), torch.device("cpu"))
    ref.load_state_dict(state)
    ref.eval()
    inf = cfg.inference
    with torch.no_grad():
        p_ec, p_ef = ref.scores(ref(torch.from_numpy(x)), inf.lambda_rc)
        scores = mix_scores(p_ec, p_ef, inf.lambda_e, inf.calibration, torch.from_numpy(~store.classes.seen))
    np.testing.assert_array_equal(got["class_index"].to_numpy(), scores.argmax(1).numpy())
    assert list(got["class_name"]) == [store.classes.names[i] for i in got["class_index"]]
    np.testing.assert_array_equal(got["seen"].to_numpy(), store.classes.seen[got["class_index"].to_numpy()])

    pred_file = tmp_path / "preds.csv"
    r = CliRunner().invoke(
        cli,
        [
            "predict",
            "--model",
            "models:/dedn-test@champion",
            "--data",
            str(tiny_store),
            "--split",
            "test",
            "--out",
            str(pred_file),
            "--tracking-uri",
            server,
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    import pandas as pd

    df = pd.read_csv(pred_file)
    assert len(df) == len(x) and list(df["class_index"]) == list(got["class_index"])

    # a store with another feature shape is refused, one line, nothing written
    from dedn.data.synth import SynthConfig, synth_builtin

    synth_builtin(tmp_path / "other", SynthConfig(channels=16, height=4, width=4))
    r = CliRunner().invoke(
        cli,
        [
            "predict",
            "--model",
            "models:/dedn-test@champion",
            "--data",
            str(tmp_path / "other"),
            "--out",
            str(tmp_path / "bad.csv"),
            "--tracking-uri",
            server,
        ],
    )
    assert r.exit_code == 2 and "does not match the model" in r.stderr and not (tmp_path / "bad.csv").exists()

    # by default promote registers the final model, the one whose test figures the search printed
    final_args = ["promote", "--experiment", str(out.experiment), "--model-name", "dedn-test", "--tracking-uri", server]
    r = CliRunner().invoke(cli, final_args, catch_exceptions=False)
    assert r.exit_code == 0 and "test figures of the final model reproduced" in r.output, r.output
    final = client.get_model_version_by_alias("dedn-test", "champion")
    assert final.version != version.version and final.run_id == parent.info.run_id
    assert final.tags["dedn.final_of_search"] == parent.info.run_id
    assert float(final.tags["dedn.test_H"]) == pytest.approx(out.test["H"])  # type: ignore[index]
    applied = __import__("yaml").safe_load((out.experiment / "final_model" / "config.yaml").read_text())["inference"]
    assert {k: final.tags[f"dedn.inference.{k}"] for k in applied} == {k: str(v) for k, v in applied.items()}
    r = CliRunner().invoke(
        cli,
        ["predict", "--model", "models:/dedn-test@champion", "--data", str(tiny_store), "--split", "test"]
        + ["--out", str(tmp_path / "final.csv"), "--tracking-uri", server],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    df = pd.read_csv(tmp_path / "final.csv")
    truth = store.labels[store.indices("test")]
    assert list(df["true_class"]) == [store.classes.names[i] for i in truth]

    def per_class(classes: np.ndarray) -> float:  # mean over classes of the fraction of images right
        accs = [np.mean(df["class_index"].to_numpy()[truth == c] == c) for c in classes if (truth == c).any()]
        return float(np.mean(accs))

    s_acc = per_class(np.flatnonzero(store.classes.seen))
    u_acc = per_class(np.flatnonzero(~store.classes.seen))
    assert u_acc == pytest.approx(out.test["U"]) and s_acc == pytest.approx(out.test["S"])  # type: ignore[index]
    assert 2 * s_acc * u_acc / (s_acc + u_acc) == pytest.approx(out.test["H"])  # type: ignore[index]
    assert f"H {100 * out.test['H']:.1f}" in r.output  # type: ignore[index]


@pytest.mark.slow  # a full scenario (search, server or compile): the slow tier
@pytest.mark.parametrize("named", ["default", "option", "environment"])
def test_embedded_sqlite_default(named: str, tmp_path: Path, tiny_store: Path) -> None:
    """Without --tracking-uri a search logs to mlflow.db in the working folder; the relative form of MLflow's
    documentation, ``sqlite:///mlflow.db`` as an option or in MLFLOW_TRACKING_URI, names the same file, for the
    search and for promote run later from the same folder."""
    import os

    spec = write_spec(tmp_path, tiny_store, epochs=2, body=SPEC.replace("num_samples: 3", "num_samples: 2"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    option: list[str] = []
    if named == "option":
        option = ["--tracking-uri", "sqlite:///mlflow.db"]
    elif named == "environment":
        env["MLFLOW_TRACKING_URI"] = "sqlite:///mlflow.db"
    search = ["search", "-c", str(spec), "--name", "embedded", "--storage-path", "runs", "--no-final-test", *option]
    r = subprocess.run(cli_argv(*search), cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("embedded")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # the parent and two trials
    assert experiment.artifact_location == (tmp_path / "mlruns" / "embedded").as_uri()
    promote = ["promote", "--experiment", "embedded", "--model-name", "m", "--trial", "best", *option]
    r = subprocess.run(cli_argv(*promote), cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    promoted = client.get_model_version_by_alias("m", "champion").run_id
    before = next(run.info for run in runs if run.info.run_id == promoted)
    after = client.get_run(promoted).info  # the model is logged on the run without moving its end
    assert (after.status, after.start_time, after.end_time) == (before.status, before.start_time, before.end_time)


def test_relative_sqlite_uri_is_made_absolute_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tracking.store import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    here = tmp_path.resolve()
    assert resolve_tracking_uri(None) == f"sqlite:///{here / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{here / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///a/b.db?timeout=30") == f"sqlite:///{here / 'a' / 'b.db'}?timeout=30"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("sqlite:///:memory:") == "sqlite:///:memory:"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{here / 'env.db'}"


def test_file_store_is_refused_on_a_cluster(tmp_path: Path, tiny_store: Path) -> None:
    spec = write_spec(tmp_path, tiny_store, epochs=2, body=SPEC)
    with pytest.raises(DednInputError, match="a file store cannot serve a multi-node cluster"):
        run_search(
            SearchOptions(
                spec_path=str(spec),
                name="scatter",
                storage_path=str(tmp_path / "runs"),
                address="127.0.0.1:6379",
                tracking_uri=str(tmp_path / "mlruns"),
            )
        )
    assert not (tmp_path / "runs" / "scatter").exists()


def test_unreachable_server_stops_the_search_before_any_trial(tmp_path: Path, tiny_store: Path) -> None:
    spec = write_spec(tmp_path, tiny_store, epochs=2, body=SPEC)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DednInputError, match="tracking store: cannot be reached"):
        run_search(
            SearchOptions(spec_path=str(spec), name="nope", storage_path=str(tmp_path / "runs"), tracking_uri=dead)
        )
    assert not (tmp_path / "runs" / "nope").exists()


@pytest.mark.slow
def test_server_going_away_fails_no_trial(tmp_path: Path, tiny_store: Path) -> None:
    """The server dies after the first trial has logged: every trial still finishes, the search ends
    normally and reports what it could not log."""
    port = free_port()
    server = start_server(tmp_path / "mlflow", port)
    uri = f"http://127.0.0.1:{port}"
    spec = write_spec(tmp_path, tiny_store, epochs=8, body=SPEC.replace("num_samples: 3", "num_samples: 4"))
    exp = tmp_path / "runs" / "flaky"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cli.main import main; main()",
            "search",
            "-c",
            str(spec),
            "--name",
            "flaky",
            "--storage-path",
            str(tmp_path / "runs"),
            "--tracking-uri",
            uri,
            "--no-final-test",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**__import__("os").environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"},
    )
    try:
        end = time.time() + 240
        while time.time() < end and not any(len(v) >= 2 for v in trial_rows(exp).values()):
            time.sleep(0.3)
        server.terminate()
        server.wait(timeout=30)
        log, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
        server.kill()
    assert proc.returncode == 0, log[-3000:]
    assert "4 terminated" in log and "not logged" in log
    assert all(len(v) >= 1 for v in trial_rows(exp).values()) and len(trial_rows(exp)) == 4


def test_the_latest_search_is_the_latest_that_finished(tmp_path: Path) -> None:
    """promote without --experiment never picks a killed, failed or running search silently: it takes the newest
    finished one and names the newer unfinished one with the --experiment that picks it; none finished: refused."""
    from mlflow.tracking import MlflowClient

    from tracking.registry import latest_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)

    def search(name: str, start_ms: int, status: str | None) -> None:
        exp = client.create_experiment(name)
        run = client.create_run(exp, start_time=start_ms, tags={"dedn.search_spec": "x"})
        if status is not None:
            client.set_terminated(run.info.run_id, status=status)

    search("first", 1_000, "FINISHED")
    search("second", 2_000, "FINISHED")
    assert latest_search(uri) == ("second", None)
    search("killed", 3_000, "KILLED")
    name, note = latest_search(uri)
    assert name == "second" and note is not None and "'killed', is KILLED" in note and "--experiment killed" in note
    assert latest_search(uri, running=True)[0] == "second"  # dedn ui: a running search too, never a killed one
    search("running", 4_000, None)
    assert latest_search(uri)[0] == "second" and "--experiment running" in str(latest_search(uri)[1])
    assert latest_search(uri, running=True) == ("running", None)

    empty = f"sqlite:///{tmp_path / 'other.db'}"
    other = MlflowClient(tracking_uri=empty)
    run = other.create_run(other.create_experiment("only"), tags={"dedn.search_spec": "x"})
    other.set_terminated(run.info.run_id, status="FAILED")
    with pytest.raises(DednInputError, match="no search in this tracking store finished.*'only', is FAILED"):
        latest_search(empty)
