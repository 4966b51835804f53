"""Population trials: each Ray Tune trial trains M configurations as one batched model (dedn.population).

- ``make_population_searcher`` builds a searcher that asks Optuna for M configurations per Tune trial; every member is its own
  Optuna trial, sees its validation H per epoch as intermediate values, ends PRUNED when successive
  halving stops it, FAIL when it diverges and COMPLETE with its best validation H otherwise.
- ``population_trainable`` runs ``train_population`` and reports every epoch: the population's best
  active member as ``val_H`` (what Tune's scheduler sees) and every member under ``members/<j>/``.
- ``member_entries`` turns a Tune result (population or single) into one entry per configuration, so
  the best-trial choice, the plots and the final test treat members exactly like single trials.

A population checkpoint holds ``state.pt`` (the batched model and optimiser of the active members,
every member's best-epoch weights and history; ``weights_only`` loadable) and ``progress.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.objects import SharedStore
from tuning.space import DefineByRun, trial_config

STATE, PROGRESS = "state.pt", "progress.json"
MEMBER_KEYS = ("val_", "grid_", "loss_", "epoch")


def make_population_searcher(
    define: DefineByRun,
    size: int,
    storage_url: str,
    study_name: str,
    seed: int,
    points: list[dict[str, Any]] | None,
    metric: str,
    mode: str,
) -> Any:
    """A Ray Tune searcher over an Optuna study in SQLite that asks M Optuna trials per Tune trial (TPE,
    seeded, ``constant_liar`` so members asked together spread out). Built here so that importing this
    module does not import Ray."""
    from ray.tune.search import Searcher

    class _Search(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=metric, mode=mode)
            self.define, self.size = define, size
            self.storage_url, self.study_name, self.seed = storage_url, study_name, seed
            self.points = list(points or [])
            self.members: dict[str, list[int]] = {}  # tune trial id -> Optuna storage trial ids
            self.reported: dict[int, int] = {}  # Optuna trial id -> last epoch reported
            self.best: dict[int, float] = {}
            self.told: set[int] = set()
            self._study: Any = None

        def __getstate__(self) -> dict[str, Any]:
            return {k: v for k, v in self.__dict__.items() if k != "_study"}

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__dict__.update(state)
            self._study = None

        @property
        def study(self) -> Any:
            if self._study is None:
                import optuna

                optuna.logging.set_verbosity(optuna.logging.WARNING)
                fresh = self.study_name not in optuna.get_all_study_names(self.storage_url)
                self._study = optuna.create_study(
                    study_name=self.study_name,
                    storage=optuna.storages.RDBStorage(self.storage_url),
                    sampler=optuna.samplers.TPESampler(seed=self.seed, constant_liar=True),
                    direction="maximize" if mode == "max" else "minimize",
                    load_if_exists=True,
                )
                if fresh:
                    for p in self.points:
                        self._study.enqueue_trial(p)
            return self._study

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            configs, ids, numbers = [], [], []
            for _ in range(self.size):
                t = self.study.ask()
                self.define(t)
                configs.append(dict(t.params))
                ids.append(t._trial_id)
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
                epoch, value = int(m["epoch"]), float(m[metric])
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

    return _Search()


def section(result: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """``result[name]`` as {member: {key: value}}, whether Tune passed the result nested (callbacks) or
    flattened to ``name/<member>/<key>`` (searchers)."""
    nested = result.get(name)
    if isinstance(nested, dict):
        return nested
    out: dict[str, dict[str, Any]] = {}
    prefix = name + "/"
    for k, v in result.items():
        if k.startswith(prefix) and k.count("/") >= 2:
            member, key = k[len(prefix) :].split("/", 1)
            out.setdefault(member, {})[key] = v
    return out


def member_metrics(record: Any, posthoc: bool) -> dict[str, float]:
    from tuning.trainable import epoch_metrics

    return epoch_metrics(record, posthoc)


def save_population_checkpoint(folder: str, epoch: int, progress: Any, members: list[dict[str, Any]]) -> None:
    from dedn.population import population_state

    torch.save(population_state(epoch, progress), os.path.join(folder, STATE))
    with open(os.path.join(folder, PROGRESS), "w") as f:
        json.dump(
            {
                "epoch": epoch,
                "population": True,
                "members": members,
                "partitions": [[int(i) for i in p] for p in progress.partitions],
                "status": list(progress.status),
                "best_epoch": list(progress.best_epoch),
            },
            f,
        )


def load_population_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE, map_location="cpu", weights_only=True)


def population_trainable(
    config: dict[str, Any],
    shared: SharedStore,
    base: dict[str, Any],
    posthoc: bool,
    halving: dict[str, Any] | None,
    checkpoint_every: int = 1,
) -> None:
    """One Tune trial training ``config["members"]`` as one population on the shared store."""
    from ray import tune

    from dedn.population import Halving, train_population
    from tuning.trainable import trial_setup, wants_checkpoint

    store, node, zero_copy, resume = trial_setup(shared, load_population_checkpoint)
    members = list(config["members"])
    cfgs = [trial_config(base, m) for m in members]

    last_epoch = cfgs[0].effective().optim.epochs

    def report(epoch: int, records: dict[int, Any], p: Any) -> None:
        per = {str(j): member_metrics(r, posthoc) for j, r in records.items()}
        ended = {
            str(j): {"status": p.status[j], "reason": p.reasons[j]}
            for j in range(len(members))
            if p.status[j] in ("stopped", "failed") and p.last_epoch[j] == epoch
        }
        metrics: dict[str, Any] = {"epoch": epoch, "members": per, "ended": ended}
        if per:
            lead = max(per, key=lambda j: per[j]["val_H"])
            metrics.update({k: v for k, v in per[lead].items() if k != "epoch"})
            metrics["val_member"] = int(lead)
            rate = next(iter(records.values())).samples_per_s
            metrics["population_samples_per_s"] = rate * len(records)
        metrics.update(
            {
                "members_trained": len(records),
                "members_active": len(p.active),
                "peak_device_mb_per_member": p.peak_device_bytes / 2**20 / max(1, len(records)),
                "node_id": node,
                "features_zero_copy": zero_copy,
            }
        )
        improved = any(p.best_epoch[j] == epoch for j in records) or bool(ended)
        metrics["checkpointed"] = wants_checkpoint(epoch, last_epoch, checkpoint_every, improved)
        if not metrics["checkpointed"]:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_population_checkpoint(folder, epoch, p, members)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    results = train_population(
        cfgs,
        store,
        "validation",
        on_epoch=report,
        halving=Halving(**halving) if halving else None,
        select_on="grid" if posthoc else "configured",
        resume=resume,
    )
    if all(r.status == "failed" for r in results):
        reasons = "; ".join(f"member {r.index}: {r.reason}" for r in results)
        raise FloatingPointError(f"every member of the population failed: {reasons}")


@dataclass
class Entry:
    """One trained configuration of a Tune result: a single trial, or one member of a population."""

    label: str
    config: dict[str, Any]  # sampled dotted values
    df: Any  # per-epoch metrics with plain column names (epoch, val_H, ...)
    result: Any
    member: int | None


def member_entries(result: Any) -> list[Entry]:
    """Entries of a Tune result: one for a single-configuration trial, one per member of a population."""
    df: Any = result.metrics_dataframe
    name = Path(result.path).name
    parts = name.split("_")
    short = parts[2] if len(parts) > 2 else name
    members = result.config.get("members") if isinstance(result.config, dict) else None
    if members is None:
        cfg = {k: v for k, v in result.config.items() if "." in k}
        return [Entry(short, cfg, df, result, None)]
    out = []
    for j, cfg in enumerate(members):
        prefix = f"members/{j}/"
        if df is None:
            sub = None
        else:
            cols = [c for c in df.columns if c.startswith(prefix)]
            sub = df[cols].rename(columns={c: c[len(prefix) :] for c in cols})
            if "val_H" in sub:
                sub = sub[sub["val_H"].notna()].reset_index(drop=True)
        out.append(Entry(f"{short}-m{j}", dict(cfg), sub, result, j))
    return out


def best_weights(checkpoint_path: str | os.PathLike[str], member: int | None) -> dict[str, torch.Tensor]:
    """The best-epoch weights (a single-configuration DEDN state dict) in a trial checkpoint."""
    state = torch.load(Path(checkpoint_path) / STATE, map_location="cpu", weights_only=True)
    if member is None:
        return state["best_model"]
    return state["best_state"][member]


def write_member_checkpoint(population_folder: str | os.PathLike[str], member: int, out: Path) -> Path:
    """A single-trial checkpoint folder (state.pt with ``best_model``, progress.json with the partition and
    history) for one member of a population checkpoint: what ``dedn promote`` reads from a child run."""
    state = load_population_checkpoint(population_folder)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"best_model": state["best_state"][member]}, out / STATE)
    progress = json.loads((Path(population_folder) / PROGRESS).read_text())
    (out / PROGRESS).write_text(
        json.dumps(
            {
                "epoch": state["last_epoch"][member],
                "best_epoch": state["best_epoch"][member],
                "partition": progress["partitions"][member],
                "status": state["status"][member],
                "history": state["histories"][member],
            }
        )
    )
    return out
