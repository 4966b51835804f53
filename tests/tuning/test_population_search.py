"""``dedn search --population``: real local Ray, a real ``mlflow server`` on a loopback port, Optuna in
SQLite. Every member is its own Optuna trial and its own MLflow child run; halving stops members."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import ROOT, child_runs, cli_argv, training_worker, trial_rows, wait_for, write_spec
from tuning.population import section
from tuning.search import SearchOptions, run_search

SPEC = """
num_samples: 8
max_concurrent_trials: 2
params:
  optim.lr: {type: loguniform, low: 5.0e-4, high: 3.0e-3}
  loss.gamma: {type: loguniform, low: 1.0e-3, high: 0.3}
  model.clusters: {type: categorical, choices: [manual, half]}
scheduler: {type: fifo}
population: {size: 4, grace_period: 1, reduction_factor: 2}
"""


@pytest.mark.slow  # a full scenario (search, server or compile): the slow tier
def test_population_search_records_every_member(server: str, tmp_path: Path, tiny_store: Path) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    spec = write_spec(tmp_path, tiny_store, epochs=3, body=SPEC)
    out = run_search(
        SearchOptions(spec_path=str(spec), name="pop", storage_path=str(tmp_path / "runs"), tracking_uri=server)
    )
    assert out.population == 4 and out.num_trials == 2  # 8 configurations in 2 population trials
    assert out.not_logged == [] and out.test is not None

    # what each member reported, from Tune's result.json rows
    reported: dict[int, list[tuple[int, float]]] = {}  # Optuna trial number -> [(epoch, val_H)]
    configs: dict[int, dict] = {}
    ended: dict[int, tuple[str, int]] = {}
    for rows in trial_rows(out.experiment).values():
        numbers = rows[0]["config"]["optuna_trials"]
        for j, number in enumerate(numbers):
            configs[number] = rows[0]["config"]["members"][j]
            reported[number] = [
                (r["epoch"], section(r, "members")[str(j)]["val_H"]) for r in rows if str(j) in r["members"]
            ]
            for r in rows:
                if str(j) in r["ended"]:
                    ended[number] = (r["ended"][str(j)]["status"], r["epoch"])
        # halving with grace 1, eta 2 over 3 epochs: 4 members -> 2 after epoch 1 -> 1 after epoch 2
        assert [r["members_trained"] for r in rows] == [4, 2, 1]
        assert [r["members_active"] for r in rows] == [2, 1, 1]
        assert sorted(e for n, (_, e) in ended.items() if n in numbers) == [1, 1, 2]
    assert len(reported) == 8 and all(s == "stopped" for s, _ in ended.values())

    # Optuna: one trial per member; intermediate values are its per-epoch val_H; halving -> PRUNED
    study = optuna.load_study(study_name="pop", storage=f"sqlite:///{out.experiment / 'optuna.db'}")
    assert len(study.trials) == 8
    for t in study.trials:
        assert t.params == configs[t.number]
        so_far = [(e, max(h for _, h in reported[t.number][: i + 1])) for i, (e, _) in enumerate(reported[t.number])]
        assert sorted(t.intermediate_values.items()) == [(e, pytest.approx(h)) for e, h in so_far]  # best so far
        if t.number in ended:
            assert t.state == optuna.trial.TrialState.PRUNED
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE
            assert t.value == pytest.approx(max(h for _, h in reported[t.number]))
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2

    # MLflow: one child run per member, with its params, its val_H history and how it ended
    client = MlflowClient(tracking_uri=server)
    exp = client.get_experiment_by_name("pop")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 8
    for run in children:
        number = int(run.data.tags["optuna.trial_number"])
        assert run.data.params == {k: str(v) for k, v in configs[number].items()}
        history = client.get_metric_history(run.info.run_id, "val_H")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (e, pytest.approx(h)) for e, h in reported[number]
        ]
        assert run.data.metrics["best_val_H"] == pytest.approx(max(h for _, h in reported[number]))
        if number in ended:
            assert run.data.tags["dedn.stopped"] == f"stopped by successive halving at epoch {ended[number][1]}"
        assert run.info.status == "FINISHED"
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint"}
        assert json.loads(run.data.tags["dedn.values"]) == configs[number]  # what promote rebuilds its config from
    best = max(children, key=lambda r: r.data.metrics["best_val_H"])
    assert out.best_metrics["val_H"] == pytest.approx(best.data.metrics["best_val_H"])
    assert out.best_config == configs[int(best.data.tags["optuna.trial_number"])]

    # the best member promotes like any trial: its registered weights reproduce its validation metrics
    import mlflow

    from cli.main import cli

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    args = ["promote", "--experiment", "pop", "--model-name", "dedn-pop", "--tracking-uri", server, "--trial", "best"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    # promote leaves MLflow's process-wide URIs as it found them (later code must not talk to this server)
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
    assert r.exit_code == 0, r.output
    assert "validation figures of the trial reproduced" in r.output
    version = client.get_model_version_by_alias("dedn-pop", "champion")
    assert version.run_id == best.info.run_id
    progress = json.loads(next((out.experiment / "member_checkpoints").glob("*/progress.json")).read_text())
    assert {"partition", "history", "best_epoch"} <= set(progress)


@pytest.mark.slow
def test_population_search_resumes_after_the_driver_dies(tmp_path: Path, tiny_store: Path) -> None:
    import signal
    import subprocess

    import optuna

    # A population of this tiny model trains an epoch in ~0.1 s: 30 epochs keep the third population running for
    # seconds, long enough for the kill below to land in it on a fast machine as on a loaded one.
    EPOCHS = 30
    spec = write_spec(
        tmp_path,
        tiny_store,
        epochs=EPOCHS,
        body="""
num_samples: 6
max_concurrent_trials: 1
params:
  optim.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}
  loss.eps: {type: uniform, low: 0.0, high: 2.0}
scheduler: {type: fifo}
population: {size: 2, grace_period: 2, reduction_factor: 2}
""",
    )
    runs, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = runs / "presume"
    args = ["search", "-c", str(spec), "--name", "presume", "--storage-path", str(runs), "--no-final-test"]
    proc = subprocess.Popen(
        cli_argv(*args, "--tracking-uri", uri),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        # Tune copies result rows into the experiment folder with its state, every 10 s by default;
        # every 0.5 s here, so the kill lands while the third population runs
        env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"},
    )
    try:

        def two_done_third_started():  # type: ignore[no-untyped-def]
            rows = trial_rows(exp)
            done = [k for k, v in rows.items() if v and v[-1]["epoch"] == EPOCHS]
            started = [k for k, v in rows.items() if v and v[-1]["epoch"] < EPOCHS]
            return (done, started) if len(done) >= 2 and started else None

        done, _ = wait_for(two_done_third_started, 300, "two finished populations and a third under way")
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
    after = trial_rows(exp)
    assert len(after) == 3  # 6 configurations in populations of 2
    for k in done:
        assert after[k] == before[k]
    for k, v in after.items():  # every population reached its last epoch, halved to one member at epoch 2
        assert sorted({x["epoch"] for x in v}) == list(range(1, EPOCHS + 1)), (k, [x["epoch"] for x in v])
        assert {x["epoch"]: x["members_trained"] for x in v} == {e: 2 if e <= 2 else 1 for e in range(1, EPOCHS + 1)}
    # every member told once, also those of the population the driver's death interrupted
    study = optuna.load_study(study_name="presume", storage=f"sqlite:///{exp / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE"] * 3 + ["PRUNED"] * 3
    members = child_runs(uri, "presume")
    assert len(members) == 6 and all(m.info.status == "FINISHED" for m in members)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for m in members:  # each member's epochs logged once, across the driver's death
        steps = sorted(x.step for x in client.get_metric_history(m.info.run_id, "val_H"))
        assert steps == (list(range(1, EPOCHS + 1)) if "dedn.stopped" not in m.data.tags else [1, 2]), steps


@pytest.mark.slow
def test_killed_population_worker_is_retried_from_its_checkpoint(tmp_path: Path, tiny_store: Path) -> None:
    """SIGKILL the worker of a population trial after its first halving: Tune retries it from the
    population checkpoint, which holds the surviving members' stacked weights and optimiser state."""
    import signal
    import subprocess

    from mlflow.tracking import MlflowClient

    spec = write_spec(
        tmp_path,
        tiny_store,
        epochs=60,  # ~0.2 s each here: the worker must still be running when it is killed
        body="""
num_samples: 3
max_failures: 2
params:
  optim.lr: {type: loguniform, low: 1.0e-3, high: 2.0e-3}
scheduler: {type: fifo}
population: {size: 3, grace_period: 2, reduction_factor: 3}
""",
    )
    exp, uri = tmp_path / "runs" / "pkill", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["search", "-c", str(spec), "--name", "pkill", "--storage-path", str(tmp_path / "runs")]
    proc = subprocess.Popen(
        cli_argv(*args, "--no-final-test", "--tracking-uri", uri),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Judged on what the worker itself writes too (its checkpoints, its working folder): Tune's copy of the
        # results in the experiment folder can lag behind on a loaded machine, until after the last epoch.
        pid = wait_for(lambda: training_worker(exp, 3), 240, "the population's third epoch")
        os.kill(pid, signal.SIGKILL)  # the trial's worker dies after the halving at epoch 2
        log, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-3000:]
    (rows,) = trial_rows(exp).values()
    epochs = [r["epoch"] for r in rows]
    # as for a single trial (tests/tuning/test_search.py): no epoch missing; an epoch the killed worker reported whose
    # checkpoint Tune had not kept is re-run by the retry, and Tune may keep both rows (its results are at least
    # once), never two from the same worker
    assert sorted(set(epochs)) == list(range(1, 61)), epochs
    again = [e for e in set(epochs) if epochs.count(e) > 1]
    for e in again:
        assert sorted(r["pid"] != pid for r in rows if r["epoch"] == e) == [False, True], (e, rows)
    assert len(again) <= 1 and epochs == sorted(epochs), epochs
    assert len({r["pid"] for r in rows}) == 2 and pid in {r["pid"] for r in rows}  # the killed worker and the retry
    # halving 3 -> 1 at epoch 2 held across the retry: one member trained after it, the same one
    assert all(r["members_trained"] == (3 if r["epoch"] <= 2 else 1) for r in rows)
    assert len({tuple(r["members"]) for r in rows if r["epoch"] > 2}) == 1
    client = MlflowClient(tracking_uri=uri)
    members = child_runs(uri, "pkill")
    assert len(members) == 3 and all(m.info.status == "FINISHED" for m in members)
    for m in members:  # each epoch logged once, across the retry
        steps = [x.step for x in client.get_metric_history(m.info.run_id, "val_H")]
        assert len(steps) == len(set(steps))
        if "dedn.stopped" in m.data.tags:
            assert sorted(steps) == [1, 2]
        else:
            assert set(epochs) <= set(steps) <= set(range(1, 61))
            assert m.data.tags.get("dedn.retries") == "1"
