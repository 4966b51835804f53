"""The search's Optuna searcher. Every configuration (a single trial, or each member of a population trial) is its own
Optuna trial: its best validation H so far at each epoch as intermediate values (what ASHA ranks by; each epoch's own
H is in MLflow), then COMPLETE with its best-epoch validation H, PRUNED when it stopped before its last epoch
(scheduler, time budget, successive halving; Optuna keeps the last intermediate value, so its value is its best too),
FAIL when it raised or diverged.
User attributes ``tune_trial_id``, ``member`` and ``dedn.trial_id`` (the tag of its MLflow run) link the stores.

Every call on the study is made by a process of its own (``tracking.beside``), in the order sent: Optuna's TPE and
storage writes take neither CPU nor the interpreter's lock from Tune's event loop. ``suggest`` answers None (Tune asks
again) until its configurations are asked; ``save`` waits for the process, so a saved searcher state never names a
report the storage does not hold.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from tracking.beside import Beside
from tuning.optuna_storage import open_storage
from tuning.population import member_key, section
from tuning.space import DefineByRun
from tuning.study_process import trial_id, tune_config

__all__ = ["StudySearcher", "fail_unstarted"]

_LIVE: weakref.WeakSet[StudySearcher] = weakref.WeakSet()  # searchers of this process: fail_unstarted flushes them


class StudySearcher(Searcher):
    """A Ray Tune searcher over an Optuna study (TPE, seeded, ``constant_liar``). ``size`` None: each Tune trial is
    one configuration, its config the sampled values and ``optuna_trial`` (its number); else a population of
    ``size``, its config ``members`` and ``optuna_trials``. Trials are kept by their storage id."""

    def __init__(
        self,
        define: DefineByRun,
        size: int | None,
        storage_url: str,
        study_name: str,
        seed: int,
        points: list[dict[str, Any]] | None,
        metric: str,
        mode: str,
        last_epoch: int,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.define, self.size = define, size
        self.storage_url, self.study_name, self.seed = storage_url, study_name, seed
        self.points = list(points or [])
        self.last_epoch = last_epoch
        self.members: dict[str, list[int]] = {}  # tune trial id -> Optuna storage trial ids
        self.reported: dict[int, int] = {}  # Optuna trial id -> last epoch reported
        self.best: dict[int, float] = {}
        self.told: set[int] = set()
        self.again: list[dict[str, Any]] = []  # on resume: Tune trials to propose again (``Study.open``)
        self._start_local()

    _LOCAL = ("_beside", "_asking", "_opened")

    def _start_local(self) -> None:
        """This process's state (``_LOCAL``): never pickled, started afresh when unpickled."""
        self._beside: Beside | None = None
        self._asking: Future[tuple[list[dict[str, Any]], list[int], list[int]]] | None = None
        self._opened = False
        _LIVE.add(self)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._LOCAL}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start_local()

    @property
    def process(self) -> Beside:
        """The study's process, started on first use."""
        if self._beside is None:
            study = (
                self.storage_url,
                self.study_name,
                self.seed,
                self.mode == "max",
                self.points,
                self.size,
                self.define,
            )
            self._beside = Beside("tuning.study_process", study)
        return self._beside

    def flush(self) -> None:
        """Wait until every call sent to the study is made and written; raise the first that failed."""
        if self._beside is not None:
            self.process.result(self.process.ask("flush"))

    def _open(self) -> None:
        """Open the study (on resume: reconciled with the storage) before the driver compares anything with it."""
        if not self._opened:
            mine = sorted({tid for ids in self.members.values() for tid in ids})
            found = self.process.result(self.process.ask("open", mine))
            self._opened = True
            if found is not None:  # a resumed study: what it holds and this state lacks
                told, reported, self.again = found
                self.told |= set(told)
                for tid, epoch in reported.items():
                    self.reported[tid] = max(self.reported.get(tid, 0), epoch)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        self._open()
        if self.again:
            return self._propose_again(trial_id, self.again.pop(0))
        if self._asking is None:
            self._asking = self.process.ask("ask")
        self.process.read()
        if not self._asking.done():
            return None  # Tune asks again on its next step, with another trial id
        configs, ids, numbers = self._asking.result()
        self._asking = None
        self.members[trial_id] = ids
        self._claim(trial_id, ids, range(len(ids)))
        return tune_config(self.size, configs, numbers)

    def _propose_again(self, trial_id: str, again: dict[str, Any]) -> dict[str, Any]:
        """A Tune trial lost to Tune's state (``Study.open``), proposed again as ``trial_id``: its Optuna
        trials, those still running claimed by it."""
        self.members[trial_id] = list(again["ids"])
        self._claim(trial_id, [tid for _, tid in again["claim"]], [j for j, _ in again["claim"]])
        return dict(again["config"])

    def _claim(self, trial_id: str, ids: list[int], members: Iterable[int]) -> None:
        """Name in the study the Tune trial that took ``ids`` and their runs' key."""
        keys = [member_key(trial_id, j if self.size is not None else None) for j in members]
        self.process.tell("claim", trial_id, ids, keys)

    def _tell(self, tid: int, state: Any, value: float | None = None) -> None:
        """Tell a configuration's end (once)."""
        if tid not in self.told:
            self.told.add(tid)
            self.process.tell("tell", tid, state, value)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._open()
        ids = self.members.get(trial_id, [])
        if self.size is None:
            records = [(ids[0], result)] if ids and "epoch" in result else []
        else:
            records = [(ids[int(j)], m) for j, m in section(result, "members").items()]
        reports = []
        for tid, m in records:
            epoch, value = int(m["epoch"]), float(m[self.metric])
            self.best[tid] = max(self.best.get(tid, float("-inf")), value)
            if epoch > self.reported.get(tid, 0) and tid not in self.told:
                reports.append((tid, self.best[tid], epoch))
                self.reported[tid] = epoch
        if reports:
            self.process.tell("report", reports)
        for key, end in section(result, "ended").items():
            self._tell(ids[int(key)], TrialState.FAIL if end["status"] == "failed" else TrialState.PRUNED)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if result:
            self.on_trial_result(trial_id, result)
        self._open()
        last = int(result.get("epoch", 0)) if result else 0
        for tid in self.members.get(trial_id, []):
            if error or tid not in self.best:
                self._tell(tid, TrialState.FAIL)
            elif last < self.last_epoch:  # stopped early: by the scheduler, or the search's time budget
                self._tell(tid, TrialState.PRUNED)
            else:
                self._tell(tid, TrialState.COMPLETE, self.best[tid])

    def save(self, checkpoint_path: str) -> None:
        self.flush()  # what the state says was reported is in the storage
        state = {"members": self.members, "reported": self.reported, "best": self.best, "told": sorted(self.told)}
        state["again"] = self.again
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.members = state["members"]
        self.reported = {int(k): v for k, v in state["reported"].items()}
        self.best = {int(k): v for k, v in state["best"].items()}
        self.told = set(state["told"])
        self.again = state.get("again", [])


def fail_unstarted(storage_url: str, study_name: str) -> int:
    """End FAIL, with the user attribute ``dedn.unstarted``, the study's RUNNING trials that no Tune trial took (asked
    as the search ended); returns how many. This process's searchers of the study write what they queued first."""
    for searcher in list(_LIVE):
        if searcher.study_name == study_name and searcher.storage_url == storage_url:
            searcher.flush()
    storage = open_storage(storage_url)
    if study_name not in optuna.get_all_study_names(storage):
        return 0
    study = optuna.load_study(study_name=study_name, storage=storage)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    unstarted = [t for t in running if "tune_trial_id" not in t.user_attrs]
    for t in unstarted:
        trial = optuna.trial.Trial(study, trial_id(storage, study_name, t.number))
        trial.set_user_attr("dedn.unstarted", "the search ended before a trial took it")
        study.tell(t.number, state=TrialState.FAIL)
    return len(unstarted)
