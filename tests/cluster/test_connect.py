"""``cluster.connect.ray_session`` without a cluster of ``ray start`` nodes: a local session never goes to
another cluster, an address where no Ray answers is one line within seconds, and SIGTERM stops a session
at once, while it connects and while trials run, with its Ray shut down."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cluster.connect import ray_session, resolve_address
from dedn.errors import DednInputError
from tests.helpers import ROOT, cli_argv, free_port, training_worker, trial_rows, wait_for, write_spec


class SilentPort:
    """A TCP port that accepts connections and never says anything (something that is not a Ray GCS), on
    the address Ray connects to for 127.0.0.1 (this machine's, as Ray advertises its nodes)."""

    def __init__(self) -> None:
        self.host = resolve_address("127.0.0.1:1").rsplit(":", 1)[0]
        self.sock = socket.socket()
        self.sock.bind((self.host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.accepted:
            c.close()


@pytest.fixture
def silent_port() -> Iterator[SilentPort]:
    port = SilentPort()
    yield port
    port.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder under /tmp for a Ray temp folder (its socket paths must fit an AF_UNIX address)."""
    path = Path(tempfile.mkdtemp(prefix="dedn-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _session_pids(session: int) -> set[int]:
    out = set()
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == session and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _stale_record(folder: Path) -> str:
    """Ray's record of the current cluster (as ``ray start`` leaves it) naming a head that is gone."""
    dead = f"127.0.0.1:{free_port()}"
    (folder / "ray").mkdir(parents=True, exist_ok=True)
    (folder / "ray" / "ray_current_cluster").write_text(dead)
    return dead


def test_a_local_session_never_joins_ray_address_or_a_stale_record(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = _stale_record(short_tmp)
    monkeypatch.setenv("RAY_TMPDIR", str(short_tmp))  # where Ray looks for its record
    monkeypatch.setenv("RAY_ADDRESS", dead)
    mode = os.environ.get("RAY_AUTH_MODE")
    start = time.time()
    with ray_session(None, num_cpus=1) as info:
        import ray

        nodes = [n for n in ray.nodes() if n["Alive"]]
        elapsed = time.time() - start
    assert info["started"] is True
    assert info["address"] and info["address"].rsplit(":", 1)[1] != dead.rsplit(":", 1)[1]
    assert len(nodes) == 1
    assert elapsed < 90  # started its own instance instead of retrying the dead head for minutes
    assert (short_tmp / "ray" / "ray_current_cluster").read_text() == dead  # the record is left alone
    assert os.environ.get("RAY_AUTH_MODE") == mode  # ray.init's token mode does not outlive the session


def test_auto_with_a_dead_ray_address_is_one_line_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    start = time.time()
    with pytest.raises(DednInputError) as e, ray_session("auto"):
        pass
    assert time.time() - start < 10
    assert e.value.source == "auto" and e.value.field == "--address"
    assert e.value.rule.startswith("no Ray cluster answers at ") and f":{port} (" in e.value.rule


def test_a_port_where_no_ray_answers_is_refused_within_the_auth_timeout(silent_port: SilentPort) -> None:
    address = f"127.0.0.1:{silent_port.port}"
    start = time.time()
    with pytest.raises(DednInputError) as e, ray_session(address, auth_timeout_s=6):
        pass
    assert time.time() - start < 15
    assert e.value.source == address and e.value.field == "--address"
    assert e.value.rule == f"no Ray cluster answered at {silent_port.host}:{silent_port.port} within 6 s"
    assert len(silent_port.accepted) >= 2  # the socket check, then the GCS question
    probes = [p for p in psutil.Process().children(recursive=True) if "ray_internals.py" in " ".join(p.cmdline())]
    assert probes == []  # the child that asked was killed


_CONNECT = """
import json, signal, sys
from cluster.connect import ray_session
try:
    with ray_session(sys.argv[1], auth_timeout_s=120):
        print("joined", flush=True)
except KeyboardInterrupt as e:
    print(json.dumps({"interrupt": str(e), "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}))
    sys.exit(130)
"""


def test_sigterm_while_connecting_stops_the_session_at_once(silent_port: SilentPort) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CONNECT), f"127.0.0.1:{silent_port.port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(silent_port.accepted) >= 2, 60, "the session to ask the port for a Ray GCS")
        time.sleep(0.5)
        assert any("ray_internals.py" in " ".join(psutil.Process(p).cmdline()) for p in _session_pids(proc.pid))
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (proc.returncode, out, err[-2000:])
    assert json.loads(out.strip().splitlines()[-1]) == {
        "interrupt": "stopped by signal SIGTERM",
        "sigterm_default": True,
    }
    assert took < 10, took
    assert wait_for(lambda: not _session_pids(proc.pid), 10, "the GCS question to end") is True


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cli_argv(*args),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_sigterm_while_joining_leaves_no_search_behind(
    tmp_path: Path, tiny_store: Path, silent_port: SilentPort
) -> None:
    """The whole command: a search stopped before it joined leaves nothing (no folder, no MLflow run: both are made
    once the cluster is joined and can hold a trial)."""
    spec = write_spec(
        tmp_path,
        tiny_store,
        epochs=2,
        body="num_samples: 2\nparams:\n  optim.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}\n",
    )
    runs, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["search", "-c", str(spec), "--name", "stopped", "--storage-path", str(runs), "--tracking-uri", uri]
    proc = _cli([*args, "--address", f"127.0.0.1:{silent_port.port}"], tmp_path, dict(os.environ))
    try:
        wait_for(lambda: len(silent_port.accepted) >= 2, 120, "the search to ask the port for a Ray GCS")
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and out.strip().splitlines()[-1] == "Aborted!", out[-2000:]
    assert "Traceback" not in out
    assert took < 20, took
    assert not runs.exists() and not (tmp_path / "mlflow.db").exists()
    assert wait_for(lambda: not _session_pids(proc.pid), 10, "the command's processes to end") is True


@pytest.mark.slow
def test_sigterm_during_trials_stops_a_local_search_and_its_ray(
    tmp_path: Path, tiny_store: Path, short_tmp: Path
) -> None:
    """A local search (RAY_ADDRESS and Ray's record naming a dead head) runs its own Ray; SIGTERM while
    trials run ends the command within seconds, its Ray instance with it, and not by Ray's abort."""
    spec = write_spec(
        tmp_path,
        tiny_store,
        epochs=300,  # not ended before the signal, however late Tune's copy of its rows
        body="num_samples: 2\nmax_concurrent_trials: 1\nparams:\n  optim.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}\nscheduler: {type: fifo}\n",
    )
    dead = _stale_record(short_tmp)
    env = {**os.environ, "RAY_TMPDIR": str(short_tmp), "RAY_ADDRESS": dead}
    runs = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["search", "-c", str(spec), "--name", "local", "--storage-path", str(runs), "--tracking-uri", uri]
    proc = _cli(args, tmp_path, env)
    try:
        wait_for(lambda: glob.glob(str(runs / "local" / "*" / "result.json")), 240, "a trial to report")
        # and still training (its worker's checkpoints are ahead of Tune's copy of its rows, which can lag until
        # after its last epoch on a loaded machine: a trial ended before the signal would end FINISHED)
        wait_for(lambda: training_worker(runs / "local", 1), 60, "a trial's worker")
        ray_pids = _session_pids(proc.pid) - {proc.pid}
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and out.strip().splitlines()[-1] == "Aborted!", out[-3000:]
    assert "SIGTERM received" not in out  # Ray's own handler would have aborted the driver
    assert took < 30, took
    assert len(ray_pids) >= 3  # its own Ray: GCS, raylet, a trial's worker, ...
    assert wait_for(lambda: not _session_pids(proc.pid), 20, "its Ray instance to end") is True
    assert any(trial_rows(runs / "local").values())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("local")
    statuses = [r.info.status for r in client.search_runs([exp.experiment_id])]
    assert len(statuses) >= 2 and set(statuses) == {"KILLED"}, statuses  # the parent and the trial: resumable
