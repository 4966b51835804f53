"""A Ray Tune callback that logs every trial to MLflow from the driver (tracking.runs.Tracker)."""

from __future__ import annotations

import tempfile
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
    trial config, final validation metrics and the last checkpoint at the end."""

    def __init__(self, tracker: Tracker, base: dict[str, Any]) -> None:
        self.tracker = tracker
        self.base = base
        self.best: dict[str, dict[str, float]] = {}

    def _run(self, trial: Any) -> str | None:
        run_id = self.tracker.child(trial.trial_id, str(trial), sampled_params(trial.config))
        return run_id

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        run_id = self._run(trial)
        if run_id is None:
            return
        cfg = trial_config(self.base, sampled_params(trial.config)).effective()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "trial_config.yaml"
            path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            data = path.read_bytes()

        def log() -> None:
            with tempfile.TemporaryDirectory() as d2:
                (Path(d2) / "trial_config.yaml").write_bytes(data)
                self.tracker.client.log_artifact(run_id, str(Path(d2) / "trial_config.yaml"))

        self.tracker.call(f"config of {trial}", log)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        run_id = self.tracker.state["trials"].get(trial.trial_id) or self._run(trial)
        if run_id is None or "epoch" not in result:
            return
        metrics = {
            k: float(v)
            for k, v in result.items()
            if (k.startswith(EPOCH_KEYS) or k in EXTRA_KEYS) and isinstance(v, (int, float))
        }
        self.tracker.metrics(run_id, metrics, int(result["epoch"]), f"epoch {result['epoch']} of {trial}")
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

    def _finish(self, trial: Any, status: str, reason: str | None = None) -> None:
        run_id = self.tracker.state["trials"].get(trial.trial_id)
        if run_id is None:
            return
        client = self.tracker.client
        best = self.best.get(trial.trial_id)
        if best:
            self.tracker.metrics(run_id, best, int(best["best_epoch"]), f"final metrics of {trial}")
        checkpoint = getattr(trial, "checkpoint", None)
        path = getattr(checkpoint, "path", None)
        if status == "FINISHED" and path and Path(path).is_dir():
            self.tracker.call(f"checkpoint of {trial}", lambda: client.log_artifacts(run_id, path, "checkpoint"))
        elif path:
            self.tracker.call(f"checkpoint uri of {trial}", lambda: client.set_tag(run_id, "dedn.checkpoint", path))
        if reason:
            self.tracker.call(f"error of {trial}", lambda: client.set_tag(run_id, "dedn.error", reason[:5000]))
        self.tracker.call(f"status of {trial}", lambda: client.set_terminated(run_id, status=status))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        reason = getattr(trial, "error_file", None)
        text = Path(reason).read_text() if reason and Path(reason).is_file() else "trial failed"
        self._finish(trial, "FAILED", text.strip().splitlines()[-1] if text.strip() else "trial failed")

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        run_id = self.tracker.state["trials"].get(trial.trial_id)
        if run_id is not None:
            n = int(self.tracker.state.setdefault("retries", {}).get(trial.trial_id, 0)) + 1
            self.tracker.state["retries"][trial.trial_id] = n
            self.tracker.call(
                f"retry tag of {trial}", lambda: self.tracker.client.set_tag(run_id, "dedn.retries", str(n))
            )
