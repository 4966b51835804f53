"""The tracking callback on a resumed search (tuning.tracking_callback): runs of trials that the restored Tune
experiment does not know are closed, once. Real MLflow (SQLite in a temporary folder); Tune's trials are
stand-ins with the one attribute the callback reads of them here (``trial_id``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from tracking.runs import Tracker
from tuning.tracking_callback import MLflowTrialLogger


def test_runs_of_trials_the_resumed_experiment_does_not_know_end_killed(tmp_path: Path) -> None:
    uri, exp = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "exp"
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
