"""What the benchmark scripts share: the repository root, a small class/attribute table builder and a local
MLflow server (``start_mlflow_server`` / ``stop_mlflow_server``).

The scripts run as ``python benchmarks/X.py``, so this folder is first on ``sys.path`` and they import it as
``from common import ROOT``. Nothing here imports from ``tests/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dedn.data.store import AttributeTable, ClassTable

ROOT = Path(__file__).resolve().parents[1]


def make_tables(k: int = 4, d: int = 3, g: int = 2, seed: int = 0) -> tuple[ClassTable, AttributeTable]:
    """k classes (class 0 validation-unseen, class k-1 unseen, the others seen), d attributes, g-dim vectors.

    A store built from these tables follows the split rules when class 0 rows go to val_unseen (2), class
    k-1 rows to test_unseen (4), and the other classes' rows to train (0) and test_seen (3).
    """
    import numpy as np

    from dedn.data.store import AttributeTable, ClassTable

    rng = np.random.default_rng(seed)
    seen = np.array([True] * (k - 1) + [False])
    val_unseen = np.zeros(k, dtype=bool)
    val_unseen[0] = True
    classes = ClassTable([f"c{i}" for i in range(k)], seen, val_unseen, rng.random((k, d)).astype(np.float32))
    attributes = AttributeTable(
        [f"a{i}" for i in range(d)],
        rng.random((d, g)).astype(np.float32),
        {"manual": (["x", "y"], np.array([0, 1] + [1] * (d - 2)))},
    )
    return classes, attributes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The server programs ``start_mlflow_server`` runs MLflow under. MLflow's default, uvicorn, with more than one worker
# leaves Nagle's algorithm on for its connections (its listening socket is made with protocol 0, so asyncio does not
# set TCP_NODELAY on what it accepts: Kludex/uvicorn#3149), and on Linux each reply on a kept-alive connection then
# waits about 40 ms for the client's delayed ACK between its headers and its body. gunicorn's sync workers (MLflow's
# ``--gunicorn-opts``) answer one request per connection and close it, which sends the body at once; before the
# next request a sync worker waits for the client to close its end (``gunicorn.util.close_graceful``). gunicorn's
# gthread workers (``gthread``: one thread each, connections kept alive 5 s) keep the connection, with TCP_NODELAY set
# on gunicorn's listening socket. The access log is on in all three, in the format ``driver_scale.server_requests``
# reads; gunicorn's control socket (from version 26, in the home folder by default) is off, so that a benchmark
# writes only in its own folder.
SERVER_APPS = ("uvicorn", "gunicorn", "gthread")


def gunicorn_opts(threaded: bool = False) -> str:
    """MLflow's ``--gunicorn-opts`` for a benchmark's server (``threaded``: gthread workers of one thread, connections
    kept alive); ``--no-control-socket`` where the installed gunicorn has a control socket."""
    from gunicorn import config

    opts = "--timeout 120 --access-logfile - --access-logformat '%(t)s \"%(r)s\" %(s)s'"
    if threaded:
        opts += " --worker-class gthread --threads 1 --keep-alive 5"
    return opts + (" --no-control-socket" if hasattr(config, "ControlSocketDisable") else "")


def sqlite_wal(db: Path) -> None:
    """Put a SQLite database file (made, empty, when absent) in write-ahead-log mode, which stays with the file:
    a commit then appends to ``<db>-wal`` and syncs it once, where SQLite's default rollback journal syncs the
    journal and the database each time."""
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("PRAGMA journal_mode=WAL")


# A server a benchmark starts stays in the benchmark's session, in a process group of its own (stopped as a group).
# In a session of its own, Linux's autogroup scheduler (kernel.sched_autogroup_enabled, on by default) weighs the
# server's group against the session holding the driver and its Ray workers, SCHED_IDLE stand-ins for GPUs included:
# measured in driver_scale.py, the server's worker then waited 81% of its runnable time in the run queue
# (/proc/PID/schedstat) and the tracking store took 32 requests/s; in the same session, where SCHED_IDLE tasks yield
# to it, it is scheduled at once.
SAME_SESSION: dict[str, Any] = {"process_group": 0}


def start_mlflow_server(
    folder: Path, workers: int = 4, jobs: bool = False, app: str = "uvicorn", wal: bool = False, backend: str = ""
) -> tuple[Any, str, float]:
    """``mlflow server`` on a free 127.0.0.1 port with a SQLite backend and artifacts in ``folder``, in its own
    process group but the caller's session (``SAME_SESSION``; stop it with ``stop_mlflow_server``; ``backend`` a database URL instead of the SQLite file, e.g.
    ``start_postgres``'s), under ``app`` (``SERVER_APPS``) with ``workers`` worker
    processes. ``jobs`` False sets MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false (no background job consumers); ``wal``
    puts the database in write-ahead-log mode first (``sqlite_wal``). Returns the process, its URI and the seconds
    until ``GET /health`` answered."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    if wal:
        sqlite_wal(folder / "mlflow.db")
    port = free_port()
    env = dict(os.environ)
    if not jobs:
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(workers), "--backend-store-uri", backend or f"sqlite:///{folder / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(folder / "artifacts")]
    if app not in SERVER_APPS:
        raise ValueError(f"app: {app!r} is not one of {SERVER_APPS}")
    if app != "uvicorn":
        cmd += ["--gunicorn-opts", gunicorn_opts(threaded=app == "gthread")]
    log = open(folder / "server.log", "ab")  # noqa: SIM115  (closed with the process)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, **SAME_SESSION)
    uri = f"http://127.0.0.1:{port}"
    while time.perf_counter() - t0 < 180:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {folder / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri, time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.5)
    stop_mlflow_server(proc)
    raise RuntimeError(f"mlflow server did not answer /health within 180 s; see {folder / 'server.log'}")


def stop_mlflow_server(proc: Any) -> None:
    """Stop a server ``start_mlflow_server`` started: its process group (the server and its workers)."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_postgres() -> tuple[Any, str, Path]:
    """A PostgreSQL server (Debian's ``postgresql`` programs: initdb, pg_ctl) in a new temporary folder on a free
    127.0.0.1 port, with its defaults (fsync and synchronous commits on: a production database), as ``nobody`` under
    root (PostgreSQL refuses root), and a database ``mlflow``; returns (the postmaster's process id, the database's
    URL, the folder). Stop it with ``stop_postgres``, then remove the folder."""
    import glob
    import os
    import pwd
    import shutil
    import subprocess
    import tempfile
    import time

    found = shutil.which("initdb") or (sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [""])[-1]
    if not found:
        raise RuntimeError("PostgreSQL's initdb not found (on PATH or in /usr/lib/postgresql/*/bin)")
    bindir = Path(found).resolve().parent
    # a folder of its own, which ``nobody`` can enter, with a short path (a socket's path has a 107-byte limit)
    folder = Path(tempfile.mkdtemp(prefix="dedn-pg-"))
    user: dict[str, Any] = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    data, port = folder / "data", free_port()
    run = {"check": True, "capture_output": True, "timeout": 120, **user}
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "dedn", "--auth=trust", "--no-locale", "-E", "UTF8"], **run
    )
    # the postmaster itself, not pg_ctl (which starts it in a session of its own: SAME_SESSION)
    options = ["-c", "listen_addresses=127.0.0.1", "-p", str(port), "-c", f"unix_socket_directories={folder}"]
    with open(folder / "pg.log", "ab") as log:
        server = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), *options], stdout=log, stderr=log, **user, **SAME_SESSION
        )
    ready = [str(bindir / "pg_isready"), "-q", "-h", str(folder), "-p", str(port)]
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.returncode}; see {folder / 'pg.log'}")
        if subprocess.run(ready, check=False).returncode == 0:
            break
        time.sleep(0.1)
    subprocess.run([str(bindir / "createdb"), "-h", str(folder), "-p", str(port), "-U", "dedn", "mlflow"], **run)
    pid = server.pid
    return pid, f"postgresql+psycopg2://dedn@127.0.0.1:{port}/mlflow", folder


def stop_postgres(pid: int) -> None:
    """Stop a server ``start_postgres`` started, by its process id (SIGINT: PostgreSQL's fast shutdown)."""
    import os
    import signal
    import time

    try:
        os.kill(pid, signal.SIGINT)
        for _ in range(300):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:  # this process's child: reaped once it exits
                    return
            except ChildProcessError:  # not its child
                os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
