"""The searcher's Optuna study in a process of its own (``python -m tuning.study_process``, started by
``tuning.study_searcher.StudySearcher`` through ``tracking.beside``): TPE's asks and the storage's writes take neither
CPU nor the interpreter's lock from Tune's event loop. It imports Optuna and the search space only (no Ray, no torch).
"""

from __future__ import annotations

import sys
from typing import Any

import optuna
from optuna.trial import TrialState

from tuning.optuna_internals import PopulationTPE
from tuning.optuna_storage import open_buffered
from tuning.space import DefineByRun

__all__ = ["Study", "start_study", "trial_id", "tune_config"]


def trial_id(storage: Any, study_name: str, number: int) -> int:
    """A trial's storage id (what ``optuna.trial.Trial`` takes), from its number, through public storage methods."""
    return int(storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number))


def tune_config(size: int | None, configs: list[dict[str, Any]], numbers: list[int]) -> dict[str, Any]:
    """A Tune trial's config from its configurations and their Optuna trial numbers."""
    if size is None:
        return {**configs[0], "optuna_trial": numbers[0]}
    return {"members": configs, "optuna_trials": numbers}


class Study:
    """The study's process: the calls the searcher sends, made in order; what a buffered journal keeps is written
    whenever no call waits. The first error of a call is raised by the next ``flush``."""

    def __init__(
        self, url: str, name: str, seed: int, maximize: bool, points: list[Any], size: int | None, define: DefineByRun
    ) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage, self.write_storage = open_buffered(url)
        self.name, self.size, self.define = name, size, define
        self.fresh = name not in optuna.get_all_study_names(self.storage)
        # a resumed search continues the seed's sequence where the study stands (the sampler's own random state is
        # not saved): seeding it afresh would propose the first trials again
        asked = 0 if self.fresh else len(optuna.load_study(study_name=name, storage=self.storage).trials)
        self.sampler = PopulationTPE(seed=seed + asked, constant_liar=True)
        self.study = optuna.create_study(
            study_name=name,
            storage=self.storage,
            sampler=self.sampler,
            direction="maximize" if maximize else "minimize",
            load_if_exists=True,
        )
        if self.fresh:
            for p in points:
                self.study.enqueue_trial(p)
        self.error: BaseException | None = None

    def __call__(self, name: str, args: tuple[Any, ...]) -> Any:
        try:
            return getattr(self, name)(*args)
        except Exception as e:
            self.error = self.error or e
            raise

    def idle(self) -> None:
        try:
            self.write_storage()
        except Exception as e:
            self.error = self.error or e

    def flush(self) -> None:
        self.idle()
        if self.error is not None:
            raise self.error

    def _trial(self, tid: int) -> Any:
        return optuna.trial.Trial(self.study, tid)

    def open(self, mine: list[int]) -> tuple[set[int], dict[int, int], list[dict[str, Any]]] | None:
        """None for a new study; on resume (told, reported, again): the trials the storage holds finished, the last
        epoch reported of each, and the Tune trials to propose again. Configurations asked by a driver that died before
        Tune's state named them (not in ``mine``) are proposed again, first, in their own Optuna trials (Tune asks for
        as many trials as its state lacks; the same name, the same values, no extra trial); finished ones are not told
        again; reported epochs not again; a population the driver died while asking is told FAIL."""
        if self.fresh:
            return None
        taken = set(mine)
        told: set[int] = set()
        reported: dict[int, int] = {}
        again: list[dict[str, Any]] = []
        lost: dict[str, list[tuple[int, int, Any]]] = {}  # Tune trial id (or "#n" when none took it) -> members
        for t in self.study.get_trials(deepcopy=False):
            tid = trial_id(self.storage, self.name, t.number)
            if t.state.is_finished():
                told.add(tid)
            if t.intermediate_values:
                reported[tid] = max(t.intermediate_values)
            if tid in taken or t.state == TrialState.WAITING or t.user_attrs.get("dedn.unstarted"):
                continue
            owner = t.user_attrs.get("tune_trial_id") or f"#{t.number - int(t.user_attrs.get('member', 0))}"
            lost.setdefault(str(owner), []).append((int(t.user_attrs.get("member", 0)), tid, t))
        for members in sorted(lost.values(), key=lambda ms: min(m[1] for m in ms)):
            members.sort(key=lambda m: m[0])
            if len(members) == (self.size or 1):
                trials = [t for _, _, t in members]
                config = tune_config(self.size, [dict(t.params) for t in trials], [t.number for t in trials])
                claim = [[j, tid] for j, tid, t in members if not t.state.is_finished()]
                again.append({"ids": [tid for _, tid, _ in members], "claim": claim, "config": config})
                continue
            for _, tid, t in members:  # a population the driver died while asking: never handed to Tune
                if t.state == TrialState.RUNNING:
                    self.study.tell(t.number, state=TrialState.FAIL)
                    told.add(tid)
        return told, reported, again

    def ask(self) -> tuple[list[dict[str, Any]], list[int], list[int]]:
        """(configurations, storage trial ids, trial numbers) of one Tune trial's configurations, asked now."""
        configs, ids, numbers = [], [], []
        with self.sampler.batch(self.size or 1):  # one TPE fit for the whole population
            for j in range(self.size or 1):
                t = self.study.ask()
                self.define(t)
                if self.size is not None:
                    t.set_user_attr("member", j)
                configs.append(dict(t.params))
                ids.append(trial_id(self.storage, self.name, t.number))
                numbers.append(t.number)
        return configs, ids, numbers

    def claim(self, tune_trial: str, ids: list[int], keys: list[str]) -> None:
        for tid, key in zip(ids, keys, strict=True):
            trial = self._trial(tid)
            trial.set_user_attr("tune_trial_id", tune_trial)
            trial.set_user_attr("dedn.trial_id", key)

    def tell(self, tid: int, state: Any, value: float | None) -> None:
        self.study.tell(self._trial(tid).number, value, state=state)

    def report(self, reports: list[tuple[int, float, int]]) -> None:
        for tid, value, epoch in reports:
            self._trial(tid).report(value, epoch)


def start_study(first: tuple[Any, ...]) -> Study:
    """The study's process's handler (``tracking.beside.serve``), from the searcher's first message."""
    return Study(*first)


if __name__ == "__main__":  # the classes the driver sends are this module's, imported under its name
    from tracking.beside import serve
    from tuning.study_process import start_study

    serve(int(sys.argv[1]), start_study)
