"""The tracking store a command talks to: its URI (``--tracking-uri``, ``MLFLOW_TRACKING_URI`` or ``mlflow.db`` in the
working folder), the checks made before a search logs to it, and MLflow's process-wide settings around a block.

``sqlite:///PATH`` is the embedded store (the default); ``http://host:port`` a shared server;
``postgresql://USER@HOST/DATABASE`` a PostgreSQL database used directly (``tracking.databases``; artifacts then go
where MLflow puts them for a database store: ``mlruns/`` in the working folder).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

from dedn.errors import DednInputError

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
    """``None`` -> ``MLFLOW_TRACKING_URI`` when set (as the CLI's option reads it), else the embedded SQLite
    store in the working folder (absolute path). A PostgreSQL URL comes back with the project's driver named
    (``tracking.databases.normalized``), the form MLflow is given."""
    from tracking.databases import normalized

    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    return normalized(uri)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside an SQLite store's file (``mlruns/<experiment>``
    next to it, not under whatever the working folder is); None (the server's or MLflow's default) else."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns" / experiment).as_uri()


def check_not_scattered(uri: str, joins_cluster: bool) -> None:
    """Refuse a file-system store (``file:`` or a bare path) when joining a cluster: relative paths
    resolve differently per node and such stores are where runs scatter. SQLite on the driver, written
    only by the driver, or a server (http://) is fine."""
    scheme = uri.split(":", 1)[0] if "://" in uri or uri.startswith("file:") else ""
    if joins_cluster and scheme in ("", "file"):
        raise DednInputError(
            uri,
            "tracking store",
            "a file store cannot serve a multi-node cluster: use "
            "--tracking-uri http://host:port (a shared server) or sqlite:///ABSOLUTE/PATH on the driver",
        )


def _environ(names: tuple[str, ...]) -> dict[str, str | None]:
    """The current values of environment variables (None: unset), for ``_restore_environ``."""
    return {k: os.environ.get(k) for k in names}


def _restore_environ(saved: dict[str, str | None]) -> None:
    """Put environment variables back as ``_environ`` found them, unset ones included."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at once, with one line, when the tracking store cannot be used. A PostgreSQL database is first
    connected to directly, giving up after ``timeout_s`` (MLflow itself retries a failing database for
    minutes); MLflow then creates its tables in an empty one."""
    from mlflow.tracking import MlflowClient

    from tracking.databases import database_tables, is_postgres

    if is_postgres(uri):
        database_tables(uri, "tracking store", timeout_s)
    saved = _environ(("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))
    try:
        with quiet_mlflow():  # a new SQLite store logs its table creation: not worth two lines
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # any failure here means: do not start the search
        raise DednInputError(uri, "tracking store", f"cannot be reached: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
        _restore_environ(saved)


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Hold back MLflow's and alembic's INFO and warning lines, Python warnings and MLflow's download
    progress bars for a block (a refusal is one line; these would surround it)."""
    loggers = {name: logging.getLogger(name) for name in ("mlflow", "alembic")}
    levels = {name: lg.level for name, lg in loggers.items()}
    env = _environ(("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",))
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    for lg in loggers.values():
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # restores both on exit
            warnings.simplefilter("ignore")
            warnings.showwarning = lambda *args, **kwargs: None  # MLflow forces some warnings "once"
            yield
    finally:
        for name, lg in loggers.items():
            lg.setLevel(levels[name])
        _restore_environ(env)


@contextlib.contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``uri`` for a block, then restore them
    exactly, unset ones included (the fluent ``mlflow.*`` calls promote and predict need read these
    globals, and ``set_*_uri`` also exports MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI to child processes)."""
    import mlflow

    env = _environ(("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"))
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        _restore_mlflow_uris(*before, env)


def _restore_mlflow_uris(tracking: str, registry: str, env: dict[str, str | None]) -> None:
    """Unset both URIs (MLflow's setters take None for that), restore the environment, and set back a
    URI that then reads differently from ``tracking`` / ``registry``: one that was set, not defaulted."""
    import mlflow

    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    _restore_environ(env)
    if mlflow.get_tracking_uri() != tracking:
        mlflow.set_tracking_uri(tracking)
    if mlflow.get_registry_uri() != registry:  # compared once the tracking URI, its default, is back
        mlflow.set_registry_uri(registry)
    _restore_environ(env)  # the setters export what they set


def code_version() -> str:
    from dedn import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__
