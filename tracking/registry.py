"""Model registry: promote the best trial of a search, load it back, predict on a store.

Models are opened with ``tracking.served_model.open_model``: their MLmodel is checked first and the
installed ``DednModel`` loads only the checkpoint's weights and config, never code or pickles from the
artifact store."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dedn.errors import DednInputError
from dedn.outputs import writing
from tracking.databases import check_existing_store
from tracking.served_model import (
    CODE_FILE,
    check_model_folder,
    code_matches,
    fetched_model,
    model_signature,
    open_model,
)
from tracking.store import mlflow_uris

__all__ = [
    "PYFUNC_CODE",
    "best_child_run",
    "check_store_matches",
    "predict_store",
    "final_model_run",
    "latest_search",
    "promote",
    "trial_run",
    "verify_figures",
]

PYFUNC_CODE = CODE_FILE


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def best_child_run(uri: str, experiment: str, metric: str) -> tuple[Any, Any]:
    """(parent run, best finished child run by ``best_<metric>``) of a search experiment."""
    runs = _experiment_runs(uri, experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]
    key = f"best_{metric}"
    scored = [r for r in children if key in r.data.metrics]
    if not parents or not scored:
        raise DednInputError(uri, "runs", f"experiment {experiment!r} has no finished trial with metric {key}")
    best = max(scored, key=lambda r: r.data.metrics[key])
    parent = next(p for p in parents if p.info.run_id == best.data.tags["mlflow.parentRunId"])
    return parent, best


def _trial_checkpoint(uri: str, parent: Any, best: Any, folder: Path) -> Path:
    """A checkpoint folder (model.safetensors, config.yaml, checkpoint.json) holding the trial's best-epoch weights
    (trained on the validation task's train split), with its config (the search's base config, ``base_config.yaml`` of
    the parent run, with the run's sampled values, its tag ``dedn.values``) and inference point."""
    import mlflow
    import torch

    from dedn.checkpoints import TRIAL_PROGRESS, TRIAL_STATE, save_checkpoint
    from dedn.config import set_path, validate_config
    from dedn.evaluation import with_inference_point
    from dedn.safe_yaml import load_mapping

    ckpt = Path(
        mlflow.artifacts.download_artifacts(
            run_id=best.info.run_id, artifact_path="checkpoint", dst_path=str(folder / "trial"), tracking_uri=uri
        )
    )
    base_file = Path(
        mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, artifact_path="base_config.yaml", dst_path=str(folder), tracking_uri=uri
        )
    )
    where = f"runs:/{best.info.run_id}/checkpoint"
    try:  # weights only: a tampered state.pt cannot run code; it is refused with one line
        state = torch.load(ckpt / TRIAL_STATE, map_location="cpu", weights_only=True)["best_model"]
        partition = json.loads((ckpt / TRIAL_PROGRESS).read_text())["partition"]
        header = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/store.json")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DednInputError(
            where, "checkpoint", f"not a trial checkpoint dedn wrote: {type(e).__name__}: {first}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DednInputError(f"{where}/{TRIAL_STATE}", "best_model", "not a state dict of tensors")
    raw = load_mapping(base_file, "base config")
    try:
        values = json.loads(best.data.tags["dedn.values"])
    except (KeyError, ValueError):
        raise DednInputError(f"runs:/{best.info.run_id}", "dedn.values", "the run has no sampled values") from None
    if not isinstance(values, dict):
        raise DednInputError(f"runs:/{best.info.run_id}", "dedn.values", "must map config keys to values")
    source = f"runs:/{best.info.run_id} dedn.values"
    for key, value in values.items():
        set_path(raw, str(key), value, source)
    cfg = validate_config(raw, source).effective()
    m = best.data.metrics
    if parent.data.tags.get("dedn.posthoc_inference") == "true":
        # a post-hoc search: the inference point this trial chose on validation
        cfg = with_inference_point(cfg, m, prefix="best_grid_")
    return save_checkpoint(
        folder / "model",
        state,
        cfg,
        header,
        np.asarray(partition),
        {"weights": "trial best epoch (validation task)", "trial_run_id": best.info.run_id},
    )


def verify_figures(python_model: Any, store_path: str, task: str, expected: dict[str, float], what: str) -> None:
    """Score ``task`` (validation or test) with the loaded model's weights and inference point, as the
    search did (one thread, the same summation order); refuse, before any alias moves, a model that does
    not reproduce ``expected`` (U, S, H, T) within 1e-6."""
    import torch

    from dedn.data import open_store
    from dedn.evaluation import evaluate, make_task
    from dedn.feeding import FeatureSource

    store = open_store(store_path)
    check_store_matches(python_model.meta, store)
    cfg = python_model.cfg.model_copy(update={"device": "cpu"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a one-CPU trial: the same summation order, the same scores
    try:
        got, _, _ = evaluate(
            python_model.model, FeatureSource(store.features(), torch.device("cpu")), store, make_task(store, task), cfg
        )
    finally:
        torch.set_num_threads(threads)
    prefix = "val" if task == "validation" else "test"
    for k in ("U", "S", "H", "T"):
        if abs(got[k] - expected[k]) > 1e-6:
            raise DednInputError(
                store_path,
                f"{prefix}_{k}",
                f"the registered model gives {got[k]:.6f}, {what} {expected[k]:.6f}: not moving the alias",
            )


@dataclass(frozen=True)
class _Source:
    """What a promote registers: the run the model is logged on, how an earlier version of it is recognised, its
    checkpoint folder (``checkpoint(scratch)``), its version tags, and the figures it must reproduce on ``task``."""

    run_id: str
    reuse: tuple[str, str]
    checkpoint: Callable[[Path], Path]
    tags: dict[str, str]
    task: str
    expected: dict[str, float]
    what: str


def promote(
    uri: str,
    experiment: str,
    model_name: str,
    metric: str = "val_H",
    alias: str | None = "champion",
    store: str | None = None,
    trial: str | None = None,
) -> Any:
    """Register a search's model and move the alias once the registered model reproduces its figures.

    By default the search's final model: the chosen configuration retrained on trainval, the one whose
    test U, S, H, T the search printed; they must come back from the registered model on the test split.
    With ``trial`` (a Tune trial id, a run name such as ``trial-007``, a run id, or ``best`` for the best
    trial by ``metric``) that trial's best-epoch weights, checked against its validation figures.
    Promoting the same model again reuses its version."""
    check_existing_store(uri)  # promote reads an existing store; it never creates one
    if trial is None:
        source = _final_source(uri, final_model_run(uri, experiment))
    else:
        parent, best = best_child_run(uri, experiment, metric) if trial == "best" else trial_run(uri, experiment, trial)
        source = _trial_source(uri, parent, best, metric)
    with mlflow_uris(uri):
        version = _reusable(uri, model_name, *source.reuse)
        if version is None:
            with tempfile.TemporaryDirectory() as d:
                version = _log_and_register(source.run_id, source.checkpoint(Path(d)), model_name, source.tags)
        loaded = open_model(f"models:/{model_name}/{version.version}", uri, installed_code=True)
        verify_figures(loaded, store or loaded.cfg.data.store, source.task, source.expected, source.what)
        if alias:
            _client(uri).set_registered_model_alias(model_name, alias, version.version)
        return version


def _final_source(uri: str, parent: Any) -> _Source:
    run_id = parent.info.run_id

    def checkpoint(folder: Path) -> Path:
        import mlflow

        return Path(
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="final_model", dst_path=str(folder))
        )

    m = parent.data.metrics
    tags = {
        "dedn.final_of_search": run_id,
        "dedn.search_run_id": run_id,
        "dedn.weights": "final model: the chosen configuration retrained on trainval",
        **{f"dedn.test_{k}": str(m[f"test_{k}"]) for k in ("U", "S", "H", "T")},
        **{f"dedn.{k.removeprefix('best_')}": str(v) for k, v in m.items() if k.startswith("best_val_")},
    }
    expected = {k: float(m[f"test_{k}"]) for k in ("U", "S", "H", "T")}
    return _Source(run_id, ("dedn.final_of_search", run_id), checkpoint, tags, "test", expected, "the search printed")


def _trial_source(uri: str, parent: Any, best: Any, metric: str) -> _Source:
    m = best.data.metrics
    tags = {
        "dedn.trial_run_id": best.info.run_id,
        "dedn.trial_id": best.data.tags.get("dedn.trial_id", ""),
        "dedn.search_run_id": parent.info.run_id,
        "dedn.weights": "trial best epoch (validation task)",
        "dedn.selected_by": metric,
        **{f"dedn.{k}": str(v) for k, v in m.items() if k.startswith("best_val_")},
    }
    expected = {k: float(m[f"best_val_{k}"]) for k in ("U", "S", "H", "T")}
    return _Source(
        best.info.run_id,
        ("dedn.trial_run_id", best.info.run_id),
        lambda folder: _trial_checkpoint(uri, parent, best, folder),
        tags,
        "validation",
        expected,
        "the trial logged",
    )


def _experiment_runs(uri: str, experiment: str) -> list[Any]:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise DednInputError(
            uri, "experiment", f"no MLflow experiment named {experiment!r} (experiments: {', '.join(names) or 'none'})"
        )
    return list(client.search_runs([exp.experiment_id], max_results=10000))


def latest_search(uri: str) -> str:
    """The experiment of the most recently started search in the tracking store."""
    client = _client(uri)
    ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    runs = (
        client.search_runs(ids, "tags.`dedn.search_spec` != ''", max_results=1, order_by=["attributes.start_time DESC"])
        if ids
        else []
    )
    if not runs:
        raise DednInputError(uri, "--experiment", "no search in this tracking store: run dedn search first")
    return str(client.get_experiment(runs[0].info.experiment_id).name)


def final_model_run(uri: str, experiment: str) -> Any:
    """The newest parent run of the experiment that logged a final model (``final_model/``)."""
    parents = [r for r in _experiment_runs(uri, experiment) if "mlflow.parentRunId" not in r.data.tags]
    client = _client(uri)
    for run in sorted(parents, key=lambda r: r.info.start_time or 0, reverse=True):
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        if "final_model" in names and "test_H" in run.data.metrics:
            return run
    raise DednInputError(
        uri,
        "final_model",
        f"experiment {experiment!r} has no final model (searched with --no-final-test, or not finished): "
        "promote a trial with --trial ID (or --trial best)",
    )


def trial_run(uri: str, experiment: str, trial: str) -> tuple[Any, Any]:
    """(parent run, child run) of one trial, named by Tune trial id, run name or run id."""
    runs = _experiment_runs(uri, experiment)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    found = [
        r
        for r in children
        if trial in (r.info.run_id, r.info.run_name, r.data.tags.get("dedn.trial_id"), f"trial-{trial}")
    ]
    if len(found) != 1:
        names = sorted(str(r.info.run_name) for r in children)
        listing = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        rule = "matches several runs" if found else f"no such trial (trials: {listing or 'none'})"
        raise DednInputError(uri, "--trial", f"{trial!r}: {rule}")
    (best,) = found
    if best.info.status != "FINISHED" or "best_val_H" not in best.data.metrics:
        raise DednInputError(uri, "--trial", f"{trial!r}: the trial did not finish ({best.info.status})")
    parent = next(r for r in runs if r.info.run_id == best.data.tags["mlflow.parentRunId"])
    return parent, best


def _inference_tags(ckpt: Path) -> dict[str, str]:
    """The inference parameters the model applies (its config's), as version tags."""
    from dedn.safe_yaml import load_mapping

    inference = load_mapping(ckpt / "config.yaml", "model config").get("inference", {})
    return {f"dedn.inference.{k}": str(v) for k, v in sorted(inference.items())}


def _log_and_register(run_id: str, ckpt: Path, model_name: str, tags: dict[str, str]) -> Any:
    import mlflow

    meta = json.loads((ckpt / "checkpoint.json").read_text())
    c, h, w = meta["feature_shape"]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"checkpoint": str(ckpt)},
            signature=model_signature(),  # any float dtype in, (N, C, H, W) checked by the model
            input_example=np.zeros((2, c, h, w), dtype=np.float32),
            pip_requirements=["dedn-platform"],
        )
    tags = {"dedn.fingerprint": meta["fingerprint"], "dedn.dataset": meta["dataset"], **tags, **_inference_tags(ckpt)}
    return mlflow.register_model(info.model_uri, model_name, tags=tags)


def _reusable(uri: str, model_name: str, tag: str, value: str) -> Any | None:
    """A version registered before from the same source, in the project's form (no duplicate version)."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client(uri).search_model_versions(f"name='{model_name}' and tag.`{tag}`='{value}'")
    except MlflowException:
        return None
    found = [v for v in found if _logged_code_is_installed(f"models:/{model_name}/{v.version}", uri)]
    return found[0] if found else None


def _logged_code_is_installed(model_uri: str, uri: str) -> bool:
    """Whether a registered version is in the project's form and logged the installed pyfunc code (a
    version logged by other code is not reused: the alias must point at code the project ships)."""
    try:
        with fetched_model(model_uri, uri) as folder:
            _, code = check_model_folder(folder, model_uri)
            return code_matches(code)
    except DednInputError:
        return False


def check_store_matches(meta: dict[str, Any], store: Any) -> None:
    """Refuse a store whose feature shape or attribute set differs from the model's."""
    if list(store.meta.feature_shape) != list(meta["feature_shape"]):
        raise DednInputError(
            store.path,
            "features",
            f"shape {store.meta.feature_shape} does not match the model's {tuple(meta['feature_shape'])}",
        )
    if store.attributes.names != meta["attribute_names"]:
        raise DednInputError(
            store.path,
            "attributes",
            f"attribute set ({store.meta.num_attributes}) does not match "
            f"the model's ({len(meta['attribute_names'])} attributes)",
        )


def predict_store(
    model_uri: str, store_path: str | os.PathLike[str], split: str, out: str | os.PathLike[str]
) -> tuple[int, dict[str, float] | None]:
    """Predict every image of a store split; write Parquet or CSV (by suffix) atomically. Returns the
    number of rows and, for the ``test`` split, the GZSL U, S, H of the predictions (per-class mean
    accuracies over test-unseen and test-seen images, as the search scores its final model)."""
    import mlflow
    import pandas as pd

    from dedn.data import open_store

    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise DednInputError(out, "--out", "must end in .parquet or .csv")
    store = open_store(store_path)
    model = open_model(model_uri, mlflow.get_tracking_uri())
    check_store_matches(model.meta, store)
    rows = store.indices(split)
    feats = store.features()
    # the model's signature takes float32 (N, C, H, W); cast one batch at a time
    preds = [model.predict(None, feats[rows[s : s + 1024]].astype(np.float32)) for s in range(0, rows.size, 1024)]
    df = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    df.insert(0, "image_id", [store.image_ids[i] for i in rows])
    df.insert(1, "true_class", [store.classes.names[store.labels[i]] for i in rows])
    tmp = out.with_name(f".{out.name}.tmp")
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            if out.suffix == ".parquet":
                df.to_parquet(tmp, index=False)
            else:
                df.to_csv(tmp, index=False)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    figures = None
    if split == "test" and len(df):
        from dedn.metrics import gzsl_metrics

        seen = np.flatnonzero(store.classes.seen)
        unseen = np.flatnonzero(~store.classes.seen)
        figures = gzsl_metrics(df["class_index"].to_numpy(), store.labels[rows], seen, unseen)
    return len(df), figures
