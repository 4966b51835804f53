"""``dedn ui``: a real MLflow server on a free loopback port, opened on an experiment's training-runs table,
announced only once it answers, without MLflow's job-queue workers, and stopped with every process it
started on SIGTERM or Ctrl-C. Processes are followed by id and process group through /proc."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import ROOT, free_port

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="follows processes through /proc")


def _store(folder: Path) -> tuple[str, dict[str, str]]:
    """A SQLite tracking store with MLflow's Default experiment and two searches; (URI, name -> id)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / 'ui.db'}"
    client = MlflowClient(tracking_uri=uri)
    ids = {}
    for name in ("older-search", "newer-search"):
        ids[name] = client.create_experiment(name, artifact_location=(folder / "artifacts" / name).as_uri())
        client.create_run(ids[name], run_name=f"{name}-parent")
        time.sleep(0.05)  # distinct creation times
    return uri, ids


def _procs() -> dict[int, tuple[int, int, str, str]]:
    """Every process now: pid -> (parent pid, process group, state, start time)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        out[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0], fields[19])
    return out


def _descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid`` now: pid -> start time (which tells a reused pid apart)."""
    procs, found, todo = _procs(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _, _, start) in procs.items():
            if ppid == parent and child not in found:
                found[child] = start
                todo.append(child)
    return found


def _running(pid: int, start: str) -> bool:
    info = _procs().get(pid)
    return info is not None and info[3] == start and info[2] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _answers(url: str) -> int | None:
    """The HTTP status of one GET (no retry), None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except OSError:
        return None


class _DednUI:
    """``dedn ui ARGS`` in a fresh process in its own session, its stdout read line by line."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        # as from an interactive shell: SIGINT raises KeyboardInterrupt even if this run ignores it
        code = (
            "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from cli.main import main; main()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "ui", *args],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.closed = threading.Event()  # dedn's stdout reached its end: every line is in the queue
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.closed.set()

    def line_starting(self, prefix: str, timeout: float) -> str:
        end = time.time() + timeout
        while time.time() < end:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert not (self.closed.is_set() and self.lines.empty()), "\n".join(self.seen[-30:])
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r} in {timeout} s:\n" + "\n".join(self.seen[-30:]))

    def kill_all(self, groups: list[int]) -> None:
        """Clean-up after a failure: SIGKILL the server's process group and dedn's own."""
        for pgid in [*groups, self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _check_serving_and_stop(
    ui: _DednUI, port: int, experiment_id: str, name: str, stop: signal.Signals, verbose: bool = False
) -> None:
    """Everything the ready line promises, then ``stop`` (SIGTERM to dedn, or SIGINT to its group as a
    terminal's Ctrl-C sends it) and nothing of what dedn started left running; the server's access log shown only
    with ``--verbose``."""
    base = f"http://127.0.0.1:{port}"
    server_group = None
    try:
        ui.line_starting("starting the MLflow UI", 120)
        assert _answers(f"{base}/health") is None  # not up before: 'ready' below means something
        ready = ui.line_starting("ready: ", 300)
        assert _answers(f"{base}/health") == 200  # asked once, at once: ready was printed after it answered
        url = ready.removeprefix("ready: ").split(" ")[0]
        assert url == f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning", ready

        # the printed URL answers with MLflow's page, whose app routes that experiment tab and view
        with urllib.request.urlopen(url, timeout=10) as r:  # the fragment stays in the browser
            page = r.read().decode()
        assert "<title>MLflow</title>" in page
        bundle = re.search(r'src="(static-files/static/js/main\.[0-9a-f]+\.js)"', page)
        assert bundle, page[:500]
        with urllib.request.urlopen(f"{base}/{bundle.group(1)}", timeout=30) as r:
            js = r.read().decode()
        assert '"/experiments/:experimentId/runs"' in js and '"workflowType"' in js and '"machine_learning"' in js
        got = f"{base}/ajax-api/2.0/mlflow/experiments/get?experiment_id={experiment_id}"
        with urllib.request.urlopen(got, timeout=10) as r:
            assert json.loads(r.read())["experiment"]["name"] == name

        # bound to loopback only
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert {line.split()[3] for line in listening.splitlines() if line.strip()} == {f"127.0.0.1:{port}"}

        # the server runs in its own process group, without MLflow's job runner or huey consumers
        procs = _procs()
        children = [pid for pid, (ppid, *_) in procs.items() if ppid == ui.proc.pid]
        assert len(children) == 1, children
        server_group = procs[children[0]][1]
        assert server_group == children[0] != procs[ui.proc.pid][1]
        tree = _descendants(ui.proc.pid)
        members = {pid for pid, (_, pgid, *_) in procs.items() if pgid == server_group}
        assert members and members <= set(tree), (members, tree)
        commands = [_cmdline(pid) for pid in members]
        assert not [c for c in commands if "mlflow.server.jobs" in c or "huey" in c], commands

        if stop == signal.SIGINT:
            os.killpg(ui.proc.pid, signal.SIGINT)  # dedn's group only, as a terminal's Ctrl-C
        else:
            os.kill(ui.proc.pid, stop)
        assert ui.proc.wait(timeout=60) == 0
        ui.line_starting("stopped", 10)
        assert ui.closed.wait(10)
        while not ui.lines.empty():
            ui.seen.append(ui.lines.get())
        access = [line for line in ui.seen if '"GET /' in line]  # uvicorn's access log: a line per request
        assert bool(access) == verbose, ui.seen
    except BaseException:
        ui.kill_all([server_group] if server_group else [])
        raise
    left = [pid for pid, start in tree.items() if _running(pid, start)]
    assert left == [], [(pid, _cmdline(pid)) for pid in left]
    assert not [pid for pid, (_, pgid, state, _) in _procs().items() if pgid == server_group and state != "Z"]
    assert _answers(f"{base}/health") is None


@needs_proc
@pytest.mark.slow  # a real MLflow server start (10 to 40 s on 2 shared cores): the slow tier
def test_dedn_ui_opens_the_newest_runs_table_and_leaves_nothing_on_sigterm(tmp_path: Path) -> None:
    uri, ids = _store(tmp_path)
    port = free_port()
    ui = _DednUI(["--port", str(port), "--tracking-uri", uri], cwd=tmp_path)
    _check_serving_and_stop(ui, port, ids["newer-search"], "newer-search", signal.SIGTERM)


@needs_proc
@pytest.mark.slow
def test_dedn_ui_opens_the_named_experiment_and_leaves_nothing_on_ctrl_c(tmp_path: Path) -> None:
    uri, ids = _store(tmp_path)
    port = free_port()
    args = ["--port", str(port), "--tracking-uri", uri, "--experiment", "older-search", "--verbose"]
    ui = _DednUI(args, cwd=tmp_path)
    _check_serving_and_stop(ui, port, ids["older-search"], "older-search", signal.SIGINT, verbose=True)


def test_dedn_ui_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    from cli.main import cli

    uri, _ = _store(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cases = [
            (["--experiment", "nope"], f"error: {uri}: --experiment: no experiment named 'nope' (experiments: "),
            (["--port", str(busy)], f"error: 127.0.0.1:{busy}: --port: cannot be used: "),
            (["--tracking-uri", "http://127.0.0.1:5000"], "error: http://127.0.0.1:5000: --tracking-uri: "),
        ]
        for args, start in cases:
            r = CliRunner().invoke(cli, ["ui", "--tracking-uri", uri, *args])
            lines = [line for line in r.output.splitlines() if line.strip()]
            assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith(start), (args, r.output)
            if args[0] == "--experiment":
                assert lines[0].endswith("(experiments: Default, newer-search, older-search)"), lines[0]


def test_dedn_ui_opens_the_latest_search_that_finished_or_runs_never_a_killed_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    from cli.models import ui_experiment

    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    client = MlflowClient(tracking_uri=uri)
    ids = {}
    for start, (name, status) in enumerate([("done", "FINISHED"), ("killed", "KILLED")]):
        ids[name] = client.create_experiment(name, artifact_location=(tmp_path / name).as_uri())
        run = client.create_run(ids[name], start_time=1000 * (start + 1), tags={"dedn.search_spec": "spec.yaml"})
        client.set_terminated(run.info.run_id, status=status)
    assert ui_experiment(uri, None) == ids["done"]
    out = capsys.readouterr().out
    assert "experiment done" in out and "'killed', is KILLED (--experiment killed picks it)" in out
    ids["live"] = client.create_experiment("live", artifact_location=(tmp_path / "live").as_uri())
    client.create_run(ids["live"], start_time=3000, tags={"dedn.search_spec": "spec.yaml"})  # running: watched
    assert ui_experiment(uri, None) == ids["live"]
    assert ui_experiment(uri, "killed") == ids["killed"]  # named: any
