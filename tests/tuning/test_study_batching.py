"""Cheaper Optuna calls (tuning.study_batching) against Optuna's own: the population sampler is TPE call for call
outside a batch and fits once inside one; the buffered journal stores what the plain file backend stores, in one
write. Real journal files in a temporary folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from tuning.study_batching import BufferedJournal, PopulationTPE

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _define(t: optuna.Trial) -> dict[str, Any]:
    return {
        "lr": t.suggest_float("lr", 1e-4, 1e-1, log=True),
        "beta": t.suggest_float("beta", 0.0, 1.0),
        "k": t.suggest_int("k", 2, 9),
    }


def _value(p: dict[str, Any]) -> float:
    return -((math.log10(p["lr"]) + 2.5) ** 2) - (p["beta"] - 0.3) ** 2 + 0.01 * p["k"]


def _filled(sampler: optuna.samplers.BaseSampler, n: int) -> optuna.Study:
    """A study holding ``n`` finished trials (the same ``n`` for any seed: they are added, not sampled)."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    rng = optuna.samplers.RandomSampler(seed=11)
    source = optuna.create_study(direction="maximize", sampler=rng)
    source.optimize(lambda t: _value(_define(t)), n_trials=n)
    study.add_trials(source.trials)
    return study


def test_outside_a_batch_it_asks_what_optunas_tpe_asks() -> None:
    plain = _filled(optuna.samplers.TPESampler(seed=3, constant_liar=True), 15)
    sampler = PopulationTPE(seed=3, constant_liar=True)
    mine = _filled(sampler, 15)
    for study in (plain, mine):
        study.optimize(lambda t: _value(_define(t)), n_trials=12)
    assert [t.params for t in mine.trials] == [t.params for t in plain.trials]
    assert sampler.fitted == 12  # once per ask (multivariate TPE: one relative sample per trial)


def test_a_batch_of_one_asks_what_optunas_tpe_asks() -> None:
    plain = _filled(optuna.samplers.TPESampler(seed=5, constant_liar=True), 30)
    expected = _define(plain.ask())
    sampler = PopulationTPE(seed=5, constant_liar=True)
    mine = _filled(sampler, 30)
    with sampler.batch(1):
        assert _define(mine.ask()) == expected  # the same fit and draw: TPE's best of its 24 candidates


def test_a_population_comes_from_one_fit_and_beats_random_draws() -> None:
    plain = _filled(optuna.samplers.TPESampler(seed=5, constant_liar=True, n_ei_candidates=32), 40)
    sampler = PopulationTPE(seed=5, constant_liar=True, n_ei_candidates=32)
    mine = _filled(sampler, 40)
    with sampler.batch(8):
        members = [_define(mine.ask()) for _ in range(8)]
    assert sampler.fitted == 1  # eight configurations, one fit
    assert members[0] == _define(plain.ask())  # the best of the 32 candidates is the one TPE proposes
    assert len({tuple(sorted(m.items())) for m in members}) == 8  # distinct candidates
    for m in members:
        assert 1e-4 <= m["lr"] <= 1e-1 and 0.0 <= m["beta"] <= 1.0 and m["k"] in range(2, 10)
    rand = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    random_values = [_value(_define(rand.ask())) for _ in range(8)]
    assert sum(map(_value, members)) / 8 > sum(random_values) / 8 + 0.1  # TPE's ratio ranks the good region first
    with sampler.batch(8):
        _define(mine.ask())
    assert sampler.fitted == 2  # a new batch fits again (the study changed)


def test_a_batch_bounds_the_bad_trials_and_refits_when_candidates_run_out(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = PopulationTPE(seed=0, constant_liar=True, max_above=50, n_ei_candidates=8)
    study = _filled(sampler, 300)
    sizes: list[int] = []
    build = PopulationTPE._build_parzen_estimator

    def spy(self: PopulationTPE, study: Any, space: Any, trials: list[Any], handle_below: bool) -> Any:
        sizes.append(len(trials))
        return build(self, study, space, trials, handle_below)

    monkeypatch.setattr(PopulationTPE, "_build_parzen_estimator", spy)
    with sampler.batch(2):  # max(8, 4 x 2) = 8 candidates per fit
        for _ in range(9):
            _define(study.ask())
    assert sampler.fitted == 2
    assert sizes == [25, 50, 25, 50]  # gamma(300) = 25 good trials; 50 of the 275 others (and the running ones)


def _drive(storage: Any) -> optuna.Study:
    """The same sequence of Optuna calls on any storage: what a population search makes."""
    sampler = PopulationTPE(seed=1, constant_liar=True)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize", sampler=sampler)
    for wave in range(3):
        with sampler.batch(4):
            trials = [study.ask() for _ in range(4)]
            for j, t in enumerate(trials):
                _define(t)
                t.set_user_attr("member", j)
        for epoch in range(1, 4):
            for t in trials:
                t.report(_value(t.params) + 0.01 * epoch, epoch)
        for j, t in enumerate(trials):
            state = optuna.trial.TrialState.PRUNED if (wave + j) % 3 == 0 else optuna.trial.TrialState.COMPLETE
            study.tell(t, _value(t.params) if state == optuna.trial.TrialState.COMPLETE else None, state=state)
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
    study = optuna.load_study(study_name="s", storage=JournalStorage(again), sampler=PopulationTPE(seed=2))
    t = study.ask()
    _define(t)
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
