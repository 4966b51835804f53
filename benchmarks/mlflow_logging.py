"""MLflow logging throughput: a local tracking server (SQLite backend) against the embedded SQLite store.

The script starts ``mlflow server`` itself on a free 127.0.0.1 port (``benchmarks/common.py``: ``--backend-store-uri
sqlite:///<tmp>/mlflow.db``, ``--artifacts-destination <tmp>/artifacts``), waits for ``GET /health``, and stops it at
the end. Targets:
- server: ``mlflow server`` with its defaults (``--workers`` 4, job execution on: it also starts background
  job consumers);
- server-nojobs: the same with ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``;
- gunicorn: the same as server-nojobs under gunicorn's sync workers (``--gunicorn-opts``), which close each
  connection after its reply: uvicorn with several workers leaves Nagle's algorithm on, and each reply on a
  kept-alive connection waits about 40 ms for the client's delayed ACK (``benchmarks/common.py``);
- gthread: the same under gunicorn's gthread workers (one thread each), which keep connections alive;
- sqlite: no server, the client writes ``sqlite:///<tmp>/embedded.db`` itself.
For each it times, with MlflowClient, for ``--seconds`` each after one untimed call:
- log_metric: one ``log_metric`` call per value;
- log_batch: ``log_batch`` of ``--batch`` metrics per call, the per-epoch batch of tuning/tracking_callback.py;
- async log_batch: ``--async-calls`` such calls with ``synchronous=False`` (MLflow queues them and writes them from a
  background thread), timed until all are written, and the time the caller spends per call;
- trial start: ``create_run`` nested under a parent (tag ``mlflow.parentRunId``) plus one ``log_batch`` of 9
  params, what tracking.sink.RunSink.create does for each trial;
- concurrent log_batch: ``--threads`` client threads, each on its own run, logging batches at once;
- member runs: ``--threads`` client threads, each making whole member runs with the fewest requests a run can
  take: ``create_run`` nested under the parent with its tags, one ``log_batch`` of its 9 params and
  ``--run-epochs`` epochs of 5 key metrics (``epoch_metrics: key``), and ``set_terminated`` (FINISHED; its
  ``runs/get`` to print the run's address is off, as in tracking/sink.py; ``update_run`` also gets the run). The
  sink makes these three per member run and no other (``tests/tracking/test_sink.py``), so runs/s times ``--run-epochs`` bounds the member-epochs/s a search can write through this server; at
  ``driver_scale.py``'s full offer (488 member-epochs/s, populations stopped by ASHA after 22 epochs on average)
  member runs start and end at about 22/s.
For a server it also times small requests on one kept-alive connection (``http.client``): until the reply's
headers and until its whole body have arrived. It also reports the server's CPU use while idle (all its
processes, over 3 s) and the disk's sync latency at that moment (median of raw SQLite insert + commit in the same
folder): each MLflow write is at least one commit, so on a slow or shared disk the commit latency bounds the
throughput. ``--dir /dev/shm`` puts the databases in memory.
The client and the server share this machine's cores, so the numbers are a floor for a server on its own host.

    python benchmarks/mlflow_logging.py                          # 3 s per measurement, threads 1 4 8
    python benchmarks/mlflow_logging.py --seconds 10 --threads 1 2 4 8 16 --workers 8 --targets server
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import ROOT, SERVER_APPS, sqlite_wal, start_mlflow_server, stop_mlflow_server

PARAMS = ("lr", "beta", "gamma", "eps", "clusters", "kmeans_q", "lambda_rc", "lambda_e", "calibration")


def cpu_seconds(proc: subprocess.Popen[bytes] | None) -> float:
    """CPU seconds (user and system) used so far by the server ``proc`` and its child processes; 0 for none."""
    import psutil

    if proc is None:
        return 0.0
    total = 0.0
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def idle_cpu(proc: subprocess.Popen[bytes], seconds: float = 3.0) -> float:
    """Cores used by the server and all its child processes while no request comes in."""
    c0, t0 = cpu_seconds(proc), time.perf_counter()
    time.sleep(seconds)
    return (cpu_seconds(proc) - c0) / (time.perf_counter() - t0)


def commit_ms(folder: Path, n: int = 11) -> float:
    """Median ms of one tiny SQLite insert + commit in ``folder``: the disk's sync latency at that moment."""
    import sqlite3
    import statistics

    con = sqlite3.connect(folder / "probe.db")
    con.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    con.commit()
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        con.execute("INSERT INTO t VALUES (?)", (i,))
        con.commit()
        times.append(1e3 * (time.perf_counter() - t0))
    con.close()
    return statistics.median(times)


def reply_ms(uri: str, n: int = 21) -> tuple[float, float]:
    """Median ms from sending a small request (``experiments/get-by-name``) on one kept-alive connection until its
    reply's headers, and until its whole body, have arrived: a server that leaves Nagle's algorithm on sends the
    body only when the client's delayed ACK of the headers comes back (about 40 ms on Linux)."""
    import http.client
    import statistics
    from urllib.parse import urlsplit

    host = urlsplit(uri)
    conn = http.client.HTTPConnection(host.hostname or "127.0.0.1", host.port)
    heads, wholes = [], []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default")
            reply = conn.getresponse()
            heads.append(1e3 * (time.perf_counter() - t0))
            reply.read()
            wholes.append(1e3 * (time.perf_counter() - t0))
    finally:
        conn.close()
    return statistics.median(heads), statistics.median(wholes)


def rate(fn: Callable[[int], None], seconds: float) -> tuple[float, int]:
    """Calls of ``fn(i)`` per second for ``seconds`` after one untimed call; returns (calls/s, calls)."""
    fn(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += 1
        fn(n)
    return n / (time.perf_counter() - t0), n


def async_batches(client: Any, exp_id: str, parent: str, batch: int, calls: int) -> tuple[float, float]:
    """``calls`` batches queued with ``log_batch(..., synchronous=False)`` on one run, then waited for:
    (calls/s from the first call until all are written, ms the caller spent per call to queue it)."""
    from mlflow.entities import Metric

    run = client.create_run(exp_id, run_name="async", tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_batch(run, metrics=[Metric("warm", 0.0, 0, 0)], synchronous=False).wait()
    t0 = time.perf_counter()
    ops = []
    for step in range(1, calls + 1):
        now = int(time.time() * 1000)
        metrics = [Metric(f"m{j:02d}", 0.5 + j, now, step) for j in range(batch)]
        ops.append(client.log_batch(run, metrics=metrics, synchronous=False))
    queued = time.perf_counter() - t0
    for op in ops:
        op.wait()
    return calls / (time.perf_counter() - t0), 1000 * queued / calls


def in_threads(
    one: Callable[[int, int], None], threads: int, seconds: float, server: Any = None
) -> tuple[float, int, float | None, float]:
    """``threads`` threads calling ``one(thread, i)`` (i counts that thread's calls) for ``seconds``, all started at
    once: (successful calls/s, failed calls, server CPU ms per successful call, client CPU ms per successful call).
    The server's CPU is that of ``server``'s processes (None without one), the client's that of this process."""
    counts, errors = [0] * threads, [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def work(k: int) -> None:
        start.wait()
        while not stop.is_set():
            try:
                one(k, counts[k] + errors[k])
                counts[k] += 1
            except Exception:  # noqa: BLE001  (count failures such as "database is locked")
                errors[k] += 1

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0, s0, c0 = time.perf_counter(), cpu_seconds(server), time.process_time()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    calls = max(sum(counts), 1)
    s_ms = None if server is None else 1000 * (cpu_seconds(server) - s0) / calls
    c_ms = 1000 * (time.process_time() - c0) / calls
    return sum(counts) / (time.perf_counter() - t0), sum(errors), s_ms, c_ms


def concurrent_batches(
    client: Any, exp_id: str, parent: str, threads: int, batch: int, seconds: float
) -> tuple[float, int]:
    """``threads`` threads, one run each, logging ``batch``-metric batches for ``seconds``: (batches/s, errors)."""
    from mlflow.entities import Metric

    runs = [
        client.create_run(exp_id, run_name=f"thread-{i}", tags={"mlflow.parentRunId": parent}).info.run_id
        for i in range(threads)
    ]

    def one(k: int, step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(runs[k], metrics=[Metric(f"m{j:02d}", 0.5 + j, now, step + 1) for j in range(batch)])

    return in_threads(one, threads, seconds)[:2]


def member_runs(
    client: Any, exp_id: str, parent: str, threads: int, epochs: int, seconds: float, server: Any = None
) -> tuple[float, int, float | None, float]:
    """``threads`` threads making whole member runs for ``seconds`` (create with tags, one ``log_batch`` of params
    and ``epochs`` x 5 metrics, end): ``in_threads``'s figures, per run."""
    from mlflow.entities import Metric, Param

    keys = ("val_H", "val_S", "val_U", "loss", "lr")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # as the tracker: no runs/get per end

    def one(k: int, i: int) -> None:
        now = int(time.time() * 1000)
        tags = {"mlflow.parentRunId": parent, "dedn.trial": f"{k}-{i}", "dedn.member": str(i % 16)}
        r = client.create_run(exp_id, run_name=f"member-{k}-{i}", tags=tags).info.run_id
        ms = [Metric(m, 0.5, now, e) for e in range(epochs) for m in keys]
        client.log_batch(r, metrics=ms, params=[Param(p, str(0.1 * i)) for p in PARAMS])
        client.set_terminated(r, status="FINISHED")

    return in_threads(one, threads, seconds, server)


def measure(uri: str, a: argparse.Namespace, server: Any = None) -> dict[str, Any]:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(f"bench-{time.time_ns()}")
    parent = client.create_run(exp_id, run_name="parent").info.run_id
    run = client.create_run(exp_id, run_name="child", tags={"mlflow.parentRunId": parent}).info.run_id
    out: dict[str, Any] = {}

    def one_metric(i: int) -> None:
        client.log_metric(run, "val_H", 0.5, step=i)

    def one_batch(i: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run, metrics=[Metric(f"m{j:02d}", 0.5 + j, now, i) for j in range(a.batch)])

    def trial_start(i: int) -> None:
        r = client.create_run(exp_id, run_name=f"trial-{i}", tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_batch(r, params=[Param(p, str(0.1 * i)) for p in PARAMS])

    out["metric"] = rate(one_metric, a.seconds)
    print(f"  {uri}: log_metric {out['metric'][0]:.0f} calls/s", flush=True)
    out["batch"] = rate(one_batch, a.seconds)
    print(f"  {uri}: log_batch of {a.batch} {out['batch'][0]:.0f} calls/s", flush=True)
    out["async"] = async_batches(client, exp_id, parent, a.batch, a.async_calls)
    print(f"  {uri}: async log_batch {out['async'][0]:.0f} calls/s", flush=True)
    out["start"] = rate(trial_start, a.seconds)
    print(f"  {uri}: trial start {out['start'][0]:.1f} /s", flush=True)
    for n in a.threads:
        out[f"threads_{n}"] = concurrent_batches(client, exp_id, parent, n, a.batch, a.seconds)
        print(f"  {uri}: {n} threads {out[f'threads_{n}'][0]:.0f} batches/s", flush=True)
    for n in a.threads:
        out[f"runs_{n}"] = member_runs(client, exp_id, parent, n, a.run_epochs, a.seconds, server)
        print(f"  {uri}: {n} threads {out[f'runs_{n}'][0]:.1f} member runs/s", flush=True)
    return out


TARGETS = ("server", "server-nojobs", "gunicorn", "gthread", "sqlite")


def main() -> None:
    """Parse the options, measure every row, print the table. Over 80 lines on purpose: a benchmark's main
    is one straight script, so each printed row sits next to the code that measured it."""
    import mlflow

    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    ap.add_argument("--batch", type=int, default=20, help="metrics per log_batch call (one epoch of one trial)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--run-epochs", type=int, default=22, help="epochs of 5 metrics in each member run")
    ap.add_argument("--async-calls", type=int, default=300, help="log_batch calls queued with synchronous=False")
    ap.add_argument("--workers", type=int, default=4, help="mlflow server worker processes (its default is 4)")
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    ap.add_argument("--dir", default=None, help="folder for the databases (default: a new temporary folder)")
    ap.add_argument("--wal", action="store_true", help="SQLite databases in write-ahead-log mode (common.sqlite_wal)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dedn-mlflow-", dir=a.dir))
    results: dict[str, dict[str, Any]] = {}
    for target in a.targets:
        tmp = root / target
        tmp.mkdir()
        if target == "sqlite":
            if a.wal:
                sqlite_wal(tmp / "embedded.db")
            results[target] = {"commit": commit_ms(tmp), "idle": None, "start": None, "reply": None}
            results[target].update(measure(f"sqlite:///{tmp / 'embedded.db'}", a))
            continue
        app = target if target in SERVER_APPS else "uvicorn"  # server, server-nojobs: MLflow's default
        proc, uri, start_s = start_mlflow_server(tmp, a.workers, jobs=target == "server", app=app, wal=a.wal)
        print(f"{target}: mlflow server at {uri} answered /health after {start_s:.1f} s", flush=True)
        try:
            time.sleep(2)
            results[target] = {"idle": idle_cpu(proc), "commit": commit_ms(tmp), "start_s": start_s}
            results[target]["reply"] = reply_ms(uri)
            results[target].update(measure(uri, a, proc))
        finally:
            stop_mlflow_server(proc)

    names = {
        "server": f"server, {a.workers} workers",
        "server-nojobs": f"server, {a.workers} workers, no jobs",
        "gunicorn": f"gunicorn, {a.workers} workers, no jobs",
        "gthread": f"gthread, {a.workers} workers, no jobs",
        "sqlite": "embedded SQLite",
    }
    width = max(18, *(len(names[t]) for t in a.targets))
    print(
        f"\nMLflow {mlflow.__version__} logging throughput with MlflowClient, {a.seconds:g} s per measurement; "
        f"{os.cpu_count()} CPU cores shared by client and server; SQLite backend in {'a temporary folder' if a.dir is None else a.dir}"
    )
    print(f"{'measurement':<44} " + " ".join(f"{names[t]:>{width}}" for t in a.targets))

    def opt(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("log_metric: metrics/s (1 per call)", lambda r: f"{r['metric'][0]:.0f}"),
        (f"log_batch of {a.batch}: calls/s", lambda r: f"{r['batch'][0]:.1f}"),
        (f"log_batch of {a.batch}: metrics/s", lambda r: f"{r['batch'][0] * a.batch:.0f}"),
        (f"async log_batch of {a.batch}: calls/s", lambda r: f"{r['async'][0]:.1f}"),
        ("async log_batch: caller ms per call", lambda r: f"{r['async'][1]:.2f}"),
        ("trial starts/s (nested create_run + params)", lambda r: f"{r['start'][0]:.1f}"),
    ]

    def calls(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r[key][0]:.1f} ({r[key][1]})"

    def metrics(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r[key][0] * a.batch:.0f}"

    def epochs(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r[key][0] * a.run_epochs:.0f}"

    def cpu(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{opt(r[key][2], '.0f')}, {r[key][3]:.0f}"

    for n in a.threads:
        label = f"{n} thread{'s' if n > 1 else ''}"
        rows.append((f"{label}: log_batch calls/s (errors)", calls(f"threads_{n}")))
        rows.append((f"{label}: metrics/s", metrics(f"threads_{n}")))
    for n in a.threads:
        label = f"{n} thread{'s' if n > 1 else ''}"
        rows.append((f"{label}: member runs/s (errors)", calls(f"runs_{n}")))
        rows.append((f"{label}: their member-epochs/s", epochs(f"runs_{n}")))
        rows.append((f"{label}: server, client CPU ms per run", cpu(f"runs_{n}")))
    rows += [
        ("kept-alive reply: ms to headers", lambda r: opt(r["reply"] and r["reply"][0], ".1f")),
        ("kept-alive reply: ms to whole body", lambda r: opt(r["reply"] and r["reply"][1], ".1f")),
        ("server CPU while idle (cores)", lambda r: opt(r["idle"], ".2f")),
        ("server start until /health (s)", lambda r: opt(r.get("start_s"), ".1f")),
        ("disk commit before the run (ms)", lambda r: f"{r['commit']:.1f}"),
    ]
    for label, cell in rows:
        print(f"{label:<44} " + " ".join(f"{cell(results[t]):>{width}}" for t in a.targets))
    print(
        "disk commit = median raw SQLite insert + commit in the database folder just before the target's run; "
        "every MLflow write commits at least once."
    )
    cmd = f"python benchmarks/mlflow_logging.py --seconds {a.seconds:g} --threads {' '.join(map(str, a.threads))}"
    if a.workers != 4:
        cmd += f" --workers {a.workers}"
    if a.batch != 20:
        cmd += f" --batch {a.batch}"
    if a.run_epochs != 22:
        cmd += f" --run-epochs {a.run_epochs}"
    if a.async_calls != 300:
        cmd += f" --async-calls {a.async_calls}"
    if a.wal:
        cmd += " --wal"
    if a.targets != list(TARGETS):
        cmd += f" --targets {' '.join(a.targets)}"
    if a.dir is not None:
        cmd += f" --dir {a.dir}"
    print(f"({cmd})")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
