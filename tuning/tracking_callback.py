"""A Ray Tune callback that logs every trial to MLflow from the driver (tracking.runs.Tracker)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from tracking.runs import Tracker
from tuning.population import section
from tuning.space import sampled_params, trial_config

__all__ = ["BEST_KEYS", "EPOCH_KEYS", "EXTRA_KEYS", "KEY_METRICS", "MLflowTrialLogger", "member_key", "run_name"]

EPOCH_KEYS = ("val_", "loss_", "grid_")
EXTRA_KEYS = ("samples_per_s", "epoch_seconds")
# what each epoch logs as MLflow metrics with ``epoch_metrics: key`` (the rest goes to epochs.parquet at the end)
KEY_METRICS = ("val_H", "val_U", "val_S", "val_T", "loss_total")
# what a run's final metrics hold, each as best_<key>: the epoch with the highest val_H
BEST_KEYS = ("val_H", "val_U", "val_S", "val_T", "epoch", "grid_lambda_rc", "grid_lambda_e", "grid_c")


def member_key(trial_id: str, member: int) -> str:
    """The run key of member ``member`` of population trial ``trial_id``."""
    return f"{trial_id}-m{member}"


def run_name(trial: Any, optuna_number: int | None) -> str:
    """A child run's name: ``trial-007`` for Optuna trial 7; a population trial (whose members are
    Optuna trials of their own) by Tune's trial counter, its members then ``trial-003-m5``."""
    if optuna_number is not None:
        return f"trial-{int(optuna_number):03d}"
    counter = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]  # Tune's "<n>_<params>"
    return f"trial-{int(counter):03d}" if counter.isdigit() else f"trial-{trial.trial_id}"


def _members(trial: Any) -> list[dict[str, Any]] | None:
    config = trial.config if isinstance(trial.config, dict) else {}
    members = config.get("members")
    return list(members) if isinstance(members, list) else None


def _abandon(t: Tracker, run: str) -> None:
    t.client.set_tag(run, "dedn.abandoned", "its driver was killed before Tune recorded the trial; not continued")
    t.client.set_terminated(run, status="KILLED")


class MLflowTrialLogger(Callback):
    """One nested child run per trial: params at start, metrics per epoch (step = epoch), the resolved
    trial config, final validation metrics and the last checkpoint at the end. Every call goes through
    the tracker, which queues what fails for the end instead of failing the search.

    A population trial gets one child run per member (key ``<trial id>-m<j>``), logged exactly like a
    single trial's run, tagged with the population trial id, the member index and its Optuna trial
    number; a member stopped by successive halving is tagged ``dedn.stopped`` at that epoch.

    ``epoch_metrics`` "all" logs every value of an epoch as a metric (about 20); "key" logs ``KEY_METRICS`` and,
    when the run ends, the whole per-epoch record as the artifact ``epochs.parquet`` (``tracking.epochs``)."""

    def __init__(self, tracker: Tracker, base: dict[str, Any], epoch_metrics: str = "all") -> None:
        self.tracker = tracker
        self.base = base
        self.epoch_metrics = epoch_metrics
        self.best: dict[str, dict[str, float]] = {}
        self.ended: dict[str, str] = {}  # population members stopped or failed: run key -> status
        self.checked = False  # runs of trials the restored experiment does not know: closed on the first step

    def _runs(self, trial: Any) -> list[tuple[str, str, dict[str, Any], dict[str, str]]]:
        """(run key, run name, params, extra tags) of each configuration the trial trains."""
        members = _members(trial)
        if members is None:
            number = trial.config.get("optuna_trial") if isinstance(trial.config, dict) else None
            tags = {} if number is None else {"optuna.trial_number": str(number)}
            return [(trial.trial_id, run_name(trial, number), sampled_params(trial.config), tags)]
        numbers = trial.config.get("optuna_trials") or [None] * len(members)
        return [
            (
                member_key(trial.trial_id, j),
                f"{run_name(trial, None)}-m{j}",
                dict(m),
                {"dedn.population_trial": trial.trial_id, "dedn.member": str(j), "optuna.trial_number": str(n)},
            )
            for j, (m, n) in enumerate(zip(members, numbers, strict=True))
        ]

    def setup(
        self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None, **info: Any
    ) -> None:
        # the tracker's background writer: MLflow calls leave the driver's event loop (tracking.runs)
        self.tracker.start()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.tracker.close()

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        """Once, before the first step: a run whose Tune trial the experiment does not know (a driver killed
        after it started the trial and before Tune saved its state; the resumed search asks again in its place,
        and Optuna fails that trial) ends KILLED, tagged ``dedn.abandoned``."""
        if self.checked:
            return
        self.checked = True
        t, known = self.tracker, {trial.trial_id for trial in trials}
        abandoned = t.state.setdefault("abandoned", [])
        for key in list(t.state["trials"]):
            if key.split("-m", 1)[0] not in known and key not in abandoned:
                abandoned.append(key)
                t.trial_call(key, f"abandoned run {key}", partial(_abandon, t))
        t.save()

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        for key, name, params, tags in self._runs(trial):  # each with its resolved config
            text = yaml.safe_dump(trial_config(self.base, params).effective().model_dump(mode="json"), sort_keys=False)
            self.tracker.child(key, name, params, tags, texts={"trial_config.yaml": text})

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if "epoch" not in result:
            return
        runs = self._runs(trial)
        for key, name, params, tags in runs:
            if key not in self.tracker.state["trials"]:
                self.tracker.child(key, name, params, tags)
        if _members(trial) is not None:
            for j, m in section(result, "members").items():
                self._epoch(member_key(trial.trial_id, int(j)), f"{trial}-m{j}", m)
            for j, end in section(result, "ended").items():
                key = member_key(trial.trial_id, int(j))
                reason = str(end.get("reason") or end["status"])
                tag = "dedn.error" if end["status"] == "failed" else "dedn.stopped"
                # journaled with the writer: a resumed population does not report it again
                self.tracker.tags(key, {tag: reason}, f"end of {trial}-m{j}")
                self.ended[key] = str(end["status"])
            return
        self._epoch(trial.trial_id, str(trial), result)

    def _epoch(self, key: str, name: str, result: dict[str, Any]) -> None:
        """Log one epoch of one configuration (a trial, or a member of a population) once."""
        epoch = int(result["epoch"])
        metrics = {
            k: float(v)
            for k, v in result.items()
            if (k.startswith(EPOCH_KEYS) or k in EXTRA_KEYS) and isinstance(v, (int, float))
        }
        if getattr(self, "epoch_metrics", "all") == "key":  # (a logger pickled before the option logs all)
            metrics = {k: v for k, v in metrics.items() if k in KEY_METRICS}
        if not self.tracker.epoch_metrics(key, metrics, epoch, f"epoch {epoch} of {name}"):
            # A worker killed after reporting this epoch but before its checkpoint was kept: the retry
            # re-runs it from the previous checkpoint on the same minibatch stream. Log each epoch once.
            return
        best = self.best.get(key)
        if best is None or result["val_H"] > best["best_val_H"]:
            self.best[key] = {f"best_{k}": float(result[k]) for k in BEST_KEYS}

    def _finish(self, trial: Any, status: str, reason: str | None = None) -> None:
        path = getattr(getattr(trial, "checkpoint", None), "path", None)
        members = _members(trial)
        if members is None:
            self._finish_runs([(trial.trial_id, str(trial), status, reason, path, self._epochs(trial, None))])
            return
        ends = []
        for j in range(len(members)):
            key = member_key(trial.trial_id, j)
            ended = self.ended.get(key)
            member_status = (
                "FAILED" if ended == "failed" or (status == "FAILED" and key not in self.best) else "FINISHED"
            )
            folder = None
            if path and Path(path).is_dir() and member_status == "FINISHED" and key in self.best:
                from tuning.population import write_member_checkpoint

                # kept in the experiment folder: a queued upload (tracking offline) still finds it later
                folder = str(write_member_checkpoint(path, j, self.tracker.dir / "member_checkpoints" / key))
            failed = member_status == "FAILED"
            ends.append(
                (key, f"{trial}-m{j}", member_status, reason if failed else None, folder, self._epochs(trial, j))
            )
        self._finish_runs(ends)

    def _epochs(self, trial: Any, member: int | None) -> dict[str, Any] | None:
        """Where the run's full per-epoch record is (Tune's result.json of the trial), when it is to be logged."""
        local = getattr(trial, "local_path", None)
        if getattr(self, "epoch_metrics", "all") != "key" or not local:
            return None
        return {"file": str(Path(local) / "result.json"), "member": member, "prefixes": [*EPOCH_KEYS, *EXTRA_KEYS]}

    def _finish_runs(self, ends: list[tuple[str, str, str, str | None, str | None, dict[str, Any] | None]]) -> None:
        """End runs (``Tracker.end_all``: one state write for a whole population), each with its best epoch's
        metrics first."""
        t = self.tracker
        for key, name, *_ in ends:
            best = self.best.get(key)
            if best:
                t.trial_metrics(key, best, int(best["best_epoch"]), f"final metrics of {name}")
        t.end_all(ends)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error_file = getattr(trial, "error_file", None)
        text = Path(error_file).read_text().strip() if error_file and Path(error_file).is_file() else ""
        self._finish(trial, "FAILED", text.splitlines()[-1] if text else "trial failed")

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        t, tid = self.tracker, trial.trial_id
        n = int(t.state.setdefault("retries", {}).get(tid, 0)) + 1
        t.state["retries"][tid] = n
        for key, name, _, _ in self._runs(trial):
            t.tags(key, {"dedn.retries": str(n)}, f"retry tag of {name}")
