"""The buffered journal (tuning.optuna_storage.BufferedJournal) stores what Optuna's plain file backend stores, in one
write. Real journal files in a temporary folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from tests.helpers import toy_objective, toy_space
from tuning.optuna_storage import BufferedJournal

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _drive(storage: Any) -> optuna.Study:
    """The same sequence of Optuna calls on any storage: what a population search makes."""
    sampler = optuna.samplers.TPESampler(seed=1, constant_liar=True)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize", sampler=sampler)
    for wave in range(3):
        trials = [study.ask() for _ in range(4)]
        for j, t in enumerate(trials):
            toy_space(t)
            t.set_user_attr("member", j)
        for epoch in range(1, 4):
            for t in trials:
                t.report(toy_objective(t.params) + 0.01 * epoch, epoch)
        for j, t in enumerate(trials):
            state = optuna.trial.TrialState.PRUNED if (wave + j) % 3 == 0 else optuna.trial.TrialState.COMPLETE
            study.tell(t, toy_objective(t.params) if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    return study


def _content(study: optuna.Study) -> list[tuple[Any, ...]]:
    return [(t.number, t.state, t.params, t.value, t.intermediate_values, t.user_attrs) for t in study.trials]


def test_buffered_journal_stores_what_the_file_backend_stores_in_one_write(tmp_path: Path) -> None:
    reference = _content(_drive(JournalStorage(JournalFileBackend(str(tmp_path / "plain.log")))))
    path = tmp_path / "buffered.log"
    backend = BufferedJournal(str(path), max_logs=100_000, max_age_s=3600)
    study = _drive(JournalStorage(backend))
    assert path.stat().st_size == 0  # nothing written yet: all of it is kept in memory
    assert _content(study) == reference  # the writing process sees every call at once
    backend.flush()
    assert backend.flushed == 1
    reread = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    assert _content(reread) == reference
    assert len(path.read_bytes().splitlines()) == len((tmp_path / "plain.log").read_bytes().splitlines())


def test_buffered_journal_writes_when_full_or_old_and_continues_a_file(tmp_path: Path) -> None:
    path = tmp_path / "j.log"
    backend = BufferedJournal(str(path), max_logs=10, max_age_s=3600)
    _drive(JournalStorage(backend))
    assert backend.flushed > 1 and len(backend.pending) < 10  # written every 10 calls or so
    backend.flush()
    again = BufferedJournal(str(path), max_logs=100_000, max_age_s=0.0)  # every append is old enough
    study = optuna.load_study(study_name="s", storage=JournalStorage(again), sampler=optuna.samplers.TPESampler(seed=2))
    t = study.ask()
    toy_space(t)
    study.tell(t, 1.5)
    assert again.pending == []
    reread = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    assert len(reread.trials) == 13 and reread.trials[-1].value == 1.5 and reread.trials[-1].params == t.params


def test_buffered_journal_refuses_a_file_another_process_wrote(tmp_path: Path) -> None:
    path = tmp_path / "j.log"
    backend = BufferedJournal(str(path), max_logs=100_000, max_age_s=3600)
    study = optuna.create_study(study_name="s", storage=JournalStorage(backend))
    backend.flush()
    study.ask()
    optuna.create_study(study_name="other", storage=JournalStorage(JournalFileBackend(str(path))))
    with pytest.raises(RuntimeError, match=f"{path}: another process wrote"):
        backend.flush()


def test_a_journal_in_the_storage_path_a_fresh_folder_lacks_is_accepted(tmp_path: Path) -> None:
    """The README's ``optuna_storage: journal:runs/...`` in a fresh folder: ``runs/`` is made by the search itself,
    so its absence is no error; a journal in another missing folder still is, before anything is made."""
    import os

    from dedn.errors import DednInputError
    from tuning.optuna_storage import checked_storage

    exp = tmp_path / "runs" / "first"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        url = checked_storage("journal:runs/optuna.journal", exp, "optuna_storage", True, "first")
        assert url == f"journal:{tmp_path / 'runs' / 'optuna.journal'}"  # made absolute once, here
        assert checked_storage("journal:runs/first/o.journal", exp, "optuna_storage", True, "first").endswith(
            "runs/first/o.journal"
        )
        with pytest.raises(DednInputError, match="does not exist"):
            checked_storage("journal:elsewhere/o.journal", exp, "optuna_storage", True, "first")
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "runs").exists()
