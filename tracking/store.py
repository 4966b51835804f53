"""The tracking store a command talks to (``sqlite:///PATH`` by default, ``http://host:port``, or ``postgresql://``
with artifacts in ``./mlruns/``): its URI, the checks before a search logs to it, MLflow's settings around a block."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

from dedn.errors import DednInputError
from tracking.databases import database_tables, is_postgres, normalized

__all__ = [
    "MAX_TAG",
    "artifact_location",
    "check_not_scattered",
    "check_reachable",
    "code_version",
    "mlflow_uris",
    "quiet_mlflow",
    "resolve_tracking_uri",
]

MAX_TAG = 5000  # characters of a tag value the project keeps


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` here; a relative SQLite path (``sqlite:///rel.db``,
    MLflow's documented form) made absolute against the working folder, once, so that every process (Ray's workers
    run in other folders) and every later command names the same file; PostgreSQL with its driver named."""
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path, _, query = uri.removeprefix("sqlite:///").partition("?")
        if path and path != ":memory:":
            uri = f"sqlite:///{Path(path).expanduser().resolve()}" + (f"?{query}" if query else "")
    return normalized(uri)


def artifact_location(uri: str, experiment: str) -> str | None:
    """``mlruns/<experiment>`` beside an SQLite store's file, for a new experiment; None (the default) elsewhere."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns" / experiment).as_uri()


def check_not_scattered(uri: str, joins_cluster: bool) -> None:
    """Refuse a file store (``file:`` or a bare path) on a cluster: its paths resolve per node and runs scatter."""
    scheme = uri.split(":", 1)[0] if "://" in uri or uri.startswith("file:") else ""
    if joins_cluster and scheme in ("", "file"):
        why = "a file store cannot serve a multi-node cluster: use --tracking-uri http://host:port (a shared server) or sqlite:///ABSOLUTE/PATH on the driver"
        raise DednInputError(uri, "tracking store", why)


def _restore_environ(saved: dict[str, str | None]) -> None:  # None: unset
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """DednInputError at once when the store cannot be used. A PostgreSQL database is first connected to directly,
    for ``timeout_s`` at most (MLflow retries a failing one for minutes); MLflow then creates its tables in it."""
    from mlflow.tracking import MlflowClient

    if is_postgres(uri):
        database_tables(uri, "tracking store", timeout_s)
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
        if not path.exists():  # made when the search opens it: a check must not leave an empty store behind
            if not (path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK)):
                raise DednInputError(uri, "tracking store", f"cannot be made: folder {path.parent} is not writable")
            return
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout_s)))
    try:
        with quiet_mlflow():  # a new SQLite store logs its table creation: not worth two lines
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # any failure here means: do not start the search
        raise DednInputError(uri, "tracking store", f"cannot be reached: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
        _restore_environ(saved)


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Hold back MLflow's and alembic's log lines below ERROR, Python warnings and MLflow's progress bars."""
    levels = {lg: lg.level for lg in (logging.getLogger("mlflow"), logging.getLogger("alembic"))}
    saved = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    for lg in levels:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # restores both on exit
            warnings.simplefilter("ignore")
            warnings.showwarning = lambda *args, **kwargs: None  # MLflow forces some warnings "once"
            yield
    finally:
        for lg, level in levels.items():
            lg.setLevel(level)
        _restore_environ(saved)


@contextlib.contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs (read by fluent ``mlflow.*`` calls) set to ``uri`` for a block,
    then restored exactly, unset ones and the environment variables ``set_*_uri`` exports included."""
    import mlflow

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:  # unset both (the setters take None), then set back a URI that was set, not defaulted
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
        _restore_environ(env)
        if mlflow.get_tracking_uri() != tracking:
            mlflow.set_tracking_uri(tracking)
        if mlflow.get_registry_uri() != registry:  # compared once the tracking URI, its default, is back
            mlflow.set_registry_uri(registry)
        _restore_environ(env)  # the setters export what they set


def code_version() -> str:
    """The package version, with ``+<git short sha>`` when this code is in a git checkout."""
    from dedn import __version__

    cmd = ["git", "rev-parse", "--short", "HEAD"]
    try:
        git = subprocess.run(cmd, capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        sha = git.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__
