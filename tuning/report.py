"""What a finished search logs on its MLflow parent run: plots, every configuration's epochs, the final model, the
summary metrics and the best configuration."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cluster.objects import SharedStore
from dedn.data.store import FeatureStore
from tracking import plots
from tracking.sink import RunSink
from tuning.population import best_weights, configurations, member_key
from tuning.record import configuration_epochs, reports
from tuning.selection import Entry
from tuning.space import chosen_values, trial_config

__all__ = [
    "FRONT_FILE",
    "epochs_table",
    "front_summary",
    "front_table",
    "non_dominated",
    "report_search",
    "trial_curves",
]

C_GRID = [round(0.1 * i, 2) for i in range(31)]
EPOCHS_FILE = "epochs.parquet"
FRONT_FILE = "front.parquet"
FRONT_FLOORS = (0.5, 0.6, 0.7)  # the summary's operating points: the most U with S at least this


def validation_curve(
    cfg_values: dict[str, Any], base: dict[str, Any], store: FeatureStore, state: dict[str, Any]
) -> dict[str, np.ndarray]:
    """The exact seen/unseen curve on the validation task of the trained weights ``state`` at the config's lambdas."""
    import torch

    from dedn.build import build_model
    from dedn.evaluation import curve_at, make_task
    from dedn.feeding import FeatureSource
    from dedn.partitions import resolve_partition

    cfg = trial_config(base, cfg_values).effective().model_copy(update={"device": "cpu"})
    cpu = torch.device("cpu")
    model = build_model(cfg, store, resolve_partition(cfg, store), cpu)
    model.load_state_dict(state)
    return curve_at(model, FeatureSource(store.features(), cpu), store, make_task(store, "validation"), cfg)


def trial_curves(results: list[Any], base: dict[str, Any], store: FeatureStore, posthoc: bool) -> list[dict[str, Any]]:
    """Every configuration's validation curve at its best epoch (by the objective), from the best weights its last
    checkpoint keeps: {name, trial_id, values, objective, curve}; configurations without weights are left out."""
    from tuning.tracking_callback import best_record

    out = []
    for r in results:
        checkpoint = getattr(r, "checkpoint", None)
        if checkpoint is None or not Path(checkpoint.path).is_dir():
            continue
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        for j, sampled in configurations(r.config):
            epochs = configuration_epochs(reports(Path(r.path) / "result.json"), j)
            if not epochs:
                continue
            record = best_record(epochs)
            values = chosen_values(sampled, record, posthoc)
            curve = validation_curve(values, base, store, best_weights(checkpoint.path, j))
            name = member_key(Path(r.path).name, j)
            objective = float(record.get("val_objective", record.get("val_H", 0.0)))
            inf = trial_config(base, values).inference
            out.append({"name": name, "trial_id": member_key(trial_id, j), "values": values, "objective": objective,
                        "curve": curve, "lambda_rc": inf.lambda_rc, "lambda_e": inf.lambda_e})  # fmt: skip
    return out


def non_dominated(u: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both U and S (one of equal points), by U descending."""
    order = np.lexsort((-s, -u))  # U descending, then S descending
    keep, best_s = [], -np.inf
    for i in order:
        if s[i] > best_s:
            keep.append(int(i))
            best_s = s[i]
    return np.asarray(keep, dtype=np.int64)


def front_table(curves: list[dict[str, Any]]) -> Any:
    """The validation front over all configurations (pyarrow): the non-dominated (U, S) points of every curve, each
    with its configuration's name and run key, the calibration (shift) that gives it, and its lambdas."""
    import pyarrow as pa

    cols: dict[str, list[Any]] = {k: [] for k in ("trial", "trial_id", "U", "S", "H", "shift", "lambda_rc", "lambda_e")}
    for t in curves:
        c = t["curve"]
        for u, s, shift in zip(c["U"], c["S"], c["shift"], strict=True):
            cols["trial"].append(t["name"])
            cols["trial_id"].append(t["trial_id"])
            cols["U"].append(float(u))
            cols["S"].append(float(s))
            cols["H"].append(2 * u * s / (u + s) if u + s > 0 else 0.0)
            cols["shift"].append(float(shift))
            cols["lambda_rc"].append(t["lambda_rc"])
            cols["lambda_e"].append(t["lambda_e"])
    keep = non_dominated(np.asarray(cols["U"]), np.asarray(cols["S"]))
    return pa.table({k: [v[i] for i in keep] for k, v in cols.items()})


def front_summary(front: Any) -> dict[str, float]:
    """The front's knee (its best H) and, for each floor in FRONT_FLOORS, the most U with S at least that."""
    u, s, h = (np.asarray(front.column(k).to_pylist(), dtype=float) for k in ("U", "S", "H"))
    out = {"front_knee_U": float(u[np.argmax(h)]), "front_knee_S": float(s[np.argmax(h)])} if h.size else {}
    for floor in FRONT_FLOORS:
        ok = s >= floor
        out[f"front_U_at_S{floor:g}"] = float(u[ok].max()) if ok.any() else 0.0
    return out


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
    inf = cfg.inference
    cpu = torch.device("cpu")
    grids = {"grid_lambda_rc": [inf.lambda_rc], "grid_lambda_e": [inf.lambda_e], "grid_calibration": C_GRID}
    cfg = cfg.model_copy(update={"device": "cpu", "inference": inf.model_copy(update=grids)})
    model = build_model(cfg, store, resolve_partition(cfg, store), cpu)
    model.load_state_dict(state)
    _, _, grid = evaluate(model, FeatureSource(store.features(), cpu), store, make_task(store, "validation"), cfg)
    return [g["S"] for g in grid], [g["U"] for g in grid], [g["H"] for g in grid], inf.calibration


def epochs_table(results: list[Any]) -> Any:
    """Every configuration's epochs as one table (pyarrow): its run key (``dedn.trial_id``), then every JSON number (not
    a bool) the epoch reported, each epoch as first reported."""
    import pyarrow as pa

    rows: list[dict[str, Any]] = []
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        for j, _ in configurations(r.config):
            for _, record in configuration_epochs(reports(Path(r.path) / "result.json"), j):
                numbers = {k: float(v) for k, v in record.items() if type(v) in (int, float) and k != "epoch"}
                rows.append({"trial_id": member_key(trial_id, j), "epoch": int(record["epoch"]), **numbers})
    columns = ["trial_id", "epoch", *sorted({k for row in rows for k in row} - {"trial_id", "epoch"})]
    return pa.table({c: [row.get(c) for row in rows] for c in columns})


def _log_figure(sink: RunSink, folder: Path, fig: Any, name: str) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    sink.call(f"plot {name}", lambda client: client.log_artifact(str(sink.parent_id), str(folder / name), "plots"))


def report_search(
    sink: RunSink,
    exp: Path,
    results: list[Any],
    shared: SharedStore,
    base: dict[str, Any],
    best: Entry | None,
    best_metrics: dict[str, Any],
    final: dict[str, Any] | None,
    posthoc: bool,
    storage: str,
    front: tuple[list[dict[str, Any]], Any] = ([], None),
) -> list[str]:
    """Log the plots, ``epochs.parquet``, the validation front (``front``: every configuration's curve and the front
    table), the final model and the summary on the parent run, then end it; returns what could not be logged (by this
    and by the trials' callback)."""
    import optuna
    import pyarrow.parquet as pq

    from dedn.checkpoints import save_checkpoint
    from tuning.optuna_storage import open_storage
    from tuning.tracking_callback import not_logged

    parent = str(sink.parent_id)
    store = shared.materialize()
    scratch = Path(tempfile.mkdtemp(prefix=".report-", dir=exp))  # the files to upload, until they are
    study = optuna.load_study(study_name=sink.experiment, storage=open_storage(storage))
    for name, fig in plots.study_plots(study).items():
        _log_figure(sink, scratch, fig, name)
    values = chosen_values(best.config if best else {}, best_metrics, posthoc)  # with posthoc, its inference point
    # S, U and H against calibration c, for the best entry's checkpointed weights at its chosen values
    checkpoint = getattr(best.result, "checkpoint", None) if best is not None else None
    if best is not None and checkpoint is not None and Path(checkpoint.path).is_dir():  # it kept weights
        s, u, h, chosen = calibration_curve(values, base, store, best_weights(checkpoint.path, best.member))
        _log_figure(sink, scratch, plots.calibration(C_GRID, s, u, h, chosen), "calibration_best_trial.png")
    curves, front_points = front
    if front_points is not None:
        pq.write_table(front_points, scratch / FRONT_FILE)
        sink.call(FRONT_FILE, lambda client: client.log_artifact(parent, str(scratch / FRONT_FILE)))
        top = sorted(curves, key=lambda t: -t["objective"])[:5]
        shown = [(t["name"], t["curve"]["U"], t["curve"]["S"]) for t in top]
        u, s = front_points.column("U").to_pylist(), front_points.column("S").to_pylist()
        _log_figure(sink, scratch, plots.front(shown, u, s), "front.png")
    table = scratch / EPOCHS_FILE
    pq.write_table(epochs_table(results), table)
    sink.call("epochs.parquet", lambda client: client.log_artifact(parent, str(table)))
    summary = {f"best_{k}": float(v) for k, v in best_metrics.items() if k.startswith("val_")}
    if final is not None:  # the retrained model: <experiment>/final_model
        epoch = int(best_metrics["epoch"])
        cfg = trial_config(base, final["config"])
        info = {"test": final["test"], "validation": best_metrics, "weights": "retrained on trainval", "epoch": epoch}
        folder = save_checkpoint(exp / "final_model", final["state"], cfg, store, np.asarray(final["partition"]), info)
        sink.call("final model", lambda client: client.log_artifacts(parent, str(folder), "final_model"))
        if "curve" in final:  # the final model's exact test curve: a table and S, U, H against the calibration
            import pyarrow as pa

            curve = final["curve"]
            pq.write_table(pa.table(curve), scratch / "final_model_curve.parquet")
            path = str(scratch / "final_model_curve.parquet")
            sink.call("final model curve", lambda client: client.log_artifact(parent, path))
            fu, fs = np.asarray(curve["U"]), np.asarray(curve["S"])
            fh = np.where(fu + fs > 0, 2 * fu * fs / np.maximum(fu + fs, 1e-12), 0.0)
            title = "Final model on test: the exact curve"
            fig = plots.calibration(
                curve["shift"], curve["S"], curve["U"], fh.tolist(), cfg.inference.calibration, title
            )
            _log_figure(sink, scratch, fig, "calibration_final_model_test.png")
        summary.update({f"test_{k}": float(v) for k, v in final["test"].items() if k in ("U", "S", "H", "T", "AUSUC")})
    summary["best_epoch"] = float(best_metrics.get("epoch", 0))
    if front_points is not None:
        summary.update(front_summary(front_points))

    def summarise(client: Any) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run = sink.runs().get(best.key) if best is not None else None
        tags = [RunTag("dedn.best_trial_run_id", run.info.run_id)] if run is not None else []
        metrics = [Metric(k, v, 0, 0) for k, v in summary.items()]
        params = [Param(k, str(v)) for k, v in sorted(values.items())]
        client.log_batch(parent, metrics=metrics, params=params, tags=tags)
        client.set_terminated(parent, status="FINISHED")

    sink.call("summary metrics, best configuration and status", summarise)
    left = not_logged(sink.experiment) + sink.close()
    shutil.rmtree(scratch, ignore_errors=True)
    return left
