"""The tracker's background writer (``tracking.runs.Tracker.start``): MLflow calls and per-epoch metric points
leave the driver's event loop, journaled first so a driver that dies with a backlog loses none of it."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dedn.errors import DednInputError
from tracking.epochs import log_epochs
from tracking.runs import JOURNAL_FILE, MAX_TAG

if TYPE_CHECKING:
    from tracking.runs import Tracker

__all__ = ["TrackingWriter", "check_journal", "end_calls", "journal_records"]

_MAX_BATCH = 1000  # metrics, params and tags per log_batch call: MLflow's limits
_MAX_FIELDS = 100  # params, and tags, per log_batch call


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _texts(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _broken_rule(rec: Any) -> str | None:
    """What a parsed journal line breaks of the forms ``TrackingWriter`` writes, or None when it has one."""
    if not isinstance(rec, dict):
        return "a record is a JSON object"
    if "a" in rec:
        return None if _whole(rec["a"]) and rec["a"] >= 0 else '"a" (points written up to) is a whole number >= 0'
    if "r" in rec:
        return None if isinstance(rec["r"], str) and isinstance(rec.get("id"), str) else '"r" and "id" are strings'
    if not (_whole(rec.get("n")) and rec["n"] >= 1 and isinstance(rec.get("k"), str) and _whole(rec.get("t"))):
        return 'a point or fields record has "n" (a whole number >= 1), "k" (a string) and "t" (a whole number)'
    if "s" not in rec:
        if not all(_texts(rec[f]) for f in ("P", "T") if f in rec):
            return '"P" (params) and "T" (tags) map strings to strings'
        return None
    m = rec.get("m")
    if not (_whole(rec["s"]) and isinstance(m, dict) and rec.get("e", 1) == 1):
        return 'a point has "s" (a whole number), "m" (an object) and "e" 1 when present'
    if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in m.items()):
        return '"m" maps metric names to numbers'
    return None


def journal_records(path: Path) -> list[dict[str, Any]]:
    """The records of a tracker's journal (``JOURNAL_FILE``), in order; none when there is no journal. A line that
    is not JSON is one a kill tore (its point was never queued) and is left out; a JSON line in no form the writer
    writes (a hand-edited or hostile file) is refused with ``DednInputError`` naming its line and the rule, before
    any of it is queued: ``dedn search --resume`` checks the folder's journal this way before Ray starts."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            rule = _broken_rule(rec)
            if rule is not None:
                raise DednInputError(path, f"line {number}", rule)
            records.append(rec)
    return records


def check_journal(folder: Path) -> None:
    """Refuse an experiment folder whose tracker journal has a line in no form the writer writes
    (``journal_records``), before a resumed search starts Ray."""
    journal_records(folder / JOURNAL_FILE)


class TrackingWriter:
    """A tracker's background writer: per run, one ordered queue of journaled metric points and fields (params,
    tags), and calls.

    The driver's thread appends each point to the journal (``{"n": seq, "k": run key, "s": step, "t": ms,
    "m": metrics}``, ``"e": 1`` for an epoch), or a run's params and tags (``{"n", "k", "t", "P": params, "T":
    tags}``), and queues it, or queues a call, on the run's queue. Writer threads claim a run (one thread per run
    at a time, so its items keep their order) whose next item is due: a call at once (its creation first of all);
    points once the run exists and its oldest point waited ``linger_s`` or fills a ``log_batch`` (1000
    metrics); fields once anything follows them, or after ``linger_s``. A due run's consecutive points and fields
    go in one ``log_batch`` (up to 1000 entities): a run's params ride with its first points, a member's
    ``dedn.stopped`` tag with its last ones. ``{"a": seq}`` lines record that every item up to ``seq`` is written;
    once all are and the journal is large, the state is written and the journal starts again."""

    def __init__(self, tracker: Tracker, threads: int, linger_s: float, max_points: int) -> None:
        # MLflow's client asks the server for a run before ending it, only to print a link to it: for a search of
        # 1,000 runs that is 1,000 calls and 2,000 console lines
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.t = tracker
        self.cond = threading.Condition(tracker.lock)
        self.linger_s, self.max_points = linger_s, max_points
        # run key ("" for calls of no run) -> ("p", (seq, step, ms, metrics)), ("f", (seq, ms, params, tags)) and
        # ("c", (what, fn)) items
        self.runs: OrderedDict[str, deque[tuple[str, Any]]] = OrderedDict()
        self.claimed: set[str] = set()  # runs a thread is working on now
        self.order: deque[int] = deque()  # sequence numbers not yet written, in journal order
        self.done: set[int] = set()
        self.seq = self.acked = self.points = self.written = 0
        self.flushing = 0
        self.stopping = self.dirty = False
        self.retry_at = 0.0
        self.saved_at = time.monotonic()
        self.path = tracker.dir / JOURNAL_FILE
        self.max_journal_bytes = 64 * 2**20
        with self.cond:
            self._replay()
            torn = False
            if self.path.is_file() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
            self.journal = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed by close)
            if torn:  # the last line of a killed driver: end it, so the next one starts on a line of its own
                self.journal.write("\n")
        self.threads = [
            threading.Thread(target=self._loop, args=(i == 0,), name=f"mlflow-writer-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for th in self.threads:
            th.start()

    def _replay(self) -> None:
        """Queue the journal's points that are not recorded as written; advance ``last_epoch`` to its epochs."""
        records = []
        for rec in journal_records(self.path):
            if "a" in rec:
                self.acked = max(self.acked, int(rec["a"]))
                self.seq = max(self.seq, int(rec["a"]))
            elif "r" in rec:  # a run created after the state file was last written
                self.t.state["trials"][str(rec["r"])] = str(rec["id"])
                self.dirty = True
            else:
                records.append(rec)
                self.seq = max(self.seq, int(rec["n"]))
        last = self.t.state.setdefault("last_epoch", {})
        for rec in records:
            if rec.get("e"):
                last[rec["k"]] = max(int(last.get(rec["k"], 0)), int(rec["s"]))
            if int(rec["n"]) <= self.acked:
                continue
            if "s" not in rec:  # fields
                self._queue(str(rec["k"]), ("f", (int(rec["n"]), int(rec["t"]), rec.get("P", {}), rec.get("T", {}))))
            else:
                self._queue(str(rec["k"]), ("p", (int(rec["n"]), int(rec["s"]), int(rec["t"]), rec["m"])))

    def _queue(self, key: str, item: tuple[str, Any]) -> None:
        q = self.runs.get(key)
        if q is None:
            q = self.runs[key] = deque()
        q.append(item)
        if item[0] != "c":
            self.order.append(item[1][0])
        if item[0] == "p":
            self.points += 1

    # -- the driver's side ---------------------------------------------------------------------------
    def add_point(self, key: str, step: int, metrics: dict[str, float], epoch: bool) -> None:
        with self.cond:
            while self.points >= self.max_points and not self.stopping:
                self.cond.wait()
            self.seq += 1
            ts = int(time.time() * 1000)
            rec: dict[str, Any] = {"n": self.seq, "k": key, "s": step, "t": ts, "m": metrics}
            if epoch:
                rec["e"] = 1
            self.journal.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self.journal.flush()
            self._queue(key, ("p", (self.seq, step, ts, dict(metrics))))
            if len(self.runs[key]) * len(metrics) >= _MAX_BATCH:
                self.cond.notify_all()

    def add_fields(self, key: str, params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        """Journal and queue a run's params and tags: written with the run's neighbouring points (or alone,
        ``linger_s`` later). A tag set twice keeps its last value."""
        params, tags = dict(params or {}), {k: v[:MAX_TAG] for k, v in (tags or {}).items()}
        with self.cond:
            self.seq += 1
            ts = int(time.time() * 1000)
            rec: dict[str, Any] = {"n": self.seq, "k": key, "t": ts}
            if params:
                rec["P"] = params
            if tags:
                rec["T"] = tags
            self.journal.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self.journal.flush()
            self._queue(key, ("f", (self.seq, ts, params, tags)))
            self.cond.notify_all()

    def add_run(self, key: str, run_id: str) -> None:
        """Journal a run just created (``{"r": run key, "id": run id}``); the state file follows within ~2 s."""
        with self.cond:
            self.journal.write(json.dumps({"r": key, "id": run_id}, separators=(",", ":")) + "\n")
            self.journal.flush()
            self.dirty = True

    def add_call(self, key: str | None, what: str, fn: Callable[[], Any]) -> None:
        with self.cond:
            self._queue(key or "", ("c", (what, fn)))
            self.cond.notify_all()

    def flush(self, timeout_s: float = 600.0, stall_s: float = 30.0) -> int:
        """Wait until what can be written is written: at most ``timeout_s``, and no longer than ``stall_s``
        without a point written (the store is down). Returns the points still queued."""
        end = time.monotonic() + timeout_s
        with self.cond:
            self.flushing += 1
            self.cond.notify_all()
            written, since = self.written, time.monotonic()
            try:
                while self.claimed or self._writable():
                    now = time.monotonic()
                    if self.written != written:
                        written, since = self.written, now
                    if now > end or now - since > stall_s:
                        break
                    self.cond.wait(0.2)
            finally:
                self.flushing -= 1
            return self.points

    def close(self, timeout_s: float = 600.0) -> int:
        left = self.flush(timeout_s)
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for th in self.threads:
            th.join(timeout=60)
        with self.cond:
            self.journal.close()
        return left

    # -- the writer threads --------------------------------------------------------------------------
    def _run_id(self, key: str) -> str | None:
        run = self.t.state["trials"].get(key)
        return None if run is None else str(run)

    def _writable(self) -> bool:
        """Whether a queued call, or a queued point of a run that exists, remains."""
        return any(q and (q[0][0] == "c" or self._run_id(k) is not None) for k, q in self.runs.items())

    def _take(self, key: str) -> tuple[str, Any]:
        """The run's next call, or its next points and fields up to one ``log_batch`` (1000 metrics, params and
        tags); the run is claimed."""
        q = self.runs[key]
        if q[0][0] == "c":
            job: tuple[str, Any] = ("call", q.popleft()[1])
        else:
            fields: list[tuple[int, int, dict[str, str], dict[str, str]]] = []
            points: list[tuple[int, int, int, dict[str, float]]] = []
            size = 0
            while q and q[0][0] != "c":
                kind, item = q[0]
                n = len(item[3]) if kind == "p" else len(item[2]) + len(item[3])
                if (points or fields) and size + n > _MAX_BATCH:
                    break
                size += n
                (points if kind == "p" else fields).append(q.popleft()[1])
            job = ("points", (fields, points))
        if not q:
            del self.runs[key]
        self.claimed.add(key)
        return job

    def _next(self) -> tuple[str, str, Any] | None:
        """The next job for a thread (the lock held): (kind, run key, call or points)."""
        if self.t.offline and self.t.failed and time.monotonic() >= self.retry_at:
            # every few seconds, the calls the store refused try again (the first one tells whether it is back)
            self.t.offline = False
            for what, fn in self.t.failed:
                self._queue("", ("c", (what, fn)))
            self.t.failed.clear()
        waiting = time.monotonic() < self.retry_at  # the store failed a write: points wait a few seconds
        urgent = self.flushing > 0 or self.stopping
        now_ms = time.time() * 1000
        for key, q in self.runs.items():
            if key in self.claimed or not q:
                continue
            kind, item = q[0]
            if kind != "c" and (waiting or self._run_id(key) is None):
                continue
            if kind == "f":  # params and tags: with the points after them, or alone before a call, or once old
                due = len(q) > 1 or now_ms - item[1] >= self.linger_s * 1000
            else:
                due = kind == "c" or now_ms - item[2] >= self.linger_s * 1000 or len(q) * len(item[3]) >= _MAX_BATCH
            if due or urgent:
                kind, job = self._take(key)
                return kind, key, job
        return None

    def _loop(self, saves: bool) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.t.uri)
        while True:
            with self.cond:
                job = self._next()
                while job is None and not self.stopping and not (saves and self._save_due()):
                    self.cond.wait(timeout=0.5)
                    job = self._next()
                if job is None and self.stopping:
                    return
            if saves and self._save_due():  # between jobs too: under a steady backlog there is no idle moment
                self._write_state()
            if job is None:
                continue
            kind, key, item = job
            if kind == "call":
                self._call(key, *item)
            else:
                self._write(client, key, *item)

    def _call(self, key: str, what: str, fn: Callable[[], Any]) -> None:
        """Make a queued call; when it fails, or the store is offline, queue it as ``Tracker.call`` does."""
        failed = self.t.offline
        if not failed:
            try:
                fn()
            except Exception:
                failed = self.t.offline = True
        with self.cond:
            if failed:
                self.t.failed.append((what, fn))
                self.retry_at = max(self.retry_at, time.monotonic() + 5.0)
            self.claimed.discard(key)
            self.cond.notify_all()

    def _write(
        self,
        client: Any,
        key: str,
        fields: list[tuple[int, int, dict[str, str], dict[str, str]]],
        points: list[tuple[int, int, int, dict[str, float]]],
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        metrics = [Metric(k, float(v), ts, step) for _, step, ts, m in points for k, v in m.items()]
        params: dict[str, str] = {}
        tags: dict[str, str] = {}
        for _, _, fp, ft in fields:  # in order: a tag set again keeps its last value
            params.update(fp)
            tags.update(ft)
        param_list = [Param(k, str(v)) for k, v in sorted(params.items())]
        tag_list = [RunTag(k, str(v)) for k, v in sorted(tags.items())]
        ok = True
        try:
            run_id = self._run_id(key)
            assert run_id is not None
            while True:  # one call unless there are more than 1000 entities (or 100 params, or 100 tags)
                ps, param_list = param_list[:_MAX_FIELDS], param_list[_MAX_FIELDS:]
                ts, tag_list = tag_list[:_MAX_FIELDS], tag_list[_MAX_FIELDS:]
                room = _MAX_BATCH - len(ps) - len(ts)
                ms, metrics = metrics[:room], metrics[room:]
                client.log_batch(run_id, metrics=ms, params=ps, tags=ts)
                if not param_list and not tag_list and not metrics:
                    break
        except Exception:
            ok = False
        with self.cond:
            self.claimed.discard(key)
            if ok:
                self.done.update(n for n, _, _, _ in points)
                self.done.update(n for n, _, _, _ in fields)
                self.points -= len(points)
                self.written += len(points)
                self._acknowledge()
                if self.t.offline:  # the store answers again: the calls it refused go now
                    self.retry_at = 0.0
            else:  # back to the front (fields first: all of it goes together again), and the store gets a few seconds
                q = self.runs.get(key)
                if q is None:
                    q = self.runs[key] = deque()
                    self.runs.move_to_end(key, last=False)
                q.extendleft(reversed([("f", f) for f in fields] + [("p", p) for p in points]))
                self.t.offline = True
                self.retry_at = time.monotonic() + 5.0
            self.cond.notify_all()

    def _acknowledge(self) -> None:
        """Record in the journal how far every point is written; start the journal again when it is large and
        everything in it is written (the state, with ``last_epoch``, written first)."""
        while self.order and self.order[0] in self.done:
            self.done.discard(self.order.popleft())
        ack = self.order[0] - 1 if self.order else self.seq
        if ack <= self.acked:
            return
        self.acked = ack
        self.journal.write(f'{{"a":{ack}}}\n')
        self.journal.flush()
        if not self.order and self.journal.tell() > self.max_journal_bytes:
            self._write_state()
            self.journal.close()
            self.journal = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
            self.journal.write(f'{{"a":{ack}}}\n')
            self.journal.flush()

    def _write_state(self) -> None:
        self.dirty = False
        self.saved_at = time.monotonic()
        self.t.save(now=True)

    def _save_due(self) -> bool:
        return self.dirty and time.monotonic() - self.saved_at > 2.0


def end_calls(t: Tracker, key: str, name: str, end: dict[str, Any]) -> None:
    """The calls of a run's end (``Tracker.end``), made or queued in order: the checkpoint, the error, the status;
    once the status is written the end leaves the state."""
    path, reason, status = end["path"], end["reason"], str(end["status"])
    if status == "FINISHED" and path and os.path.isdir(path):
        t.trial_call(key, f"checkpoint of {name}", lambda run: t.artifacts.log_artifacts(run, path, "checkpoint"))
    elif path:
        t.trial_call(key, f"checkpoint uri of {name}", lambda run: t.client.set_tag(run, "dedn.checkpoint", path))
    if end.get("epochs"):
        e = end["epochs"]
        t.trial_call(
            key,
            f"epochs of {name}",
            lambda run: log_epochs(t.artifacts, run, e["file"], e["member"], e["prefixes"], t.dir),
        )
    if reason:
        t.trial_call(key, f"error of {name}", lambda run: t.client.set_tag(run, "dedn.error", reason[:MAX_TAG]))

    def terminate(run: str) -> None:
        t.client.set_terminated(run, status=status)
        with t.lock:
            t.state.get("ends", {}).pop(key, None)
        t.save()

    t.trial_call(key, f"status of {name}", terminate)
