"""Model registry: promote a search's model, load it back (never running code or pickles it carries:
``tracking.served_model.open_model``), predict on a store."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dedn.errors import DednInputError
from dedn.predictions import check_prediction_out, check_store_matches, write_predictions
from dedn.safe_yaml import load_mapping
from tracking.databases import check_existing_store
from tracking.served_model import CODE_FILE as PYFUNC_CODE
from tracking.served_model import (
    check_model_folder,
    code_matches,
    example_input,
    fetched_model,
    model_signature,
    open_model,
)
from tracking.store import mlflow_uris

__all__ = [
    "PicturePredictor",
    "Ship",
    "latest_search",
    "picture_model",
    "predict_store",
    "promote",
    "trial_run",
    "verify_pictures",
]

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


def _at_point(uri: str, experiment: str, at: str | None, calibration: float | None, store: str | None, folder: Path,
              ship: Ship) -> tuple[Any, Path, dict[str, float], dict[str, str]]:  # fmt: skip
    """The honest final protocol at an operating point: the trial and shift ``at`` picks on the validation front
    (or the best trial at ``calibration``), retrained on trainval for its best epoch count, tested once at that
    shift. Returns (parent run, checkpoint folder, test figures, tags). ``ship``'s trunk is found before training."""
    import torch

    from dedn.checkpoints import save_checkpoint
    from dedn.data import open_store
    from dedn.train import train

    parent, front = _front_run(uri, experiment)
    ship.find_trunk(uri, parent)
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
    python_model.to(torch.device("cpu"))  # scored as a one-CPU trial scores it
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


@dataclass
class Ship:
    """What a promoted model takes: ``input`` "image" (the trunk packaged with the head; the default when the store
    was written by ``dedn data extract``) or "features"; ``weights`` a trunk weights file to use (else the one the
    extraction read, then torch's cache, each only with the extraction's SHA-256); ``images`` a folder under which
    the store's test pictures lie, to check the registered model's test figures from pictures as well."""

    input: str | None = None
    weights: str | None = None
    images: str | None = None
    trunk: Path | None = None  # found: the weights file packaged
    extraction: dict[str, Any] | None = None

    def find_trunk(self, uri: str, parent: Any) -> None:
        """Decide the input from the search's store header; find and check the trunk weights. One DednInputError."""
        from dedn.trunk import default_weights_path, sha256_file

        with tempfile.TemporaryDirectory() as d:
            header = json.loads(_download(uri, parent.info.run_id, "store.json", Path(d)).read_text())
        ex = header.get("extraction")
        if self.input == "features" or (self.input is None and not ex):
            if self.images:
                rule = "the model takes feature maps (its store was not extracted from pictures): drop --images"
                raise DednInputError("dedn promote", "--images", rule)
            return
        if not ex:
            rule = "image: the search's store was not written by dedn data extract, so no trunk is recorded"
            raise DednInputError(f"runs:/{parent.info.run_id}/store.json", "--input", rule)
        want = str(ex["weights_sha256"])
        if self.weights is not None:
            given = Path(self.weights)
            if not given.is_file():
                raise DednInputError(given, "--weights", "not found")
            if (got := sha256_file(given)) != want:
                rule = f"SHA-256 {got} is not that of the trunk the store was extracted with ({want})"
                raise DednInputError(given, "--weights", rule)
            self.trunk = given
        else:
            tried = [Path(p) for p in (ex.get("weights_file"), default_weights_path()) if p]
            self.trunk = next((p for p in tried if p.is_file() and sha256_file(p) == want), None)
            if self.trunk is None:
                where = " or ".join(str(p) for p in tried)
                rule = f"the trunk the store was extracted with (SHA-256 {want}) is not at {where}: pass --weights FILE"
                raise DednInputError("dedn promote", "--weights", rule)
        self.extraction = ex

    @property
    def kind(self) -> str:
        return "image" if self.trunk is not None else "features"

    def package(self, ckpt: Path) -> None:
        """Put the trunk (safetensors) beside the head in ``ckpt`` and mark the checkpoint as taking pictures."""
        if self.trunk is None:
            return
        from safetensors.torch import save_file

        from dedn.classifier import TRUNK_FILE
        from dedn.trunk import load_trunk_weights

        save_file(load_trunk_weights(self.trunk), str(ckpt / TRUNK_FILE))
        meta = json.loads((ckpt / "checkpoint.json").read_text())
        meta.update(input="image", extraction=self.extraction)
        (ckpt / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")


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
    ship: Ship | None = None,
) -> Any:
    """Register a search's final model, a ``trial``'s best-epoch weights (Tune trial id, run name, run id, or
    ``best`` by ``metric``), or the model of an operating point (``at`` "S>=x"/"U>=x" on the validation front, or the
    best trial at ``calibration``: retrained on trainval and tested once at that shift); move the alias once it
    reproduces its figures (from pictures too with ``ship.images``). ``ship`` says what the model takes (see Ship).
    The same model reuses its version."""
    check_existing_store(uri)  # promote reads an existing store; it never creates one
    ship = ship or Ship()
    if at is not None or calibration is not None:
        with tempfile.TemporaryDirectory() as d:
            parent, ckpt, test, tags = _at_point(uri, experiment, at, calibration, store, Path(d), ship)
            tags = {"dedn.search_run_id": parent.info.run_id, **tags}
            with mlflow_uris(uri):
                version = _log_and_register(parent.info.run_id, ckpt, model_name, tags, ship)
                _client(uri).update_model_version(model_name, version.version, description=(
                    f"Promoted for the operating point {tags['dedn.operating_point']}: the chosen trial retrained on "
                    f"trainval, test U {test['U']:.4f} S {test['S']:.4f} H {test['H']:.4f} AUSUC {test['AUSUC']:.4f}."
                ))  # fmt: skip
                _check_and_alias(uri, model_name, version, store, "test", test, "the retrained model gave", alias, ship)
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
    ship.find_trunk(uri, parent)
    tags = {reuse: run_id, "dedn.search_run_id": parent.info.run_id, **tags}
    with mlflow_uris(uri):
        version = _reusable(uri, model_name, reuse, run_id, ship.kind)
        if version is None:
            with tempfile.TemporaryDirectory() as d:
                version = _log_and_register(run_id, checkpoint(Path(d)), model_name, tags, ship)
        _check_and_alias(uri, model_name, version, store, task, expected, what, alias, ship)
        return version


def _check_and_alias(uri: str, model_name: str, version: Any, store: str | None, task: str,
                     expected: dict[str, float], what: str, alias: str | None, ship: Ship) -> None:  # fmt: skip
    """Load the registered version back as it is served; it must reproduce ``expected`` from the store's features
    (and, for the test task with ``ship.images``, from the pictures) before the alias moves."""
    loaded = open_model(f"models:/{model_name}/{version.version}", uri, installed_code=True)
    store_path = store or loaded.cfg.data.store
    verify_figures(loaded, store_path, task, expected, what)
    if ship.images and task == "test":
        verify_pictures(loaded, store_path, Path(ship.images), expected, what)
    if alias:
        _client(uri).set_registered_model_alias(model_name, alias, version.version)


def verify_pictures(model: Any, store_path: str, images: Path, expected: dict[str, float], what: str) -> None:
    """Score the store's test split from its pictures under ``images`` through the model as it is served (decode,
    trunk, head); refuse a model whose U, S, H are off ``expected`` by more than 1e-6."""
    import torch

    from dedn.classifier import PictureError
    from dedn.data import open_store
    from dedn.metrics import gzsl_metrics

    if torch.cuda.is_available():  # as the served model runs
        model.to(torch.device("cuda"))
    s = open_store(store_path)
    rows = s.indices("test")
    files = [images / s.image_ids[i] for i in rows]
    if missing := [f for f in files if not f.is_file()]:
        rule = f"{len(missing)} picture(s) of the test split are not under it (first: {missing[0]})"
        raise DednInputError(images, "--images", rule)
    preds = []
    for start in range(0, len(files), 64):
        chunk = files[start : start + 64]
        try:  # decoded as the served model decodes a request
            pixels = model.prepare([f.read_bytes() for f in chunk])
        except PictureError as e:
            raise DednInputError(chunk[e.row], "image", e.rule) from None
        preds.append(model.classify(model.features_of(pixels))[0])
    seen, unseen = np.flatnonzero(s.classes.seen), np.flatnonzero(~s.classes.seen)
    got = gzsl_metrics(np.concatenate(preds), s.labels[rows], seen, unseen)
    for k in ("U", "S", "H"):
        if abs(got[k] - expected[k]) > 1e-6:
            rule = f"the registered model gives {got[k]:.6f} from the pictures, {what} {expected[k]:.6f}: not moving the alias"
            raise DednInputError(images, f"test_{k}", rule)


def _log_and_register(run_id: str, ckpt: Path, model_name: str, tags: dict[str, str], ship: Ship) -> Any:
    """Log the checkpoint (with ``ship``'s trunk) as a models-from-code pyfunc on the run; register it with ``tags``,
    its inference and what it takes."""
    import mlflow

    ship.package(ckpt)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    c, h, w = meta["feature_shape"]
    ended = mlflow.get_run(run_id).info  # start_run's end would move the run's end time to now: put back below
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"checkpoint": str(ckpt)},
            signature=model_signature((c, h, w), image=ship.kind == "image"),
            input_example=example_input((c, h, w), image=ship.kind == "image"),
            pip_requirements=["dedn-platform"],
        )
    if ended.end_time:
        mlflow.MlflowClient().set_terminated(run_id, status=ended.status, end_time=ended.end_time)
    inference = load_mapping(ckpt / "config.yaml", "model config").get("inference", {})
    tags = {"dedn.fingerprint": meta["fingerprint"], "dedn.dataset": meta["dataset"], "dedn.input": ship.kind, **tags}
    tags.update({f"dedn.inference.{k}": str(v) for k, v in sorted(inference.items())})
    return mlflow.register_model(info.model_uri, model_name, tags=tags)


def _reusable(uri: str, model_name: str, tag: str, value: str, kind: str) -> Any | None:
    """A version registered from the same source taking the same input, logged with the installed code (the alias
    must point at it)."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client(uri).search_model_versions(
            f"name='{model_name}' and tag.`{tag}`='{value}' and tag.`dedn.input`='{kind}'"
        )
    except MlflowException:
        return None
    for version in found:
        model_uri = f"models:/{model_name}/{version.version}"
        with contextlib.suppress(DednInputError), fetched_model(model_uri, uri) as folder:
            if code_matches(check_model_folder(folder, model_uri)[1]):
                return version
    return None


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

    from dedn.data import open_store

    out = Path(out)
    check_prediction_out(out)
    store = open_store(store_path)
    model = open_model(model_uri, mlflow.get_tracking_uri())
    check_store_matches(model.meta, store)
    if calibration is not None:
        model.c = float(calibration)
    rows, feats = store.indices(split), store.features()
    # the model's signature takes float32 (N, C, H, W); cast one batch at a time
    preds = [model.classify(feats[rows[s : s + 1024]]) for s in range(0, rows.size, 1024)]
    index = np.concatenate([i for i, _ in preds]) if preds else np.zeros(0, np.int64)
    score = np.concatenate([c for _, c in preds]) if preds else np.zeros(0, np.float32)
    ids = [store.image_ids[i] for i in rows]
    names = list(store.classes.names)
    return write_predictions(out, ids, store.labels[rows], model.meta, index, score, split == "test", names)


class PicturePredictor:
    """One actor of ``dedn predict --images``: the promoted model (its checkpoint folder's files, from the object
    store) on this worker's GPU when it was given one, else its CPU; prepared pictures in, classes out."""

    def __init__(self, files: list[Any], calibration: float | None, threads: int) -> None:
        import ray
        import torch

        from dedn.classifier import Classifier

        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        with tempfile.TemporaryDirectory(prefix="dedn-model-") as d:
            for name, data in ray.get(files[0]).items():
                (Path(d) / name).write_bytes(data)
            self.model = Classifier(d)
        if calibration is not None:
            self.model.c = float(calibration)
        if torch.cuda.is_available() and ray.get_gpu_ids():
            self.model.to(torch.device("cuda"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        index = np.full(ok.size, -1, dtype=np.int64)
        score = np.zeros(ok.size, dtype=np.float32)
        if ok.any():
            index[ok], score[ok] = self.model.classify(self.model.features_of(batch["pixels"][ok]))
        return {"row": batch["row"], "class_index": index, "score": score, "error": batch["error"]}


def picture_model(model_uri: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The checkpoint files (name -> bytes, for ``PicturePredictor``) and ``checkpoint.json`` of a model that takes
    pictures, checked as every model is; one DednInputError for a model that takes feature maps."""
    import mlflow

    with fetched_model(model_uri, mlflow.get_tracking_uri()) as folder:
        checkpoint, _ = check_model_folder(folder, model_uri)
        meta = json.loads((checkpoint / "checkpoint.json").read_text())
        if meta.get("input") != "image":
            rule = "the model takes feature maps, not pictures: predict with --data STORE, or promote it from a store "
            raise DednInputError(model_uri, "--images", rule + "written by dedn data extract")
        return {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}, meta
