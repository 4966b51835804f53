"""The tracker's background writer (tracking.runs.Tracker.start): every queued metric point reaches MLflow exactly
once, in step order, and a driver killed with points queued leaves them to the next tracker on the folder, which
writes each of them once. Real MLflow: the embedded SQLite store in a temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import ROOT, new_store
from tracking.runs import JOURNAL_FILE, RUNS_FILE, Tracker

KEYS = ("t0-m0", "t0-m1", "t1-m0")


@pytest.fixture(autouse=True)
def _store(tmp_path: Path, empty_store: Path) -> None:
    """``new_tracker``'s SQLite store, a copy of an empty one (creating MLflow's tables takes seconds)."""
    new_store(empty_store, tmp_path / "mlflow.db")


EPOCHS = 30


def record(key: str, epoch: int) -> dict[str, float]:
    """An epoch's metrics, distinct per run and epoch (the value tells which point it was)."""
    base = KEYS.index(key) * 1000 + epoch
    return {"val_H": base + 0.5, "val_U": base + 0.25, "loss_total": 1.0 / epoch, "epoch_seconds": 2.0}


def new_tracker(tmp_path: Path, uri: str | None = None) -> Tracker:
    """A tracker on ``tmp_path/exp``, logging to ``uri`` (default: SQLite in ``tmp_path``)."""
    exp = tmp_path / "exp"
    exp.mkdir(exist_ok=True)
    return Tracker(uri or f"sqlite:///{tmp_path / 'mlflow.db'}", exp, "writer")


def make_runs(t: Tracker, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("num_samples: 1\n")
    t.parent({}, str(spec))
    for key in KEYS:
        t.child(key, f"trial-{key}", {"optim.lr": 0.001})


def histories(tmp_path: Path, metric: str = "val_H", uri: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every row MLflow holds for ``metric``, per run key, in the order MLflow returns them."""
    state = json.loads((tmp_path / "exp" / RUNS_FILE).read_text())
    client = MlflowClient(tracking_uri=uri or f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = {}
    for key in KEYS:
        rows = client.get_metric_history(state["trials"][key], metric)
        out[key] = sorted((int(m.step), float(m.value)) for m in rows)
    return out


def expected(epochs: range) -> dict[str, list[tuple[int, float]]]:
    return {k: [(e, record(k, e)["val_H"]) for e in epochs] for k in KEYS}


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_every_point_arrives_once_in_order(tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    """Into the embedded SQLite store, and through a real ``mlflow server`` (the default tier's one)."""
    uri = request.getfixturevalue("server") if store == "server" else None
    t = new_tracker(tmp_path, uri)
    t.start(threads=3, linger_s=0.2)
    make_runs(t, tmp_path)  # queued: the writer creates the runs before it writes their points
    for epoch in range(1, EPOCHS + 1):
        for key in KEYS:
            assert t.epoch_metrics(key, record(key, epoch), epoch, f"epoch {epoch}")
    assert not t.epoch_metrics(KEYS[0], record(KEYS[0], 3), 3, "again")  # an epoch is logged once
    t.trial_metrics(KEYS[0], {"best_val_H": 7.0}, 12, "final")
    t.trial_call(KEYS[0], "status", lambda run: t.client.set_terminated(run, status="FINISHED"))
    assert t.close(timeout_s=60) == 0
    assert t.failed == [] and t.backlog == 0
    assert histories(tmp_path, uri=uri) == expected(range(1, EPOCHS + 1))
    assert histories(tmp_path, "loss_total", uri)[KEYS[2]] == [(e, 1.0 / e) for e in range(1, EPOCHS + 1)]
    client = MlflowClient(tracking_uri=t.uri)
    run = client.get_run(t.run_of(KEYS[0]))
    assert run.info.status == "FINISHED" and run.data.metrics["best_val_H"] == 7.0
    # the journal says everything is written: a new tracker on the folder writes nothing again
    t2 = new_tracker(tmp_path, uri)
    t2.start(linger_s=0.0)
    assert t2.backlog == 0
    t2.close(timeout_s=30)
    assert histories(tmp_path, uri=uri) == expected(range(1, EPOCHS + 1))
    # and it knows the epochs logged: a retried trial's old epochs are not logged again
    assert not t2.epoch_metrics(KEYS[1], record(KEYS[1], EPOCHS), EPOCHS, "retried")


def test_points_written_but_not_recorded_are_written_once(tmp_path: Path) -> None:
    """A driver that dies after MLflow took a batch but before the journal recorded it: the next tracker writes
    those points again, and MLflow keeps one row per point (same key, step, timestamp and value)."""
    t = new_tracker(tmp_path)
    make_runs(t, tmp_path)
    t.start(threads=2, linger_s=0.0)
    for epoch in range(1, 11):
        for key in KEYS:
            t.epoch_metrics(key, record(key, epoch), epoch, "epoch")
    t.close(timeout_s=60)
    journal = tmp_path / "exp" / JOURNAL_FILE
    lines = journal.read_text().splitlines()
    journal.write_text("".join(line + "\n" for line in lines if not line.startswith('{"a"')))
    t2 = new_tracker(tmp_path)
    t2.start(linger_s=0.0)
    assert t2.backlog == 10 * len(KEYS)  # all of them replayed
    assert t2.close(timeout_s=60) == 0
    assert histories(tmp_path) == expected(range(1, 11))


DRIVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tracking.runs import Tracker
    from tests.tracking.test_tracking_writer import KEYS, LATE_PARAMS, make_runs, new_tracker, record

    tmp = Path({tmp!r})
    t = new_tracker(tmp)
    make_runs(t, tmp)  # the runs exist before the writer starts
    t.start(threads=2, linger_s=3600.0)  # nothing is old enough to be written: all of it stays queued
    for epoch in range(1, {epochs} + 1):
        for key in KEYS:
            t.epoch_metrics(key, record(key, epoch), epoch, "epoch")
    {ends}
    print("queued", t.backlog, flush=True)
    time.sleep(600)
    """
)

# the tracking callback ends trial KEYS[0]: its end calls queue behind the run's lingering points; a run created
# through the writer has its params journaled and queued, to go with its first points, when the driver dies
ENDS = """
t.end(KEYS[0], "trial-0", "FINISHED", None, None)
t.tags(KEYS[1], {"dedn.stopped": "stopped at epoch 30"}, "stop")
t.child("late", "trial-late", LATE_PARAMS, texts={"trial_config.yaml": "optim:\\n  lr: 0.002\\n"})
while "late" not in t.state["trials"] or t._writer.claimed:
    time.sleep(0.05)
"""
LATE_PARAMS = {"optim.lr": 0.002, "loss.beta": 0.5}


def test_killed_driver_backlog_is_replayed_exactly_once(tmp_path: Path) -> None:
    """The driver is killed with every point queued and one run ended (Tune reports a trial's end once, and not
    again after a resume): the next tracker started on the folder writes each point once and ends that run."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER.format(root=str(ROOT), tmp=str(tmp_path), epochs=EPOCHS, ends=ENDS)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # MLflow's table creation lines
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "" if it died: then the assertion shows it
        assert line.strip() == f"queued {EPOCHS * len(KEYS)}", (line, proc.poll())
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies with its backlog
        proc.wait(timeout=30)
    assert histories(tmp_path) == {k: [] for k in KEYS}  # nothing was written before the kill
    state = json.loads((tmp_path / "exp" / RUNS_FILE).read_text())
    assert state["ends"] == {KEYS[0]: {"status": "FINISHED", "reason": None, "path": None, "epochs": None}}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(state["trials"][KEYS[0]]).info.status == "RUNNING"  # the kill came before the status
    # the run the writer created is in the journal; the state file follows within ~2 s, and here it had not
    # (as if the kill came first: taken out of the file)
    (late,) = [r.info.run_id for r in client.search_runs([state["experiment_id"]], "tags.`dedn.trial_id` = 'late'")]
    state["trials"].pop("late", None)
    (tmp_path / "exp" / RUNS_FILE).write_text(json.dumps(state))
    assert client.get_run(late).data.params == {}  # queued for the run's first points: in the journal only
    assert "dedn.stopped" not in client.get_run(state["trials"][KEYS[1]]).data.tags  # queued behind its points
    assert [a.path for a in client.list_artifacts(late)] == ["trial_config.yaml"]  # uploaded with its creation
    t = new_tracker(tmp_path)
    t.start(threads=2, linger_s=0.0)
    assert t.backlog == EPOCHS * len(KEYS) and t.run_of("late") == late  # known from the journal, not created again
    # the epochs in the journal count as logged: the resumed trial's repeated reports are not logged again
    assert not t.epoch_metrics(KEYS[0], record(KEYS[0], 5), 5, "repeated after resume")
    assert t.epoch_metrics(KEYS[0], record(KEYS[0], EPOCHS + 1), EPOCHS + 1, "next epoch")
    assert t.close(timeout_s=60) == 0
    got = histories(tmp_path)
    want = expected(range(1, EPOCHS + 1))
    want[KEYS[0]].append((EPOCHS + 1, record(KEYS[0], EPOCHS + 1)["val_H"]))
    assert got == want
    assert client.get_run(late).data.params == {k: str(v) for k, v in LATE_PARAMS.items()}
    assert json.loads((tmp_path / "exp" / RUNS_FILE).read_text())["trials"]["late"] == late
    assert client.get_run(state["trials"][KEYS[1]]).data.tags["dedn.stopped"] == "stopped at epoch 30"
    statuses = {k: client.get_run(state["trials"][k]).info.status for k in KEYS}
    assert statuses == {KEYS[0]: "FINISHED", KEYS[1]: "RUNNING", KEYS[2]: "RUNNING"}
    assert json.loads((tmp_path / "exp" / RUNS_FILE).read_text())["ends"] == {}  # done: not made again
    # a third tracker finds nothing left to write
    t3 = new_tracker(tmp_path)
    t3.start(linger_s=0.0)
    assert t3.backlog == 0
    t3.close(timeout_s=30)
    assert histories(tmp_path) == want


def test_points_wait_for_the_run_the_writer_creates(tmp_path: Path) -> None:
    """A run created through the writer (queued) gets its points once it exists, each once."""
    t = new_tracker(tmp_path)
    make_runs(t, tmp_path)
    t.start(threads=2, linger_s=0.0)
    t.child("late", "trial-late", {})  # created by the writer, in order, before its points
    t0 = time.monotonic()
    for epoch in range(1, 6):
        t.epoch_metrics("late", {"val_H": float(epoch)}, epoch, "epoch")
    assert t.close(timeout_s=60) == 0 and time.monotonic() - t0 < 30
    client = MlflowClient(tracking_uri=t.uri)
    rows = client.get_metric_history(t.run_of("late"), "val_H")
    assert sorted((m.step, m.value) for m in rows) == [(e, float(e)) for e in range(1, 6)]


def test_a_created_run_needs_no_lookup_and_its_params_and_tags_go_with_its_points(
    tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a real ``mlflow server``, every request the tracker makes is recorded (and made): a run the writer
    creates is never fetched (its artifact location came with ``create_run``'s answer), its params travel in
    the same ``log_batch`` as its first points and its tags with its last: no request carries them alone."""
    import mlflow.store.artifact.http_artifact_repo as http_artifacts
    import mlflow.utils.rest_utils as rest

    calls: list[tuple[str, str, dict[str, Any]]] = []

    def recorded(original: Any) -> Any:
        def request(*args: Any, **kwargs: Any) -> Any:
            endpoint = kwargs.get("endpoint", args[1] if len(args) > 1 else "")
            method = kwargs.get("method", args[2] if len(args) > 2 else "")
            calls.append((str(method), str(endpoint), dict(kwargs.get("json") or {})))
            return original(*args, **kwargs)

        return request

    monkeypatch.setattr(rest, "http_request", recorded(rest.http_request))
    monkeypatch.setattr(http_artifacts, "http_request", recorded(http_artifacts.http_request))
    t = new_tracker(tmp_path, server)
    spec = tmp_path / "spec.yaml"
    spec.write_text("num_samples: 1\n")
    t.parent({}, str(spec))
    t.start(threads=2, linger_s=2.0)
    calls.clear()
    params = {k: {"optim.lr": 0.001 * (i + 1), "loss.beta": 0.5} for i, k in enumerate(KEYS)}
    for key in KEYS:
        t.child(
            key, f"trial-{key}", params[key], texts={"trial_config.yaml": f"optim:\n  lr: {params[key]['optim.lr']}\n"}
        )
    end = time.monotonic() + 30
    while not all(k in t.state["trials"] for k in KEYS) and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.5)  # the runs exist and their params wait for the first epoch, as in a search
    for epoch in range(1, 4):
        for key in KEYS:
            t.epoch_metrics(key, record(key, epoch), epoch, "epoch")
    for key in KEYS:  # queued behind the run's last points: written with them
        t.tags(key, {"dedn.stopped": "first", "other": "x"}, "tag")
        t.tags(key, {"dedn.stopped": f"stopped {key}"}, "tag again")  # the last value is kept
    t.end_all([(key, f"trial-{key}", "FINISHED", None, None, None) for key in KEYS])
    assert t.close(timeout_s=60) == 0 and t.failed == []
    monkeypatch.undo()
    assert not [c for c in calls if c[1].endswith("/runs/get")]
    assert len([c for c in calls if c[1].endswith("/runs/create")]) == len(KEYS)
    batches = [c[2] for c in calls if c[1].endswith("/runs/log-batch")]
    with_params = {b["run_id"]: b for b in batches if b.get("params")}
    assert set(with_params) == {t.run_of(k) for k in KEYS}  # once per run ...
    assert sum(1 for b in batches if b.get("params")) == len(KEYS)
    assert all(b.get("metrics") for b in batches)  # params and tags never go alone
    client = MlflowClient(tracking_uri=server)
    for key in KEYS:
        run = client.get_run(t.run_of(key))
        assert run.data.params == {k: str(v) for k, v in params[key].items()} and run.info.status == "FINISHED"
        assert run.data.tags["dedn.stopped"] == f"stopped {key}" and run.data.tags["other"] == "x"
        config = client.download_artifacts(run.info.run_id, "trial_config.yaml", str(tmp_path))
        assert Path(config).read_text() == f"optim:\n  lr: {params[key]['optim.lr']}\n"
    assert histories(tmp_path, uri=server) == expected(range(1, 4))


def test_uploads_to_a_created_run_lay_out_artifacts_as_the_client_does(tmp_path: Path) -> None:
    """The tracker's uploads (``Tracker.artifacts``) to a run it created go straight to its artifact repository;
    to a run it did not create, through ``MlflowClient``. Both give the layout ``MlflowClient`` gives."""
    t = new_tracker(tmp_path)
    make_runs(t, tmp_path)  # created here: remembered
    client = MlflowClient(tracking_uri=t.uri)
    own = t.run_of(KEYS[0])
    other = client.create_run(t.state["experiment_id"]).info.run_id  # not remembered
    reference = client.create_run(t.state["experiment_id"]).info.run_id
    folder = tmp_path / "ckpt"
    (folder / "inner").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "inner" / "b.txt").write_text("b")
    assert own in t.artifacts.repos and other not in t.artifacts.repos
    for run in (own, other):
        t.artifacts.log_artifacts(run, str(folder), "checkpoint")
        t.artifacts.log_artifact(run, str(folder), "copy")
        t.artifacts.log_artifact(run, str(folder / "a.txt"))
        t.artifacts.log_text(run, "x: 1\n", "sub/config.yaml")
    client.log_artifacts(reference, str(folder), "checkpoint")
    client.log_artifact(reference, str(folder), "copy")
    client.log_artifact(reference, str(folder / "a.txt"))
    client.log_text(reference, "x: 1\n", "sub/config.yaml")

    def tree(run: str, path: str | None = None) -> list[tuple[str, bool]]:
        out = []
        for f in client.list_artifacts(run, path):
            out.append((f.path, f.is_dir))
            if f.is_dir:
                out += tree(run, f.path)
        return out

    want = tree(reference)
    assert ("copy/ckpt/inner/b.txt", False) in want and ("sub/config.yaml", False) in want
    assert tree(own) == want and tree(other) == want
    assert not list(t.dir.glob(".text-*"))  # the temporary folders are gone


def test_a_batch_over_mlflow_limits_is_split(tmp_path: Path) -> None:
    """150 params, 120 tags and 1,200 metrics queued for one run (MLflow takes at most 100 params, 100 tags and
    1,000 entities per log_batch): all of it arrives."""
    t = new_tracker(tmp_path)
    make_runs(t, tmp_path)
    t.start(threads=1, linger_s=3600.0)
    key = KEYS[0]
    t.tags(key, {f"tag{i}": str(i) for i in range(120)}, "tags")
    assert t._writer is not None
    t._writer.add_fields(key, params={f"p{i:03d}": str(i) for i in range(150)})
    for epoch in range(1, 5):
        t.epoch_metrics(key, {f"m{i:03d}": float(epoch * 1000 + i) for i in range(300)}, epoch, "epoch")
    assert t.close(timeout_s=60) == 0 and t.failed == []
    run = MlflowClient(tracking_uri=t.uri).get_run(t.run_of(key))
    assert run.data.params == {"optim.lr": "0.001", **{f"p{i:03d}": str(i) for i in range(150)}}
    assert {k: v for k, v in run.data.tags.items() if k.startswith("tag")} == {f"tag{i}": str(i) for i in range(120)}
    assert run.data.metrics == {f"m{i:03d}": float(4000 + i) for i in range(300)}
    rows = MlflowClient(tracking_uri=t.uri).get_metric_history(t.run_of(key), "m299")
    assert sorted((m.step, m.value) for m in rows) == [(e, float(e * 1000 + 299)) for e in range(1, 5)]


# Lines of a hand-edited or hostile journal: JSON, but in no form the writer writes.
HOSTILE_LINES = {
    "not an object": "[1, 2]",
    "ack a string": '{"a": "9"}',
    "run id a number": '{"r": "t0-m0", "id": 7}',
    "sequence a bool": '{"n": true, "k": "t0-m0", "s": 2, "t": 1000, "m": {"val_H": 0.5}}',
    "no run key": '{"n": 2, "s": 2, "t": 1000, "m": {"val_H": 0.5}}',
    "step a string": '{"n": 2, "k": "t0-m0", "s": "2", "t": 1000, "m": {"val_H": 0.5}}',
    "metrics a list": '{"n": 2, "k": "t0-m0", "s": 2, "t": 1000, "m": [0.5]}',
    "metric a string": '{"n": 2, "k": "t0-m0", "s": 2, "t": 1000, "m": {"val_H": "0.5"}}',
    "param a number": '{"n": 2, "k": "t0-m0", "t": 1000, "P": {"optim.lr": 0.1}}',
}


@pytest.mark.parametrize("line", HOSTILE_LINES.values(), ids=HOSTILE_LINES.keys())
def test_a_journal_line_in_no_form_the_writer_writes_is_refused(tmp_path: Path, line: str) -> None:
    """The tracker refuses the journal with one line naming the file, the line and the rule, before it queues,
    writes or appends anything; without that line, the same journal (a line torn by a kill in it) is replayed."""
    from dedn.errors import DednInputError

    t = new_tracker(tmp_path)
    make_runs(t, tmp_path)
    journal = tmp_path / "exp" / JOURNAL_FILE
    good = '{"n":1,"k":"t0-m0","s":1,"t":1000,"m":{"val_H":0.5}}\n{"n":2,"k":"t0-m\n'  # line 2: torn
    journal.write_text(good + line + "\n")
    before = journal.read_bytes()
    refused = new_tracker(tmp_path)
    with pytest.raises(DednInputError) as err:
        refused.start(threads=1, linger_s=0.0)
    assert str(err.value).startswith(f"{journal}: line 3: ") and "\n" not in str(err.value)
    assert refused.backlog == 0 and journal.read_bytes() == before
    assert histories(tmp_path) == {k: [] for k in KEYS}
    journal.write_text(good)
    t = new_tracker(tmp_path)
    t.start(threads=1, linger_s=0.0)
    assert t.close(timeout_s=60) == 0
    assert histories(tmp_path) == {KEYS[0]: [(1, 0.5)], KEYS[1]: [], KEYS[2]: []}


class _Gate:
    """A stand-in for ``Tracker._save_lock``: a real lock, which the thread named ``older`` enters only once
    ``opened`` is set (so the two saves write in the order the race needs)."""

    def __init__(self) -> None:
        self.lock, self.waiting, self.opened = threading.Lock(), threading.Event(), threading.Event()

    def __enter__(self) -> None:
        if threading.current_thread().name == "older":
            self.waiting.set()
            assert self.opened.wait(30)
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_an_older_state_copy_is_not_written_over_a_newer_one(tmp_path: Path) -> None:
    """Tracker.save copies the state under the tracker's lock and writes it outside: the writer's periodic save and
    the driver's end_all (``now=True``) can copy in one order and write in the other. The older copy must not
    replace the newer one in the file."""
    t = new_tracker(tmp_path)
    gate = _Gate()
    t._save_lock = gate  # type: ignore[assignment]
    t.state["last_epoch"] = {"t0": 1}

    older = threading.Thread(target=t.save, kwargs={"now": True}, name="older")
    older.start()  # copies epoch 1, then waits at the gate
    assert gate.waiting.wait(30)
    t.state["last_epoch"] = {"t0": 2}
    t.save(now=True)  # copied after, written first
    gate.opened.set()
    older.join(30)
    assert not older.is_alive()
    assert json.loads((tmp_path / "exp" / RUNS_FILE).read_text())["last_epoch"] == {"t0": 2}
