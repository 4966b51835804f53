"""MLflow runs of a search: one parent run per search, one nested child run per trial.

All logging happens in the driver, in a Ray Tune callback: trials on other nodes never touch the
tracking store. The default store is ``sqlite:///mlflow.db`` in the working folder; ``--tracking-uri
http://host:port`` logs to a shared server, ``--tracking-uri postgresql://USER@HOST/DATABASE`` to a
PostgreSQL database directly (``tracking.databases``; artifacts then go where MLflow puts them for a
database store: ``mlruns/`` in the working folder). Each trial's run id is kept in the experiment folder
(``mlflow_runs.state``), so a retried or resumed trial continues its own run.

If the store cannot be reached when a search starts, the command stops before any trial runs. If it
goes away during a search, logging calls are queued and retried at the end; what still fails is reported.

During a search the tracking callback starts the tracker's background writer (``Tracker.start``): trial runs,
their calls and their per-epoch metrics then leave the driver's event loop. Each metric point (and each run's
params) is first appended to a journal in the experiment folder (``mlflow_points.journal``), then written by
writer threads with ``MlflowClient.log_batch``, many steps of one run per call (its params with the first); the
journal records what was written. A driver that dies with points queued leaves them in the journal, and the
next tracker started on the folder (``--resume``) writes them: each exactly once, because a point keeps the
timestamp it was queued with and the SQL stores behind ``sqlite:`` and ``mlflow server`` keep one row per (key,
step, timestamp, value) of a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dedn.errors import DednInputError
from tracking.run_artifacts import RunArtifacts
from tracking.run_state import RUNS_FILE, read_runs_state

if TYPE_CHECKING:
    from tracking.writer import TrackingWriter

__all__ = [
    "artifact_location",
    "DEFAULT_URI",
    "JOURNAL_FILE",
    "MAX_TAG",
    "metric_batch",
    "RUNS_FILE",
    "Tracker",
    "check_not_scattered",
    "check_reachable",
    "code_version",
    "mlflow_uris",
    "quiet_mlflow",
    "resolve_tracking_uri",
]

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_TAG = 5000  # characters of a tag value the tracker keeps
# The writer's append-only journal of metric points (not *.json either, for the same reason).
JOURNAL_FILE = "mlflow_points.journal"


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


class Tracker:
    """Parent and child runs for one search, with a retry queue for calls that fail mid-search."""

    def __init__(self, uri: str, experiment_dir: Path, experiment_name: str) -> None:
        self.uri, self.dir, self.name = uri, Path(experiment_dir), experiment_name
        self._client: Any = None
        self.offline = False
        self.pending: set[str] = set()
        self.failed: list[tuple[str, Callable[[], Any]]] = []
        self.state = self._read_state()
        self.lock = threading.RLock()  # the state and the writer's queues, between the driver and the writer
        self._save_lock = threading.Lock()  # one writer of RUNS_FILE at a time
        self._copies = self._written = 0  # state copies taken, and the newest one written
        self._writer: TrackingWriter | None = None
        self.artifacts = RunArtifacts(self)  # uploads to runs, skipping the look-up of runs created here

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; the client and pending calls stay behind,
        # the run ids come back from RUNS_FILE.
        return {"uri": self.uri, "dir": self.dir, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["dir"], state["name"])  # type: ignore[misc]

    # -- persistence of run ids ---------------------------------------------------------------
    def _read_state(self) -> dict[str, Any]:
        return read_runs_state(self.dir)

    def reload(self) -> None:
        """Read the run ids back from RUNS_FILE, where another copy of this tracker (Tune's
        callback) wrote them."""
        self.state = self._read_state()

    def save(self, now: bool = False) -> None:
        """Write the run ids (and per-trial progress) to RUNS_FILE, atomically. While the writer runs, a call
        only marks the state changed (the writer writes it within about 2 s), unless ``now``: with thousands of
        runs the file is megabytes, and what must survive a killed driver until then is in the journal."""
        w = self._writer
        if w is not None and not now:
            w.dirty = True
            return
        with self.lock:  # a copy that the other threads cannot change while it is written
            state = {k: type(v)(v) if isinstance(v, (dict, list)) else v for k, v in self.state.items()}
            copy = self._copies = self._copies + 1
            tmp = self.dir / (RUNS_FILE + ".tmp")
        with self._save_lock:  # encoded and written outside the lock the driver's thread takes per result
            if copy < self._written:  # a newer copy (another thread's save) is in the file already
                return
            tmp.write_text(json.dumps(state, indent=2))
            os.replace(tmp, self.dir / RUNS_FILE)
            self._written = copy

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a logging call; on failure queue it for the end instead of failing the search.

        After the first failure the store counts as offline: later calls are queued without trying,
        so a dead server does not stall the search with retries; the queue is replayed at the end."""
        if self.offline:
            self.failed.append((what, fn))
            return None
        try:
            return fn()
        except Exception:
            self.offline = True
            self.failed.append((what, fn))
            return None

    def retry_failed(self, attempts: int = 3, wait_s: float = 2.0) -> list[str]:
        """Retry queued calls; returns what still could not be logged. A running writer first writes what it
        holds (``flush``)."""
        if self._writer is not None:
            self._writer.flush()
        self.offline = False
        for _ in range(attempts):
            if not self.failed:
                break
            pending, self.failed = self.failed, []
            for what, fn in pending:
                try:
                    fn()
                except Exception:
                    self.failed.append((what, fn))
            if self.failed:
                time.sleep(wait_s)
        return [what for what, _ in self.failed]

    # -- runs -------------------------------------------------------------------------------------
    def parent(self, tags: dict[str, str], spec_file: str, store_header: dict[str, Any] | None = None) -> str:
        """Create (or on resume, reopen) the parent run."""
        if self.state["parent"]:
            run_id = str(self.state["parent"])
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        exp = self.client.get_experiment_by_name(self.name)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            exp_id = self.client.create_experiment(self.name, artifact_location=artifact_location(self.uri, self.name))
        run = self.client.create_run(exp_id, run_name=self.name, tags=tags)
        self.client.log_artifact(run.info.run_id, spec_file)
        if store_header is not None:  # what serving a promoted trial needs to know of the store
            self.client.log_dict(run.info.run_id, store_header, "store.json")
        self.state["parent"] = run.info.run_id
        self.state["experiment_id"] = exp_id
        self.save()
        return run.info.run_id

    def child(
        self,
        trial_id: str,
        trial_name: str,
        params: dict[str, Any],
        tags: dict[str, str] | None = None,
        texts: dict[str, str] | None = None,
    ) -> None:
        """The trial's run: created once, then continued by id (retries, resume), with the text artifacts
        ``texts`` (name -> text; logged again when the run is reopened). Creation that fails is queued once;
        calls for the trial resolve its run id when they run (``run_of``). With the writer running, the params
        are journaled and go with the run's first points (``TrackingWriter.add_fields``)."""
        texts = dict(texts or {})

        def upload_texts() -> None:
            for name, text in texts.items():
                self.artifacts.log_text(self.run_of(trial_id), text, name)

        if trial_id in self.state["trials"]:

            def reopen() -> None:
                self.client.update_run(self.run_of(trial_id), "RUNNING")
                upload_texts()

            self._call(trial_id, f"reopen run of {trial_name}", reopen)
            return
        if trial_id in self.pending:
            return
        parent = str(self.state["parent"])
        exp_id = str(self.state["experiment_id"])
        writer = self._writer
        pairs = {k: str(v) for k, v in sorted(params.items())}

        def create() -> None:
            from mlflow.entities import Param

            if trial_id not in self.state["trials"]:  # a retry after a failed upload creates no second run
                run = self.client.create_run(
                    exp_id,
                    run_name=trial_name,
                    tags={"mlflow.parentRunId": parent, "dedn.trial_id": trial_id, **(tags or {})},
                )
                self.artifacts.remember(run.info.run_id, run.info.artifact_uri)
                if writer is None:
                    self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in pairs.items()])
                self.state["trials"][trial_id] = run.info.run_id
                self.pending.discard(trial_id)
                if writer is not None:  # in the journal at once: a killed driver's next tracker knows the run
                    writer.add_run(trial_id, run.info.run_id)
                else:
                    self.save()
            upload_texts()

        self.pending.add(trial_id)
        self._call(trial_id, f"create run of {trial_name}", create)
        if writer is not None:
            writer.add_fields(trial_id, params=pairs)

    def tags(self, trial_id: str, tags: dict[str, str], what: str) -> None:
        """Set tags on a trial's run; with the writer, journaled and written with the run's neighbouring points."""
        if self._writer is not None:
            return self._writer.add_fields(trial_id, tags=tags)
        from mlflow.entities import RunTag

        batch = [RunTag(k, v[:MAX_TAG]) for k, v in tags.items()]
        self.trial_call(trial_id, what, lambda run: self.client.log_batch(run, tags=batch))

    def run_of(self, trial_id: str) -> str:
        return str(self.state["trials"][trial_id])

    def trial_call(self, trial_id: str, what: str, fn: Callable[[str], Any]) -> None:
        """A logging call on a trial's run, its id looked up when the call runs."""
        self._call(trial_id, what, lambda: fn(self.run_of(trial_id)))

    def _call(self, trial_id: str | None, what: str, fn: Callable[[], Any]) -> None:
        """``call``, or with the writer running, queued for it (in order, after the trial's queued metrics)."""
        if self._writer is not None:
            self._writer.add_call(trial_id, what, fn)
        else:
            self.call(what, fn)

    def end(self, key: str, name: str, status: str, reason: str | None, path: str | None, epochs: Any = None) -> None:
        """A run's end: its checkpoint folder ``path`` (logged when FINISHED, else named), ``epochs.parquet`` (from
        ``epochs``: ``tracking.epochs.log_epochs``'s file, member and prefixes), error and status (``end_all``)."""
        self.end_all([(key, name, status, reason, path, epochs)])

    def end_all(self, ends: list[tuple[str, str, str, str | None, str | None, Any]]) -> None:
        """The ends of runs (``end``'s arguments each), e.g. a population's members. They are in the state file
        (written once for all) before their calls are made or queued: Tune does not report an ended trial again
        after a resume, so what a killed driver did not write, the next ``start`` on the folder writes."""
        from tracking.writer import end_calls

        with self.lock:
            for key, _, status, reason, path, epochs in ends:
                end = {"status": status, "reason": reason, "path": path, "epochs": epochs}
                self.state.setdefault("ends", {})[key] = end
            recorded = [(key, name, dict(self.state["ends"][key])) for key, name, *_ in ends]
        self.save(now=True)
        for key, name, end in recorded:
            end_calls(self, key, name, end)

    def metrics(self, run_id: str, metrics: dict[str, float], step: int, what: str) -> None:
        """Log metrics at ``step`` on a run."""
        batch = metric_batch(metrics, step)
        self.call(what, lambda: self.client.log_batch(run_id, metrics=batch))

    def trial_metrics(self, trial_id: str, metrics: dict[str, float], step: int, what: str) -> None:
        """Log metrics at ``step`` on a trial's run, its id looked up when the call runs (with the writer
        running: journaled and queued, written with other steps of the run)."""
        if self._writer is not None:
            self._writer.add_point(trial_id, step, metrics, epoch=False)
            return
        batch = metric_batch(metrics, step)
        self.trial_call(trial_id, what, lambda run: self.client.log_batch(run, metrics=batch))

    def epoch_metrics(self, trial_id: str, metrics: dict[str, float], step: int, what: str) -> bool:
        """Log a trial's metrics for epoch ``step`` once: not when this or a later epoch of the trial was logged
        already (a retried or resumed trial reports again the epochs after its last checkpoint). The epochs
        logged are kept in the state (``last_epoch``) and, with the writer, in the journal. Returns whether it
        logged them."""
        with self.lock:
            last = self.state.setdefault("last_epoch", {})
            if step <= int(last.get(trial_id, 0)):
                return False
            last[trial_id] = step
            if self._writer is not None:
                self._writer.add_point(trial_id, step, metrics, epoch=True)
                self._writer.dirty = True  # the state file catches up within about 2 s
                return True
        self.save()
        self.trial_metrics(trial_id, metrics, step, what)
        return True

    # -- the background writer ---------------------------------------------------------------------
    def start(self, threads: int = 4, linger_s: float = 5.0, max_points: int = 50_000) -> None:
        """Start the background writer (once): from now on ``child``, ``trial_call``, ``trial_metrics`` and
        ``epoch_metrics`` return at once and the writer makes the calls. Points a previous driver journaled
        and did not write are queued first. ``threads`` writer threads; a run's points wait up to ``linger_s``
        so that one call carries several steps; at ``max_points`` queued points the caller waits."""
        with self.lock:
            if self._writer is None:
                from tracking.writer import TrackingWriter, end_calls

                self._writer = TrackingWriter(self, threads, linger_s, max_points)
                for key, end in list(self.state.get("ends", {}).items()):  # recorded by a driver killed before
                    if key in self.state["trials"]:  # it wrote them
                        end_calls(self, key, key, end)

    def flush(self, timeout_s: float = 600.0) -> int:
        """Wait until the writer has written what it holds (up to ``timeout_s``, or until only points of
        runs that do not exist remain); returns the points still queued."""
        return self._writer.flush(timeout_s) if self._writer is not None else 0

    def close(self, timeout_s: float = 600.0) -> int:
        """Flush and stop the writer, and write the state; later calls are made at once again. Returns the
        points left in the journal, for the next tracker started on the folder."""
        w = self._writer
        if w is None:
            return 0
        left = w.close(timeout_s)
        self._writer = None
        self.save()
        return left

    @property
    def backlog(self) -> int:
        """Metric points queued and not yet written (0 without the writer)."""
        return self._writer.points if self._writer is not None else 0


def metric_batch(metrics: dict[str, float], step: int) -> list[Any]:
    """MLflow metric entities for one step, all stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()]
