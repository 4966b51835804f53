"""The tracking callback (tuning.tracking_callback) keeps MLflow a view of Tune's record: on a resumed search, runs of
trials the restored experiment does not know are taken over by the trials proposed in their place, or end KILLED, runs of trials that ended while no driver ran are brought
up to date and ended, continued runs get exactly the epochs they lack; each epoch is logged once, as first reported;
``epoch_metrics: key`` logs the key metrics. Real MLflow (SQLite in a temporary folder); Tune's trials are stand-ins
with the attributes the callback reads of them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import new_store
from tracking.sink import Row, RunSink
from tuning.record import configuration_epochs, reports
from tuning.report import epochs_table
from tuning.tracking_callback import KEY_METRICS, MLflowTrialLogger


def record(epoch: int, j: int = 0, shift: float = 0.0) -> dict[str, Any]:
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
        "samples_per_s": 900.0,
        "note": "text",
    }


def trial(folder: Path, trial_id: str, config: dict[str, Any], status: str = "PENDING") -> SimpleNamespace:
    folder.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(
        trial_id=trial_id,
        config=config,
        status=status,
        local_path=str(folder),
        path=str(folder),
        experiment_tag=f"{len(trial_id)}_x",
        checkpoint=None,
        error_file=None,
    )


def report(epoch: int, shift: float = 0.0, members: int | None = None) -> dict[str, Any]:
    stamp = 1_800_000_000 + epoch
    if members is None:
        return {**record(epoch, 0, shift), "timestamp": stamp}
    columns = list(record(epoch))  # members as rows of values, as tuning.population.population_metrics reports them
    rows = {str(j): [record(epoch, j, shift)[c] for c in columns] for j in range(members)}
    return {"epoch": epoch, "members": rows, "member_columns": columns, "ended": {}, "timestamp": stamp}


def write_record(t: SimpleNamespace, results: list[dict[str, Any]]) -> None:
    with open(Path(t.local_path) / "result.json", "a") as f:  # what Tune's JsonLoggerCallback writes
        for r in results:
            f.write(json.dumps(r) + "\n")


def logger(uri: str, sink: RunSink, epoch_metrics: str = "all") -> MLflowTrialLogger:
    lg = MLflowTrialLogger(uri, "cb", str(sink.experiment_id), str(sink.parent_id), epoch_metrics, "")
    lg.setup()
    return lg


def steps(uri: str, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "val_H"))


@pytest.fixture
def parent(tmp_path: Path, empty_store: Path) -> tuple[str, RunSink]:
    uri = new_store(empty_store, tmp_path / "mlflow.db")
    sink = RunSink(uri, "cb", linger_s=0.0)
    sink.open_parent({})
    return uri, sink


def test_a_resumed_search_brings_every_run_up_to_date_with_the_record(tmp_path: Path, parent: Any) -> None:
    """Four runs a killed driver left: one whose trial Tune never recorded (abandoned), one of a trial that ended while no
    driver ran, one continued, and a population's two members. Over 80 lines on purpose: one scenario."""
    uri, first = parent
    single = {"optim.lr": 0.001, "optuna_trial": 0}
    ended = trial(tmp_path / "ended", "ended", {**single, "optuna_trial": 1}, "TERMINATED")
    going = trial(tmp_path / "going", "going", {**single, "optuna_trial": 2})
    pop = trial(tmp_path / "pop", "pop", {"members": [{"optim.lr": 1e-3}, {"optim.lr": 2e-3}], "optuna_trials": [3, 4]})
    for key in ("lost", "ended", "going", "pop-m0", "pop-m1"):
        first.create(key, f"trial-{key}", {}, {})
    for e in (1, 2, 3, 4, 5):  # what the killed driver had sent: more than the record Tune saved holds
        first.log("going", Row(e, (1_800_000_000 + e) * 1000, {"val_H": record(e)["val_H"]}), "epoch")
    first.flush(timeout_s=60)
    # the record: epoch 3 of "going" reported twice (retried from its checkpoint: the first report counts)
    write_record(ended, [report(e) for e in (1, 2, 3, 4)])
    write_record(going, [report(1), report(2), report(3), report(3, shift=0.5)])
    write_record(pop, [report(1, members=2)])

    lg = logger(uri, first)
    restored = [ended, going, pop]
    lg.on_step_begin(0, restored)
    lg.on_step_begin(1, restored)  # once: nothing more on later steps
    for t in (going, pop):
        lg.on_trial_start(0, restored, t)
    for e in (3, 4, 5):  # reported again (the trial continues from its checkpoint of epoch 2): not logged again
        lg.on_trial_result(0, restored, going, report(e, shift=0.5))
    lg.on_trial_result(0, restored, going, report(6))
    lg.on_trial_result(0, restored, pop, report(2, members=2))
    lg.on_trial_complete(0, restored, going)
    lg.on_trial_complete(0, restored, pop)
    lg.on_experiment_end(restored)
    assert lg.not_logged == []

    runs = first.runs()
    assert {k: r.info.status for k, r in runs.items()} == {
        "lost": "KILLED",
        "ended": "FINISHED",
        "going": "FINISHED",
        "pop-m0": "FINISHED",
        "pop-m1": "FINISHED",
    }
    assert [k for k, r in runs.items() if "dedn.abandoned" in r.data.tags] == ["lost"]
    for key, last in (("ended", 4), ("going", 6)):  # every epoch once, each as first reported
        history = steps(uri, runs[key].info.run_id)
        assert history == [(e, pytest.approx(record(e)["val_H"])) for e in range(1, last + 1)]
    assert runs["ended"].data.metrics["best_epoch"] == 4
    # the best epoch over every report, as the search selects (a report again counts, as in Tune's rows)
    assert runs["going"].data.metrics["best_val_H"] == pytest.approx(record(5, shift=0.5)["val_H"])
    for j in (0, 1):
        run = runs[f"pop-m{j}"].info.run_id
        assert steps(uri, run) == [(e, pytest.approx(record(e, j)["val_H"])) for e in (1, 2)]
    first.close(timeout_s=5)


def test_each_epoch_logs_all_its_values_or_the_key_ones(tmp_path: Path, parent: Any) -> None:
    uri, sink = parent
    pop = trial(tmp_path / "pop", "pop", {"members": [{"optim.lr": 1e-3}, {"optim.lr": 2e-3}], "optuna_trials": [0, 1]})
    one = trial(tmp_path / "one", "one", {"optim.lr": 1e-3, "optuna_trial": 2})
    key_logger, all_logger = logger(uri, sink, "key"), logger(uri, sink, "all")
    for lg, t, members in ((key_logger, pop, 2), (all_logger, one, None)):
        lg.on_step_begin(0, [t])
        lg.on_trial_start(0, [t], t)
        for e in (1, 2, 3):
            lg.on_trial_result(e, [t], t, report(e, members=members))
        lg.on_trial_complete(3, [t], t)
        lg.on_experiment_end([t])
    runs = sink.runs()
    client = MlflowClient(tracking_uri=uri)
    for j in (0, 1):
        run = client.get_run(runs[f"pop-m{j}"].info.run_id)
        assert {k for k in run.data.metrics if not k.startswith("best_")} == set(KEY_METRICS)
        assert run.data.tags["optuna.trial_number"] == str(j) and run.data.tags["dedn.member"] == str(j)
        assert json.loads(run.data.tags["dedn.values"]) == pop.config["members"][j]
        assert run.info.run_name == f"trial-003-m{j}"
    run = client.get_run(runs["one"].info.run_id)
    assert {k for k in run.data.metrics if not k.startswith("best_")} == {
        k for k, v in record(1).items() if isinstance(v, float) and k != "epoch"
    }
    assert run.info.run_name == "trial-002" and run.data.params == {"optim.lr": "0.001"}
    sink.close(timeout_s=5)


def test_the_parent_table_holds_every_configuration_epoch_as_first_reported(tmp_path: Path) -> None:
    pop = trial(tmp_path / "pop", "pop", {"members": [{"optim.lr": 1e-3}, {"optim.lr": 2e-3}], "optuna_trials": [0, 1]})
    write_record(pop, [report(1, members=2), report(2, members=2), report(2, shift=0.5, members=2)])
    with open(Path(pop.local_path) / "result.json", "a") as f:
        f.write('{"epoch": 3, "memb')  # a torn last line (a killed driver's): left out
    result = SimpleNamespace(path=pop.local_path, config=pop.config, metrics={"trial_id": "pop"})
    table = epochs_table([result]).to_pylist()
    want = [(f"pop-m{j}", e, record(e, j)["val_H"]) for j in (0, 1) for e in (1, 2)]
    assert [(r["trial_id"], r["epoch"], r["val_H"]) for r in table] == want
    assert all(r["samples_per_s"] == 900.0 and "note" not in r for r in table)
    epochs = configuration_epochs(reports(Path(pop.local_path) / "result.json"), 1, up_to=1)
    assert [(stamp, r["epoch"]) for stamp, r in epochs] == [(1_800_000_001_000, 1)]


def test_the_run_of_a_trial_tune_lost_is_taken_over_by_the_trial_proposed_in_its_place(
    tmp_path: Path, parent: Any
) -> None:
    """A killed driver's trial (Optuna trial 7) that Tune's saved state never named: on resume the searcher proposes
    Optuna trial 7 again as a new Tune trial, whose run is the lost one, re-keyed and named as before, continued with
    the epochs it lacks; no second run, nothing abandoned."""
    uri, first = parent
    first.create("lost", "trial-007", {"optim.lr": 0.002}, {"optuna.trial_number": "7"})
    for e in (1, 2, 3):
        first.log("lost", Row(e, (1_800_000_000 + e) * 1000, {"val_H": record(e)["val_H"]}), "epoch")
    first.flush(timeout_s=60)
    lost_id = first.runs()["lost"].info.run_id

    again = trial(tmp_path / "again", "again", {"optim.lr": 0.002, "optuna_trial": 7})
    lg = logger(uri, first)
    lg.on_step_begin(0, [])  # the restored experiment knows no trial
    lg.on_trial_start(0, [again], again)
    for e in (1, 2, 3, 4, 5):  # the trial starts afresh: epochs 1 to 3 are in the run already
        lg.on_trial_result(0, [again], again, report(e))
    lg.on_trial_complete(0, [again], again)
    lg.on_experiment_end([again])
    assert lg.not_logged == []

    runs = first.runs()
    assert list(runs) == ["again"] and runs["again"].info.run_id == lost_id
    run = runs["again"]
    assert run.info.status == "FINISHED" and run.info.run_name == "trial-007" and "dedn.abandoned" not in run.data.tags
    assert steps(uri, lost_id) == [(e, pytest.approx(record(e)["val_H"])) for e in range(1, 6)]
    first.close(timeout_s=5)


def test_the_callback_keeps_the_store_params_through_tunes_pickle() -> None:
    """Tune pickles its callbacks with the experiment: a resumed search's runs still get the store's params."""
    import pickle

    logger = MLflowTrialLogger("sqlite:///x.db", "e", "1", "p", params={"store.size": "448"})
    again = pickle.loads(pickle.dumps(logger))
    assert again.params == {"store.size": "448"} and again.sink is None
