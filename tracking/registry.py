"""Model registry: promote the best trial of a search, load it back, predict on a store.

Models are opened with ``tracking.served_model.open_model``: their MLmodel is checked first and the
installed ``DednModel`` loads only the checkpoint's weights and config, never code or pickles from the
artifact store."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dedn.errors import DednInputError
from tracking.runs import check_existing_store, mlflow_uris
from tracking.served_model import CODE_FILE, check_model_folder, code_matches, fetched_model, open_model

__all__ = [
    "PYFUNC_CODE",
    "best_child_run",
    "check_store_matches",
    "predict_store",
    "promote",
    "verify_validation",
]

PYFUNC_CODE = CODE_FILE


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def best_child_run(uri: str, experiment: str, metric: str) -> tuple[Any, Any]:
    """(parent run, best child run by ``best_<metric>``) of a search experiment."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise DednInputError(
            uri, "experiment", f"no MLflow experiment named {experiment!r} (experiments: {', '.join(names) or 'none'})"
        )
    runs = client.search_runs([exp.experiment_id], max_results=10000)
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
    """A checkpoint folder (model.safetensors, config.yaml, checkpoint.json) holding the trial's
    best-epoch weights (trained on the validation task's train split), with its inference point."""
    import mlflow
    import torch

    from dedn.checkpoints import TRIAL_PROGRESS, TRIAL_STATE, save_checkpoint
    from dedn.config import validate_config
    from dedn.evaluation import with_inference_point
    from dedn.safe_yaml import load_mapping

    ckpt = Path(
        mlflow.artifacts.download_artifacts(
            run_id=best.info.run_id, artifact_path="checkpoint", dst_path=str(folder / "trial"), tracking_uri=uri
        )
    )
    cfg_path = Path(
        mlflow.artifacts.download_artifacts(
            run_id=best.info.run_id, artifact_path="trial_config.yaml", dst_path=str(folder / "trial"), tracking_uri=uri
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
    cfg = validate_config(load_mapping(cfg_path, "trial config"), str(cfg_path))
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


def verify_validation(python_model: Any, store_path: str, expected: dict[str, float]) -> dict[str, float]:
    """Score the validation task with the loaded model's weights and inference point; refuse a mismatch."""
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
            python_model.model,
            FeatureSource(store.features(), torch.device("cpu")),
            store,
            make_task(store, "validation"),
            cfg,
        )
    finally:
        torch.set_num_threads(threads)
    for k in ("U", "S", "H", "T"):
        if abs(got[k] - expected[f"best_val_{k}"]) > 1e-6:
            raise DednInputError(
                store_path,
                f"val_{k}",
                f"the registered model gives {got[k]:.6f}, the trial "
                f"logged {expected[f'best_val_{k}']:.6f}: not moving the alias",
            )
    return got


def promote(
    uri: str,
    experiment: str,
    model_name: str,
    metric: str = "val_H",
    alias: str | None = "champion",
    store: str | None = None,
) -> Any:
    """Log the best trial as a pyfunc model and register it (once per trial), check that the registered
    model loads and reproduces the trial's validation metrics, then move the alias."""
    check_existing_store(uri)  # promote reads an existing store; it never creates one
    parent, best = best_child_run(uri, experiment, metric)
    with mlflow_uris(uri):
        return _promote(uri, parent, best, model_name, metric, alias, store)


def _promote(
    uri: str, parent: Any, best: Any, model_name: str, metric: str, alias: str | None, store: str | None
) -> Any:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        existing = client.search_model_versions(f"name='{model_name}' and tag.`dedn.trial_run_id`='{best.info.run_id}'")
    except MlflowException:
        existing = []
    existing = [v for v in existing if _logged_code_is_installed(f"models:/{model_name}/{v.version}", uri)]
    if existing:  # promoting the same trial again: no duplicate version (unless its code is not ours)
        version = existing[0]
    else:
        with tempfile.TemporaryDirectory() as d:
            ckpt = _trial_checkpoint(uri, parent, best, Path(d))
            meta = json.loads((ckpt / "checkpoint.json").read_text())
            c, h, w = meta["feature_shape"]
            with mlflow.start_run(run_id=best.info.run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(PYFUNC_CODE),
                    artifacts={"checkpoint": str(ckpt)},
                    input_example=np.zeros((2, c, h, w), dtype=np.float32),
                    pip_requirements=["dedn-platform"],
                )
        tags = {
            "dedn.trial_run_id": best.info.run_id,
            "dedn.trial_id": best.data.tags.get("dedn.trial_id", ""),
            "dedn.search_run_id": parent.info.run_id,
            "dedn.fingerprint": meta["fingerprint"],
            "dedn.dataset": meta["dataset"],
            "dedn.selected_by": metric,
            **{f"dedn.{k}": str(v) for k, v in best.data.metrics.items() if k.startswith("best_")},
        }
        version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    loaded = open_model(f"models:/{model_name}/{version.version}", uri, installed_code=True)
    store_path = store or loaded.cfg.data.store
    verify_validation(loaded, store_path, best.data.metrics)
    if alias:
        client.set_registered_model_alias(model_name, alias, version.version)
    return version


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


def predict_store(model_uri: str, store_path: str | os.PathLike[str], split: str, out: str | os.PathLike[str]) -> int:
    """Predict every image of a store split; write Parquet or CSV (by suffix) atomically. Returns rows."""
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, out)
    return len(df)
