"""Model registry: promote a search's model, load it back (never running code or pickles it carries:
``tracking.served_model.open_model``), predict on a store."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dedn.errors import DednInputError
from dedn.outputs import writing
from dedn.safe_yaml import load_mapping
from tracking.databases import check_existing_store
from tracking.served_model import CODE_FILE as PYFUNC_CODE
from tracking.served_model import check_model_folder, code_matches, fetched_model, model_signature, open_model
from tracking.store import mlflow_uris

__all__ = ["predict_store", "latest_search", "promote", "trial_run"]

_FIGURES = ("U", "S", "H", "T")
_PARENT = "mlflow.parentRunId"


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _download(uri: str, run_id: str, path: str, dst: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=uri))


def _experiment_runs(uri: str, experiment: str) -> tuple[list[Any], list[Any]]:
    """(parent runs, child runs) of an experiment; refuses an unknown one, listing those that exist."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments(max_results=1000))) or "none"
        raise DednInputError(uri, "experiment", f"no MLflow experiment named {experiment!r} (experiments: {names})")
    runs = list(client.search_runs([exp.experiment_id], max_results=10000))
    return [r for r in runs if _PARENT not in r.data.tags], [r for r in runs if _PARENT in r.data.tags]


def best_child_run(uri: str, experiment: str, metric: str) -> tuple[Any, Any]:
    """(parent run, best finished child run by ``best_<metric>``) of a search experiment."""
    parents, children = _experiment_runs(uri, experiment)
    key = f"best_{metric}"
    scored = [r for r in children if r.info.status == "FINISHED" and key in r.data.metrics]
    if not parents or not scored:
        raise DednInputError(uri, "runs", f"experiment {experiment!r} has no finished trial with metric {key}")
    best = max(scored, key=lambda r: r.data.metrics[key])
    return next(p for p in parents if p.info.run_id == best.data.tags[_PARENT]), best


def trial_run(uri: str, experiment: str, trial: str) -> tuple[Any, Any]:
    """(parent run, child run) of one trial, named by Tune trial id, run name or run id."""
    parents, children = _experiment_runs(uri, experiment)
    found = [r for r in children if trial in (r.info.run_id, r.info.run_name, r.data.tags.get("dedn.trial_id"))]
    if len(found) != 1:
        names = sorted(str(r.info.run_name) for r in children)
        listing = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        rule = "matches several runs" if found else f"no such trial (trials: {listing or 'none'})"
        raise DednInputError(uri, "--trial", f"{trial!r}: {rule}")
    (best,) = found
    if best.info.status != "FINISHED" or "best_val_H" not in best.data.metrics:
        raise DednInputError(uri, "--trial", f"{trial!r}: the trial did not finish ({best.info.status})")
    return next(r for r in parents + children if r.info.run_id == best.data.tags[_PARENT]), best


def final_model_run(uri: str, experiment: str) -> Any:
    """The newest parent run of the experiment that logged a final model (``final_model/``)."""
    parents, _ = _experiment_runs(uri, experiment)
    client = _client(uri)
    for run in sorted(parents, key=lambda r: r.info.start_time or 0, reverse=True):
        if "final_model" in {a.path for a in client.list_artifacts(run.info.run_id)} and "test_H" in run.data.metrics:
            return run
    rule = f"experiment {experiment!r} has no final model (searched with --no-final-test, or not finished)"
    raise DednInputError(uri, "final_model", f"{rule}: promote a trial with --trial ID (or --trial best)")


def latest_search(uri: str, running: bool = False) -> tuple[str, str | None]:
    """The experiment of the most recently started search that finished (with ``running``, or is running), and a note
    naming a newer search that did not (killed, failed, or running) with the ``--experiment`` that picks it; refused
    when none finished."""
    client = _client(uri)
    ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    spec, order = "tags.`dedn.search_spec` != ''", ["attributes.start_time DESC"]
    latest = client.search_runs(ids, spec, max_results=1, order_by=order) if ids else []
    if not latest:
        raise DednInputError(uri, "--experiment", "no search in this tracking store: run dedn search first")
    newest = str(client.get_experiment(latest[0].info.experiment_id).name)
    if latest[0].info.status == "FINISHED" or (running and latest[0].info.status == "RUNNING"):
        return newest, None
    unfinished = f"the latest search, {newest!r}, is {latest[0].info.status} (--experiment {newest} picks it)"
    done = client.search_runs(ids, f"{spec} and attributes.status = 'FINISHED'", max_results=1, order_by=order)
    if not done:
        raise DednInputError(uri, "--experiment", f"no search in this tracking store finished: {unfinished}")
    return str(client.get_experiment(done[0].info.experiment_id).name), unfinished


def _trial_checkpoint(uri: str, parent: Any, best: Any, folder: Path) -> Path:
    """The trial's best-epoch weights (validation task) as a checkpoint: ``base_config.yaml`` with ``dedn.values``."""
    import mlflow
    import torch

    from dedn.checkpoints import TRIAL_PROGRESS, TRIAL_STATE, save_checkpoint
    from dedn.evaluation import with_inference_point

    run = f"runs:/{best.info.run_id}"
    ckpt = _download(uri, best.info.run_id, "checkpoint", folder / "trial")
    try:  # weights only: a tampered state.pt cannot run code; it is refused with one line
        state = torch.load(ckpt / TRIAL_STATE, map_location="cpu", weights_only=True)["best_model"]
        partition = json.loads((ckpt / TRIAL_PROGRESS).read_text())["partition"]
        header = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/store.json")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        rule = f"not a trial checkpoint dedn wrote: {type(e).__name__}: {first}"
        raise DednInputError(f"{run}/checkpoint", "checkpoint", rule) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DednInputError(f"{run}/checkpoint/{TRIAL_STATE}", "best_model", "not a state dict of tensors")
    cfg = _trial_config(uri, parent, best, folder).effective()
    if parent.data.tags.get("dedn.posthoc_inference") == "true":  # post-hoc: the point the trial chose on validation
        cfg = with_inference_point(cfg, best.data.metrics, prefix="best_grid_")
    extra = {"weights": "trial best epoch (validation task)", "trial_run_id": best.info.run_id}
    return save_checkpoint(folder / "model", state, cfg, header, np.asarray(partition), extra)


def operating_point(front: list[dict[str, Any]], at: str, source: str) -> dict[str, Any]:
    """The front point ``at`` picks: ``S>=x`` the most U among points with S >= x, ``U>=x`` the most S among those with
    U >= x (the first of equals). One DednInputError when the text is malformed or no point qualifies."""
    keep, _, floor = at.replace(" ", "").partition(">=")
    try:
        x = float(floor)
    except ValueError:
        x = -1.0
    if keep not in ("S", "U") or not 0.0 <= x <= 1.0:
        raise DednInputError("dedn promote", "--at", f"{at!r}: must be S>=x or U>=x with x in [0, 1]")
    goal = "U" if keep == "S" else "S"
    ok = [p for p in front if p[keep] >= x]
    if not ok:
        most = max((p[keep] for p in front), default=0.0)
        raise DednInputError(
            source, "--at", f"{at!r}: no point of the validation front has {keep} >= {x:g} (most: {most:.4f})"
        )
    return max(ok, key=lambda p: p[goal])


def _front_run(uri: str, experiment: str) -> tuple[Any, list[dict[str, Any]]]:
    """The newest parent run of the experiment with a validation front, and the front's points."""
    import pyarrow.parquet as pq

    parents, _ = _experiment_runs(uri, experiment)
    client = _client(uri)
    for run in sorted(parents, key=lambda r: r.info.start_time or 0, reverse=True):
        if "front.parquet" in {a.path for a in client.list_artifacts(run.info.run_id)}:
            with tempfile.TemporaryDirectory() as d:
                return run, pq.read_table(_download(uri, run.info.run_id, "front.parquet", Path(d))).to_pylist()
    raise DednInputError(uri, "front.parquet", f"experiment {experiment!r} has no validation front (not finished)")


def _trial_config(uri: str, parent: Any, child: Any, folder: Path) -> Any:
    """A trial's training config: the search's ``base_config.yaml`` with the run's ``dedn.values``."""
    from dedn.config import set_path, validate_config

    run = f"runs:/{child.info.run_id}"
    raw = load_mapping(_download(uri, parent.info.run_id, "base_config.yaml", folder), "base config")
    try:
        values = json.loads(child.data.tags["dedn.values"])
    except (KeyError, ValueError):
        raise DednInputError(run, "dedn.values", "the run has no sampled values") from None
    if not isinstance(values, dict):
        raise DednInputError(run, "dedn.values", "must map config keys to values")
    for key, value in values.items():
        set_path(raw, str(key), value, f"{run} dedn.values")
    return validate_config(raw, f"{run} dedn.values")


def _at_point(uri: str, experiment: str, at: str | None, calibration: float | None, store: str | None, folder: Path
              ) -> tuple[Any, Path, dict[str, float], dict[str, str]]:  # fmt: skip
    """The honest final protocol at an operating point: the trial and shift ``at`` picks on the validation front
    (or the best trial at ``calibration``), retrained on trainval for its best epoch count, tested once at that
    shift. Returns (parent run, checkpoint folder, test figures, tags)."""
    import torch

    from dedn.checkpoints import save_checkpoint
    from dedn.data import open_store
    from dedn.train import train

    parent, front = _front_run(uri, experiment)
    if at is not None:
        point = operating_point(front, at, f"runs:/{parent.info.run_id}/front.parquet")
        _, child = trial_run(uri, experiment, str(point["trial_id"]))
        inference = {"lambda_rc": point["lambda_rc"], "lambda_e": point["lambda_e"], "calibration": point["shift"]}
        val = {"U": point["U"], "S": point["S"], "H": point["H"]}
        said = f"{at} (validation U {point['U']:.4f}, S {point['S']:.4f})"
    else:
        _, child = best_child_run(uri, experiment, "val_objective")
        m = child.data.metrics
        inference = {"calibration": float(calibration or 0.0)}
        if parent.data.tags.get("dedn.posthoc_inference") == "true":
            inference.update(lambda_rc=m["best_grid_lambda_rc"], lambda_e=m["best_grid_lambda_e"])
        val = {}
        said = f"calibration {calibration:g}"
    cfg = _trial_config(uri, parent, child, folder)
    cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(update=inference), "device": "cpu"})
    data = open_store(store or cfg.data.store)
    epochs = int(child.data.metrics["best_epoch"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as verify_figures scores it: the same summation order, the same figures
    try:
        result = train(cfg, data, "test", epochs=epochs, keep_epoch=epochs, eval_only_at=epochs)
    finally:
        torch.set_num_threads(threads)
    test = {k: float(result.best[k]) for k in (*_FIGURES, "AUSUC")}
    info = {"test": test, "validation": val, "weights": f"retrained on trainval at {said}", "epoch": epochs}
    ckpt = save_checkpoint(folder / "model", result.best_state, cfg, data, np.asarray(result.partition), info)
    tags = {
        "dedn.weights": "the chosen trial retrained on trainval, at an operating point",
        "dedn.operating_point": said,
        "dedn.trial_id": child.data.tags.get("dedn.trial_id", ""),
        **{f"dedn.test_{k}": str(v) for k, v in test.items()},
        **{f"dedn.val_{k}": str(v) for k, v in val.items()},
    }
    return parent, ckpt, test, tags


def verify_figures(python_model: Any, store_path: str, task: str, expected: dict[str, float], what: str) -> None:
    """Score ``task`` as the search did; before any alias moves, refuse a model off ``expected`` U, S, H, T by >1e-6."""
    import torch

    from dedn.data import open_store
    from dedn.evaluation import evaluate, make_task
    from dedn.feeding import FeatureSource

    store = open_store(store_path)
    check_store_matches(python_model.meta, store)
    cfg = python_model.cfg.model_copy(update={"device": "cpu"})
    source = FeatureSource(store.features(), torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a one-CPU trial: the same summation order, the same scores
    try:
        got, _, _ = evaluate(python_model.model, source, store, make_task(store, task), cfg)
    finally:
        torch.set_num_threads(threads)
    prefix = "val" if task == "validation" else "test"
    for k in _FIGURES:
        if abs(got[k] - expected[k]) > 1e-6:
            rule = f"the registered model gives {got[k]:.6f}, {what} {expected[k]:.6f}: not moving the alias"
            raise DednInputError(store_path, f"{prefix}_{k}", rule)


def promote(
    uri: str,
    experiment: str,
    model_name: str,
    metric: str = "val_H",
    alias: str | None = "champion",
    store: str | None = None,
    trial: str | None = None,
    at: str | None = None,
    calibration: float | None = None,
) -> Any:
    """Register a search's final model, a ``trial``'s best-epoch weights (Tune trial id, run name, run id, or
    ``best`` by ``metric``), or the model of an operating point (``at`` "S>=x"/"U>=x" on the validation front, or the
    best trial at ``calibration``: retrained on trainval and tested once at that shift); move the alias once it
    reproduces its figures. The same model reuses its version."""
    check_existing_store(uri)  # promote reads an existing store; it never creates one
    if at is not None or calibration is not None:
        with tempfile.TemporaryDirectory() as d:
            parent, ckpt, test, tags = _at_point(uri, experiment, at, calibration, store, Path(d))
            tags = {"dedn.search_run_id": parent.info.run_id, **tags}
            with mlflow_uris(uri):
                version = _log_and_register(parent.info.run_id, ckpt, model_name, tags)
                _client(uri).update_model_version(model_name, version.version, description=(
                    f"Promoted for the operating point {tags['dedn.operating_point']}: the chosen trial retrained on "
                    f"trainval, test U {test['U']:.4f} S {test['S']:.4f} H {test['H']:.4f} AUSUC {test['AUSUC']:.4f}."
                ))  # fmt: skip
                loaded = open_model(f"models:/{model_name}/{version.version}", uri, installed_code=True)
                verify_figures(loaded, store or loaded.cfg.data.store, "test", test, "the retrained model gave")
                if alias:
                    _client(uri).set_registered_model_alias(model_name, alias, version.version)
        return version
    if trial is None:  # the chosen configuration retrained on trainval: the test figures the search printed
        parent = final_model_run(uri, experiment)
        run_id, m, reuse = parent.info.run_id, parent.data.metrics, "dedn.final_of_search"
        tags = {
            "dedn.weights": "final model: the chosen configuration retrained on trainval",
            **{f"dedn.test_{k}": str(m[f"test_{k}"]) for k in _FIGURES},
            **{f"dedn.{k.removeprefix('best_')}": str(v) for k, v in m.items() if k.startswith("best_val_")},
        }
        task, expected, what = "test", {k: float(m[f"test_{k}"]) for k in _FIGURES}, "the search printed"
        checkpoint = partial(_download, uri, run_id, "final_model")
    else:  # the trial's best-epoch weights: the validation figures the trial logged
        parent, best = best_child_run(uri, experiment, metric) if trial == "best" else trial_run(uri, experiment, trial)
        run_id, m, reuse = best.info.run_id, best.data.metrics, "dedn.trial_run_id"
        tags = {
            "dedn.trial_id": best.data.tags.get("dedn.trial_id", ""),
            "dedn.weights": "trial best epoch (validation task)",
            "dedn.selected_by": metric,
            **{f"dedn.{k}": str(v) for k, v in m.items() if k.startswith("best_val_")},
        }
        task, expected, what = "validation", {k: float(m[f"best_val_{k}"]) for k in _FIGURES}, "the trial logged"
        checkpoint = partial(_trial_checkpoint, uri, parent, best)
    tags = {reuse: run_id, "dedn.search_run_id": parent.info.run_id, **tags}
    with mlflow_uris(uri):
        version = _reusable(uri, model_name, reuse, run_id)
        if version is None:
            with tempfile.TemporaryDirectory() as d:
                version = _log_and_register(run_id, checkpoint(Path(d)), model_name, tags)
        loaded = open_model(f"models:/{model_name}/{version.version}", uri, installed_code=True)
        verify_figures(loaded, store or loaded.cfg.data.store, task, expected, what)
        if alias:
            _client(uri).set_registered_model_alias(model_name, alias, version.version)
        return version


def _log_and_register(run_id: str, ckpt: Path, model_name: str, tags: dict[str, str]) -> Any:
    """Log the checkpoint as a models-from-code pyfunc on the run; register it with ``tags`` and its inference."""
    import mlflow

    meta = json.loads((ckpt / "checkpoint.json").read_text())
    c, h, w = meta["feature_shape"]
    ended = mlflow.get_run(run_id).info  # start_run's end would move the run's end time to now: put back below
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"checkpoint": str(ckpt)},
            signature=model_signature((c, h, w)),
            input_example=np.zeros((2, c, h, w), dtype=np.float32),
            pip_requirements=["dedn-platform"],
        )
    if ended.end_time:
        mlflow.MlflowClient().set_terminated(run_id, status=ended.status, end_time=ended.end_time)
    inference = load_mapping(ckpt / "config.yaml", "model config").get("inference", {})
    tags = {"dedn.fingerprint": meta["fingerprint"], "dedn.dataset": meta["dataset"], **tags}
    tags.update({f"dedn.inference.{k}": str(v) for k, v in sorted(inference.items())})
    return mlflow.register_model(info.model_uri, model_name, tags=tags)


def _reusable(uri: str, model_name: str, tag: str, value: str) -> Any | None:
    """A version registered from the same source, logged with the installed code (the alias must point at it)."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client(uri).search_model_versions(f"name='{model_name}' and tag.`{tag}`='{value}'")
    except MlflowException:
        return None
    for version in found:
        model_uri = f"models:/{model_name}/{version.version}"
        with contextlib.suppress(DednInputError), fetched_model(model_uri, uri) as folder:
            if code_matches(check_model_folder(folder, model_uri)[1]):
                return version
    return None


def check_store_matches(meta: dict[str, Any], store: Any) -> None:
    """Refuse a store whose feature shape or attribute set differs from the model's."""
    if list(store.meta.feature_shape) != list(meta["feature_shape"]):
        rule = f"shape {store.meta.feature_shape} does not match the model's {tuple(meta['feature_shape'])}"
        raise DednInputError(store.path, "features", rule)
    if store.attributes.names != meta["attribute_names"]:
        n = len(meta["attribute_names"])
        rule = f"attribute set ({store.meta.num_attributes}) does not match the model's ({n} attributes)"
        raise DednInputError(store.path, "attributes", rule)


def predict_store(
    model_uri: str,
    store_path: str | os.PathLike[str],
    split: str,
    out: str | os.PathLike[str],
    calibration: float | None = None,
) -> tuple[int, dict[str, float] | None]:
    """Predict every image of a store split (at ``calibration`` instead of the model's own when given); write Parquet
    or CSV (by suffix) atomically. Returns the number of rows and, for ``test``, the GZSL U, S, H of the predictions
    (as the search scores its final model)."""
    import mlflow
    import pandas as pd

    from dedn.data import open_store

    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise DednInputError(out, "--out", "must end in .parquet or .csv")
    store = open_store(store_path)
    model = open_model(model_uri, mlflow.get_tracking_uri())
    check_store_matches(model.meta, store)
    if calibration is not None:
        model.c = float(calibration)
    rows, feats = store.indices(split), store.features()
    # the model's signature takes float32 (N, C, H, W); cast one batch at a time
    preds = [model.predict(None, feats[rows[s : s + 1024]].astype(np.float32)) for s in range(0, rows.size, 1024)]
    df = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    df.insert(0, "image_id", [store.image_ids[i] for i in rows])
    df.insert(1, "true_class", [store.classes.names[store.labels[i]] for i in rows])
    tmp = out.with_name(f".{out.name}.tmp")
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            (df.to_parquet if out.suffix == ".parquet" else df.to_csv)(tmp, index=False)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if split != "test" or not len(df):
        return len(df), None
    from dedn.metrics import gzsl_metrics

    seen, unseen = np.flatnonzero(store.classes.seen), np.flatnonzero(~store.classes.seen)
    return len(df), gzsl_metrics(df["class_index"].to_numpy(), store.labels[rows], seen, unseen)
