"""MLflow as a sink (tracking.sink.RunSink): every point reaches MLflow once, in step order, with the fewest requests
a run can take; a driver killed with points queued loses nothing that a sync from the record does not bring back,
and nothing is stored twice. Real MLflow: the embedded SQLite store, and a real ``mlflow server``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import ROOT, free_port, new_store, wait_for
from tracking.sink import Row, RunSink, SinkProcess, rows_batches
from tuning.tracking_callback import RecordRows

KEYS = ("t0-m0", "t0-m1", "t1")
EPOCHS = 30


def row(key: str, epoch: int) -> Row:
    """An epoch's metrics, distinct per run and epoch (the value tells which point it was), stamped as the record
    would stamp it."""
    base = KEYS.index(key) * 1000 + epoch
    metrics = {"val_H": base + 0.5, "val_U": base + 0.25, "loss_total": 1.0 / epoch}
    return Row(epoch, 1_800_000_000_000 + 1000 * epoch, metrics)


def open_sink(uri: str, **kw: Any) -> RunSink:
    sink = RunSink(uri, "sink", **kw)
    sink.open_parent({"dedn.dataset": "tiny"})
    return sink


def history(uri: str, sink: RunSink, key: str, metric: str = "val_H") -> list[tuple[int, float]]:
    rows = MlflowClient(tracking_uri=uri).get_metric_history(sink.runs()[key].info.run_id, metric)
    return sorted((int(m.step), float(m.value)) for m in rows)


def expected(key: str, epochs: range) -> list[tuple[int, float]]:
    return [(e, row(key, e).metrics["val_H"]) for e in epochs]


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_every_point_arrives_once_in_order(
    tmp_path: Path, empty_store: Path, store: str, request: pytest.FixtureRequest
) -> None:
    """Into the embedded SQLite store, and through a real ``mlflow server`` (the default tier's one)."""
    uri = request.getfixturevalue("server") if store == "server" else new_store(empty_store, tmp_path / "mlflow.db")
    sink = open_sink(uri, threads=3, linger_s=0.2)
    for key in KEYS:  # queued: a run's creation comes first, its points wait for it
        sink.create(key, f"trial-{key}", {"optim.lr": 0.001, "model.clusters": "half"}, {"optuna.trial_number": "3"})
    for epoch in range(1, EPOCHS + 1):
        for key in KEYS:
            sink.log(key, row(key, epoch), f"epoch {epoch}")
    final = Row(12, row(KEYS[0], 12).timestamp, {"best_val_H": 7.0})
    sink.end(KEYS[0], "FINISHED", final, {"dedn.stopped": "by ASHA"}, list, None, "end")
    assert sink.close(timeout_s=60) == [] and sink.points == 0
    runs = RunSink(uri, "sink")
    runs.open_parent({})
    found = runs.runs()
    assert sorted(found) == sorted(KEYS)
    for key in KEYS:
        assert history(uri, runs, key) == expected(key, range(1, EPOCHS + 1))
        assert found[key].data.params == {"optim.lr": "0.001", "model.clusters": "half"}
        assert found[key].data.tags["optuna.trial_number"] == "3"
        assert found[key].data.tags["mlflow.parentRunId"] == runs.parent_id
    assert history(uri, runs, KEYS[2], "loss_total") == [(e, 1.0 / e) for e in range(1, EPOCHS + 1)]
    ended = found[KEYS[0]]
    assert ended.info.status == "FINISHED" and ended.data.metrics["best_val_H"] == 7.0
    assert ended.data.tags["dedn.stopped"] == "by ASHA"
    runs.close(timeout_s=5)


def test_a_point_sent_twice_is_stored_once_and_a_sync_adds_only_what_is_missing(
    tmp_path: Path, empty_store: Path
) -> None:
    """The record's timestamps make a batch sent again (a retry after a timeout the store had committed) the same
    rows; a sync reads the run's history and sends only the steps it lacks."""
    uri = new_store(empty_store, tmp_path / "mlflow.db")
    sink = open_sink(uri, linger_s=0.0)
    sink.create("t1", "trial-000", {}, {})
    for epoch in (1, 2, 3, 3, 2):  # epochs 3 and 2 sent again
        sink.log("t1", row("t1", epoch), "epoch")
    sink.flush(timeout_s=60)
    assert history(uri, sink, "t1") == expected("t1", range(1, 4))
    sink.sync("t1", lambda: [row("t1", e) for e in range(1, 9)], "sync")
    sink.flush(timeout_s=60)
    assert history(uri, sink, "t1") == expected("t1", range(1, 9))
    sink.close(timeout_s=30)


def test_points_over_the_limit_are_dropped_and_the_end_syncs_them_from_the_record(
    tmp_path: Path, empty_store: Path
) -> None:
    uri = new_store(empty_store, tmp_path / "mlflow.db")
    sink = open_sink(uri, linger_s=3600.0, max_points=5)
    sink.create("t1", "trial-000", {}, {})
    for epoch in range(1, 13):
        sink.log("t1", row("t1", epoch), "epoch")
    assert sink.points == 5 and "t1" in sink.dirty  # the rest was dropped, the run marked
    record = [row("t1", e) for e in range(1, 13)]
    sink.end("t1", "FINISHED", None, {}, lambda: record, None, "end")
    assert sink.close(timeout_s=60) == []
    again = RunSink(uri, "sink")
    again.open_parent({})
    assert history(uri, again, "t1") == expected("t1", range(1, 13))
    again.close(timeout_s=5)


def test_a_member_run_costs_two_requests_besides_its_batches(
    tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creation (with its tags, the end's too when they are queued with it) and the end's status: every other call on a
    run is a ``log_batch``, its params with its first points and its final metrics with its last ones, no tags (a
    ``log_batch`` with tags commits them apart). Each MlflowClient call is counted (and made), and each commit: the
    sink writes a database through ``tracking.mlflow_store``'s store, one transaction per call."""
    import sqlalchemy

    from tracking.mlflow_store import served

    uri = new_store(empty_store, tmp_path / "mlflow.db")
    MlflowClient(tracking_uri=served(uri))  # the store made (and cached by MLflow) here: its set-up commits come first
    sink = open_sink(uri, threads=1, linger_s=3600.0)
    commits: list[Any] = []

    def committed(connection: Any) -> None:
        commits.append(connection)

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "commit", committed)
    calls: list[str] = []
    batch_tags: list[Any] = []
    for name in ("create_run", "log_batch", "set_terminated", "update_run", "log_artifact", "get_run", "search_runs"):
        original = getattr(MlflowClient, name)

        def counted(self: Any, *a: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls.append(_name)
            batch_tags.extend(kw.get("tags") or [] if _name == "log_batch" else [])
            return _original(self, *a, **kw)

        monkeypatch.setattr(MlflowClient, name, counted)
    sink.create("t0-m3", "trial-000-m3", {"optim.lr": 0.001}, {"dedn.member": "3"})
    for epoch in range(1, 21):
        sink.log("t0-m3", row("t0-m0", epoch), "epoch")
    final = Row(20, row("t0-m0", 20).timestamp, {"best_val_H": 20.5})
    sink.end("t0-m3", "FINISHED", final, {"dedn.stopped": "x"}, list, None, "end")
    assert sink.close(timeout_s=60) == []
    sqlalchemy.event.remove(sqlalchemy.engine.Engine, "commit", committed)
    assert calls == ["create_run", "log_batch", "set_terminated"], calls
    assert len(commits) == 3  # MLflow's own store: 6 (an experiment read, params and metrics apart)
    monkeypatch.undo()
    assert history(uri, sink, "t0-m3") == [(e, 0.5 + e) for e in range(1, 21)]
    assert [t for t in batch_tags if not t.key.startswith("mlflow.")] == []
    run = MlflowClient(tracking_uri=uri).get_run(sink.runs()["t0-m3"].info.run_id)
    assert run.data.tags["dedn.member"] == "3" and run.data.tags["dedn.stopped"] == "x"
    assert run.data.params == {"optim.lr": "0.001"} and run.data.metrics["best_val_H"] == 20.5
    assert run.info.status == "FINISHED"


def test_tags_sent_after_a_run_was_made_still_arrive_in_order(tmp_path: Path, empty_store: Path) -> None:
    """A run made before its later tags were queued: they go with its points; a tag set twice keeps the last value,
    whichever call carried it."""
    uri = new_store(empty_store, tmp_path / "mlflow.db")
    sink = open_sink(uri, threads=1, linger_s=0.0)
    sink.create("t1", "trial-001", {}, {"dedn.note": "made"})
    assert sink.flush(timeout_s=60) == []
    sink.tags("t1", {"dedn.note": "changed", "dedn.retries": "1"}, "retry")
    sink.log("t1", row("t1", 1), "epoch")
    sink.end("t1", "FINISHED", None, {"dedn.note": "ended"}, list, None, "end")
    sink.create("t0-m0", "trial-000-m0", {}, {"dedn.note": "made"})  # made with its later tags, in their order
    sink.tags("t0-m0", {"dedn.note": "changed", "dedn.retries": "2"}, "retry")
    sink.end("t0-m0", "KILLED", None, {"dedn.note": "ended"}, list, None, "end")
    assert sink.close(timeout_s=60) == []
    client = MlflowClient(tracking_uri=uri)
    for key, retries, status in (("t1", "1", "FINISHED"), ("t0-m0", "2", "KILLED")):
        run = client.get_run(sink.runs()[key].info.run_id)
        assert (run.data.tags["dedn.note"], run.data.tags["dedn.retries"], run.info.status) == (
            "ended",
            retries,
            status,
        )


def test_batches_keep_a_step_whole_and_within_mlflows_limits() -> None:
    rows = [Row(e, 1000 * e, {f"m{i}": float(i) for i in range(300)}) for e in range(1, 8)]
    params = {f"p{i}": str(i) for i in range(150)}
    batches = rows_batches(rows, params, {"t": "x"})
    assert all(len(m) + len(p) + len(t) <= 1000 and len(p) <= 100 and len(t) <= 100 for m, p, t in batches)
    steps = [{m.step for m in metrics} for metrics, _, _ in batches]
    per_step = [sum(1 for metrics, _, _ in batches for m in metrics if m.step == e) for e in range(1, 8)]
    assert per_step == [300] * 7
    assert all(len([s for s in steps if e in s]) == 1 for e in range(1, 8))  # never split
    assert sorted(p.key for _, ps, _ in batches for p in ps) == sorted(params)


_KILLED_DRIVER = textwrap.dedent(
    """
    import sys, time
    from tracking.sink import Row, RunSink
    uri = sys.argv[1]
    sink = RunSink(uri, "sink", linger_s=0.0)
    sink.open_parent({})
    sink.create("t1", "trial-000", {}, {})
    for epoch in range(1, 41):
        sink.log("t1", Row(epoch, 1_800_000_000_000 + 1000 * epoch, {"val_H": 2000.5 + epoch}), "epoch")
        if epoch == 10:
            sink.flush(timeout_s=60)
            print("written", flush=True)
        time.sleep(0.05)
    time.sleep(60)
    """
)


def test_a_killed_drivers_points_come_back_from_the_record_once(tmp_path: Path, empty_store: Path) -> None:
    """SIGKILL a process whose sink is sending: what it sent is kept, what it held is lost with it; a sync from the
    record (what a resumed search makes) then brings the run up to date, every epoch once."""
    uri = new_store(empty_store, tmp_path / "mlflow.db")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_DRIVER, uri], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    sink = RunSink(uri, "sink")
    sink.open_parent({})
    before = history(uri, sink, "t1")
    assert [s for s, _ in before][:10] == list(range(1, 11))
    sink.runs()
    sink.sync(
        "t1",
        lambda: [Row(e, 1_800_000_000_000 + 1000 * e, {"val_H": 2000.5 + e}) for e in range(1, 41)],
        "sync",
    )
    assert sink.close(timeout_s=60) == []
    again = RunSink(uri, "sink")
    again.open_parent({})
    assert history(uri, again, "t1") == [(e, 2000.5 + e) for e in range(1, 41)]
    again.close(timeout_s=5)


def test_a_store_that_goes_away_is_reported_not_waited_for(tmp_path: Path, server: str) -> None:
    """Calls to a store that stops answering are kept and tried again; ``close`` gives up after its stall time and
    names what was not logged, instead of holding the search."""
    dead = f"http://127.0.0.1:{free_port()}"
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        sink = RunSink(dead, "sink", experiment_id="0", parent_id="p", linger_s=0.0)
        sink.create("t1", "trial-000", {}, {})
        sink.log("t1", row("t1", 1), "epoch 1")
        left = wait_for(lambda: sink.flush(timeout_s=30, stall_s=2) or None, 60, "a flush that gives up")
        assert left == ["run of trial-000", "params of trial-000", "1 metric points"]
        sink.close(timeout_s=0)
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)


def test_a_sink_process_writes_every_point_once_and_ends_when_closed_not_on_the_drivers_signals(
    tmp_path: Path, empty_store: Path
) -> None:
    """The search's sink in a process of its own: Ctrl-C and SIGTERM (which reach the driver's whole group) leave it
    sending; ``close`` sends what is queued, and the process exits."""
    uri = new_store(empty_store, tmp_path / "mlflow.db")
    parent = open_sink(uri)
    sink = SinkProcess(uri, "sink", experiment_id=str(parent.experiment_id), parent_id=str(parent.parent_id))
    # the tracking URI (a database URI may carry a password) is not on a command line other users can read
    assert uri not in Path(f"/proc/{sink.process.pid}/cmdline").read_text()
    for key in KEYS:
        sink.create(key, f"trial-{key}", {"optim.lr": 0.001}, {})
    for epoch in range(1, EPOCHS + 1):
        for key in KEYS:
            sink.log(key, row(key, epoch), f"epoch {epoch}")
        if epoch == 5:
            for sig in (signal.SIGINT, signal.SIGTERM):
                os.kill(sink.process.pid, sig)
    record = tmp_path / "result.json"  # what Tune saved of run t1: three epochs more than were logged
    lines = [{"epoch": e, "timestamp": row("t1", e).timestamp // 1000, **row("t1", e).metrics} for e in range(1, 34)]
    record.write_text("".join(json.dumps(line) + "\n" for line in lines))
    sink.sync(KEYS[2], RecordRows(str(record), None, None, False), "sync")
    sink.end(KEYS[0], "FINISHED", None, {"dedn.stopped": "by ASHA"}, list, None, "end")
    assert sink.flush(timeout_s=60) == [] and sink.process.poll() is None
    assert sink.counts() == (0, len(KEYS) * EPOCHS, sink.counts()[2])
    assert sink.close(timeout_s=60) == [] and sink.process.returncode == 0
    found = parent.runs()
    assert sorted(found) == sorted(KEYS) and found[KEYS[0]].info.status == "FINISHED"
    for key in KEYS[:2]:
        assert history(uri, parent, key) == expected(key, range(1, EPOCHS + 1))
    assert history(uri, parent, KEYS[2]) == expected(KEYS[2], range(1, EPOCHS + 4))
    parent.close(timeout_s=5)


_DRIVER_WITH_PROCESS = textwrap.dedent(
    """
    import sys, time
    from tracking.sink import RunSink, SinkProcess
    parent = RunSink(sys.argv[1], "sink", threads=0)
    parent.open_parent({})
    sink = SinkProcess(sys.argv[1], "sink", experiment_id=parent.experiment_id, parent_id=parent.parent_id)
    print(sink.process.pid, flush=True)
    time.sleep(120)
    """
)


def test_a_sink_process_ends_at_once_with_a_killed_driver(tmp_path: Path, empty_store: Path) -> None:
    """SIGKILL the driver: its sink's process sees its pipe close and exits, so that it cannot write beside the
    driver that resumes the search (that one brings the runs up to date from the record)."""
    uri = new_store(empty_store, tmp_path / "mlflow.db")
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER_WITH_PROCESS, uri], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert Path(f"/proc/{child}").exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not _alive(child) or None, 30, "the sink's process to exit")
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
