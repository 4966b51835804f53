"""The one place the project uses Optuna's private names: ``PopulationTPE``, TPE proposing a population from one fit.

Why: a TPE proposal rates its candidates against every trial. A population search on 64 GPUs asks ~20 configurations
a second and holds 10,000 trials after ten minutes, where ``TPESampler`` takes 119 ms per configuration (2.4 cores)
and one fit per population 6 ms (``benchmarks/optuna_sampling.py --sizes 1000 10000 --storages journal``). Optuna
has no public way to draw several configurations from one fit (optuna/optuna#2660, closed without it; #2626).
Names used: ``PRIVATE_NAMES`` and ``TPESampler``'s ``_rng``, ``_n_ei_candidates``, ``_constant_liar``, ``_gamma``;
``tests/tuning/test_optuna_internals.py`` checks them against the installed Optuna and compares the sampler with
``TPESampler`` call for call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import optuna
from optuna.samplers._tpe import sampler as _tpe
from optuna.trial import TrialState

__all__ = ["PRIVATE_NAMES", "PopulationTPE"]

PRIVATE_NAMES = (
    (_tpe, "_split_trials"),
    (_tpe, "default_gamma"),
    (_tpe, "default_gamma_multiobjective"),
    (optuna.samplers.TPESampler, "_build_parzen_estimator"),
    (optuna.samplers.TPESampler, "_compute_acquisition_func"),
    (optuna.samplers.TPESampler, "_sample"),
    (optuna.Study, "_get_trials"),
)


class PopulationTPE(optuna.samplers.TPESampler):
    """``TPESampler`` that, inside ``batch(size)``, proposes a population from one fit (outside: Optuna's TPE, call
    for call). It fits TPE's two Parzen estimators as ``TPESampler._sample`` does, except that the bad trials' one uses
    at most ``max_above`` of them, drawn at random (seeded: a slightly smoother density at a fraction of the cost),
    and that ``max(n_ei_candidates, 4 x size)`` candidates are drawn once, ranked by TPE's ratio and handed out best
    first (under ``constant_liar`` distinct candidates, not running trials, spread the population)."""

    def __init__(self, max_above: int = 1_000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_above = max_above
        self._fits: dict[tuple[tuple[str, str], ...], deque[dict[str, Any]]] | None = None
        self._size = 1
        self._split: tuple[list[Any], list[Any]] | None = None  # (good, bad) trials of the batch
        self._space: dict[str, Any] | None = None  # the batch's relative search space
        self.fitted = 0  # fits made since the sampler was built (read by tests and benchmarks)

    @contextmanager
    def batch(self, size: int) -> Iterator[None]:
        """The ``size`` configurations asked inside come from one fit per search space."""
        self._fits, self._size, self._split, self._space = {}, max(1, size), None, None
        try:
            yield
        finally:
            self._fits = self._split = self._space = None

    def infer_relative_search_space(self, study: optuna.Study, trial: Any) -> dict[str, Any]:
        # once per batch: Optuna's intersection of the trials' spaces rescans every trial since the oldest running
        # one, and a population search keeps hundreds of them running
        if self._fits is None:
            return super().infer_relative_search_space(study, trial)
        if self._space is None:
            self._space = super().infer_relative_search_space(study, trial)
        return self._space

    def _ranked(self, study: optuna.Study, trial: Any, search_space: dict[str, Any]) -> deque[dict[str, Any]]:
        """Candidates for ``search_space`` in TPE's internal representation, best ratio first."""
        states = [TrialState.COMPLETE, TrialState.PRUNED]
        if self._constant_liar:
            states.append(TrialState.RUNNING)
        if self._split is None:  # once per batch: the same trials for every search space of the population
            trials = study._get_trials(deepcopy=False, states=tuple(states), use_cache=not self._constant_liar)
            trials = [t for t in trials if t.number != trial.number]
            if self._gamma is None:
                self._gamma = _tpe.default_gamma if len(study.directions) <= 1 else _tpe.default_gamma_multiobjective
            n = sum(t.state != TrialState.RUNNING for t in trials)
            below, above = _tpe._split_trials(study, trials, self._gamma(n))
            if len(above) > self.max_above:
                keep = self._rng.rng.choice(len(above), self.max_above, replace=False)
                above = [above[i] for i in sorted(keep)]
            self._split = below, above
        below, above = self._split
        good = self._build_parzen_estimator(study, search_space, below, handle_below=True)
        bad = self._build_parzen_estimator(study, search_space, above, handle_below=False)
        samples = good.sample(self._rng.rng, max(self._n_ei_candidates, 4 * self._size))
        ratio = self._compute_acquisition_func(samples, good, bad)
        self.fitted += 1
        return deque({k: v[i].item() for k, v in samples.items()} for i in np.argsort(-ratio, kind="stable"))

    def _sample(self, study: optuna.Study, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        if self._fits is None:
            self.fitted += 1
            return super()._sample(study, trial, search_space)
        key = tuple(sorted((name, repr(d)) for name, d in search_space.items()))
        if not self._fits.get(key):  # the first of the batch, or more asks than candidates
            self._fits[key] = self._ranked(study, trial, search_space)
        best = self._fits[key].popleft()
        return {name: d.to_external_repr(best[name]) for name, d in search_space.items()}
