"""Cheaper Optuna calls for the searcher's thread (``tuning.study_searcher``) when a search asks and reports a lot.

- ``PopulationTPE``: TPE that proposes a population's configurations from one fit instead of one per member.
  Each TPE proposal reads every trial of the study and rates its candidates against every one of them: tens of
  ms per configuration at a few thousand trials, growing with the study, while a population search on 64 GPUs
  asks about 20 configurations per second and holds 10,000 trials after ten minutes. Outside ``batch()`` it is
  Optuna's ``TPESampler``, call for call.
- ``BufferedJournal``: Optuna's journal file whose appends wait in memory until ``flush``, so that many Optuna
  calls cost one file lock, one write and one disk sync (each costs all three otherwise: a few ms).

Both rest on Optuna's TPE and journal internals as of the version ``constraints.txt`` pins; their tests compare
them with the plain sampler and file backend call for call.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import optuna
from optuna.samplers._tpe import sampler as _tpe
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend
from optuna.trial import TrialState

__all__ = ["BufferedJournal", "PopulationTPE"]


class PopulationTPE(optuna.samplers.TPESampler):
    """``TPESampler`` that proposes a population's configurations from one fit, inside ``batch(size)``.

    Outside a batch it is Optuna's TPE, call for call. Inside, the first configuration asked for a search space
    fits TPE's two Parzen estimators on the study as ``TPESampler._sample`` does (good trials: the best
    ``gamma(n)``; bad trials: the others and the running ones), with two changes that bound the cost of a fit
    as the study grows to tens of thousands of trials:
    - the bad trials' estimator is fitted on at most ``max_above`` of them, drawn at random (seeded): a kernel
      density of 1,000 points in place of 10,000 is a slightly smoother estimate of the same density, and the
      ratio TPE ranks by costs one tenth;
    - one set of ``max(n_ei_candidates, 4 x size)`` candidates is drawn from the good trials' estimator and
      ranked once by TPE's ratio; the population's configurations are the best candidates, in rank order (TPE
      proper takes the best of its own ``n_ei_candidates`` draws for each configuration).
    Under ``constant_liar`` a configuration asked later in the batch does not count the earlier ones as
    running trials: the population is spread by taking distinct candidates instead."""

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
