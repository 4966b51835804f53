"""MLflow as a sink for a search's runs; the record is Tune's saved results. The parent run is found by its tag
``dedn.experiment``, each trial's (population member's) run by ``dedn.trial_id``, the run key.

Calls return at once; worker threads make each run's calls in order: creation, sync and end at once, points once the
oldest waited ``linger_s`` (one ``log_batch`` then carries several epochs). A point keeps the record's timestamp, so
a batch sent twice is stored once (MLflow's SQL stores keep one row per key, step, timestamp and value). ``sync``
logs the record's rows whose step the run's history lacks. When the store fails, a run's calls go back to the front
of its queue and are tried again; points beyond ``max_points`` are dropped and synced from the record at the end.
``SinkProcess`` makes a sink's calls in a process of its own (``python -m tracking.sink``), off the driver's CPU.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tracking.beside import Beside
from tracking.store import MAX_TAG, artifact_location

__all__ = ["Row", "RunSink", "SinkProcess", "rows_batches", "start_sink"]

RUN_KEY = "dedn.trial_id"  # the tag that finds a trial's (or a population member's) run
EXPERIMENT_TAG = "dedn.experiment"  # the tag that finds a search's parent run
_MAX_BATCH = 1000  # metrics, params and tags per log_batch call: MLflow's limits
_MAX_FIELDS = 100  # params, and tags, per log_batch call
_RETRY_S = 5.0


Rows = Callable[[], list["Row"]]  # a run's steps in the record, read when called
Files = Callable[[], str | None] | None  # a folder to upload as the run's checkpoint, made when called


@dataclass(frozen=True)
class Row:
    """One step of a run: its metrics, stamped with the record's time (ms)."""

    step: int
    timestamp: int
    metrics: dict[str, float]


def rows_batches(
    rows: Iterable[Row], params: dict[str, str] | None = None, tags: dict[str, str] | None = None
) -> list[tuple[list[Any], list[Any], list[Any]]]:
    """(metrics, params, tags) entity lists for ``log_batch`` calls within MLflow's limits; a step's metrics are
    never split between two calls (one metric's history then tells which steps a run holds)."""
    from mlflow.entities import Metric, Param, RunTag

    ps = [Param(k, str(v)) for k, v in sorted((params or {}).items())]
    ts = [RunTag(k, str(v)[:MAX_TAG]) for k, v in sorted((tags or {}).items())]
    out: list[tuple[list[Any], list[Any], list[Any]]] = []
    metrics: list[Any] = []
    for row in rows:
        step = [Metric(k, float(v), row.timestamp, row.step) for k, v in row.metrics.items()]
        room = _MAX_BATCH - len(metrics) - min(len(ps), _MAX_FIELDS) - min(len(ts), _MAX_FIELDS)
        if metrics and len(step) > room:
            out.append((metrics, ps[:_MAX_FIELDS], ts[:_MAX_FIELDS]))
            ps, ts, metrics = ps[_MAX_FIELDS:], ts[_MAX_FIELDS:], []
        metrics.extend(step)
    while metrics or ps or ts:
        out.append((metrics, ps[:_MAX_FIELDS], ts[:_MAX_FIELDS]))
        ps, ts, metrics = ps[_MAX_FIELDS:], ts[_MAX_FIELDS:], []
    return out


class RunSink:
    """The runs of one search in one tracking store, written by ``threads`` background threads."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        experiment_id: str | None = None,
        parent_id: str | None = None,
        threads: int = 4,
        linger_s: float = 5.0,
        max_points: int = 200_000,
        witness: str = "val_H",
    ) -> None:
        # else MLflow's client fetches a run before ending it, to print its link: one request more per run
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri, self.experiment = uri, experiment
        self.linger_s, self.max_points = linger_s, max_points
        self.witness = witness  # the metric whose history says which steps a run holds (every step logs it)
        self.ids: dict[str, str] = {}  # run key -> run id, once known
        self.params: dict[str, str] = {}  # the search's own params (``open_parent``), every run's too
        self.parent_id, self.experiment_id = parent_id, experiment_id  # known, or found by ``open_parent``
        self.cond = threading.Condition()
        self.queues: OrderedDict[str, deque[tuple[Any, ...]]] = OrderedDict()  # run key ("" for calls) -> calls
        self.ready: dict[str, None] = {}  # runs with a call to make at once (creation, sync, end, ...), in order
        self.since: dict[str, float] = {}  # run key -> when its oldest queued point came
        self.claimed: set[str] = set()
        self.dirty: set[str] = set()  # runs whose points were dropped: synced from the record at their end
        self.uncertain: set[str] = set()  # runs whose creation was sent without an answer
        self.points = self.written = self.done = 0  # points queued, points written, calls made
        self.retry_at = 0.0
        self.urgent = self.stopping = False
        self._client: Any = None
        self.threads = [
            threading.Thread(target=self._loop, name=f"mlflow-sink-{i}", daemon=True) for i in range(threads)
        ]
        for th in self.threads:
            th.start()

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            from tracking.mlflow_store import served

            self._client = MlflowClient(tracking_uri=served(self.uri))  # the threads' store: one set-up, one engine
        return self._client

    # -- look-ups, made at once -------------------------------------------------------------------------------
    def open_parent(
        self,
        tags: dict[str, str],
        files: Iterable[str] = (),
        texts: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> str:
        """The search's parent run, found by its tag ``dedn.experiment`` (reopened: RUNNING) or created with ``tags``,
        ``params``, the ``files`` and the ``texts`` (artifact name -> text)."""
        c = self.client
        self.params = dict(params or {})
        exp = c.get_experiment_by_name(self.experiment)
        self.experiment_id = (
            exp.experiment_id
            if exp is not None
            else c.create_experiment(self.experiment, artifact_location=artifact_location(self.uri, self.experiment))
        )
        found = c.search_runs([self.experiment_id], f"tags.`{EXPERIMENT_TAG}` = '{self.experiment}'", max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
            c.update_run(self.parent_id, status="RUNNING")
            return self.parent_id
        run = c.create_run(self.experiment_id, run_name=self.experiment, tags={**tags, EXPERIMENT_TAG: self.experiment})
        self.parent_id = run.info.run_id
        if params:
            from mlflow.entities import Param

            c.log_batch(self.parent_id, params=[Param(k, v) for k, v in sorted(params.items())])
        for f in files:
            c.log_artifact(self.parent_id, f)
        for name, text in (texts or {}).items():
            c.log_text(self.parent_id, text, name)
        return self.parent_id

    def runs(self) -> dict[str, Any]:
        """The search's child runs by run key (``dedn.trial_id``), every status; their ids are remembered."""
        from mlflow.entities import ViewType

        found: dict[str, Any] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [str(self.experiment_id)],
                f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                run_view_type=ViewType.ALL,
                max_results=1000,
                page_token=token,
            )
            for r in page:
                key = r.data.tags.get(RUN_KEY)
                if key:
                    found[key] = r
            token = page.token
            if not token:
                break
        with self.cond:
            self.ids.update({k: r.info.run_id for k, r in found.items()})
        return found

    def steps(self, key: str) -> set[int]:
        """The steps the run of ``key`` holds (none for a run not known), read at once."""
        run = self.ids.get(key)
        return {int(m.step) for m in self.client.get_metric_history(run, self.witness)} if run else set()

    # -- queued calls ---------------------------------------------------------------------------------------------
    def create(self, key: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        """The run of ``key``: created under the parent with its tags, its params sent with its first points."""
        tags = {**tags, "mlflow.parentRunId": str(self.parent_id), RUN_KEY: key}
        self._put(key, ("create", name, tags), f"run of {name}")
        self._put(key, ("fields", {k: str(v) for k, v in params.items()}, {}), f"params of {name}")

    def reopen(self, key: str, name: str) -> None:
        """A run an earlier driver made, continued: RUNNING again."""
        self._put(key, ("reopen",), f"reopen run of {name}")

    def adopt(self, old: str, key: str, name: str) -> None:
        """The run of ``old`` (a trial Tune lost, proposed again) is from now on the run of ``key``, named ``name``."""
        with self.cond:
            self.ids[key] = self.ids.pop(old)
        self.tags(key, {RUN_KEY: key, "mlflow.runName": name}, f"run of {name} (was {old})")

    def log(self, key: str, row: Row, what: str) -> None:
        """One step's metrics, sent with the run's neighbouring steps."""
        with self.cond:
            if self.points >= self.max_points:
                self.dirty.add(key)  # the record has it: the run's end syncs it
                return
            self.points += 1
        self._put(key, ("row", row), what)

    def log_rows(self, rows: list[tuple[str, Row]]) -> None:
        """One step's metrics of each of several runs (a population's epoch): ``log`` of each (key, row)."""
        for key, row in rows:
            self.log(key, row, "")

    def tags(self, key: str, tags: dict[str, str], what: str) -> None:
        self._put(key, ("fields", {}, tags), what)

    def sync(self, key: str, rows: Callable[[], list[Row]], what: str) -> None:
        """Bring the run up to date with the record: the ``rows()`` (read when the call is made) it lacks logged."""
        self._put(key, ("sync", rows), what)

    def end(
        self, key: str, status: str, final: Row | None, tags: dict[str, str], rows: Rows, files: Files, what: str
    ) -> None:
        """The run's end: synced with the record ``rows()`` if points of it were dropped, ``final`` metrics and
        ``tags`` logged, the folder ``files()`` returns (if any) uploaded as ``checkpoint``, then its status."""
        self._put(key, ("end", status, final, tags, rows, files), what)

    def call(self, what: str, fn: Callable[[Any], Any]) -> None:
        """Any other call (``fn(client)``: on the parent run, plots, ...), made in order with the others."""
        self._put("", ("call", fn), what)

    def _put(self, key: str, op: tuple[Any, ...], what: str) -> None:
        with self.cond:
            self.queues.setdefault(key, deque()).append((what, op))
            if op[0] not in ("row", "fields"):
                self.ready[key] = None  # made at once
            self.since.setdefault(key, time.monotonic())
            self.cond.notify()

    # -- the worker threads ----------------------------------------------------------------------------------------
    def _next(self) -> tuple[str, list[tuple[str, tuple[Any, ...]]]] | None:
        """A run's queued calls for a thread (lock held): a ready run, else the oldest whose points waited ``linger_s``."""
        now = time.monotonic()
        if now < self.retry_at:
            return None
        key = next((k for k in self.ready if k not in self.claimed), None)
        if key is None:
            for k, q in self.queues.items():
                if k in self.claimed:
                    continue
                if not (self.urgent or now - self.since.get(k, now) >= self.linger_s or len(q) >= 100):
                    break  # the others came later still
                key = k
                break
        if key is None:
            return None
        q = self.queues.pop(key)
        ops = list(q)
        self.since.pop(key, None)
        was_ready = self.ready.pop(key, False) is None
        if was_ready and not self.urgent:  # the points after its last call wait their turn
            last = max(i for i, (_, op) in enumerate(ops) if op[0] not in ("row", "fields"))
            ops, rest = ops[: last + 1], ops[last + 1 :]
            if rest:
                self.queues[key] = deque(rest)
                self.since[key] = now
        self.claimed.add(key)
        return key, ops

    def _loop(self) -> None:
        from mlflow.tracking import MlflowClient

        from tracking.mlflow_store import served

        client = MlflowClient(tracking_uri=served(self.uri))  # a database: a run's writes, each in one session
        while True:
            with self.cond:
                job = self._next()
                while job is None:
                    if self.stopping and not any(self.queues.values()):
                        return
                    self.cond.wait(timeout=0.25)
                    job = self._next()
            key, ops = job
            done = self._run(client, key, ops)
            with self.cond:
                self.claimed.discard(key)
                self.done += done
                rows = sum(op[0] == "row" for _, op in ops[:done])
                self.points -= rows
                self.written += rows
                if done < len(ops):  # the store failed: the rest goes back to the front, tried again in a while
                    q = self.queues.setdefault(key, deque())
                    self.queues.move_to_end(key, last=False)
                    q.extendleft(reversed(ops[done:]))
                    self.since[key] = 0.0
                    if any(op[0] not in ("row", "fields") for _, op in q):
                        self.ready[key] = None
                    self.retry_at = time.monotonic() + _RETRY_S
                self.cond.notify_all()

    def _run(self, client: Any, key: str, ops: list[tuple[str, tuple[Any, ...]]]) -> int:
        """Make a run's calls in order, consecutive points, params and tags (and a following end's) batched; returns
        how many were made (the rest failed)."""
        i, ops = 0, self._tags_at_creation(key, ops)
        try:
            while i < len(ops):
                if ops[i][1][0] not in ("row", "fields"):
                    self._call(client, key, ops[i][1], logged=False)
                    i += 1
                    continue
                j = i
                while j < len(ops) and ops[j][1][0] in ("row", "fields"):
                    j += 1
                batch = [op for _, op in ops[i:j]]
                rows = [op[1] for op in batch if op[0] == "row"]
                params = {k: v for op in batch if op[0] == "fields" for k, v in op[1].items()}
                tags = {k: v for op in batch if op[0] == "fields" for k, v in op[2].items()}
                end = ops[j][1] if j < len(ops) and ops[j][1][0] == "end" and key not in self.dirty else None
                if end is not None:  # the end's final metrics and tags ride along
                    rows += [end[2]] if end[2] is not None else []
                    tags.update(end[3])
                self._log(client, key, rows, params, tags)
                i = j
                if end is not None:
                    self._call(client, key, end, logged=True)
                    i += 1
        except Exception:
            pass
        return i

    def _tags_at_creation(self, key: str, ops: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, tuple[Any, ...]]]:
        """``ops`` with the tags of a run not made yet (its later tags and its end's, when queued with it) moved into
        its creation: the same run in the end, one write fewer (a ``log_batch`` with tags commits them apart). One op
        for one, so that the calls not made go back to the queue as they came."""
        if not ops or ops[0][1][0] != "create" or key in self.ids:
            return ops
        tags, out = dict(ops[0][1][2]), list(ops[1:])
        for n, (what, op) in enumerate(out):
            moved = op[2] if op[0] == "fields" else op[3] if op[0] == "end" else {}
            if "mlflow.runName" in moved or op[0] in ("sync", "reopen", "call"):  # in order from here on
                break
            tags.update({k: str(v)[:MAX_TAG] for k, v in moved.items()})
            out[n] = (what, ("fields", op[1], {}) if op[0] == "fields" else (*op[:3], {}, *op[4:]) if moved else op)
        return [(ops[0][0], ("create", ops[0][1][1], tags)), *out]

    def _log(self, client: Any, key: str, rows: list[Row], params: dict[str, str], tags: dict[str, str]) -> None:
        for metrics, ps, ts in rows_batches(rows, params, tags):
            client.log_batch(self.ids[key], metrics=metrics, params=ps, tags=ts)

    def _call(self, client: Any, key: str, op: tuple[Any, ...], logged: bool) -> None:
        kind = op[0]
        if kind == "call":
            op[1](client)
        elif kind == "create":
            if key in self.ids or (key in self.uncertain and self._found(client, key)):
                return
            self.uncertain.add(key)  # until the answer is back: a failed creation may have been made all the same
            run = client.create_run(str(self.experiment_id), run_name=op[1], tags=op[2])
            with self.cond:
                self.ids[key] = run.info.run_id
                self.uncertain.discard(key)
        elif kind == "reopen":
            client.update_run(self.ids[key], status="RUNNING")
        elif kind == "sync":
            self._sync(client, key, op[1]())
        elif kind == "end":
            status, final, tags, rows, artifacts = op[1:]
            if key in self.dirty:
                self._sync(client, key, rows())
                self.dirty.discard(key)
            if not logged:
                self._log(client, key, [final] if final is not None else [], {}, tags)
            folder = artifacts() if artifacts is not None else None
            if folder:
                client.log_artifacts(self.ids[key], folder, "checkpoint")
            client.set_terminated(self.ids[key], status=status)

    def _found(self, client: Any, key: str) -> bool:
        """Whether a run of ``key`` exists after all (a creation that failed on its way back): then it is used."""
        found = client.search_runs(
            [str(self.experiment_id)],
            f"tags.`{RUN_KEY}` = '{key}' and tags.`mlflow.parentRunId` = '{self.parent_id}'",
            max_results=1,
        )
        if found:
            with self.cond:
                self.ids[key] = found[0].info.run_id
        return bool(found)

    def _sync(self, client: Any, key: str, rows: list[Row]) -> None:
        have = {int(m.step) for m in client.get_metric_history(self.ids[key], self.witness)}
        self._log(client, key, [r for r in rows if r.step not in have], {}, {})

    # -- the end --------------------------------------------------------------------------------------------------
    def flush(self, timeout_s: float = 600.0, stall_s: float = 30.0) -> list[str]:
        """Make every queued call now and wait (at most ``timeout_s``, ``stall_s`` without progress); returns what is
        still queued."""
        end = time.monotonic() + timeout_s
        with self.cond:
            self.urgent = True
            self.cond.notify_all()
            mark, since = self.done, time.monotonic()
            try:
                while self.claimed or any(self.queues.values()):
                    now = time.monotonic()
                    if self.done != mark:
                        mark, since = self.done, now
                    if now > end or now - since > stall_s:
                        break
                    self.cond.wait(0.2)
            finally:
                self.urgent = False
            return self._left()

    def _left(self) -> list[str]:
        return [what for q in self.queues.values() for what, op in q if op[0] != "row"] + (
            [f"{self.points} metric points"] if self.points else []
        )

    def close(self, timeout_s: float = 600.0) -> list[str]:
        """Flush, then stop the threads; returns what could not be logged (the record still has it)."""
        left = self.flush(timeout_s)
        with self.cond:
            self.stopping = True
            self.queues.clear()
            self.ready.clear()
            self.cond.notify_all()
        for th in self.threads:
            th.join(timeout=60)
        return left


class SinkProcess(RunSink):
    """A ``RunSink`` whose calls are made by a process of its own (``tracking.beside``), so that MLflow's client takes
    neither CPU nor the interpreter's lock from the driver; look-ups (``runs``, ``steps``) are made here. ``close``
    sends what is queued first; a killed driver's process exits at once (the record holds what it did not send).
    ``imports``: the modules of the callables it will be sent (rows read from the record, checkpoint folders),
    imported as it starts."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        experiment_id: str,
        parent_id: str,
        linger_s: float = 5.0,
        imports: Iterable[str] = (),
    ) -> None:
        super().__init__(uri, experiment, experiment_id=experiment_id, parent_id=parent_id, threads=0)
        settings = {"experiment_id": experiment_id, "parent_id": parent_id, "linger_s": linger_s}
        self.beside = Beside("tracking.sink", (uri, experiment, settings, list(imports)))
        self.process = self.beside.process
        self.last: tuple[int, int, int] = (0, 0, 0)

    def _ask(self, *message: Any) -> Any:
        try:
            return self.beside.result(self.beside.ask(*message))
        except RuntimeError:
            if self.beside.ended is None:
                raise  # the call failed there: not a process that is gone
            return None

    def _left(self) -> list[str]:
        if self.beside.ended:
            return [f"what was queued when {self.beside.ended}"]
        return super()._left()

    def _put(self, key: str, op: tuple[Any, ...], what: str) -> None:
        self.beside.tell("_put", key, op, what)

    def log(self, key: str, row: Row, what: str) -> None:
        self.beside.tell("log", key, row, what)

    def log_rows(self, rows: list[tuple[str, Row]]) -> None:
        if rows:
            self.beside.tell("log_rows", rows)  # one message for a population's epoch

    def adopt(self, old: str, key: str, name: str) -> None:
        with self.cond:
            self.ids[key] = self.ids.pop(old)
        self.beside.tell("adopt", old, key, name)

    def runs(self) -> dict[str, Any]:
        found = super().runs()
        self.beside.tell("remember", dict(self.ids))
        return found

    def counts(self) -> tuple[int, int, int]:
        """(points queued, points written, calls made) in the sink's process."""
        got = self._ask("counts")
        self.last = tuple(got) if got is not None else self.last
        return self.last

    def flush(self, timeout_s: float = 600.0, stall_s: float = 30.0) -> list[str]:
        left = self._ask("flush", timeout_s, stall_s)
        return list(left) if left is not None else self._left()

    def close(self, timeout_s: float = 600.0) -> list[str]:
        self.counts()
        left = self._ask("close", timeout_s)
        left = list(left) if left is not None else self._left()
        self.beside.close()
        return left


def start_sink(first: tuple[str, str, dict[str, Any], list[str]]) -> Callable[[str, tuple[Any, ...]], Any]:
    """The sink's process: a ``RunSink`` making the calls the driver sends. ``first``: (tracking URI, experiment, the
    sink's settings, modules to import)."""
    import importlib

    uri, experiment, settings, imports = first
    for module in imports:  # now, not while a call waits for its callable's class
        importlib.import_module(module)
    sink = RunSink(uri, experiment, **settings)

    def handle(name: str, args: tuple[Any, ...]) -> Any:
        if name == "counts":
            return sink.points, sink.written, sink.done
        if name == "remember":
            with sink.cond:
                sink.ids.update(args[0])
            return None
        return getattr(sink, name)(*args)

    return handle


if __name__ == "__main__":  # the classes the driver sends are this module's, imported under its name
    from tracking.beside import serve
    from tracking.sink import start_sink

    serve(int(sys.argv[1]), start_sink)
