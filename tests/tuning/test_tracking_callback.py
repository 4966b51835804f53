"""The tracking callback (tuning.tracking_callback): on a resumed search, runs of trials that the restored Tune
experiment does not know are closed, once; with ``epoch_metrics: key``, five metrics per epoch and the whole
record as ``epochs.parquet``. Real MLflow (SQLite in a temporary folder); Tune's trials are
stand-ins with the one attribute the callback reads of them here (``trial_id``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import new_store
from tracking.runs import Tracker
from tuning.tracking_callback import KEY_METRICS, MLflowTrialLogger


def test_runs_of_trials_the_resumed_experiment_does_not_know_end_killed(tmp_path: Path, empty_store: Path) -> None:
    uri, exp = new_store(empty_store, tmp_path / "mlflow.db"), tmp_path / "exp"
    exp.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text("num_samples: 3\n")
    first = Tracker(uri, exp, "resumed")
    first.parent({}, str(spec))
    for key in ("known", "lost", "pop-m0", "pop-m1"):  # a single trial's run, a lost one, a population's two
        first.child(key, f"trial-{key}", {})
    # the next driver: Tune restored "known" and "pop"; "lost" started after Tune last saved its state
    logger = MLflowTrialLogger(Tracker(uri, exp, "resumed"), {})
    trials = [SimpleNamespace(trial_id="known"), SimpleNamespace(trial_id="pop")]
    logger.on_step_begin(0, trials)
    logger.on_step_begin(1, trials)  # once: nothing more on later steps
    client = MlflowClient(tracking_uri=uri)
    runs = {k: client.get_run(first.run_of(k)) for k in ("known", "lost", "pop-m0", "pop-m1")}
    assert {k: r.info.status for k, r in runs.items()} == {
        "known": "RUNNING",
        "lost": "KILLED",
        "pop-m0": "RUNNING",
        "pop-m1": "RUNNING",
    }
    assert [k for k, r in runs.items() if "dedn.abandoned" in r.data.tags] == ["lost"]
    assert Tracker(uri, exp, "resumed").state["abandoned"] == ["lost"]  # recorded: a later resume skips it


def test_key_epoch_metrics_log_five_per_epoch_and_the_whole_record_as_parquet(
    tmp_path: Path, empty_store: Path
) -> None:
    import pyarrow.parquet as pq

    from tracking.epochs import EPOCHS_FILE

    uri, exp, trial_dir = new_store(empty_store, tmp_path / "mlflow.db"), tmp_path / "exp", tmp_path / "exp" / "trial"
    trial_dir.mkdir(parents=True)
    spec = tmp_path / "spec.yaml"
    spec.write_text("num_samples: 2\n")
    tracker = Tracker(uri, exp, "key")
    tracker.parent({}, str(spec))
    logger = MLflowTrialLogger(tracker, {}, "key")
    members = [{"optim.lr": 1e-3}, {"optim.lr": 2e-3}]
    trial = SimpleNamespace(
        trial_id="pop", config={"members": members, "optuna_trials": [0, 1]}, local_path=str(trial_dir), checkpoint=None
    )

    def record(epoch: int, j: int, shift: float = 0.0) -> dict[str, object]:
        h = 0.1 * epoch + 0.01 * j + shift
        return {
            "epoch": epoch,
            "val_H": h,
            "val_U": h - 0.05,
            "val_S": h + 0.05,
            "val_T": h,
            "grid_c": 1.0 + j,
            "grid_lambda_rc": 0.8,
            "grid_lambda_e": 0.5,
            "loss_total": 2.0 / epoch,
            "loss_cls_c": 1.0 / epoch,
            "samples_per_s": 900.0,
            "note": "text",
        }

    # epoch 2 reported twice (a resumed trial reports again the epochs after its checkpoint): the first counts
    reports = [(1, 0.0), (2, 0.0), (2, 0.5), (3, 0.0)]
    with open(trial_dir / "result.json", "w") as f:  # what Tune's JsonLoggerCallback writes before the callback runs
        for epoch, shift in reports:
            result = {"epoch": epoch, "members": {str(j): record(epoch, j, shift) for j in range(2)}, "ended": {}}
            f.write(json.dumps(result) + "\n")
            logger.on_trial_result(epoch, [trial], trial, result)
        f.write('{"epoch": 4, "memb')  # a torn last line: skipped
    logger.on_trial_complete(4, [trial], trial)
    client = MlflowClient(tracking_uri=uri)
    for j in range(2):
        run = tracker.run_of(f"pop-m{j}")
        per_epoch = {k for k in client.get_run(run).data.metrics if not k.startswith("best_")}
        assert per_epoch == set(KEY_METRICS)  # not loss_cls_c, grid_c, samples_per_s
        assert [(m.step, m.value) for m in client.get_metric_history(run, "val_H")] == [
            (e, pytest.approx(0.1 * e + 0.01 * j)) for e in (1, 2, 3)
        ]
        table = pq.read_table(client.download_artifacts(run, EPOCHS_FILE, str(tmp_path / f"m{j}"))).to_pylist()
        assert table == [{k: pytest.approx(v) for k, v in record(e, j).items() if k != "note"} for e in (1, 2, 3)]
        assert client.get_run(run).info.status == "FINISHED"
    assert not list(exp.glob(".epochs-*"))  # the temporary Parquet files are gone
