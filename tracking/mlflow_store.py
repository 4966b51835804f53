"""The one place the project uses MLflow's private names: ``store_class()``, MLflow's SQL tracking store with a
run's writes in one transaction each. The project writes a SQLite or PostgreSQL database through it (``served``:
the search's sink), and ``mlflow server --backend-store-uri dedn+sqlite:///PATH`` (or ``dedn+postgresql://USER@HOST/
DATABASE``) serves it where this project is installed (entry points ``mlflow.tracking_store`` and
``mlflow.model_registry_store``). The database is the plain URL's: MLflow's own store and server open it as before.

Why: a search's member run is a creation, one ``log_batch`` (its params, its epochs' metrics) and an end. MLflow's
``log_batch`` opens a session and reads the run for its check, then for the params, the metrics and the tags a
session each, which reads the run again and commits, adding the metrics one ORM object at a time
(mlflow/mlflow#3010, open); its ``create_run`` reads the experiment and its tags in a session of its own, and it and
``update_run_info`` read the run's metrics, params and tags only to return the run. Here each is one session, the run
read once, params and metrics bulk inserts: half the store's CPU per member run, 28% of the server's
(``python benchmarks/server_cost.py``). What it does not cover goes to MLflow's own method as it came: metrics of a
logged model, a run name tag or a rename, a run name given twice, and any batch that fails (a changed param, a
metric already there: MLflow explains or de-duplicates); MLflow's workspaces and a read replica, which its store has
and this one not, refuse the ``dedn+`` URL (and the sink then writes through MLflow's). Names used: ``private_names()``;
``tests/tracking/test_mlflow_store.py`` checks them against the installed MLflow and compares the store with MLflow's
call for call: the runs, rows, latest values and refusals each leaves.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from dedn.errors import DednInputError
from tracking.databases import normalized

__all__ = ["PREFIX", "REPLICA", "private_names", "registry_store", "served", "store_class", "tracking_store"]

PREFIX = "dedn+"  # dedn+sqlite:///PATH, dedn+postgresql://...: the database URL after it
REPLICA = "_MLFLOW_SERVER_READ_REPLICA_BACKEND_STORE"  # mlflow.server.constants.READ_REPLICA_BACKEND_STORE_URI_ENV_VAR


def private_names() -> tuple[tuple[Any, str], ...]:
    """(owner, name) of every private MLflow name ``store_class`` uses."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.utils import mlflow_tags, name_utils, validation

    return (
        (SqlAlchemyStore, "_get_experiment"),
        (SqlAlchemyStore, "_check_experiment_is_active"),
        (mlflow_tags, "_get_run_name_from_tags"),
        (name_utils, "_generate_random_name"),
        (SqlAlchemyStore, "_get_run"),
        (SqlAlchemyStore, "_check_run_is_active"),
        (SqlAlchemyStore, "_update_latest_metrics_if_necessary"),
        (validation, "_validate_run_id"),
        (validation, "_validate_batch_log_data"),
        (validation, "_validate_batch_log_limits"),
        (validation, "_validate_param_keys_unique"),
    )


@cache
def store_class() -> type:
    """``OneSessionStore``: MLflow's SQL tracking store, its ``log_batch``, ``create_run`` and ``update_run_info`` one
    session each (this module's docstring).
    Built on first use: MLflow loads the entry points while its own ``mlflow.tracking`` is still being imported."""
    import uuid

    import sqlalchemy
    from mlflow.entities import (
        LifecycleStage,
        Run,
        RunData,
        RunInfo,
        RunInputs,
        RunStatus,
        RunTag,
        SourceType,
        ViewType,
    )
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.dbmodels.models import SqlMetric, SqlParam, SqlRun, SqlTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.utils import validation
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, _get_run_name_from_tags
    from mlflow.utils.name_utils import _generate_random_name
    from mlflow.utils.uri import append_to_uri_path

    def info(run: Any) -> Any:
        """A run's RunInfo as ``SqlRun.to_mlflow_entity`` makes it, without reading its metrics, params and tags."""
        names = ("run_name", "user_id", "status", "start_time", "end_time", "lifecycle_stage", "artifact_uri")
        values = (
            run.name,
            run.user_id,
            run.status,
            run.start_time,
            run.end_time,
            run.lifecycle_stage,
            run.artifact_uri,
        )
        return RunInfo(
            run_id=run.run_uuid, experiment_id=str(run.experiment_id), **dict(zip(names, values, strict=True))
        )

    class Changed(Exception):
        """A param logged again with another value: MLflow's ``log_batch`` words the error."""

    class OneSessionStore(SqlAlchemyStore):
        def create_run(self, experiment_id: str, user_id: str, start_time: int, tags: list[Any], run_name: str) -> Any:
            # MLflow's reads the experiment and its tags in a session of its own, and the new run's (empty) metrics,
            # params and dataset inputs to return them
            tags = list(tags or [])
            named = _get_run_name_from_tags(tags)
            if run_name and named and run_name != named:
                return super().create_run(experiment_id, user_id, start_time, tags, run_name)  # MLflow's refusal
            run_name = run_name or named or _generate_random_name()
            tags += [] if named else [RunTag(MLFLOW_RUN_NAME, run_name)]
            with self.ManagedSessionMaker(read_only=False) as session:
                experiment = self._get_experiment(session, experiment_id, ViewType.ALL)
                self._check_experiment_is_active(experiment)
                run_id = uuid.uuid4().hex
                run = SqlRun(
                    name=run_name,
                    artifact_uri=append_to_uri_path(experiment.artifact_location, run_id, self.ARTIFACTS_FOLDER_NAME),
                    run_uuid=run_id,
                    experiment_id=experiment_id,
                    source_type=SourceType.to_string(SourceType.UNKNOWN),
                    source_name="",
                    entry_point_name="",
                    user_id=user_id,
                    status=RunStatus.to_string(RunStatus.RUNNING),
                    start_time=start_time,
                    end_time=None,
                    deleted_time=None,
                    source_version="",
                    lifecycle_stage=LifecycleStage.ACTIVE,
                )
                run.tags = [SqlTag(key=t.key, value=t.value) for t in tags]
                session.add(run)
                return Run(info(run), RunData(tags=tags), RunInputs(dataset_inputs=[]))

        def update_run_info(self, run_id: str, run_status: Any, end_time: Any, run_name: Any) -> Any:
            # MLflow's reads the run's metrics, params and tags too, to return its RunInfo
            if run_name:
                return super().update_run_info(run_id, run_status, end_time, run_name)
            with self.ManagedSessionMaker(read_only=False) as session:
                run = self._get_run(run_uuid=run_id, session=session)
                self._check_run_is_active(run)
                if run_status is not None:
                    run.status = RunStatus.to_string(run_status)
                if end_time is not None:
                    run.end_time = end_time
                return info(run)

        def log_batch(self, run_id: str, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
            if any(m.model_id for m in metrics) or any(t.key == "mlflow.runName" for t in tags):
                return super().log_batch(run_id, metrics, params, tags)
            try:
                return self._one_session(run_id, metrics, params, tags)
            except MlflowException as e:  # the session's rollback wraps what the block raised
                if not isinstance(e.__cause__, (sqlalchemy.exc.IntegrityError, Changed)):
                    raise
            return super().log_batch(run_id, metrics, params, tags)

        def _one_session(self, run_id: str, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
            validation._validate_run_id(run_id)
            metrics, params, tags = validation._validate_batch_log_data(metrics, params, tags)
            validation._validate_batch_log_limits(metrics, params, tags)
            validation._validate_param_keys_unique(params)
            rows: dict[tuple[Any, ...], None] = {}  # MLflow's de-duplication within a batch: one row per identity
            for m in metrics:
                is_nan, value = self.sanitize_metric_value(m.value)
                rows[(m.key, m.timestamp, m.step, value, is_nan)] = None
            names = ("key", "timestamp", "step", "value", "is_nan")
            values = [{"run_uuid": run_id, **dict(zip(names, row, strict=True))} for row in rows]
            with self.ManagedSessionMaker(read_only=False) as session:  # one commit when the block ends
                run = self._get_run(run_uuid=run_id, session=session)
                self._check_run_is_active(run)
                held = {p.key: p.value for p in run.params}
                if any(p.key in held and held[p.key] != p.value for p in params):
                    raise Changed
                new = [{"run_uuid": run_id, "key": p.key, "value": p.value} for p in params if p.key not in held]
                if new:
                    session.execute(sqlalchemy.insert(SqlParam), new)
                if values:
                    session.execute(sqlalchemy.insert(SqlMetric), values)
                    self._update_latest_metrics_if_necessary([SqlMetric(**v) for v in values], session)
                have = {t.key: t for t in run.tags}
                for t in tags:  # the last value of a key wins, as in MLflow
                    if t.key not in have:
                        have[t.key] = SqlTag(run_uuid=run_id, key=t.key, value=t.value)
                        session.add(have[t.key])
                    have[t.key].value = t.value

    return OneSessionStore


def _unsupported() -> str | None:
    """What MLflow's own store would do here and this one does not: its workspaces, a read replica."""
    from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES

    if MLFLOW_ENABLE_WORKSPACES.get():
        return "MLflow's workspaces (MLFLOW_ENABLE_WORKSPACES)"
    return "a read replica (--read-replica-backend-store-uri)" if os.environ.get(REPLICA) else None


def served(uri: str) -> str:
    """The URL the project writes runs to ``uri`` through: a SQLite or PostgreSQL database (psycopg2, the project's
    driver) through this module's store when its entry points are installed; any other URL (a server) as it is."""
    from importlib.metadata import entry_points

    scheme, _, rest = uri.partition("://")
    if scheme.lower() in ("postgres", "postgresql", "postgresql+psycopg2"):
        uri = f"postgresql://{rest}"
    elif scheme.lower() != "sqlite":
        return uri
    installed = entry_points(group="mlflow.tracking_store", name=PREFIX + uri.partition("://")[0])
    return PREFIX + uri if installed and _unsupported() is None else uri


def _database(store_uri: str) -> str:
    return normalized(store_uri.removeprefix(PREFIX))


def tracking_store(store_uri: str, artifact_uri: str | None = None) -> Any:
    """The ``mlflow.tracking_store`` entry point's builder for ``dedn+sqlite`` and ``dedn+postgresql`` URLs."""
    if (what := _unsupported()) is not None:
        raise DednInputError(store_uri, "backend store", f"{what} needs MLflow's own store: give the URL without dedn+")
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH

    return store_class()(_database(store_uri), artifact_uri or DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)


def registry_store(store_uri: str) -> Any:
    """The ``mlflow.model_registry_store`` entry point's builder: MLflow's own registry store on the same database."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    return SqlAlchemyStore(_database(store_uri))
