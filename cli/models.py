"""``dedn promote``, ``dedn predict``, ``dedn ui``: the model registry and the MLflow UI."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import click

__all__ = ["predict", "promote", "ui"]

_URI = click.option(
    "--tracking-uri",
    default=None,
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking/registry store (default: sqlite:///mlflow.db in this folder).",
)


@click.command()
@click.option("--experiment", required=True, help="Search experiment name (the MLflow experiment).")
@click.option("--metric", default="val_H", show_default=True, help="Validation metric that picks the trial.")
@click.option("--model-name", required=True, help="Registered model name.")
@click.option("--alias", default="champion", show_default=True, help="Alias set on the new version ('' for none).")
@click.option("--store", default=None, help="Store to verify validation metrics on (default: the trial's).")
@_URI
def promote(
    experiment: str, metric: str, model_name: str, alias: str, store: str | None, tracking_uri: str | None
) -> None:
    """Register the best trial of a search as a new model version, tagged, with an alias.

    The model is an MLflow pyfunc of the trial's best-epoch weights: resolved config, class names,
    inference parameters, the store fingerprint and an input example. Before the alias moves, the
    registered model is loaded and must reproduce the trial's validation U, S, H, T. Promoting the
    same trial again reuses its version.

    \b
    Examples:
      dedn promote --experiment tiny-20261127-101500 --model-name dedn-tiny
      dedn promote --experiment cub-search --metric val_T --model-name dedn-cub --alias staging
    """
    from tracking.registry import promote as do_promote
    from tracking.runs import quiet_mlflow, resolve_tracking_uri

    with quiet_mlflow():  # a refusal is one line: MLflow's INFO and warning lines held back
        v = do_promote(resolve_tracking_uri(tracking_uri), experiment, model_name, metric, alias or None, store)
    uri = f"models:/{model_name}@{alias}" if alias else f"models:/{model_name}/{v.version}"
    click.echo(f"registered {model_name} version {v.version}, validation metrics reproduced")
    click.echo(f"model uri: {uri}")


@click.command()
@click.option("--model", "model_uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model")
@click.option("--data", "store", required=True, help="Feature store to predict on.")
@click.option("--split", default="test", show_default=True, help="Split or group (test, test_unseen, trainval, ...).")
@click.option("--out", required=True, help="Output file to create: .parquet or .csv.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing --out file (never an input, nor a file inside one)."
)
@_URI
def predict(model_uri: str, store: str, split: str, out: str, overwrite: bool, tracking_uri: str | None) -> None:
    """Predict classes for a store's images with a registered model.

    Writes image_id, true_class, class_index, class_name, score and seen (whether the predicted class
    was seen in training). A store whose feature shape or attribute set differs from the model's is refused.

    \b
    Examples:
      dedn predict --model models:/dedn-tiny@champion --data data/tiny --split test --out preds.parquet
      dedn predict --model models:/dedn-cub/3 --data data/cub --split test_unseen --out unseen.csv
    """
    from dedn.outputs import check_output
    from tracking.registry import predict_store
    from tracking.runs import mlflow_uris, quiet_mlflow, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    # before anything is loaded: the predictions never replace the store, the model or the tracking store
    inputs = [store, _local_path(model_uri), _local_path(uri)]
    check_output(out, inputs=inputs, command="dedn predict", overwrite=overwrite, kind="file")
    with mlflow_uris(uri), quiet_mlflow():  # the model is checked before anything of it is loaded
        n = predict_store(model_uri, store, split, out)
    click.echo(f"wrote {n} predictions to {out}")


def _local_path(uri: str) -> str | None:
    """The local file or folder a model or tracking URI names (sqlite:///, file:, a bare path), else None."""
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///") :].split("?", 1)[0] or None
    if uri.startswith("file:"):
        return unquote(urlparse(uri).path) or None
    if "://" in uri or uri.split(":", 1)[0] in ("models", "runs", "mlflow-artifacts"):
        return None
    return uri


@click.command()
@click.option("--port", type=int, default=5000, show_default=True)
@_URI
def ui(port: int, tracking_uri: str | None) -> None:
    """Start the MLflow UI on 127.0.0.1 over the project's tracking store.

    \b
    Examples:
      dedn ui
      dedn ui --port 5050 --tracking-uri sqlite:///runs/mlflow.db
    """
    from tracking.runs import check_existing_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_existing_store(uri)  # the UI reads a store; it never creates one
    click.echo(f"MLflow UI at http://127.0.0.1:{port} over {uri} (Ctrl-C stops it)", err=False)
    sys.stdout.flush()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(cmd, check=False)
