"""What a finished search logs on its MLflow parent run: tags, plots, the final model, summary metrics."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cluster.objects import SharedStore
from dedn.data.store import FeatureStore
from tracking import plots
from tracking.runs import Tracker, code_version
from tuning.optuna_storage import default_storage, open_storage
from tuning.space import chosen_values, trial_config

__all__ = ["C_GRID", "calibration_curve", "parent_tags", "report_search"]

C_GRID = [round(0.1 * i, 2) for i in range(31)]


def parent_tags(store: FeatureStore, spec_path: str, posthoc: bool) -> dict[str, str]:
    import optuna
    import ray

    return {
        "dedn.dataset": store.meta.name,
        "dedn.fingerprint": store.meta.fingerprint,
        "dedn.search_spec": str(Path(spec_path).resolve()),
        "dedn.code_version": code_version(),
        "ray.version": ray.__version__,
        "optuna.version": optuna.__version__,
        "dedn.posthoc_inference": str(posthoc).lower(),
    }


def calibration_curve(
    cfg_values: dict[str, Any], base: dict[str, Any], store: FeatureStore, state: dict[str, Any]
) -> tuple[list[float], list[float], list[float], float]:
    """S, U, H on the validation task against c, for the trained weights ``state``."""
    import torch

    from dedn.build import build_model
    from dedn.evaluation import evaluate, make_task
    from dedn.feeding import FeatureSource
    from dedn.partitions import resolve_partition

    cfg = trial_config(base, cfg_values).effective()
    cfg = cfg.model_copy(
        update={
            "device": "cpu",
            "inference": cfg.inference.model_copy(
                update={
                    "grid_lambda_rc": [cfg.inference.lambda_rc],
                    "grid_lambda_e": [cfg.inference.lambda_e],
                    "grid_calibration": C_GRID,
                }
            ),
        }
    )
    model = build_model(cfg, store, resolve_partition(cfg, store), torch.device("cpu"))
    model.load_state_dict(state)
    _, _, grid = evaluate(
        model, FeatureSource(store.features(), torch.device("cpu")), store, make_task(store, "validation"), cfg
    )
    return [g["S"] for g in grid], [g["U"] for g in grid], [g["H"] for g in grid], cfg.inference.calibration


def _log_figure(tracker: Tracker, run_id: str, fig: Any, name: str) -> None:
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        data = path.read_bytes()

    def log() -> None:
        with tempfile.TemporaryDirectory() as d2:
            (Path(d2) / name).write_bytes(data)
            tracker.client.log_artifact(run_id, str(Path(d2) / name), "plots")

    tracker.call(f"plot {name}", log)


def report_search(
    tracker: Tracker,
    exp: Path,
    name: str,
    results: list[Any],
    shared: SharedStore,
    base: dict[str, Any],
    best_config: dict[str, Any],
    best_metrics: dict[str, Any],
    final: dict[str, Any] | None,
    posthoc: bool,
    optuna_storage: str | None = None,
) -> list[str]:
    """Log plots, the final model and summary metrics on the parent run; returns what could not be logged.
    ``optuna_storage``: the study's storage URL (default: ``optuna.db`` in the experiment folder)."""
    tracker.reload()  # the callback (a separate copy) wrote the trial runs
    parent = str(tracker.state["parent"])
    store = shared.materialize()
    best_entry = _log_search_plots(tracker, parent, optuna_storage or default_storage(exp), name, results)
    if best_entry is not None:
        _log_calibration_plot(tracker, parent, best_entry, best_config, best_metrics, posthoc, base, store)
    summary = {f"best_{k}": float(v) for k, v in best_metrics.items() if k.startswith("val_")}
    if final is not None:
        _log_final_model(tracker, parent, exp, final, base, store, best_metrics)
        summary.update({f"test_{k}": float(v) for k, v in final["test"].items() if k in ("U", "S", "H", "T")})
    summary["best_epoch"] = float(best_metrics.get("epoch", 0))
    tracker.metrics(parent, summary, 0, "summary metrics")
    _log_best_params(tracker, parent, chosen_values(best_config, best_metrics, posthoc))
    if best_entry is not None:
        _tag_best_trial(tracker, parent, best_entry)
    tracker.call("parent status", lambda: tracker.client.set_terminated(parent, status="FINISHED"))
    return tracker.retry_failed()


def _log_search_plots(tracker: Tracker, parent: str, storage: str, name: str, results: list[Any]) -> Any:
    """Validation H per epoch, parameter importance and parallel coordinates of every configuration the
    search trained; returns the entry (tuning.population.Entry) with the highest validation H, or None."""
    import optuna

    from tuning.population import member_entries

    curves: dict[str, tuple[list[int], list[float]]] = {}
    params: list[dict[str, Any]] = []
    best_h: list[float] = []
    best_name, best_entry = None, None
    for r in results:
        for e in member_entries(r):
            df: Any = e.df
            if df is None or "val_H" not in df or df["val_H"].isna().all():
                continue
            curves[e.label] = (df["epoch"].astype(int).tolist(), df["val_H"].astype(float).tolist())
            params.append(e.config)
            best_h.append(float(df["val_H"].max()))
            if best_entry is None or best_h[-1] > max(best_h[:-1], default=-1.0):
                best_name, best_entry = e.label, e
    _log_figure(tracker, parent, plots.h_per_epoch(curves, best_name), "val_H_per_epoch.png")
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
        with warnings.catch_warnings():  # "too few trials: importances will be equal": the plot shows it
            warnings.filterwarnings("ignore", message="The number of trials is too small", category=UserWarning)
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # fewer than two finished trials, or a constant objective
        importances = {}
    _log_figure(tracker, parent, plots.param_importance(importances), "param_importance.png")
    _log_figure(tracker, parent, plots.parallel_coordinates(params, best_h), "parallel_coordinates.png")
    return best_entry


def _log_calibration_plot(
    tracker: Tracker,
    parent: str,
    entry: Any,
    best_config: dict[str, Any],
    best_metrics: dict[str, Any],
    posthoc: bool,
    base: dict[str, Any],
    store: FeatureStore,
) -> None:
    """S, U and H against calibration c for the best entry's checkpointed weights (when it kept one), at
    the chosen configuration (with ``posthoc``, at the inference point it chose on validation)."""
    from tuning.population import best_weights

    checkpoint = getattr(entry.result, "checkpoint", None)
    if checkpoint is None or not Path(checkpoint.path).is_dir():
        return
    state = best_weights(checkpoint.path, entry.member)
    values = chosen_values(best_config, best_metrics, posthoc)
    s, u, h, chosen = calibration_curve(values, base, store, state)
    _log_figure(tracker, parent, plots.calibration(C_GRID, s, u, h, chosen), "calibration_best_trial.png")


def _log_best_params(tracker: Tracker, parent: str, values: dict[str, Any]) -> None:
    """The best configuration as the parent run's params (dotted config keys, as the child runs have)."""
    from mlflow.entities import Param

    params = [Param(k, str(v)) for k, v in sorted(values.items())]
    if params:
        tracker.call("best configuration", lambda: tracker.client.log_batch(parent, params=params))


def _log_final_model(
    tracker: Tracker,
    parent: str,
    exp: Path,
    final: dict[str, Any],
    base: dict[str, Any],
    store: FeatureStore,
    best_metrics: dict[str, Any],
) -> None:
    """Save the retrained model to ``<experiment>/final_model`` and log it on the parent run."""
    from dedn.checkpoints import save_checkpoint

    folder = save_checkpoint(
        exp / "final_model",
        final["state"],
        trial_config(base, final["config"]),
        store,
        np.asarray(final["partition"]),
        {
            "test": final["test"],
            "validation": best_metrics,
            "weights": "retrained on trainval",
            "epoch": int(best_metrics["epoch"]),
        },
    )
    tracker.call("final model", lambda: tracker.client.log_artifacts(parent, str(folder), "final_model"))


def _tag_best_trial(tracker: Tracker, parent: str, entry: Any) -> None:
    """Tag the parent run with the run id of the best entry's trial (or population member)."""
    from tuning.tracking_callback import member_key

    m = entry.result.metrics
    trial_id = m.get("trial_id") if m else None
    key = trial_id if entry.member is None or not trial_id else member_key(trial_id, entry.member)
    run_id = tracker.state["trials"].get(key) if key else None
    if run_id:
        tracker.call("best-trial tag", lambda: tracker.client.set_tag(parent, "dedn.best_trial_run_id", run_id))
