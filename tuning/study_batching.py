"""Cheaper Optuna calls for the searcher's thread (``tuning.study_searcher``) when a search asks and reports a lot.

- ``PopulationTPE``: TPE that fits its Parzen estimators once per population instead of once per member.
  Each TPE fit reads every trial of the study (thousands, a few hundred ms each in a large population search);
  inside ``batch()``, the members of one population share the fit of the first and each draws its own
  candidates from it. Outside ``batch()`` it is Optuna's ``TPESampler``, call for call.
- ``BufferedJournal``: Optuna's journal file whose appends wait in memory until ``flush``, so that many Optuna
  calls cost one file lock, one write and one disk sync (each costs all three otherwise: a few ms).

Both rest on Optuna's TPE and journal internals as of the version ``constraints.txt`` pins; their tests compare
them with the plain sampler and file backend call for call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.samplers._tpe import sampler as _tpe
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend
from optuna.trial import TrialState

__all__ = ["BufferedJournal", "PopulationTPE"]


class PopulationTPE(optuna.samplers.TPESampler):
    """``TPESampler`` whose fits are shared by the configurations asked inside ``batch()``.

    The first configuration of a batch fits TPE's two Parzen estimators (good and bad trials) on the study as
    Optuna's ``TPESampler._sample`` does; later ones in the batch reuse that fit for the same search space and
    draw their own ``n_ei_candidates``, keeping the one with the best ratio. What they give up: with
    ``constant_liar``, a member asked later in the batch does not see the earlier members as running trials, so
    members of a population are independent draws from the same model rather than pushed apart."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fits: dict[tuple[tuple[str, str], ...], tuple[Any, Any]] | None = None
        self.fitted = 0  # fits made since the sampler was built (read by tests and benchmarks)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Configurations asked inside share one fit per search space."""
        self._fits = {}
        try:
            yield
        finally:
            self._fits = None

    def _fit(self, study: optuna.Study, trial: Any, search_space: dict[str, Any]) -> tuple[Any, Any]:
        """The (good, bad) Parzen estimators of ``search_space``: ``TPESampler._sample`` up to its draw."""
        states = [TrialState.COMPLETE, TrialState.PRUNED]
        if self._constant_liar:
            states.append(TrialState.RUNNING)
        trials = study._get_trials(deepcopy=False, states=tuple(states), use_cache=not self._constant_liar)
        trials = [t for t in trials if t.number != trial.number]
        if self._gamma is None:
            self._gamma = _tpe.default_gamma if len(study.directions) <= 1 else _tpe.default_gamma_multiobjective
        n = sum(t.state != TrialState.RUNNING for t in trials)
        below, above = _tpe._split_trials(study, trials, self._gamma(n))
        self.fitted += 1
        return (
            self._build_parzen_estimator(study, search_space, below, handle_below=True),
            self._build_parzen_estimator(study, search_space, above, handle_below=False),
        )

    def _sample(self, study: optuna.Study, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        if self._fits is None:
            self.fitted += 1
            return super()._sample(study, trial, search_space)
        key = tuple(sorted((name, repr(d)) for name, d in search_space.items()))
        if key not in self._fits:
            self._fits[key] = self._fit(study, trial, search_space)
        below, above = self._fits[key]
        samples = below.sample(self._rng.rng, self._n_ei_candidates)
        best = self._compare(samples, self._compute_acquisition_func(samples, below, above))
        return {name: d.to_external_repr(best[name]) for name, d in search_space.items()}


class BufferedJournal(BaseJournalBackend):
    """A ``JournalFileBackend`` whose appends are kept in memory until ``flush`` (or until ``max_logs`` are kept,
    or the oldest is ``max_age_s`` old): reads see the file's logs, then the kept ones. For the one process that
    writes the study (the search's driver): another writer's logs appended meanwhile would be numbered wrongly,
    so ``flush`` raises when the file grew behind its back."""

    def __init__(self, path: str, max_logs: int = 2_000, max_age_s: float = 1.0) -> None:
        self.path, self.max_logs, self.max_age_s = path, max_logs, max_age_s
        self.file = JournalFileBackend(path)
        self.pending: list[dict[str, Any]] = []
        self.in_file: int | None = None  # logs in the file, known once it was read to its end
        self.since = 0.0  # when the oldest kept log was appended
        self.flushed = 0  # flushes that wrote something (read by tests and benchmarks)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        if not self.pending:
            n = log_number_from
            for log in self.file.read_logs(log_number_from):
                n += 1
                yield log
            self.in_file = n
            return
        assert self.in_file is not None and log_number_from >= self.in_file, "the journal was read out of order"
        yield from self.pending[log_number_from - self.in_file :]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if self.in_file is None:  # Optuna reads before it writes; be safe if it ever does not
            for _ in self.read_logs(0):
                pass
        if not self.pending:
            self.since = time.monotonic()
        self.pending.extend(logs)
        if len(self.pending) >= self.max_logs or time.monotonic() - self.since >= self.max_age_s:
            self.flush()

    def flush(self) -> None:
        """Write the kept logs to the file at once (one lock, one write, one disk sync)."""
        if not self.pending:
            return
        start, logs = self.in_file, self.pending
        assert start is not None
        if any(True for _ in self.file.read_logs(start)):
            raise RuntimeError(f"{self.path}: another process wrote to the study's journal meanwhile")
        self.file.append_logs(logs)
        self.pending = []
        written = sum(1 for _ in self.file.read_logs(start))  # also where the file backend finds the new end
        self.in_file = start + written
        self.flushed += 1
        if written != len(logs):
            raise RuntimeError(f"{self.path}: another process wrote to the study's journal meanwhile")
