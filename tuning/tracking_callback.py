"""A Ray Tune callback that logs every trial to MLflow from the driver (tracking.runs.Tracker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from tracking.runs import Tracker
from tuning.space import sampled_params, trial_config

EPOCH_KEYS = ("val_", "loss_", "grid_")
EXTRA_KEYS = ("samples_per_s", "epoch_seconds")


class MLflowTrialLogger(Callback):
    """One nested child run per trial: params at start, metrics per epoch (step = epoch), the resolved
    trial config, final validation metrics and the last checkpoint at the end. Every call goes through
    the tracker, which queues what fails for the end instead of failing the search."""

    def __init__(self, tracker: Tracker, base: dict[str, Any]) -> None:
        self.tracker = tracker
        self.base = base
        self.best: dict[str, dict[str, float]] = {}

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        t = self.tracker
        params = sampled_params(trial.config)
        t.child(trial.trial_id, str(trial), params)
        text = yaml.safe_dump(trial_config(self.base, params).effective().model_dump(mode="json"), sort_keys=False)
        t.trial_call(
            trial.trial_id, f"config of {trial}", lambda run: t.client.log_text(run, text, "trial_config.yaml")
        )

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if "epoch" not in result:
            return
        if trial.trial_id not in self.tracker.state["trials"]:
            self.tracker.child(trial.trial_id, str(trial), sampled_params(trial.config))
        epoch = int(result["epoch"])
        last = self.tracker.state.setdefault("last_epoch", {})
        if epoch <= int(last.get(trial.trial_id, 0)):
            # A worker killed after reporting this epoch but before its checkpoint was kept: the retry
            # re-runs it from the previous checkpoint on the same minibatch stream. Log each epoch once.
            return
        last[trial.trial_id] = epoch
        self.tracker.save()
        metrics = {
            k: float(v)
            for k, v in result.items()
            if (k.startswith(EPOCH_KEYS) or k in EXTRA_KEYS) and isinstance(v, (int, float))
        }
        self._log(trial, metrics, epoch, f"epoch {epoch} of {trial}")
        best = self.best.get(trial.trial_id)
        if best is None or result["val_H"] > best["best_val_H"]:
            self.best[trial.trial_id] = {
                "best_val_H": float(result["val_H"]),
                "best_val_U": float(result["val_U"]),
                "best_val_S": float(result["val_S"]),
                "best_val_T": float(result["val_T"]),
                "best_epoch": float(result["epoch"]),
                "best_grid_lambda_rc": float(result["grid_lambda_rc"]),
                "best_grid_lambda_e": float(result["grid_lambda_e"]),
                "best_grid_c": float(result["grid_c"]),
            }

    def _log(self, trial: Any, metrics: dict[str, float], step: int, what: str) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.tracker.trial_call(trial.trial_id, what, lambda run: self.tracker.client.log_batch(run, metrics=batch))

    def _finish(self, trial: Any, status: str, reason: str | None = None) -> None:
        t, tid = self.tracker, trial.trial_id
        best = self.best.get(tid)
        if best:
            self._log(trial, best, int(best["best_epoch"]), f"final metrics of {trial}")
        path = getattr(getattr(trial, "checkpoint", None), "path", None)
        if status == "FINISHED" and path and Path(path).is_dir():
            t.trial_call(tid, f"checkpoint of {trial}", lambda run: t.client.log_artifacts(run, path, "checkpoint"))
        elif path:
            t.trial_call(tid, f"checkpoint uri of {trial}", lambda run: t.client.set_tag(run, "dedn.checkpoint", path))
        if reason:
            t.trial_call(tid, f"error of {trial}", lambda run: t.client.set_tag(run, "dedn.error", reason[:5000]))
        t.trial_call(tid, f"status of {trial}", lambda run: t.client.set_terminated(run, status=status))

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
        t.trial_call(tid, f"retry tag of {trial}", lambda run: t.client.set_tag(run, "dedn.retries", str(n)))
