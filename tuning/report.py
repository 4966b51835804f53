"""What a finished search logs on its MLflow parent run: tags, plots, the final model, summary metrics."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cluster.objects import SharedStore
from dedn.data.store import FeatureStore
from tracking import plots
from tracking.runs import Tracker, code_version
from tuning.space import trial_config

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

    from dedn.train import FeatureSource, build_model, evaluate, make_task, resolve_partition

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
) -> list[str]:
    """Log plots, the final model and summary metrics on the parent run; returns what could not be logged."""
    import optuna

    from dedn.train import save_checkpoint
    from tuning.tracking_callback import member_key

    tracker.state = tracker._load()  # the callback (a separate copy) wrote the trial runs
    parent = str(tracker.state["parent"])
    store = shared.materialize()

    from tuning.population import best_weights, member_entries

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
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{exp / 'optuna.db'}")
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # fewer than two finished trials, or a constant objective
        importances = {}
    _log_figure(tracker, parent, plots.param_importance(importances), "param_importance.png")
    _log_figure(tracker, parent, plots.parallel_coordinates(params, best_h), "parallel_coordinates.png")

    checkpoint = getattr(best_entry.result, "checkpoint", None) if best_entry is not None else None
    if best_entry is not None and checkpoint is not None and Path(checkpoint.path).is_dir():
        state = best_weights(checkpoint.path, best_entry.member)
        values = dict(best_config)
        if posthoc:
            values.update(
                {
                    "inference.lambda_rc": best_metrics["grid_lambda_rc"],
                    "inference.lambda_e": best_metrics["grid_lambda_e"],
                    "inference.calibration": best_metrics["grid_c"],
                }
            )
        s, u, h, chosen = calibration_curve(values, base, store, state)
        _log_figure(tracker, parent, plots.calibration(C_GRID, s, u, h, chosen), "calibration_best_trial.png")

    summary = {f"best_{k}": float(v) for k, v in best_metrics.items() if k.startswith("val_")}
    if final is not None:
        cfg = trial_config(base, final["config"])
        folder = save_checkpoint(
            exp / "final_model",
            final["state"],
            cfg,
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
        summary.update({f"test_{k}": float(v) for k, v in final["test"].items() if k in ("U", "S", "H", "T")})
    tracker.metrics(parent, summary, 0, "summary metrics")
    if best_entry is not None:
        m = best_entry.result.metrics
        trial_id = m.get("trial_id") if m else None
        key = trial_id if best_entry.member is None or not trial_id else member_key(trial_id, best_entry.member)
        run_id = tracker.state["trials"].get(key) if key else None
        if run_id:
            tracker.call("best-trial tag", lambda: tracker.client.set_tag(parent, "dedn.best_trial_run_id", run_id))
    tracker.call("parent status", lambda: tracker.client.set_terminated(parent, status="FINISHED"))
    return tracker.retry_failed()
