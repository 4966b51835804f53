"""Where the tracking server's CPU per member run goes: its store's three calls, and the HTTP layer around them.

A member run costs the server what ``tracking.sink.RunSink`` sends for it, and no more (``tests/tracking/test_sink.py``):
``create_run`` nested under a parent with its tags, one ``log_batch`` of its 9 params and ``--epochs`` epochs of
5 key metrics (``epoch_metrics: key``), and ``set_terminated``. ``driver_scale.py``'s server B (CPU ms per
member-epoch) is this cost over a run's epochs: ASHA ends most runs after 20 to 25 of them. Rows, each ``--runs``
runs one after the other after 20 untimed ones, all measured in this one process run:
- store: MLflow's ``SqlAlchemyStore`` called in this process on a SQLite file in write-ahead-log mode; CPU of this
  process per call (``time.process_time``);
- store, the project's: the same with ``tracking.mlflow_store``'s store (``dedn+sqlite``), whose ``log_batch`` is one
  database session with bulk inserts (MLflow's makes a session, a read of the run and a commit for the params,
  another for the metrics, a third for the tags), and whose ``create_run`` and ``update_run_info`` read only what they
  need (MLflow's read the experiment in a session of their own, and the run's metrics, params and tags to return it);
- server: ``mlflow server`` as ``driver_scale.py`` starts it (one gunicorn sync worker, the same SQLite file set-up)
  called by ``MlflowClient`` over HTTP, with each of the two stores; CPU of the server's processes per run (psutil),
  which adds to the store's: request parsing, validation, the web framework, replies.
The client shares this machine's cores with the server, so rows measured here are floors for a busier machine.

    python benchmarks/server_cost.py                   # 300 runs of 22 epochs per row
    python benchmarks/server_cost.py --runs 1000 --epochs 80
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from common import sqlite_wal, start_mlflow_server, stop_mlflow_server
from mlflow_logging import PARAMS, cpu_seconds

KEYS = ("val_H", "val_S", "val_U", "loss", "lr")


def member_run(calls: Any, exp_id: str, parent: str, i: int, epochs: int) -> list[float]:
    """One member run through ``calls`` (a store or an MlflowClient): this process's CPU seconds per call."""
    from mlflow.entities import Metric, Param, RunStatus, RunTag

    now = int(time.time() * 1000)
    tags = {"mlflow.parentRunId": parent, "dedn.trial_id": f"t{i}-m{i % 16}", "dedn.member": str(i % 16)}
    t0 = time.process_time()
    if not hasattr(calls, "set_terminated"):  # a store, not an MlflowClient
        run = calls.create_run(exp_id, "bench", now, [RunTag(k, v) for k, v in tags.items()], f"member-{i}")
    else:
        run = calls.create_run(exp_id, run_name=f"member-{i}", tags=tags)
    run_id = run.info.run_id
    t1 = time.process_time()
    metrics = [Metric(k, 0.5 + 0.001 * e, now + e, e) for e in range(epochs) for k in KEYS]
    calls.log_batch(run_id, metrics, [Param(p, str(0.1 * i)) for p in PARAMS], [])
    t2 = time.process_time()
    if hasattr(calls, "set_terminated"):
        calls.set_terminated(run_id, status="FINISHED")
    else:
        calls.update_run_info(run_id, RunStatus.FINISHED, int(time.time() * 1000), None)
    return [t1 - t0, t2 - t1, time.process_time() - t2]


def measure(calls: Any, runs: int, epochs: int, server: Any = None) -> tuple[list[float], float | None]:
    """(CPU ms per call of this process: create, log_batch, end; the server's CPU ms per run, or None)."""
    if hasattr(calls, "set_terminated"):
        exp_id = calls.create_experiment(f"bench-{time.time_ns()}")
        parent = calls.create_run(exp_id, run_name="parent").info.run_id
    else:
        exp_id = calls.create_experiment(f"bench-{time.time_ns()}")
        parent = calls.create_run(exp_id, "bench", 0, [], "parent").info.run_id
    for i in range(20):
        member_run(calls, exp_id, parent, i, epochs)
    s0 = cpu_seconds(server)
    total = [0.0, 0.0, 0.0]
    for i in range(runs):
        total = [a + b for a, b in zip(total, member_run(calls, exp_id, parent, 20 + i, epochs), strict=True)]
    s_ms = None if server is None else 1000 * (cpu_seconds(server) - s0) / runs
    return [1000 * t / runs for t in total], s_ms


def main() -> None:
    import mlflow
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    from tracking.mlflow_store import PREFIX, tracking_store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300, help="member runs timed per row")
    ap.add_argument("--epochs", type=int, default=22, help="epochs of 5 key metrics per member run")
    a = ap.parse_args()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # as the sink: no runs/get per end
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    rows: list[tuple[str, list[float] | None, float]] = []
    stores = (("MLflow's", "", SqlAlchemyStore), ("the project's", PREFIX, tracking_store))
    with tempfile.TemporaryDirectory(prefix="dedn-server-cost-") as tmp:
        for name, _, make in stores:
            db = Path(tmp) / f"{len(rows)}.db"
            sqlite_wal(db)
            calls, _ = measure(make(f"sqlite:///{db}", f"{tmp}/art"), a.runs, a.epochs)
            rows.append((f"store in this process, {name}", calls, sum(calls)))
            print(f"  {rows[-1][0]}: {sum(calls):.1f} ms per run", flush=True)
        for name, prefix, _ in stores:
            folder = Path(tmp) / f"server{len(rows)}"
            folder.mkdir()
            sqlite_wal(folder / "mlflow.db")
            backend = f"{prefix}sqlite:///{folder / 'mlflow.db'}"
            proc, uri, _ = start_mlflow_server(folder, workers=1, app="gunicorn", backend=backend)
            try:
                _, server_ms = measure(MlflowClient(tracking_uri=uri), a.runs, a.epochs, proc)
            finally:
                stop_mlflow_server(proc)
            assert server_ms is not None
            rows.append((f"server (gunicorn sync, 1 worker), {name}", None, server_ms))
            print(f"  {rows[-1][0]}: {server_ms:.1f} ms per run", flush=True)
    server_ms = rows[2][2]
    print(f"\n`python benchmarks/server_cost.py --runs {a.runs} --epochs {a.epochs}` (MLflow {mlflow.__version__}, "
          f"SQLite in WAL mode, {os.cpu_count()} cores; {a.epochs} epochs x {len(KEYS)} metrics and "
          f"{len(PARAMS)} params per run)\n")  # fmt: skip
    print(
        "| row | create ms | log_batch ms | end ms | CPU ms per run | per member-epoch ms | of the first server row |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, calls, per_run in rows:
        split = [f"{c:.2f}" for c in calls] if calls else ["", "", ""]
        share = f"{100 * per_run / server_ms:.0f}%"
        print(f"| {name} | {' | '.join(split)} | {per_run:.1f} | {per_run / a.epochs:.2f} | {share} |")


if __name__ == "__main__":
    main()
