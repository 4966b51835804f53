"""The Ray Tune callback that keeps a search's MLflow runs up to date with Tune's record (``tracking.sink``).

One child run per configuration (a trial, or a population member), found by its key (``member_key``) in the tag
``dedn.trial_id`` and tagged with its Optuna trial number and sampled values (``dedn.values``, what ``dedn promote``
rebuilds its config from): params at start, each epoch's metrics once (step = epoch), at the end the best epoch's as
``best_*``, the last checkpoint and the status. A resumed search first brings every run up to date from the record;
the run of a trial the restored experiment does not know (a killed driver started it after Tune last wrote its state)
is taken over by the trial proposed again in its place (the same Optuna trial), else ends KILLED, ``dedn.abandoned``.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tracking.sink import Row, SinkProcess
from tuning.interrupt import stopping
from tuning.population import configurations, member_key, section
from tuning.record import configuration_epochs, epoch_records, reports, result_file, stamp_ms

__all__ = [
    "KEY_METRICS",
    "MLflowTrialLogger",
    "RecordRows",
    "best_record",
    "epoch_values",
    "not_logged",
    "run_name",
    "trial_name",
]

_EPOCH_KEYS, _EXTRA_KEYS = ("val_", "loss_", "grid_"), ("samples_per_s", "epoch_seconds")
# what an epoch logs with ``epoch_metrics: key`` (the parent run's epochs.parquet has the rest): rows cost the server
KEY_METRICS = ("val_H",)
# what a run's final metrics hold, each as best_<key>: the epoch with the highest val_H
_BEST_KEYS = (
    "val_objective",
    "val_H",
    "val_U",
    "val_S",
    "val_T",
    "val_AUSUC",
    "epoch",
    "grid_lambda_rc",
    "grid_lambda_e",
    "grid_c",
)
_ENDED = ("FINISHED", "FAILED", "KILLED")
_LOGGERS: weakref.WeakSet[MLflowTrialLogger] = weakref.WeakSet()  # this process's loggers, for ``not_logged``


def run_name(trial: Any, optuna_number: int | None, member: int | None = None) -> str:
    """A child run's name: ``trial-007`` for Optuna trial 7; a population's members (Optuna trials of their own)
    by Tune's trial counter, ``trial-003-m5``."""
    if optuna_number is not None and member is None:
        return f"trial-{int(optuna_number):03d}"
    counter = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]  # Tune's "<n>_<params>"
    name = f"trial-{int(counter):03d}" if counter.isdigit() else f"trial-{trial.trial_id}"
    return member_key(name, member)


def trial_name(trial: Any) -> str:
    """Tune's name and folder for a trial: its MLflow run's name (``trial-007``; a population ``trial-003``, its members'
    runs ``trial-003-m5``), so that one trial has one name in the folders, MLflow, Optuna's number and the plots."""
    config = trial.config if isinstance(trial.config, dict) else {}
    return run_name(trial, config.get("optuna_trial"))


def best_record(epochs: list[tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """The record of a configuration's best epoch among its (stamp, record) epochs: by the objective, the earliest
    of equals (what a run's best_val_* metrics hold)."""
    return max(epochs, key=lambda e: (_value(e[1]), -e[1]["epoch"]))[1]


def _value(record: dict[str, Any]) -> float:
    """What selects a run's best epoch: the objective's value (H in records made before objectives)."""
    return float(record.get("val_objective", record.get("val_H", float("-inf"))))


class MLflowTrialLogger(Callback):
    """Tune's side of the MLflow sink: which runs a trial has, what each result adds to them, and their ends.
    ``epoch_metrics`` "all" logs every value of an epoch (about 20), "key" ``KEY_METRICS``."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        experiment_id: str,
        parent: str,
        epoch_metrics: str = "all",
        exp: str = "",
        epochs: int = 0,
        params: dict[str, str] | None = None,
    ) -> None:
        self.params = params or {}  # logged with every run's own (how the store's features were made)
        self.uri, self.experiment, self.experiment_id, self.parent = uri, experiment, experiment_id, parent
        self.epoch_metrics, self.exp, self.epochs = epoch_metrics, exp, epochs  # epochs: a trial's last (0: unknown)
        self._live()

    def _live(self) -> None:
        self.sink: SinkProcess | None = None
        self.known: dict[str, Any] | None = None  # the runs MLflow holds, read once at the first step
        self.logged: dict[str, int] = {}  # run key -> last epoch sent
        self.best: dict[str, tuple[int, dict[str, Any]]] = {}  # run key -> (report ms, record) of its best epoch
        self.ended: dict[str, dict[str, Any]] = {}  # population members that stopped or failed: key -> how
        self.started: set[str] = set()  # run keys this driver created or reopened
        self.closed: set[str] = set()  # run keys this driver ended
        self.retries: dict[str, int] = {}
        self.orphans: dict[tuple[str | None, str | None], str] = {}  # (Optuna number, member) -> key, on resume
        self.not_logged: list[str] = []

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment
        keep = ("uri", "experiment", "experiment_id", "parent", "epoch_metrics", "exp", "epochs", "params")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"epochs": 0, "params": {}, **state})
        self._live()

    # -- what a trial's runs are ------------------------------------------------------------------------------------
    def _runs(self, trial: Any) -> list[tuple[str, int | None, str, dict[str, Any], dict[str, str]]]:
        """(run key, member, run name, params, tags) of each configuration the trial trains."""
        config = trial.config if isinstance(trial.config, dict) else {}
        numbers = config.get("optuna_trials") or [config.get("optuna_trial")]
        out = []
        for (j, values), number in zip(configurations(config), numbers, strict=False):
            tags = {"dedn.values": json.dumps(values, sort_keys=True)}
            if number is not None:
                tags["optuna.trial_number"] = str(number)
            if j is not None:
                tags["dedn.member"] = str(j)
            out.append((member_key(trial.trial_id, j), j, run_name(trial, number, j), values, tags))
        return out

    def _rows(self, trial: Any, member: int | None, up_to: int | None = None) -> RecordRows:
        """The configuration's epochs in the record, as MLflow rows (read when called)."""
        return RecordRows(str(result_file(trial)), member, up_to, self.epoch_metrics == "key")

    # -- Tune's calls --------------------------------------------------------------------------------------------------
    def setup(
        self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None, **info: Any
    ) -> None:
        # with the key metrics (many GPUs) epochs wait up to a minute: most member runs cost one log_batch, at their end
        linger = 60.0 if self.epoch_metrics == "key" else 5.0
        self.sink = SinkProcess(
            self.uri,
            self.experiment,
            experiment_id=self.experiment_id,
            parent_id=self.parent,
            linger_s=linger,
            imports=[__name__],
        )
        _LOGGERS.add(self)

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        """Once, before the first step: runs of trials the restored experiment does not know (started by a driver killed
        before Tune saved its state) end KILLED, and runs of trials that ended are brought up to date."""
        if self.known is not None or self.sink is None:
            return
        self.known = self.sink.runs()
        by_key = {
            key: (trial, j, name, values, tags) for trial in trials for key, j, name, values, tags in self._runs(trial)
        }
        for key, run in self.known.items():
            if key not in by_key and "dedn.abandoned" not in run.data.tags:
                self.orphans[(run.data.tags.get("optuna.trial_number"), run.data.tags.get("dedn.member"))] = key
        for key, (trial, j, name, values, tags) in by_key.items():
            if trial.status in ("TERMINATED", "ERROR") and (
                key not in self.known or self.known[key].info.status not in ("FINISHED", "FAILED")
            ):
                self._open(trial, key, j, name, values, tags)
                self._end(trial, key, j, name, "FAILED" if trial.status == "ERROR" else "FINISHED", self._reason(trial))

    def _open(
        self, trial: Any, key: str, member: int | None, name: str, values: dict[str, Any], tags: dict[str, str]
    ) -> None:
        """Create the run, or continue an earlier driver's, sending the record's epochs the run lacks."""
        assert self.sink is not None
        self.started.add(key)
        old = self.orphans.pop((tags.get("optuna.trial_number"), tags.get("dedn.member")), None)
        if self.known is not None and old is not None and key not in self.known:
            self.known[key] = self.known.pop(old)
            self.sink.adopt(old, key, name)
        if self.known is not None and key in self.known:
            self.sink.reopen(key, name)
            # what a killed driver sent can be ahead of the record Tune saved: the trial reports those epochs again
            self.logged[key] = max(self.sink.steps(key), default=0)
        else:
            self.sink.create(key, name, {**self.params, **values}, tags)
        all_reports = reports(result_file(trial))
        epochs = configuration_epochs(all_reports, member)
        if not epochs:
            return
        last = epochs[-1][1]["epoch"]
        self.sink.sync(key, self._rows(trial, member, last), f"epochs 1-{last} of {name}")
        self.logged[key] = max(last, self.logged.get(key, 0))
        self.best[key] = max(epochs, key=lambda e: (_value(e[1]), -e[1]["epoch"]))
        for report in all_reports:
            end = section(report, "ended").get(str(member)) if member is not None else None
            if end is not None:
                self.ended[key] = end

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        for key, j, name, values, tags in self._runs(trial):
            if key not in self.started:
                self._open(trial, key, j, name, values, tags)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if self.sink is None:
            return
        population = configurations(trial.config)[0][0] is not None
        stamp = stamp_ms(result)
        rows = []
        for j, record in epoch_records(result, population).items():
            key, epoch = member_key(trial.trial_id, j), int(record["epoch"])
            best = self.best.get(key)
            if best is None or _value(record) > _value(best[1]):  # over every report, as the search selects
                self.best[key] = (stamp, record)
            if epoch <= self.logged.get(key, 0):
                # a retried or resumed trial reports again the epochs after its last checkpoint: the first report counts
                continue
            self.logged[key] = epoch
            rows.append((key, Row(epoch, stamp, epoch_values(record, self.epoch_metrics == "key"))))
        self.sink.log_rows(rows)
        for member, end in section(result, "ended").items():
            ended = member_key(trial.trial_id, int(member))
            self.sink.tags(ended, _end_tag(end), f"end of {ended}")
            self.ended[ended] = end

    def _reason(self, trial: Any) -> str | None:
        if trial.status != "ERROR":
            return None
        error_file = getattr(trial, "error_file", None)
        text = Path(error_file).read_text().strip() if error_file and Path(error_file).is_file() else ""
        return text.splitlines()[-1] if text else "trial failed"

    def _end(self, trial: Any, key: str, member: int | None, name: str, status: str, reason: str | None) -> None:
        assert self.sink is not None
        if member is not None:  # a member ends as it ended, or by its population's end if it has results
            failed = self.ended.get(key, {}).get("status") == "failed" or (status == "FAILED" and key not in self.best)
            status = "FAILED" if failed else "FINISHED"
        best = self.best.get(key)
        final = None
        if best is not None:  # the best epoch's metrics as best_*
            final = Row(
                int(best[1]["epoch"]), best[0], {f"best_{k}": float(best[1][k]) for k in _BEST_KEYS if k in best[1]}
            )
        tags = {"dedn.error": reason} if status == "FAILED" and reason else {}
        if key in self.ended:  # sent again with the end: a killed driver may not have sent it
            tags.update(_end_tag(self.ended[key]))
        tags.update(self._outcome(key, status, tags))
        checkpoint = getattr(getattr(trial, "checkpoint", None), "path", None)
        artifacts = None
        if status == "FINISHED" and checkpoint:
            if member is None:
                artifacts = partial(_folder, checkpoint)
            elif best is not None:
                artifacts = partial(
                    _member_checkpoint, checkpoint, member, str(Path(self.exp) / "member_checkpoints" / key)
                )
        self.closed.add(key)
        self.sink.end(key, status, final, tags, self._rows(trial, member), artifacts, f"end of {name}")

    def _outcome(self, key: str, status: str, tags: dict[str, str]) -> dict[str, str]:
        """``dedn.outcome`` (completed, stopped or failed: MLflow's status says FINISHED for the first two) and the
        run's description saying the same, both shown in MLflow's runs table."""
        last = self.logged.get(key, 0)
        if status == "FAILED":
            outcome, note = "failed", f"failed at epoch {last}: {tags.get('dedn.error', 'see the trial error')}"
        elif "dedn.stopped" in tags:
            outcome, note = "stopped", tags["dedn.stopped"]
        elif self.epochs and last < self.epochs:
            outcome, note = "stopped", f"stopped at epoch {last} of {self.epochs} (by the scheduler or the time budget)"
        else:
            outcome, note = "completed", f"completed {last} epochs"
        return {"dedn.outcome": outcome, "mlflow.note.content": note}

    def _finish(self, trial: Any, status: str) -> None:
        reason = self._reason(trial)
        for key, j, name, values, tags in self._runs(trial):
            if key not in self.started:  # failed before it started: its run is made now, to say so
                self._open(trial, key, j, name, values, tags)
            self._end(trial, key, j, name, status, reason)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(trial, "FAILED")

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        n = self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
        for key, *_ in self._runs(trial):
            if self.sink is not None:
                self.sink.tags(key, {"dedn.retries": str(n)}, f"retry tag of {key}")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        """Runs of trials the search's end stopped (its time budget) end too, then everything queued is sent; when
        the search was interrupted, runs stay open for ``--resume`` (the driver marks them KILLED)."""
        for trial in trials if not stopping() else []:
            for key, j, name, _, _ in self._runs(trial):
                if key in self.started and key not in self.closed:
                    self._end(trial, key, j, name, "FAILED" if trial.status == "ERROR" else "FINISHED", None)
        for key in self.orphans.values() if self.sink is not None and not stopping() else []:
            assert self.sink is not None and self.known is not None
            if self.known[key].info.status not in _ENDED:
                note = {"dedn.abandoned": "its driver was killed before Tune recorded the trial; not continued"}
                self.sink.end(key, "KILLED", None, note, list, None, f"abandoned run {key}")
        if self.sink is not None:
            self.not_logged = self.sink.close()


def epoch_values(record: dict[str, Any], key_only: bool) -> dict[str, float]:
    """What an epoch record logs to MLflow: every value (about 20), or with ``key_only`` ``KEY_METRICS``."""
    values = {
        k: float(v)
        for k, v in record.items()
        if (k.startswith(_EPOCH_KEYS) or k in _EXTRA_KEYS) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return {k: v for k, v in values.items() if k in KEY_METRICS} if key_only else values


@dataclass(frozen=True)
class RecordRows:
    """A configuration's epochs in the record (up to ``up_to``) as MLflow rows, read when called: in the sink's
    process, so it is data, not a closure."""

    path: str
    member: int | None
    up_to: int | None
    key_only: bool

    def __call__(self) -> list[Row]:
        epochs = configuration_epochs(reports(self.path), self.member, self.up_to)
        return [Row(r["epoch"], t, epoch_values(r, self.key_only)) for t, r in epochs]


def _folder(path: str) -> str | None:
    return path if Path(path).is_dir() else None


def _member_checkpoint(population: str, member: int, out: str) -> str | None:
    """Member ``member``'s checkpoint written from its population's, when that is still there."""
    from tuning.population import write_member_checkpoint

    return str(write_member_checkpoint(population, member, Path(out))) if Path(population).is_dir() else None


def _end_tag(end: dict[str, Any]) -> dict[str, str]:
    """The tag of a population member that stopped or failed before its population ended."""
    return {"dedn.error" if end["status"] == "failed" else "dedn.stopped": str(end.get("reason") or end["status"])}


def not_logged(experiment: str) -> list[str]:
    """What the loggers of ``experiment`` in this process could not send to MLflow (the record still has it)."""
    return [what for logger in list(_LOGGERS) if logger.experiment == experiment for what in logger.not_logged]
