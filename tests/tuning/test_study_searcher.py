"""The Optuna searcher's own process (tuning.study_searcher): Tune's event loop never waits for the study and makes no
call on it, yet the study ends up with exactly what the driver was told, in order, and a saved searcher names nothing
the storage lacks.
Real Optuna storages (a journal file, SQLite) in a temporary folder."""

from __future__ import annotations

import os
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
def test_every_report_reaches_the_study_from_a_process_beside_the_driver(
    tmp_path: Path, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"journal:{tmp_path / 's.log'}" if form == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    s = _searcher(url, size=3)
    assert s.suggest("never-taken") is None  # the ask is queued; Tune asks again on its next step
    config = wait_for(lambda: s.suggest("t1"), 60, "a population")
    assert config["optuna_trials"] == [0, 1, 2]
    here: list[int] = []  # Optuna calls made in the driver's process: none
    for name in ("report", "set_user_attr"):
        original = getattr(optuna.trial.Trial, name)
        monkeypatch.setattr(optuna.trial.Trial, name, lambda *a, _f=original: here.append(1) or _f(*a))
    monkeypatch.setattr(optuna.Study, "tell", lambda *a, **k: here.append(1))
    for epoch in range(1, 6):
        members = {str(j): {"epoch": epoch, "val_H": 0.1 * epoch + 0.01 * j} for j in range(3)}
        s.on_trial_result("t1", {"epoch": epoch, "members": members})
    s.on_trial_complete("t1", {"epoch": 5, "members": members})
    s.save(str(tmp_path / "state.json"))  # waits for the queue: what it says was reported is stored
    monkeypatch.undo()
    assert here == [] and s.process.process.pid != os.getpid()
    trials = _study(url).trials
    assert [t.user_attrs["tune_trial_id"] for t in trials] == ["t1"] * 3  # the trial that took them
    assert [t.user_attrs["member"] for t in trials] == [0, 1, 2]
    assert [t.user_attrs["dedn.trial_id"] for t in trials] == ["t1-m0", "t1-m1", "t1-m2"]  # their MLflow runs' key
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


def test_a_pruned_configuration_is_worth_its_best_epoch(tmp_path: Path) -> None:
    """Intermediate values are the best validation H so far: Optuna keeps a PRUNED trial's last intermediate value
    as its value, which is then its best epoch's H (what MLflow's best_val_H and Tune's val_H_best say)."""
    url = f"journal:{tmp_path / 's.log'}"
    s = _searcher(url)
    wait_for(lambda: s.suggest("t1"), 60, "a configuration")
    raw = [0.30, 0.55, 0.41]  # the trial's H per epoch: the best is the second
    for epoch, h in enumerate(raw, start=1):
        s.on_trial_result("t1", {"epoch": epoch, "val_H": h})
    s.on_trial_complete("t1", {"epoch": 3, "val_H": raw[-1]})  # stopped before the last epoch (5): PRUNED
    s.flush()
    (t,) = _study(url).trials
    assert t.state == optuna.trial.TrialState.PRUNED
    assert t.intermediate_values == {1: 0.30, 2: 0.55, 3: 0.55}
    assert t.value == max(raw)


@pytest.mark.parametrize("size", [None, 2], ids=["single", "population"])
def test_trials_a_killed_driver_asked_after_its_last_saved_state_are_proposed_again(
    tmp_path: Path, size: int | None
) -> None:
    """A driver saves its searcher with Tune's state, asks and runs two more trials (one finished, one running), and
    dies. The restored searcher proposes those same Optuna trials again, first and in order, for the new Tune trials
    the restored experiment asks for, claims the running one for its new Tune trial, tells nothing twice, and only
    then asks Optuna for new configurations: the study never holds more trials than Tune asked for."""
    url = f"journal:{tmp_path / 's.log'}"
    key = "optuna_trial" if size is None else "optuna_trials"
    s = _searcher(url, size)
    first = wait_for(lambda: s.suggest("t1"), 60, "a trial")
    s.save(str(tmp_path / "state.json"))  # Tune's last saved state knows t1 only
    done = wait_for(lambda: s.suggest("t2"), 60, "a second trial")
    running = wait_for(lambda: s.suggest("t3"), 60, "a third trial")
    for epoch in (1, 2, 3, 4, 5):
        s.on_trial_result("t2", _result(size, epoch, 0.1 * epoch))
    s.on_trial_complete("t2", _result(size, 5, 0.5))
    s.on_trial_result("t3", _result(size, 1, 0.2))
    s.flush()  # then SIGKILL: t2 and t3 are in the storage, not in the saved state

    restored = _searcher(url, size)
    restored.restore(str(tmp_path / "state.json"))
    again = [restored.suggest("n1"), restored.suggest("n2")]
    assert [a[key] for a in again] == [done[key], running[key]]  # the same Optuna trials, the same values
    assert again[0] == done and again[1] == running
    fresh = wait_for(lambda: restored.suggest("n3"), 60, "a new configuration")
    restored.on_trial_complete("n1", _result(size, 5, 0.5))  # the re-run ends again: not told twice
    restored.flush()
    trials = _study(url).trials
    per = size or 1
    assert len(trials) == 4 * per  # t1, t2 (= n1), t3 (= n2), n3: nothing failed, nothing extra
    states = [t.state for t in trials]
    assert states[per : 2 * per] == [optuna.trial.TrialState.COMPLETE] * per
    assert all(st == optuna.trial.TrialState.RUNNING for st in states[2 * per :]), states
    numbers = fresh[key] if size else [fresh[key]]
    assert min(numbers) == 3 * per  # asked after the three that existed
    assert {t.user_attrs["tune_trial_id"] for t in trials[2 * per : 3 * per]} == {"n2"}  # the running one re-claimed
    assert {t.user_attrs["tune_trial_id"] for t in trials[per : 2 * per]} == {"t2"}  # a finished one keeps its attrs
    assert first[key] != done[key]


def _result(size: int | None, epoch: int, h: float) -> dict:
    if size is None:
        return {"epoch": epoch, "val_H": h}
    return {"epoch": epoch, "members": {str(j): {"epoch": epoch, "val_H": h} for j in range(size)}}


def test_a_killed_study_process_is_an_error_naming_it_not_a_wait(tmp_path: Path) -> None:
    """The study's process dies (SIGKILL, as the OOM killer would): the driver's next wait on it raises at once,
    naming the process and how it ended, and every later call says the same instead of hanging."""
    import signal

    s = _searcher(f"journal:{tmp_path / 's.log'}")
    wait_for(lambda: s.suggest("t1"), 60, "a configuration")
    pid = s.process.process.pid
    os.kill(pid, signal.SIGKILL)
    s.process.process.wait(timeout=30)
    s.on_trial_result("t1", {"epoch": 1, "val_H": 0.3})  # a call the process can no longer make
    for _ in range(2):
        with pytest.raises(RuntimeError, match=rf"pid {pid}, tuning.study_process\): it ended with exit code -9"):
            s.flush()
