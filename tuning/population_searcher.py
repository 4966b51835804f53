"""The searcher of population trials: every Tune trial asks Optuna for M configurations (tuning.population).

Every member is its own Optuna trial: it sees its validation H per epoch as intermediate values, ends
PRUNED when successive halving stops it, FAIL when it diverges and COMPLETE with its best validation H
otherwise. This module imports Ray; ``tuning.population`` (what trials import) does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from tuning.population import section
from tuning.space import DefineByRun

__all__ = ["PopulationSearcher"]


class PopulationSearcher(Searcher):
    """A Ray Tune searcher over an Optuna study in SQLite that asks M Optuna trials per Tune trial (TPE,
    seeded, ``constant_liar`` so members asked together spread out).

    Members are kept by their Optuna storage trial id (what ``optuna.trial.Trial`` takes to report
    intermediate values), looked up from the trial number through the storage's public methods."""

    def __init__(
        self,
        define: DefineByRun,
        size: int,
        storage_url: str,
        study_name: str,
        seed: int,
        points: list[dict[str, Any]] | None,
        metric: str,
        mode: str,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.define, self.size = define, size
        self.storage_url, self.study_name, self.seed = storage_url, study_name, seed
        self.points = list(points or [])
        self.members: dict[str, list[int]] = {}  # tune trial id -> Optuna storage trial ids
        self.reported: dict[int, int] = {}  # Optuna trial id -> last epoch reported
        self.best: dict[int, float] = {}
        self.told: set[int] = set()
        self._study: Any = None
        self._storage: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_study", "_storage")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._study = None
        self._storage = None

    @property
    def storage(self) -> Any:
        if self._storage is None:
            import optuna

            self._storage = optuna.storages.RDBStorage(self.storage_url)
        return self._storage

    @property
    def study(self) -> Any:
        if self._study is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            fresh = self.study_name not in optuna.get_all_study_names(self.storage_url)
            self._study = optuna.create_study(
                study_name=self.study_name,
                storage=self.storage,
                sampler=optuna.samplers.TPESampler(seed=self.seed, constant_liar=True),
                direction="maximize" if self.mode == "max" else "minimize",
                load_if_exists=True,
            )
            if fresh:
                for p in self.points:
                    self._study.enqueue_trial(p)
        return self._study

    def _storage_id(self, number: int) -> int:
        """The storage's trial id of the study's trial ``number``."""
        study_id = self.storage.get_study_id_from_name(self.study_name)
        return int(self.storage.get_trial_id_from_study_id_trial_number(study_id, number))

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        configs, ids, numbers = [], [], []
        for _ in range(self.size):
            t = self.study.ask()
            self.define(t)
            configs.append(dict(t.params))
            ids.append(self._storage_id(t.number))
            numbers.append(t.number)
        self.members[trial_id] = ids
        return {"members": configs, "optuna_trials": numbers}

    def _trial(self, tid: int) -> Any:
        import optuna

        return optuna.trial.Trial(self.study, tid)

    def _tell(self, tid: int, state: Any, value: float | None = None) -> None:
        if tid in self.told:
            return
        self.told.add(tid)
        self.study.tell(self._trial(tid).number, value, state=state)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        import optuna

        ids = self.members.get(trial_id, [])
        for key, m in section(result, "members").items():
            tid = ids[int(key)]
            epoch, value = int(m["epoch"]), float(m[self.metric])
            if epoch > self.reported.get(tid, 0) and tid not in self.told:
                self._trial(tid).report(value, epoch)
                self.reported[tid] = epoch
            self.best[tid] = max(self.best.get(tid, float("-inf")), value)
        for key, end in section(result, "ended").items():
            tid = ids[int(key)]
            state = optuna.trial.TrialState.FAIL if end["status"] == "failed" else optuna.trial.TrialState.PRUNED
            self._tell(tid, state)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        import optuna

        if result:
            self.on_trial_result(trial_id, result)
        for tid in self.members.get(trial_id, []):
            if error or tid not in self.best:
                self._tell(tid, optuna.trial.TrialState.FAIL)
            else:
                self._tell(tid, optuna.trial.TrialState.COMPLETE, self.best[tid])

    def save(self, checkpoint_path: str) -> None:
        state = {
            "members": self.members,
            "reported": self.reported,
            "best": self.best,
            "told": sorted(self.told),
        }
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.members = state["members"]
        self.reported = {int(k): v for k, v in state["reported"].items()}
        self.best = {int(k): v for k, v in state["best"].items()}
        self.told = set(state["told"])
