"""The Optuna searcher's own thread (tuning.study_searcher): Tune's event loop never waits for the study, yet the
study ends up with exactly what the driver was told, in order, and a saved searcher names nothing the storage lacks.
Real Optuna storages (a journal file, SQLite) in a temporary folder."""

from __future__ import annotations

import threading
from pathlib import Path

import optuna
import pytest

from tests.helpers import wait_for
from tuning.space import DefineByRun, SearchSpec
from tuning.study_searcher import StudySearcher, fail_unstarted

SPEC = SearchSpec.model_validate(
    {"base": "b.yaml", "params": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
)


def _searcher(url: str, size: int | None = None) -> StudySearcher:
    return StudySearcher(DefineByRun(SPEC, False), size, url, "s", 0, None, "val_H", "max", 5)


def _study(url: str) -> optuna.Study:
    from tuning.optuna_storage import open_storage

    return optuna.load_study(study_name="s", storage=open_storage(url))


@pytest.mark.parametrize("form", ["journal", "sqlite"])
def test_every_report_reaches_the_study_off_the_driver_thread(
    tmp_path: Path, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"journal:{tmp_path / 's.log'}" if form == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    s = _searcher(url, size=3)
    assert s.suggest("never-taken") is None  # the ask is queued; Tune asks again on its next step
    config = wait_for(lambda: s.suggest("t1"), 60, "a population")
    assert config["optuna_trials"] == [0, 1, 2]
    threads: set[str] = set()
    original = optuna.trial.Trial.report

    def spy(self: optuna.trial.Trial, value: float, step: int) -> None:
        threads.add(threading.current_thread().name)
        original(self, value, step)

    monkeypatch.setattr(optuna.trial.Trial, "report", spy)
    for epoch in range(1, 6):
        members = {str(j): {"epoch": epoch, "val_H": 0.1 * epoch + 0.01 * j} for j in range(3)}
        s.on_trial_result("t1", {"epoch": epoch, "members": members})
    s.on_trial_complete("t1", {"epoch": 5, "members": members})
    s.save(str(tmp_path / "state.json"))  # waits for the queue: what it says was reported is stored
    monkeypatch.undo()
    assert threads and all(name.startswith("optuna-study") for name in threads)
    trials = _study(url).trials
    assert [t.user_attrs["tune_trial_id"] for t in trials] == ["t1"] * 3  # the trial that took them
    assert [t.user_attrs["member"] for t in trials] == [0, 1, 2]
    for j, t in enumerate(trials):
        assert t.intermediate_values == {e: pytest.approx(0.1 * e + 0.01 * j) for e in range(1, 6)}
        assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(0.5 + 0.01 * j)


def test_configurations_asked_as_the_search_ended_end_failed(tmp_path: Path) -> None:
    url = f"journal:{tmp_path / 's.log'}"
    s = _searcher(url)
    taken = wait_for(lambda: s.suggest("t1"), 60, "a configuration")
    s.on_trial_result("t1", {"epoch": 1, "val_H": 0.3})
    assert s.suggest("t2") is None  # asked for the next trial; then the time budget ends
    s.flush()
    assert fail_unstarted(url, "s") == 1
    trials = _study(url).trials
    assert trials[0].number == taken["optuna_trial"] and trials[0].state == optuna.trial.TrialState.RUNNING
    assert trials[1].state == optuna.trial.TrialState.FAIL and "dedn.unstarted" in trials[1].user_attrs
    assert fail_unstarted(url, "s") == 0 and fail_unstarted(url, "other") == 0


def test_a_trial_that_ends_before_its_run_is_saved_still_names_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial that fails before its first report ends before the tracker's writer has saved its run id (within
    about 2 s); an Optuna trial cannot be changed once told, so the tell waits for the id. After a wait in vain
    (tracking offline) the next ends do not wait, until a link succeeds again."""
    import json
    import time

    import tuning.study_searcher as study_searcher

    time_sleep = time.sleep

    monkeypatch.setattr(study_searcher, "LINK_WAIT_S", 3.0)
    runs = tmp_path / "mlflow_runs.state"
    url = f"journal:{tmp_path / 's.log'}"
    s = StudySearcher(DefineByRun(SPEC, False), None, url, "s", 0, None, "val_H", "max", 5, runs_file=str(runs))
    for t in ("t1", "t2", "t3"):
        wait_for(lambda t=t: s.suggest(t), 60, "a configuration")

    def save_later() -> None:  # the tracker's writer, a second later
        time.sleep(1.0)
        runs.write_text(json.dumps({"parent": "p", "trials": {"t1": "run-1"}}))

    writer = threading.Thread(target=save_later)
    writer.start()
    s.on_trial_complete("t1", None, error=True)  # failed before any report
    s.flush()
    writer.join()
    first = _study(url).trials[0]
    assert first.state == optuna.trial.TrialState.FAIL and first.user_attrs["mlflow_run_id"] == "run-1"

    sleeps: list[float] = []  # the study thread's waits, observed

    def sleep(dt: float) -> None:
        if threading.current_thread().name.startswith("optuna-study"):
            sleeps.append(dt)
        time_sleep(dt)

    monkeypatch.setattr(study_searcher.time, "sleep", sleep)
    t0 = time.monotonic()
    s.on_trial_complete("t2", None, error=True)  # its run never comes: a wait in vain
    s.flush()
    assert time.monotonic() - t0 >= 3.0 and sleeps
    waited = len(sleeps)
    s.on_trial_complete("t3", None, error=True)  # then no wait
    s.flush()
    assert len(sleeps) == waited
    second, third = _study(url).trials[1:]
    assert second.state == third.state == optuna.trial.TrialState.FAIL
    assert "mlflow_run_id" not in second.user_attrs and "mlflow_run_id" not in third.user_attrs
