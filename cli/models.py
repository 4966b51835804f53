"""``dedn promote``, ``dedn predict``, ``dedn ui``: the model registry and the MLflow UI."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from dedn.errors import DednInputError, without_password

__all__ = ["predict", "promote", "ui", "ui_experiment"]

_URI = click.option(
    "--tracking-uri",
    default=None,
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking/registry store (default: sqlite:///mlflow.db in this folder).",
)


@click.command()
@click.option(
    "--experiment",
    default=None,
    help="The search's experiment: its name (as the search printed) or its folder (default: the latest search).",
)
@click.option("--model-name", required=True, help="Registered model name.")
@click.option(
    "--trial",
    default=None,
    help="Promote this trial's best-epoch weights instead of the final model: a run name (trial-007), a Tune "
    "trial id, a run id, or 'best' for the best trial by --metric.",
)
@click.option("--metric", default="val_H", show_default=True, help="Validation metric that picks --trial best.")
@click.option(
    "--at",
    default=None,
    help="An operating point on the search's validation front: 'S>=0.6' (the most U keeping S >= 0.6) or 'U>=0.4'. "
    "Its trial is retrained on trainval and tested once at that point's calibration.",
)
@click.option("--calibration", type=float, default=None, help="Like --at, for the best trial at this calibration c.")
@click.option("--alias", default="champion", show_default=True, help="Alias set on the new version ('' for none).")
@click.option(
    "--store", default=None, help="Store to verify the figures on (default: the one the model was trained on)."
)
@click.option(
    "--input",
    "input_kind",
    type=click.Choice(["image", "features"]),
    default=None,
    help="What the registered model takes: pictures (the trunk packaged with the head; the default when the store "
    "was written by dedn data extract) or feature maps (the default otherwise).",
)
@click.option(
    "--weights",
    default=None,
    help="The trunk weights to package (default: the file the extraction read, else torch's cache); only with the "
    "SHA-256 the store recorded.",
)
@click.option(
    "--images",
    default=None,
    help="Folder the store's pictures lie under (as given to dedn data extract): the registered model must then "
    "reproduce the test figures from the test split's pictures as well.",
)
@_URI
def promote(
    experiment: str | None,
    model_name: str,
    trial: str | None,
    metric: str,
    at: str | None,
    calibration: float | None,
    alias: str,
    store: str | None,
    input_kind: str | None,
    weights: str | None,
    images: str | None,
    tracking_uri: str | None,
) -> None:
    """Register a search's model as a new version, tagged, and move the alias to it.

    By default the search's final model: the chosen configuration retrained on trainval, whose test
    U, S, H, T the search printed. Before the alias moves, the registered model is loaded and must
    reproduce those test figures. With --trial, a trial's best-epoch weights (trained on the
    validation task's train split) are registered instead, and must reproduce the trial's validation
    figures. The version's tags state the inference parameters (lambda_rc, lambda_e, calibration) the
    model applies. Promoting the same model again reuses its version.

    A search on a store made by dedn data extract registers a model that takes pictures: the trunk the
    features were extracted with (found by its SHA-256) and the head in one MLflow model, whose input is a
    binary column 'image' (base64 in JSON requests) prepared as the extraction prepared its images.

    \b
    Examples:
      dedn promote --model-name dedn-tiny
      dedn promote --experiment tiny-20261127-101500 --model-name dedn-tiny
      dedn promote --experiment cub-search --model-name dedn-cub --trial trial-007 --alias staging
      dedn promote --experiment cub-search --model-name dedn-cub --trial best --metric val_T
      dedn promote --experiment cub-search --model-name dedn-cub --at "S>=0.6"
      dedn promote --experiment cub-search --model-name dedn-cub --images CUB --weights resnet101.pth
    """
    from tracking.registry import Ship, latest_search
    from tracking.registry import promote as do_promote
    from tracking.store import quiet_mlflow, resolve_tracking_uri

    tracking = resolve_tracking_uri(tracking_uri)
    with quiet_mlflow():  # a refusal is one line: MLflow's INFO and warning lines held back
        if experiment is None:
            name, newer = latest_search(tracking)
            click.echo(f"experiment {name} (the latest finished search{'; ' + newer if newer else ''})")
        else:  # a search folder: its name
            name = Path(experiment).name if Path(experiment).is_dir() else experiment
        if trial is not None and images is not None:
            rule = "checks a model's test figures from the pictures; --trial registers validation-task weights"
            raise DednInputError("dedn promote", "--images", rule)
        if trial is not None and (at is not None or calibration is not None):
            raise DednInputError("dedn promote", "--trial", "give --trial or an operating point (--at, --calibration)")
        ship = Ship(input_kind, weights, images)
        v = do_promote(tracking, name, model_name, metric, alias or None, store, trial, at, calibration, ship)
    uri = f"models:/{model_name}@{alias}" if alias else f"models:/{model_name}/{v.version}"
    what = "validation figures of the trial" if trial else "test figures of the final model"
    if at is not None or calibration is not None:
        t = v.tags
        click.echo(f"operating point {t['dedn.operating_point']}")
        click.echo(f"{'(%)':<32} {'U':>6} {'S':>6} {'H':>6} {'AUSUC':>6}")
        if "dedn.val_U" in t:
            val = [100 * float(t[f"dedn.val_{k}"]) for k in ("U", "S", "H")]
            click.echo(f"{'validation (the front)':<32} {val[0]:>6.1f} {val[1]:>6.1f} {val[2]:>6.1f}")
        test = [100 * float(t[f"dedn.test_{k}"]) for k in ("U", "S", "H", "AUSUC")]
        click.echo(f"{'test once (retrained, trainval)':<32} " + " ".join(f"{x:>6.1f}" for x in test))
        what = "test figures at the operating point"
    if v.tags.get("dedn.input") == "image":
        what += " (from the pictures too)" if images else ""
        click.echo("the model takes pictures: a binary column 'image' (base64 in JSON), trunk packaged with the head")
    click.echo(f"registered {model_name} version {v.version}: {what} reproduced")
    click.echo(f"model uri: {uri}")


@click.command()
@click.option("--model", "model_uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model")
@click.option("--data", "store", default=None, help="Feature store to predict on.")
@click.option("--split", default="test", show_default=True, help="Split or group (test, test_unseen, trainval, ...).")
@click.option("--images", default=None, help="Folder of pictures to classify (a model that takes pictures).")
@click.option(
    "--image-list",
    default=None,
    help="With --images: a CSV with a column image_file (paths under --images) and optionally label (1-based), or "
    "the xlsa17 res101.mat.",
)
@click.option("--out", required=True, help="Output file to create: .parquet or .csv.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing --out file (never an input, nor a file inside one)."
)
@click.option(
    "--calibration",
    type=float,
    default=None,
    help="Calibration c to apply instead of the model's own (the operating point it was promoted for).",
)
@click.option("--address", default=None, help="With --images: the Ray cluster ('auto' or host:port); default local.")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="With --images: model actors (one per GPU, 1 on CPU)."
)
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None, help="With --images: GPUs per actor.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Pictures per batch.")
@_URI
def predict(
    model_uri: str,
    store: str | None,
    split: str,
    images: str | None,
    image_list: str | None,
    out: str,
    overwrite: bool,
    calibration: float | None,
    address: str | None,
    workers: int | None,
    gpus_per_worker: float | None,
    batch_size: int,
    tracking_uri: str | None,
) -> None:
    """Predict classes for a store's images, or for pictures, with a registered model.

    Writes image_id, true_class, class_index, class_name, score and seen (whether the predicted class
    was seen in training). A store whose feature shape or attribute set differs from the model's is refused.
    With --images and --image-list, a model that takes pictures classifies them on Ray (decoding on CPU
    tasks, the model on GPU actors where the cluster has GPUs), streaming, with a progress bar on a terminal.

    \b
    Examples:
      dedn predict --model models:/dedn-tiny@champion --data data/tiny --split test --out preds.parquet
      dedn predict --model models:/dedn-cub/3 --data data/cub --split test_unseen --out unseen.csv
      dedn predict --model models:/dedn-cub@champion --data data/cub --out preds.parquet --calibration 0.5
      dedn predict --model models:/dedn-cub@champion --images photos --image-list photos.csv --out preds.parquet
    """
    from dedn.outputs import check_output
    from tracking.store import mlflow_uris, quiet_mlflow, resolve_tracking_uri

    if (store is None) == (images is None):
        raise DednInputError("dedn predict", "--data", "give a store (--data) or pictures (--images), one of them")
    if (images is None) != (image_list is None):
        raise DednInputError("dedn predict", "--image-list", "--images and --image-list go together")
    uri = resolve_tracking_uri(tracking_uri)
    # before anything is loaded: the predictions never replace the inputs, the model or the tracking store
    inputs = [store, images, image_list, _local_path(model_uri), _local_path(uri)]
    check_output(out, inputs=inputs, command="dedn predict", overwrite=overwrite, kind="file")
    with mlflow_uris(uri), quiet_mlflow():  # the model is checked before anything of it is loaded
        if store is not None:
            from tracking.registry import predict_store

            n, figures = predict_store(model_uri, store, split, out, calibration)
        else:
            n, figures = _predict_pictures(model_uri, images, image_list, out, calibration, address, workers,
                                           gpus_per_worker, batch_size)  # fmt: skip
            split = "the pictures"
    click.echo(f"wrote {n} predictions to {out}")
    if figures:
        click.echo("on " + split + ": " + "   ".join(f"{k} {100 * v:.1f}" for k, v in figures.items()) + "  (%)")


def _predict_pictures(model_uri: str, images: str | None, image_list: str | None, out: str, calibration: float | None,
                      address: str | None, workers: int | None, gpus_per_worker: float | None, batch_size: int
                      ) -> tuple[int, dict[str, float] | None]:  # fmt: skip
    """The model and the list checked, then the pictures through ``cluster.extract.map_images`` with the model on
    ``tracking.registry.PicturePredictor`` actors; a picture that is not taken stops it with one line naming it."""
    import numpy as np
    from tqdm import tqdm

    from cluster.connect import local_ray_on_loopback, ray_session
    from dedn.predictions import check_prediction_out, read_picture_list, write_predictions
    from tracking.registry import PicturePredictor, picture_model

    assert images is not None and image_list is not None
    check_prediction_out(Path(out))
    files_in, meta = picture_model(model_uri)
    files, labels = read_picture_list(Path(image_list), Path(images), list(meta["class_names"]))
    root = Path(images).resolve()
    index = np.full(len(files), -1, dtype=np.int64)
    score = np.zeros(len(files), dtype=np.float32)
    if address is None:
        local_ray_on_loopback()
    with ray_session(address), tqdm(total=len(files), desc="predict", unit="img", disable=None) as bar:
        import ray

        from cluster.extract import map_images, pool_size

        n, per = pool_size(workers, gpus_per_worker, "dedn predict")
        kwargs = {"files": [ray.put(files_in)], "calibration": calibration}
        del files_in
        items = [(i, str(root / f)) for i, f in enumerate(files)]
        size = int(meta["extraction"]["size"])
        batches = map_images(
            items, size, PicturePredictor, kwargs, workers=n, gpus_per_worker=per, batch_size=batch_size
        )
        with contextlib.closing(batches):
            for batch in batches:
                for r, err in zip(batch["row"], batch["error"], strict=True):
                    if err:
                        raise DednInputError(root / files[int(r)], "image", str(err))
                index[batch["row"]], score[batch["row"]] = batch["class_index"], batch["score"]
                bar.update(len(batch["row"]))  # shown on a terminal only
    return write_predictions(Path(out), files, labels, meta, index, score)


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
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="Port on 127.0.0.1.")
@click.option(
    "--experiment",
    default=None,
    help="Experiment whose training-runs table opens (default: the most recently created one).",
)
@_URI
@click.option("--verbose", is_flag=True, help="Show the server's access log (a line per request) and its INFO lines.")
def ui(port: int, experiment: str | None, tracking_uri: str | None, verbose: bool) -> None:
    """Serve the MLflow UI on 127.0.0.1 over the project's tracking store, opened on a search's runs.

    Prints the URL of the experiment's training-runs table (MLflow's machine-learning view, where the
    search's parent and trial runs are listed, not its GenAI traces view) once the server answers; the
    store's front page when it holds no experiment. MLflow's job-queue workers are not started. Ctrl-C
    or SIGTERM stops the server and every process it started.

    \b
    Examples:
      dedn ui
      dedn ui --experiment tiny-demo --port 5050 --tracking-uri sqlite:///runs/mlflow.db
    """
    from tracking.databases import check_existing_store
    from tracking.store import quiet_mlflow, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise DednInputError(
            uri, "--tracking-uri", "a tracking server serves its own UI: open this address in a browser"
        )
    check_existing_store(uri)  # the UI reads a store; it never creates one
    with quiet_mlflow():
        experiment_id = ui_experiment(uri, experiment)
    _check_port_free(port)
    base = f"http://127.0.0.1:{port}"
    # MLflow 3's UI opens an experiment in its GenAI view unless the URL asks for the machine-learning one
    url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning" if experiment_id else f"{base}/"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if not verbose:  # uvicorn's access log: a line per request, hundreds per page
        cmd += ["--uvicorn-opts", "--no-access-log --log-level warning"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner, no huey consumers
    click.echo(f"starting the MLflow UI on {base} over {without_password(uri)}")
    sys.stdout.flush()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in (signal.SIGTERM, signal.SIGHUP):
        if previous[s] != signal.SIG_IGN:  # ignored from the start (nohup, a background job): stays so
            signal.signal(s, _interrupt)
    proc: subprocess.Popen[bytes] | None = None
    exited: int | None = None
    try:
        # its own process group: stopped as one, whatever MLflow and uvicorn start under it
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        _wait_until_answering(proc, base, uri)
        click.echo(f"ready: {url} (Ctrl-C stops it)")
        sys.stdout.flush()
        exited = proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if proc is not None:
            _stop_group(proc.pid, proc)
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)
    if exited is not None:
        click.echo(f"error: the MLflow server stopped by itself with status {exited}", err=True)
        raise SystemExit(1)
    click.echo("stopped")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP stop the UI as Ctrl-C does


def ui_experiment(uri: str, name: str | None) -> str | None:
    """The id of the experiment ``dedn ui`` opens: ``name``'s (refused with the names there are when
    the store has no such active experiment), else the most recently created one, MLflow's empty
    ``Default`` experiment aside; None for a store without one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if name is not None:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            names = sorted(e.name for e in client.search_experiments(max_results=1000))
            listed = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
            raise DednInputError(uri, "--experiment", f"no experiment named {name!r} (experiments: {listed or 'none'})")
        return str(exp.experiment_id)
    from tracking.registry import latest_search

    try:  # the latest search that finished or runs; a killed or failed one only by --experiment
        name, newer = latest_search(uri, running=True)
    except DednInputError:  # no search finished: the store's newest experiment (plain training runs, say)
        name, newer = None, None
    found = client.get_experiment_by_name(name) if name is not None else None
    if found is not None:
        click.echo(f"experiment {name} (the latest search{'; ' + newer if newer else ''})")
        return str(found.experiment_id)
    for exp in client.search_experiments(max_results=1000, order_by=["creation_time DESC"]):
        if exp.experiment_id != "0" or client.search_runs(["0"], max_results=1):
            return str(exp.experiment_id)
    return None


def _check_port_free(port: int) -> None:
    """Refuse a loopback port something already listens on (its /health could pass for MLflow's)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise DednInputError(f"127.0.0.1:{port}", "--port", f"cannot be used: {e.strerror}") from None


def _wait_until_answering(proc: subprocess.Popen[bytes], base: str, uri: str, timeout_s: float = 300.0) -> None:
    """Return once the server answers ``/health`` with 200; refuse a server that exits or stays silent."""
    import urllib.request

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise DednInputError(
                uri, "tracking store", f"the MLflow server exited with status {proc.returncode} before answering"
            )
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise DednInputError(uri, "tracking store", f"the MLflow server did not answer {base}/health in {timeout_s:.0f} s")


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which only wait to be reaped, aside)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc_fs = Path("/proc")
    if not proc_fs.is_dir():
        return True
    for stat in proc_fs.glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def _stop_group(pgid: int, proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, wait for all of it, SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        end = time.monotonic() + grace_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
        while _group_alive(pgid) and time.monotonic() < end:
            time.sleep(0.1)
        if not _group_alive(pgid):
            return
