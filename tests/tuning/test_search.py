"""dedn search on a real local Ray cluster: Optuna in SQLite, ASHA, failures, kills and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest

from tests.helpers import (
    ROOT,
    TINY_CONFIG,
    child_runs,
    cli_argv,
    new_store,
    training_worker,
    trial_rows,
    wait_for,
    write_spec,
)
from tuning.search import SearchOptions, run_search


@pytest.mark.parametrize(
    "objective", ["H", pytest.param("AUSUC", marks=pytest.mark.slow), pytest.param("U@S>=0.5", marks=pytest.mark.slow)]
)
def test_search_end_to_end(tmp_path: Path, tiny_store: Path, empty_store: Path, objective: str) -> None:
    """The default tier's real search: trials, ASHA, checkpoints, failures, and Tune, Optuna and MLflow agreeing on
    the spec's objective (``val_objective``; H by default, AUSUC and a constrained U in the slow tier).
    Over 80 lines on purpose: one scenario, each check right after the step it checks."""
    spec = write_spec(
        tmp_path,
        tiny_store,
        epochs=4,
        body="""
num_samples: 6
max_concurrent_trials: 2
max_failures: 0
params:
  optim.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}
  loss.gamma: {type: loguniform, low: 1.0e-3, high: 1.0}
  model.clusters: {type: categorical, choices: [manual, kmeans]}
  model.kmeans_q: {type: int, low: 2, high: 6, when: {model.clusters: kmeans}}
  inference.calibration: {type: uniform, low: 0.0, high: 2.0}
points_to_evaluate:
  - {optim.lr: 1.0e+9, loss.gamma: 0.1, model.clusters: manual, inference.calibration: 1.0}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
checkpoint_every: 3
objective: "OBJECTIVE"
""".replace("OBJECTIVE", objective),
    )
    uri = new_store(empty_store, tmp_path / "mlflow.db")
    out = run_search(
        SearchOptions(spec_path=str(spec), name="e2e", storage_path=str(tmp_path / "runs"), tracking_uri=uri)
    )
    assert out.num_trials == 6
    # the diverging trial failed with its reason; the search went on
    assert len(out.errors) == 1 and "diverged" in next(iter(out.errors.values()))
    rows = trial_rows(out.experiment)
    ok = {k: v for k, v in rows.items() if v}
    assert len(ok) == 5
    assert all(r["features_zero_copy"] for v in ok.values() for r in v)
    epochs = [len(v) for v in ok.values()]
    assert max(epochs) == 4 and min(epochs) < 4, epochs  # ASHA stopped someone early
    assert all([r["epoch"] for r in v] == list(range(1, len(v) + 1)) for v in ok.values())
    K = "val_objective"
    for v in ok.values():  # the objective's value as computed from the reported U/S/H/AUSUC
        for r in v:
            assert r[K] == {"H": r["val_H"], "AUSUC": r["val_AUSUC"]}.get(objective, r[K]) and 0 <= r[K] <= 1
            assert objective != "U@S>=0.5" or r[K] >= r["val_U"] * (r["val_S"] >= 0.5)
    # checkpoints every 3rd epoch, at the last epoch (4) and whenever the validation objective improved
    for v in ok.values():
        h = [r[K] for r in v]
        for i, r in enumerate(v):
            improved = h[i] > max(h[:i], default=-1.0)
            assert r["checkpointed"] == (improved or r["epoch"] in (3, 4)), (r["epoch"], h)
    best = max(r[K] for v in ok.values() for r in v)
    assert out.best_metrics[K] == pytest.approx(best)
    assert out.test is not None and set(out.test) >= {"U", "S", "H", "T"}
    assert json.loads((out.experiment / "best.json").read_text())["num_trials"] == 6
    children = child_runs(uri, "e2e")
    assert len(children) == 6
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == 1 and "diverged" in failed[0].data.tags["dedn.error"]

    # one truth: Tune's rows, the Optuna study and the MLflow runs agree on every trial and on the best
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{out.experiment / 'optuna.db'}")
    by_tune = {v[0]["trial_id"]: v for v in ok.values()}
    states = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert len(study.trials) == 6 and len(states) == 6
    for tid, t in states.items():
        if tid not in by_tune:  # the diverging trial
            assert t.state == optuna.trial.TrialState.FAIL
            continue
        v = by_tune[tid]
        # per epoch (step = epoch) the best value so far: a pruned trial's value is then its best, as in MLflow
        assert t.intermediate_values == pytest.approx(
            {r["epoch"]: max(x[K] for x in v[: i + 1]) for i, r in enumerate(v)}
        )
        if len(v) == 4:  # ran to its last epoch: told its best epoch, what the search selects on
            assert t.state == optuna.trial.TrialState.COMPLETE
            assert t.value == pytest.approx(max(r[K] for r in v))
        else:  # stopped by ASHA: Optuna keeps a pruned trial's last intermediate value, the best so far
            assert t.state == optuna.trial.TrialState.PRUNED and t.value == pytest.approx(max(r[K] for r in v))
    best_tid = next(tid for tid, v in by_tune.items() if any(r[K] == best for r in v))
    assert study.best_trial.user_attrs["tune_trial_id"] == best_tid
    assert study.best_value == pytest.approx(best) == pytest.approx(out.best_metrics[K])
    runs = {r.data.tags["dedn.trial_id"]: r for r in children}
    for t in study.trials:  # each Optuna trial names its MLflow run by its key, and the run names the trial back
        run = runs[t.user_attrs["dedn.trial_id"]]
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["dedn.trial_id"] == t.user_attrs["tune_trial_id"]
        assert run.info.run_name == f"trial-{t.number:03d}"
        # how it ended, told apart in MLflow's table (its status says FINISHED for completed and stopped alike)
        outcome = {"COMPLETE": "completed", "PRUNED": "stopped", "FAIL": "failed"}[t.state.name]
        assert run.data.tags["dedn.outcome"] == outcome, (t.state, run.data.tags)
        assert run.data.tags["mlflow.note.content"].startswith(outcome)
        if t.state != optuna.trial.TrialState.FAIL:  # one value per trial: Optuna's is MLflow's best_val_objective
            assert t.value == pytest.approx(run.data.metrics[f"best_{K}"])
    # one name per trial: Tune's folder is named as the MLflow run and after the Optuna number
    assert {p.parent.name for p in out.experiment.glob("*/params.json")} == {
        f"trial-{t.number:03d}" for t in study.trials
    }
    finished = [r for r in children if r.info.status == "FINISHED"]
    top = max(finished, key=lambda r: r.data.metrics[f"best_{K}"])
    assert top.data.tags["dedn.trial_id"] == study.best_trial.user_attrs["dedn.trial_id"]
    assert top.data.metrics[f"best_{K}"] == pytest.approx(study.best_value)
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(tracking_uri=uri).get_run(str(out.parent_run_id))
    assert parent.data.params == {k: str(v) for k, v in out.best_config.items()}  # the best configuration
    assert parent.data.metrics[f"best_{K}"] == pytest.approx(study.best_value)
    assert parent.data.tags["dedn.best_trial_run_id"] == top.info.run_id
    # the validation front over all trials: no point of it beats another, and no trial's own best point beats it
    import pyarrow.parquet as pq

    got = MlflowClient(tracking_uri=uri).download_artifacts(parent.info.run_id, "front.parquet", str(tmp_path))
    front = [(p["U"], p["S"]) for p in pq.read_table(got).to_pylist()]
    assert front and all(not (u2 >= u and s2 >= s and (u2, s2) != (u, s)) for u, s in front for u2, s2 in front)
    for v in ok.values():
        r = max(v, key=lambda x: (x[K], -x["epoch"]))  # the trial's best epoch, the earliest of equals
        assert any(u >= r["val_U"] - 1e-9 and s >= r["val_S"] - 1e-9 for u, s in front), (r, front)
    assert out.front is not None and out.front["front_knee_U"] in {u for u, _ in front}
    # the final model's exact test curve: its area is test_AUSUC, and the test figures are one of its points
    got = MlflowClient(tracking_uri=uri).download_artifacts(
        parent.info.run_id, "final_model_curve.parquet", str(tmp_path)
    )
    curve = pq.read_table(got).to_pydict()
    u, s = np.asarray(curve["U"]), np.asarray(curve["S"])
    assert float(np.sum(np.diff(u) * (s[1:] + s[:-1]) / 2)) == pytest.approx(parent.data.metrics["test_AUSUC"])
    assert out.test is not None and min(abs(u - out.test["U"]) + abs(s - out.test["S"])) < 1e-9


@pytest.mark.slow
def test_killed_trial_worker_is_retried_from_its_checkpoint(tmp_path: Path, tiny_store: Path) -> None:
    spec = write_spec(
        tmp_path,
        tiny_store,
        epochs=60,  # ~0.2 s each here: the worker must still be training when it is killed
        body="""
num_samples: 1
max_failures: 2
params:
  optim.lr: {type: loguniform, low: 1.0e-3, high: 2.0e-3}
scheduler: {type: fifo}
""",
    )
    exp = tmp_path / "runs" / "kill"
    proc = subprocess.Popen(
        cli_argv(
            "search",
            "-c",
            str(spec),
            "--name",
            "kill",
            "--storage-path",
            str(tmp_path / "runs"),
            "--no-final-test",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Judged on what the worker itself writes (its checkpoints, its working folder): Tune's copy of the
        # results in the experiment folder can lag behind on a loaded machine, until after the last epoch.
        pid = wait_for(lambda: training_worker(exp, 3), 240, "the trial's third epoch")
        os.kill(pid, signal.SIGKILL)  # the trial's worker process dies mid-training
        log, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-3000:]
    (rows,) = trial_rows(exp).values()
    epochs = [r["epoch"] for r in rows]
    # resumed from its checkpoint, the run ends at the last epoch with no epoch missing. An epoch the killed worker
    # reported whose checkpoint Tune had not kept is re-run from the previous checkpoint by the retry: Tune may keep
    # both rows (its results are at least once), never two from the same worker.
    assert sorted(set(epochs)) == list(range(1, 61)), epochs
    again = [e for e in set(epochs) if epochs.count(e) > 1]
    for e in again:
        assert sorted(r["pid"] != pid for r in rows if r["epoch"] == e) == [False, True], (e, rows)
    assert len(again) <= 1 and epochs == sorted(epochs), epochs
    assert len({r["pid"] for r in rows}) == 2 and pid in {r["pid"] for r in rows}  # the killed one and the retry
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (run,) = child_runs(uri, "kill")  # the retried trial continued its own run
    history = MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "val_H")
    steps = [m.step for m in history]
    # each epoch logged once; the run may hold the epoch whose result row Tune lost in the kill
    assert len(steps) == len(set(steps)) and set(epochs) <= set(steps) <= set(range(1, 61))
    assert run.data.tags.get("dedn.retries") == "1" and run.info.status == "FINISHED"


@pytest.mark.slow
def test_driver_killed_then_resumed(tmp_path: Path, tiny_store: Path) -> None:
    """A driver killed mid-search and resumed: every trial continues, nothing logged twice.
    Over 80 lines on purpose: one scenario, each check right after the step it checks."""
    # a trial of this tiny model trains an epoch in ~0.1 s: 30 epochs keep the third one running for seconds, long
    # enough for the kill below to land in it (at 6, a trial could end between two copies of Tune's results)
    EPOCHS = 30
    spec = write_spec(
        tmp_path,
        tiny_store,
        epochs=EPOCHS,
        body="""
num_samples: 4
max_concurrent_trials: 1
params:
  optim.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}
  loss.eps: {type: uniform, low: 0.0, high: 2.0}
scheduler: {type: fifo}
""",
    )
    runs = tmp_path / "runs"
    exp = runs / "resume"
    proc = subprocess.Popen(
        cli_argv(
            "search",
            "-c",
            str(spec),
            "--name",
            "resume",
            "--storage-path",
            str(runs),
            "--no-final-test",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,  # not read: a pipe would fill and hold the driver
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        # Tune copies result rows into the experiment folder with its state, every 10 s by default;
        # every 0.5 s here, so the kill lands while the third trial runs
        env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"},
    )
    try:

        def two_done_third_started():  # type: ignore[no-untyped-def]
            rows = trial_rows(exp)
            done = [k for k, v in rows.items() if v and v[-1]["epoch"] == EPOCHS]
            started = [k for k, v in rows.items() if v and v[-1]["epoch"] < EPOCHS]
            return (done, started) if len(done) >= 2 and started else None

        done, _ = wait_for(two_done_third_started, 240, "two finished trials and a third under way")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die at once
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = trial_rows(exp)
    r = subprocess.run(
        cli_argv("search", "-c", str(spec), "--resume", str(exp), "--no-final-test"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # as quiet as a first run: the progress line and the summary, not Tune's boxes, INFO lines or results warnings
    noise = [
        line for line in (r.stdout + r.stderr).splitlines() if any(m in line for m in (" INFO ", " WARNING ", "│"))
    ]
    assert not noise, noise[:5]
    after = trial_rows(exp)
    assert len(after) == 4  # what was asked, not more
    for k in done:  # finished trials were not rerun
        assert after[k] == before[k]
    for k, v in after.items():  # every trial reached its last epoch; the interrupted one continued
        # (it may repeat the epochs after the last checkpoint the killed driver had recorded)
        assert sorted({x["epoch"] for x in v}) == list(range(1, EPOCHS + 1)), (k, [x["epoch"] for x in v])
    interrupted = [k for k in after if k not in done]
    assert any(len(after[k]) > len(before.get(k, [])) for k in interrupted)
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{exp / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    best = json.loads((exp / "best.json").read_text())
    assert best["num_trials"] == 4
    assert best["best_metrics"]["val_H"] == pytest.approx(max(x["val_H"] for v in after.values() for x in v))
    runs = child_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume")  # one run per trial, resumed ones continued
    assert len(runs) == 4 and len({r.data.tags["dedn.trial_id"] for r in runs}) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for r in runs:  # each epoch logged once, also across the driver's death
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_H")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), steps


@pytest.mark.slow  # long: the slow tier
def test_trials_read_features_from_the_object_store_not_parquet(tmp_path: Path, tiny_store: Path) -> None:
    import shutil

    import ray

    from cluster.connect import ray_session
    from cluster.objects import is_object_store_view, share_store
    from dedn.config import load_config
    from dedn.data import open_store
    from dedn.train import train

    copy = tmp_path / "store"
    shutil.copytree(tiny_store, copy)
    cfg = load_config(TINY_CONFIG, [f"data.store={copy}", "optim.epochs=1", "device=cpu"])

    @ray.remote(num_cpus=1)
    def trial(shared):  # type: ignore[no-untyped-def]
        store = shared.materialize()
        feats = store.features()
        r = train(cfg, store)
        return is_object_store_view(feats), float(feats.astype(np.float64).sum()), r.history[0].loss["total"]

    with ray_session(None, num_cpus=2):
        store = open_store(copy)
        expected = float(store.features().astype(np.float64).sum())
        shared = share_store(store)
        shutil.rmtree(copy)  # no Parquet file left to read
        results = ray.get([trial.remote(shared), trial.remote(shared)])
    for zero_copy, total, loss in results:
        assert zero_copy and total == expected and np.isfinite(loss)


@pytest.mark.slow
def test_search_across_two_ray_nodes(tmp_path: Path, tiny_store: Path) -> None:
    """A second Ray node on this machine (Ray's own multi-node test cluster): trials run on both nodes
    and read their features from the object store."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        spec = write_spec(
            tmp_path,
            tiny_store,
            epochs=3,
            body="""
num_samples: 4
max_concurrent_trials: 2
params:
  optim.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}
scheduler: {type: fifo}
""",
        )
        out = run_search(
            SearchOptions(
                spec_path=str(spec),
                name="nodes",
                storage_path=str(tmp_path / "runs"),
                address=cluster.address,
                final_test=False,
            )
        )
    finally:
        cluster.shutdown()
    rows = [r for v in trial_rows(out.experiment).values() for r in v]
    assert out.num_trials == 4
    assert len({r["node_id"] for r in rows}) == 2
    assert all(r["features_zero_copy"] for r in rows)
