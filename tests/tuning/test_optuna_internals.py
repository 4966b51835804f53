"""The adapter holding the project's use of Optuna's private names (tuning.optuna_internals): every name it relies on
is still there in the installed Optuna, and the population sampler is TPE call for call outside a batch and fits once
inside one. An Optuna upgrade that changes them fails here."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from tests.helpers import toy_objective, toy_space
from tuning.optuna_internals import PRIVATE_NAMES, PopulationTPE

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _filled(sampler: optuna.samplers.BaseSampler, n: int) -> optuna.Study:
    """A study holding ``n`` finished trials (the same ``n`` for any seed: they are added, not sampled)."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    rng = optuna.samplers.RandomSampler(seed=11)
    source = optuna.create_study(direction="maximize", sampler=rng)
    source.optimize(lambda t: toy_objective(toy_space(t)), n_trials=n)
    study.add_trials(source.trials)
    return study


def test_outside_a_batch_it_asks_what_optunas_tpe_asks() -> None:
    plain = _filled(optuna.samplers.TPESampler(seed=3, constant_liar=True), 15)
    sampler = PopulationTPE(seed=3, constant_liar=True)
    mine = _filled(sampler, 15)
    for study in (plain, mine):
        study.optimize(lambda t: toy_objective(toy_space(t)), n_trials=12)
    assert [t.params for t in mine.trials] == [t.params for t in plain.trials]
    assert sampler.fitted == 12  # once per ask (multivariate TPE: one relative sample per trial)


def test_a_batch_of_one_asks_what_optunas_tpe_asks() -> None:
    plain = _filled(optuna.samplers.TPESampler(seed=5, constant_liar=True), 30)
    expected = toy_space(plain.ask())
    sampler = PopulationTPE(seed=5, constant_liar=True)
    mine = _filled(sampler, 30)
    with sampler.batch(1):
        assert toy_space(mine.ask()) == expected  # the same fit and draw: TPE's best of its 24 candidates


def test_a_population_comes_from_one_fit_and_beats_random_draws() -> None:
    plain = _filled(optuna.samplers.TPESampler(seed=5, constant_liar=True, n_ei_candidates=32), 40)
    sampler = PopulationTPE(seed=5, constant_liar=True, n_ei_candidates=32)
    mine = _filled(sampler, 40)
    with sampler.batch(8):
        members = [toy_space(mine.ask()) for _ in range(8)]
    assert sampler.fitted == 1  # eight configurations, one fit
    assert members[0] == toy_space(plain.ask())  # the best of the 32 candidates is the one TPE proposes
    assert len({tuple(sorted(m.items())) for m in members}) == 8  # distinct candidates
    for m in members:
        assert 1e-4 <= m["lr"] <= 1e-1 and 0.0 <= m["beta"] <= 1.0 and m["k"] in range(2, 10)
    rand = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    random_values = [toy_objective(toy_space(rand.ask())) for _ in range(8)]
    assert (
        sum(map(toy_objective, members)) / 8 > sum(random_values) / 8 + 0.1
    )  # TPE's ratio ranks the good region first
    with sampler.batch(8):
        toy_space(mine.ask())
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
            toy_space(study.ask())
    assert sampler.fitted == 2
    assert sizes == [25, 50, 25, 50]  # gamma(300) = 25 good trials; 50 of the 275 others (and the running ones)


@pytest.mark.parametrize("owner, name", PRIVATE_NAMES, ids=[name for _, name in PRIVATE_NAMES])
def test_every_private_name_the_adapter_uses_is_in_the_installed_optuna(owner: Any, name: str) -> None:
    assert callable(getattr(owner, name, None)), (
        f"optuna {optuna.__version__} has no {name}: rework tuning/optuna_internals.py"
    )
