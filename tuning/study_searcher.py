"""The search's Optuna searcher. Every configuration (a single trial, or each member of a population trial) is its own
Optuna trial: its best validation H so far at each epoch as intermediate values (what ASHA ranks by; each epoch's own
H is in MLflow), then COMPLETE with its best-epoch validation H, PRUNED when it stopped before its last epoch
(scheduler, time budget, successive halving; Optuna keeps the last intermediate value, so its value is its best too),
FAIL when it raised or diverged.
User attributes ``tune_trial_id``, ``member`` and ``dedn.trial_id`` (the tag of its MLflow run) link the stores.

Every call on the study is made by the searcher's one thread, in the order queued: a storage write syncs the disk,
and Tune's event loop does not wait for that. ``suggest`` answers None (Tune asks again) until its configurations are
asked; ``save`` waits for the queue, so a saved searcher state never names a report the storage does not hold.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from tuning.optuna_internals import PopulationTPE
from tuning.optuna_storage import open_buffered, open_storage
from tuning.population import member_key, section
from tuning.space import DefineByRun

__all__ = ["StudySearcher", "fail_unstarted"]

_LIVE: weakref.WeakSet[StudySearcher] = weakref.WeakSet()  # searchers of this process: fail_unstarted flushes them


def _trial_id(storage: Any, study_name: str, number: int) -> int:
    """A trial's storage id (what ``optuna.trial.Trial`` takes), from its number, through public storage methods."""
    return int(storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number))


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
        self.again: list[dict[str, Any]] = []  # on resume: Tune trials to propose again (``_close_orphans``)
        self._start_local()

    _LOCAL = ("_study", "_storage", "_flush_storage", "_pool", "_asking", "_error", "_lock", "_queued")

    def _start_local(self) -> None:
        """This process's state (``_LOCAL``): never pickled, started afresh when unpickled."""
        self._study: Any = None
        self._storage: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._asking: Future[tuple[list[dict[str, Any]], list[int], list[int]]] | None = None
        self._error: BaseException | None = None
        self._flush_storage: Callable[[], None] = lambda: None  # writes what a buffered journal keeps
        self._lock, self._queued = threading.Lock(), 0  # calls queued and not yet made
        _LIVE.add(self)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._LOCAL}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start_local()

    # -- the study's thread ---------------------------------------------------------------------------
    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Queue ``fn(*args)`` for the study's thread; its first error is raised by the next ``flush``."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optuna-study")
        with self._lock:
            self._queued += 1

        def job() -> Any:
            try:
                return fn(*args)
            except BaseException as e:
                self._error = self._error or e
                raise
            finally:
                with self._lock:
                    self._queued -= 1
                    idle = self._queued == 0
                if idle:  # the queue is empty: what the calls wrote goes to the storage now
                    self._write_storage()

        return self._pool.submit(job)

    def _write_storage(self) -> None:
        try:
            self._flush_storage()
        except BaseException as e:
            self._error = self._error or e

    def flush(self) -> None:
        """Wait until every queued call on the study is made and written; raise the first that failed."""
        if self._pool is not None:
            self._submit(self._write_storage).result()
        if self._error is not None:
            raise self._error

    def _open(self) -> None:
        """Open the study (on resume: reconciled with the storage) before the driver compares anything with it."""
        if self._study is None:  # set by this call only: every other call on the study is queued after it
            self._submit(lambda: self.study).result()

    @property
    def storage(self) -> Any:
        if self._storage is None:
            self._storage, self._flush_storage = open_buffered(self.storage_url)
        return self._storage

    @property
    def study(self) -> Any:
        if self._study is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            fresh = self.study_name not in optuna.get_all_study_names(self.storage)
            # a resumed search continues the seed's sequence where the study stands (the sampler's own
            # random state is not saved): seeding it afresh would propose the first trials again
            asked = 0 if fresh else len(optuna.load_study(study_name=self.study_name, storage=self.storage).trials)
            self._study = optuna.create_study(
                study_name=self.study_name,
                storage=self.storage,
                sampler=PopulationTPE(seed=self.seed + asked, constant_liar=True),
                direction="maximize" if self.mode == "max" else "minimize",
                load_if_exists=True,
            )
            if fresh:
                for p in self.points:
                    self._study.enqueue_trial(p)
            else:
                self._close_orphans()
        return self._study

    def _close_orphans(self) -> None:
        """On resume, compare with the storage: configurations asked by a driver that died before Tune's state named
        them are proposed again, first, in their own Optuna trials (Tune asks for as many trials as its state lacks;
        the same name, the same values, no extra trial); finished ones are not told again; reported epochs not again."""
        mine = {tid for ids in self.members.values() for tid in ids}
        self.again = []
        lost: dict[str, list[tuple[int, int, Any]]] = {}  # Tune trial id (or "#n" when none took it) -> members
        for t in self._study.get_trials(deepcopy=False):
            tid = _trial_id(self.storage, self.study_name, t.number)
            if t.state.is_finished():
                self.told.add(tid)
            if t.intermediate_values:
                self.reported[tid] = max(self.reported.get(tid, 0), max(t.intermediate_values))
            if tid in mine or t.state == TrialState.WAITING or t.user_attrs.get("dedn.unstarted"):
                continue
            owner = t.user_attrs.get("tune_trial_id") or f"#{t.number - int(t.user_attrs.get('member', 0))}"
            lost.setdefault(str(owner), []).append((int(t.user_attrs.get("member", 0)), tid, t))
        for members in sorted(lost.values(), key=lambda ms: min(m[1] for m in ms)):
            members.sort(key=lambda m: m[0])
            if len(members) == (self.size or 1):
                trials = [t for _, _, t in members]
                config = self._tune_config([dict(t.params) for t in trials], [t.number for t in trials])
                claim = [[j, tid] for j, tid, t in members if not t.state.is_finished()]
                self.again.append({"ids": [tid for _, tid, _ in members], "claim": claim, "config": config})
                continue
            for _, tid, t in members:  # a population the driver died while asking: never handed to Tune
                if t.state == TrialState.RUNNING:
                    self._study.tell(t.number, state=TrialState.FAIL)
                    self.told.add(tid)

    def _ask(self) -> tuple[list[dict[str, Any]], list[int], list[int]]:
        """(configurations, storage trial ids, trial numbers) of one Tune trial's configurations, asked now."""
        configs, ids, numbers = [], [], []
        with self.study.sampler.batch(self.size or 1):  # one TPE fit for the whole population
            for j in range(self.size or 1):
                t = self.study.ask()
                self.define(t)
                if self.size is not None:
                    t.set_user_attr("member", j)
                configs.append(dict(t.params))
                ids.append(_trial_id(self.storage, self.study_name, t.number))
                numbers.append(t.number)
        return configs, ids, numbers

    def _claim(self, trial_id: str, ids: list[int], members: list[int] | None = None) -> None:
        for j, tid in zip(members if members is not None else range(len(ids)), ids, strict=True):
            trial = self._trial(tid)
            trial.set_user_attr("tune_trial_id", trial_id)
            trial.set_user_attr("dedn.trial_id", member_key(trial_id, j if self.size is not None else None))

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        self._open()
        if self.again:
            return self._propose_again(trial_id, self.again.pop(0))
        if self._asking is None:
            self._asking = self._submit(self._ask)
        if not self._asking.done():
            return None  # Tune asks again on its next step, with another trial id
        configs, ids, numbers = self._asking.result()
        self._asking = None
        self.members[trial_id] = ids
        self._submit(self._claim, trial_id, ids)
        return self._tune_config(configs, numbers)

    def _tune_config(self, configs: list[dict[str, Any]], numbers: list[int]) -> dict[str, Any]:
        """A Tune trial's config from its configurations and their Optuna trial numbers."""
        if self.size is None:
            return {**configs[0], "optuna_trial": numbers[0]}
        return {"members": configs, "optuna_trials": numbers}

    def _propose_again(self, trial_id: str, again: dict[str, Any]) -> dict[str, Any]:
        """A Tune trial lost to Tune's state (``_close_orphans``), proposed again as ``trial_id``: its Optuna trials,
        those still running claimed by it."""
        self.members[trial_id] = list(again["ids"])
        self._submit(self._claim, trial_id, [tid for _, tid in again["claim"]], [j for j, _ in again["claim"]])
        return dict(again["config"])

    def _trial(self, tid: int) -> Any:
        return optuna.trial.Trial(self.study, tid)

    def _tell(self, tid: int, state: Any, value: float | None = None) -> None:
        """Tell a configuration's end, on the study's thread (once)."""
        if tid not in self.told:
            self.told.add(tid)
            self._submit(lambda: self.study.tell(self._trial(tid).number, value, state=state))

    def _report(self, reports: list[tuple[int, float, int]]) -> None:
        for tid, value, epoch in reports:
            self._trial(tid).report(value, epoch)

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
            self._submit(self._report, reports)
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
        trial = optuna.trial.Trial(study, _trial_id(storage, study_name, t.number))
        trial.set_user_attr("dedn.unstarted", "the search ended before a trial took it")
        study.tell(t.number, state=TrialState.FAIL)
    return len(unstarted)
