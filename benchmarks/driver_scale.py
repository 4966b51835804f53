"""Driver load: does the search driver keep up with populations on many GPUs?

The script runs the real search driver, the Tuner that ``dedn search`` builds (``tuning.search.build_tuner``: the
Optuna searcher, the ASHA scheduler of the spec, the MLflow tracking callback and the resume signer), against a
``mlflow server`` it starts on 127.0.0.1 (SQLite backend in write-ahead-log mode in a temporary folder, served by
``tracking/mlflow_store.py``'s store unless ``--tracking-store mlflow``; one gunicorn
sync worker, or MLflow's default uvicorn with ``--server-app uvicorn --server-workers 4``) and stops at the end. Only
the trainable differs: a synthetic one that trains nothing and reports population results in the project's format
(``tuning.population.population_metrics``: ``epoch``, ``members/<j>/<metric>`` with the 20 values of
``tuning.trainable.epoch_metrics``, the leading member's values, ``val_objective_best``) at the rate of real hardware.

With ``--gpus G --population M`` each of G concurrent Tune trials (one logical GPU each) trains M members at
``--member-samples-per-s`` (29,000 per GPU, measured on an H200 at CUB shapes, docs/scaling.md) over
``--images-per-epoch`` (3,800: CUB's train split), so a population finishes an epoch every M x 3,800 / 29,000 s
and the driver is offered G x 29,000 / 3,800 member-epochs/s: 488 at G = 64.
Each trial keeps to that schedule from its own start (a trial held back by the driver catches up), writes a
line per epoch it emitted, and stops at the spec's 80 epochs or when ASHA or the time budget stops it.

Ray's worker processes run in Linux's SCHED_IDLE class (``--trial-idle``, the default: Ray starts them as ``chrt
--idle 0 python``, its ``py_executable`` runtime environment): the trials stand in for the GPU nodes of a cluster,
whose CPUs are not the driver's, so they get only the CPU that the driver, Ray and the server leave. At nice 15,
Ray's own setting (``--no-trial-idle``), the 64 worker processes took this 2-core machine for minutes as they started
(about 1.5 CPU-seconds each, and 64 idle Ray workers then use about half a core: one-off checks), and the server
waited for a CPU 93% of the time. Trials still start slowly here: each worker process gets only the CPU that is left.
Nothing starts worker processes ahead of the search: Ray gives a trial actor a process of its own, never an idle one
that ran tasks (64 started with tasks before the search were never used by a trial, and cost about half a core idle).

Per phase (the first ``--warmup`` seconds, then windows of ``--window`` seconds, then the drain after the time
budget until every received epoch is in MLflow) it prints:
- offered: member-epochs due by the schedules of the trials still emitting (a trial Tune holds in ``tune.report``
  because the driver is behind looks stopped, so this undercounts then: compare with the nominal offer); emitted: what the trials reported; received: what
  the tracking callback was given; written: epochs that reached MLflow (counted by the tracking callback's process,
  ``tracking.sink.SinkProcess``, in its successful ``log_batch`` calls); reported: member-epochs the Optuna searcher processed;
- backlog: offered minus written at the end of the phase (epochs late in Ray, in Tune or in the tracking queue);
- the tracking callback's driver time per Tune result, Tune's wait for a trial's configurations (per configuration: the
  searcher's study process asks Optuna) and the searcher's driver time (per Tune
  result, M member-epochs) latencies, the driver's CPU (cores) and resident memory, the CPU of its tracking process
  (MLflow's client, in a process of its own), of its study process (Optuna's, likewise), the server's CPU, the CPU of
  Ray's processes (its daemons and worker processes: the stand-in trials) and the cores busy on the whole machine.
At the end it compares, per member run, the epochs the driver received (Tune's ``result.json``) with the ``val_H``
history MLflow holds (the server's database) and the intermediate values of the member's Optuna trial, and prints
``sustained: X of Y member-epochs/s offered, lost L, duplicated D, backlog at end N`` where X is the written rate
after the warmup, Y = G x 29,000 / 3,800, L counts received epochs missing from MLflow or Optuna, D epochs MLflow
holds more than once, and N the backlog when the time budget ended.

By default the search is configured as a population search on many GPUs should be: the study in a journal file,
``epoch_metrics: key`` (5 MLflow metrics per member-epoch, the whole record in ``epochs.parquet`` when a run ends)
and ``reuse_actors`` (trial processes reused: on a cluster they start on the GPU nodes, here they would all start on
the driver's 2 cores). ``--optuna-storage sqlite``, ``--epoch-metrics all`` and ``--no-reuse-actors`` measure the
spec's defaults instead. ``--tracking-backend postgresql`` puts the server on a PostgreSQL database it starts (several
workers: the production topology of the README). ``--gpus 16 --member-samples-per-s 116000`` offers the same member-epochs and Tune results
per second from 16 trials (256 member runs instead of 1,024).

    python benchmarks/driver_scale.py --seconds 120               # 64 GPUs, populations of 16
    python benchmarks/driver_scale.py --seconds 240 --gpus 16 --member-samples-per-s 116000
    python benchmarks/driver_scale.py --seconds 600 --tracking-backend postgresql --profile /tmp/driver.prof
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, SERVER_APPS, start_mlflow_server, start_postgres, stop_mlflow_server, stop_postgres
from driver_measure import LINE, Counters, Sampler, at, instrument, median_ms, phases, stored_epochs

LOSSES = ("cls_c", "cls_f", "align_c", "align_f", "distill", "cal", "total")


def member_record(rng: random.Random, quality: float, epoch: int, epoch_s: float, rate: float) -> dict[str, float]:
    """One member's validation record for ``epoch``, with the keys of ``tuning.trainable.epoch_metrics``."""
    h = quality * (1 - 0.9**epoch) + rng.uniform(-0.01, 0.01)
    u, s = h * rng.uniform(0.8, 1.0), min(1.0, h * rng.uniform(1.0, 1.3))
    m = {
        "epoch": epoch,
        "val_H": h,
        "val_U": u,
        "val_S": s,
        "val_T": u * rng.uniform(0.9, 1.1),
        "val_AUSUC": h * rng.uniform(0.7, 0.9),
        "val_objective": h,
        "val_H_configured": h,
        "val_H_grid": h + rng.uniform(0, 0.02),
        "grid_lambda_rc": rng.choice((0.5, 0.6, 0.7, 0.8, 0.9, 1.0)),
        "grid_lambda_e": rng.choice((0.0, 0.25, 0.5, 0.75, 1.0)),
        "grid_c": rng.choice((0.0, 0.5, 1.0, 1.5, 2.0)),
        "samples_per_s": rate,
        "epoch_seconds": epoch_s,
    }
    m.update({f"loss_{k}": rng.uniform(0.1, 3.0) / epoch for k in LOSSES})
    return m


def synthetic_population(
    config: dict[str, Any], last_epoch: int, epoch_s: float, rate: float, emitted: str, nice: int
) -> None:
    """A Tune trial that trains nothing: every ``epoch_s`` seconds from its start it reports a population result
    for its ``config["members"]`` and writes one line to ``<emitted>/<trial id>.txt`` (line 0: its start). Its
    thread runs at niceness ``nice`` (Linux sets it per thread)."""
    from ray import tune

    os.setpriority(os.PRIO_PROCESS, 0, nice)  # this thread; a reused worker keeps it, so set, not added

    size = len(config["members"])
    trial_id = tune.get_context().get_trial_id()
    rng = random.Random(trial_id)
    quality = [rng.uniform(0.3, 0.7) for _ in range(size)]
    start, best = time.time(), -1.0
    with open(Path(emitted) / f"{trial_id}.txt", "a") as f:
        f.write(f"{start:17.3f} {0:6d} {size:4d}".ljust(LINE - 1) + "\n")
        f.flush()
        for epoch in range(1, last_epoch + 1):
            wait = start + epoch * epoch_s - time.time()
            if wait > 0:
                time.sleep(wait)
            per = {str(j): member_record(rng, quality[j], epoch, epoch_s, rate) for j in range(size)}
            lead = max(per, key=lambda j: per[j]["val_objective"])
            best = max(best, per[lead]["val_objective"])
            columns = list(per["0"])
            rows = {j: [m[c] for c in columns] for j, m in per.items()}
            metrics: dict[str, Any] = {"epoch": epoch, "members": rows, "member_columns": columns, "ended": {}}
            metrics.update({k: v for k, v in per[lead].items() if k != "epoch"})
            metrics.update(
                {
                    "val_member": int(lead),
                    "population_samples_per_s": rate * size,
                    "members_trained": size,
                    "members_active": size,
                    "peak_device_mb_per_member": 0.0,
                    "node_id": "synthetic",
                    "features_zero_copy": True,
                    "checkpointed": False,
                    "val_objective_best": best,
                }
            )
            f.write(f"{time.time():17.3f} {epoch:6d} {size:4d}".ljust(LINE - 1) + "\n")
            f.flush()
            tune.report(metrics)


def check_format(size: int, posthoc: bool = False) -> None:
    """The synthetic result has exactly the keys ``tuning.population.population_metrics`` reports."""
    from types import SimpleNamespace

    from dedn.records import EpochRecord
    from tuning.population import population_metrics

    loss = {k: 1.0 for k in LOSSES}
    point = {"H": 0.5, "U": 0.4, "S": 0.6, "T": 0.4}
    grid = {**point, "lambda_rc": 0.8, "lambda_e": 0.5, "c": 1.0}
    records = {j: EpochRecord(1, loss, point, grid, 1.0, 100.0) for j in range(size)}
    p = SimpleNamespace(status=["active"] * size, reasons=[None] * size, last_epoch=[1] * size)
    p.active, p.peak_device_bytes = list(range(size)), 0
    real = population_metrics(1, records, p, size, posthoc)
    ours = member_record(random.Random(0), 0.5, 1, 1.0, 100.0)
    if set(real["member_columns"]) != set(ours):
        raise AssertionError(f"member record keys differ: {sorted(set(real['member_columns']) ^ set(ours))}")


def build_tuner(a: argparse.Namespace, tmp: Path, uri: str, emitted: Path) -> tuple[Any, Path, int]:
    """The Tuner ``dedn search`` builds for the spec with populations of ``--population`` on ``--gpus`` logical GPUs
    (``tuning.search.tune_settings``: the searcher, the scheduler, the MLflow callback, the resume signer), its
    trainable replaced by ``synthetic_population``; returns it, the experiment folder and the epochs."""
    from ray import tune

    from tracking.sink import RunSink
    from tuning.search import SearchOptions, tune_settings
    from tuning.space import load_search_spec, trial_config

    spec, base, _ = load_search_spec(ROOT / "configs" / "search" / a.spec)
    base = {**base, "data": {**base.get("data", {}), "store": str(tmp / "no-store")}}
    epochs = int(trial_config(base, {}).effective().optim.epochs)
    size = a.population
    epoch_s = size * a.images_per_epoch / a.member_samples_per_s
    spec = spec.model_copy(
        update={
            "num_samples": 1_000_000,
            # the GPUs bound how many trials run; Tune then keeps one more trial staged, which takes over the worker
            # process of the next trial to end (a concurrency limit counts staged trials too: the worker would go)
            "max_concurrent_trials": None,
            "time_budget_s": a.seconds,
            "population": spec.population.model_copy(update={"size": size, "halving": False}),
            "reuse_actors": a.reuse_actors,
            "epoch_metrics": a.epoch_metrics,
        }
    )
    name = "driver-scale"
    exp = tmp / "runs" / name
    opts = SearchOptions(
        spec_path=str(ROOT / "configs" / "search" / a.spec),
        name=name,
        storage_path=str(tmp / "runs"),
        cpus_per_trial=0.0,
        gpus_per_trial=1.0,
        time_budget_s=a.seconds,
        tracking_uri=uri,
        population=size,
        optuna_storage=f"journal:{exp / 'optuna.journal'}" if a.optuna_storage == "journal" else None,
    )
    exp.mkdir(parents=True)
    sink = RunSink(uri, name)
    sink.open_parent({"dedn.benchmark": "driver_scale"})
    synthetic = tune.with_resources(
        tune.with_parameters(
            synthetic_population,
            last_epoch=epochs,
            epoch_s=epoch_s,
            rate=a.member_samples_per_s / size,
            emitted=str(emitted),
            nice=a.trial_nice,
        ),
        {"cpu": 0.0, "gpu": 1.0},
    )  # the one part of the driver this benchmark replaces
    tune_config, run_config = tune_settings(base, opts, spec, exp, name, sink)
    return tune.Tuner(synthetic, tune_config=tune_config, run_config=run_config), exp, epochs


def main() -> None:
    """Parse the options, run the search, print the table. Over 80 lines on purpose: a benchmark's main is one
    straight script, so each printed column sits next to the code that measured it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=64, help="logical GPUs = concurrent population trials")
    ap.add_argument("--population", type=int, default=16, help="members per population trial")
    ap.add_argument("--seconds", type=float, default=120.0, help="the search's time budget")
    ap.add_argument("--warmup", type=float, default=30.0, help="first phase: trials starting")
    ap.add_argument("--window", type=float, default=30.0, help="length of each later phase")
    ap.add_argument("--member-samples-per-s", type=float, default=29_000.0, help="per GPU, all members together")
    ap.add_argument("--images-per-epoch", type=int, default=3_800)
    ap.add_argument("--spec", default="cub.yaml", help="search spec under configs/search/ (its scheduler, epochs)")
    ap.add_argument(
        "--server-workers",
        type=int,
        default=None,
        help="mlflow server worker processes (default: 1 on SQLite, where several wait for each other in SQLite's lock; "
        "4 on PostgreSQL)",
    )
    ap.add_argument(
        "--server-app",
        choices=SERVER_APPS,
        default="gunicorn",
        help="what the mlflow server runs under: gunicorn's sync workers, or MLflow's default uvicorn, whose workers "
        "leave Nagle's algorithm on (each reply waits ~40 ms for the client's delayed ACK: benchmarks/common.py)",
    )
    ap.add_argument(
        "--server-wal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server's SQLite database in write-ahead-log mode (benchmarks/common.py: sqlite_wal), how a local "
        "server is best set up (docs/scaling.md); --no-server-wal: SQLite's default rollback journal",
    )
    ap.add_argument(
        "--trial-nice",
        type=int,
        default=19,
        help="with --no-trial-idle, the niceness of each trial's reporting thread (Ray starts its worker processes at "
        "15; in SCHED_IDLE niceness counts for nothing)",
    )
    ap.add_argument(
        "--trial-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Ray's worker processes in Linux's SCHED_IDLE class (started as `chrt --idle 0 python`, Ray's "
        "py_executable): the trials stand in for GPU nodes, whose CPUs are not the driver's, so they get only the CPU "
        "the driver, Ray and the server leave; at nice 15, Ray's own, their start-up took the server's CPU for minutes",
    )
    ap.add_argument(
        "--tracking-backend",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the tracking server's database: a SQLite file, or a real PostgreSQL started here (benchmarks/common.py: "
        "start_postgres; the production topology of the README, with --server-workers 4 by default); the server's CPU "
        "then counts PostgreSQL's processes too",
    )
    ap.add_argument(
        "--tracking-store",
        choices=("dedn", "mlflow"),
        default="dedn",
        help="the server's store: tracking/mlflow_store.py's (--backend-store-uri dedn+sqlite:///... or "
        "dedn+postgresql://...: log_batch in one session, creation and end reading only what they need) or MLflow's "
        "own on the same database",
    )
    ap.add_argument(
        "--optuna-storage",
        choices=("sqlite", "journal"),
        default="journal",
        help="the study in a journal file (journal:<experiment>/optuna.journal, what a population search on many GPUs "
        "should use) or in optuna.db (dedn search's default)",
    )
    ap.add_argument(
        "--epoch-metrics",
        choices=("key", "all"),
        default="key",
        help="the spec's epoch_metrics: key (3 metrics per member-epoch, the rest in the parent run's epochs.parquet, "
        "what a population search on many GPUs should use) or all (20 metrics per member-epoch, the spec's default)",
    )
    ap.add_argument(
        "--reuse-actors",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the spec's reuse_actors: a new trial runs in a finished trial's worker process (on a cluster, trial "
        "processes start on the GPU nodes; here they would all start on the driver's cores, two at a time)",
    )
    ap.add_argument("--profile", default=None, help="write a cProfile of the driver's main thread to this file")
    ap.add_argument("--dir", default=None, help="parent of the temporary folder (default: the system's)")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dedn-driver-scale-", dir=a.dir))
    os.environ["XDG_CONFIG_HOME"] = str(tmp / "config")  # the resume signing key of this run only
    emitted = tmp / "emitted"
    emitted.mkdir()
    offered = a.gpus * a.member_samples_per_s / a.images_per_epoch
    epoch_s = a.population * a.images_per_epoch / a.member_samples_per_s
    check_format(a.population)
    postgres = backend = ""
    workers = a.server_workers or (4 if a.tracking_backend == "postgresql" else 1)
    if a.tracking_backend == "postgresql":
        pg_pid, backend, pg_folder = start_postgres()
        postgres = str(pg_pid)
    db_url = backend or f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
    served = f"dedn+{db_url.replace('+psycopg2', '', 1)}" if a.tracking_store == "dedn" else db_url
    proc, uri, start_s = start_mlflow_server(
        tmp / "mlflow", workers=workers, jobs=False, app=a.server_app, wal=a.server_wal and not backend, backend=served
    )
    print(f"mlflow server at {uri} answered /health after {start_s:.1f} s; folder {tmp}", flush=True)
    import ray

    try:
        # Ray's documented way to run its worker processes under another command: here in SCHED_IDLE
        idle = {"py_executable": f"chrt --idle 0 {sys.executable}"} if a.trial_idle else None
        ray.init(
            address="local",
            num_cpus=a.gpus,  # a GPU node's CPUs come with it (the trials ask for none)
            num_gpus=a.gpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=idle,
        )
        c = Counters()
        instrument(c)
        tuner, exp, epochs = build_tuner(a, tmp, uri, emitted)
        sampler = Sampler(c, emitted, epoch_s, epochs, [proc.pid] + ([int(postgres)] if postgres else []))
        sampler.rows.append(sampler.sample())
        t0 = time.time()
        sampler.t_end = t0 + a.seconds
        sampler.start()
        if a.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.runcall(tuner.fit)
            prof.dump_stats(a.profile)
        else:
            tuner.fit()
        t_fit = time.time()
        t_end = min(t_fit, t0 + a.seconds)
        # the drain: until every received epoch has been written (or 120 s without progress)
        last, since = -1, time.time()
        while time.time() - since < 120:
            with c.lock:
                written, received = c.written, c.received
            if written >= received:
                break
            if written != last:
                last, since = written, time.time()
            time.sleep(1.0)
        sampler.stop.set()
        sampler.join()
        sampler.rows.append(sampler.sample())
        ray.shutdown()
        stored = stored_epochs(exp, db_url, c.storage_url)
    finally:
        stop_mlflow_server(proc)
        if postgres:
            stop_postgres(int(postgres))
            shutil.rmtree(pg_folder, ignore_errors=True)
    rows = sampler.rows
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import mlflow
    import optuna

    store_name = "tracking/mlflow_store.py's" if a.tracking_store == "dedn" else "MLflow's own"
    database = (
        f"PostgreSQL ({workers} workers)"
        if backend
        else f"SQLite {'in WAL mode' if a.server_wal else 'with its rollback journal'} ({workers} workers)"
    )
    print(
        f"\nDriver load: {a.gpus} logical GPUs x populations of {a.population} ({epoch_s:.2f} s per population epoch), "
        f"{a.seconds:g} s budget, spec {a.spec} ({epochs} epochs, its scheduler); MLflow {mlflow.__version__} server "
        f"({a.server_app}, no jobs, {database}, {store_name} store), "
        f"{'reused' if a.reuse_actors else 'new'} worker per trial ({'SCHED_IDLE' if a.trial_idle else f'its reporting thread at nice {a.trial_nice}'}), epoch metrics {a.epoch_metrics}, Optuna {optuna.__version__} ({a.optuna_storage}) on the same {os.cpu_count()} "
        f"CPU cores; nominal offer {offered:.0f} member-epochs/s"
    )
    head = (
        f"{'phase':<11} {'offered/s':>9} {'emitted/s':>9} {'received/s':>10} {'written/s':>9} {'reported/s':>10} "
        f"{'backlog':>8} {'callback ms':>11} {'ask ms':>9} {'report ms':>9} {'driver cpu':>10} {'rss MB':>7} "
        f"{'sink cpu':>8} {'study cpu':>9} {'server cpu':>10} {'ray cpu':>7} {'busy':>5}"
    )
    print(head)
    print(f"{'':<11} {'':>9} {'':>9} {'':>10} {'':>9} {'':>10} {'':>8} {'med/p99':>11} {'med/p99':>9} {'med/p99':>9}")
    for label, lo, hi in phases(rows, t0, t_end, a.warmup, a.window):
        r0, r1 = at(rows, lo), at(rows, hi)
        dt = max(1e-6, r1["t"] - r0["t"])

        def rate(k: str, r0: dict[str, float] = r0, r1: dict[str, float] = r1, dt: float = dt) -> str:
            return f"{(r1[k] - r0[k]) / dt:.0f}"

        print(
            f"{label:<11} {rate('due'):>9} {rate('emitted'):>9} {rate('received'):>10} {rate('written'):>9} "
            f"{rate('reported'):>10} {r1['due'] - r1['written']:>8.0f} {median_ms(c.callback_s, lo, hi):>11} "
            f"{median_ms(c.ask_s, lo, hi):>9} {median_ms(c.report_s, lo, hi):>9} "
            f"{(r1['cpu'] - r0['cpu']) / dt:>10.2f} {max(r['rss'] for r in rows if lo <= r['t'] <= hi + 1):>7.0f} "
            f"{(r1['sink_cpu'] - r0['sink_cpu']) / dt:>8.2f} {(r1['study_cpu'] - r0['study_cpu']) / dt:>9.2f} "
            f"{(r1['server_cpu'] - r0['server_cpu']) / dt:>10.2f} {(r1['ray_cpu'] - r0['ray_cpu']) / dt:>7.2f} "
            f"{(r1['busy'] - r0['busy']) / dt:>5.2f}"
        )
    steady0, end = at(rows, t0 + a.warmup), at(rows, t_end)
    start = at(rows, t0)
    budget = max(1e-6, end["t"] - start["t"])
    span = max(1e-6, end["t"] - steady0["t"])
    sustained = (end["written"] - steady0["written"]) / span
    backlog_end = end["due"] - end["written"]
    print(
        f"end of budget to end of fit {t_fit - t_end:.1f} s; driver peak RSS {peak_rss:.0f} MB; received "
        f"{stored['received']} member-epochs; MLflow holds {stored['mlflow']} (lost {stored['lost_mlflow']}, "
        f"duplicated {stored['duplicated']}); Optuna holds {stored['optuna']} (lost {stored['lost_optuna']})"
    )
    requests_line, per_run = server_requests(tmp / "mlflow" / "server.log")
    print(requests_line)
    trials = sum(1 for d in exp.glob("trial-*") if (d / "result.json").is_file())
    print(
        f"Ray started {len(sampler.workers_seen)} worker processes for {trials} trials that reported (a staged trial "
        "gets a process of its own while GPUs are free, and Tune lends it a finished trial's actor when one comes: "
        f"reuse_actors); in the budget Ray's processes used {(end['ray_cpu'] - start['ray_cpu']) / budget:.2f} of the "
        f"{(end['busy'] - start['busy']) / budget:.2f} cores busy"
    )
    print(
        "offered: due on the schedules of the trials still emitting (a trial that Tune holds in tune.report "
        "because the driver is behind counts as stopped: then it undercounts; the header has the nominal offer); "
        "backlog: offered - written at the phase's end; callback: "
        "tracking callback per Tune result; ask: Tune's wait for a trial's configurations (the searcher's study process "
        "asks them), per configuration; report: searcher per Tune result, on the driver's thread "
        f"({a.population} member-epochs); cpu in cores (sink: the driver's tracking process, MLflow's client; study: "
        "the searcher's Optuna process; ray: Ray's daemons and worker processes, the stand-in trials among them; busy: "
        f"the machine's {os.cpu_count()} cores); per member-epoch: the driver's, its two processes' and the server's CPU "
        f"({'MLflow and PostgreSQL' if backend else 'MLflow'}) from the first sample to the end of the drain, over the "
        "member-epochs received; requests per member run: the server's requests besides log-batch, over the runs created"
    )
    cmd = f"python benchmarks/driver_scale.py --seconds {a.seconds:g}"
    if a.gpus != 64 or a.population != 16:
        cmd += f" --gpus {a.gpus} --population {a.population}"
    if a.member_samples_per_s != 29_000 or a.images_per_epoch != 3_800:
        cmd += f" --member-samples-per-s {a.member_samples_per_s:g} --images-per-epoch {a.images_per_epoch}"
    if a.warmup != 30 or a.window != 30:
        cmd += f" --warmup {a.warmup:g} --window {a.window:g}"
    if a.spec != "cub.yaml":
        cmd += f" --spec {a.spec}"
    if a.tracking_backend != "sqlite":
        cmd += f" --tracking-backend {a.tracking_backend}"
    if a.trial_nice != 19 and not a.trial_idle:
        cmd += f" --trial-nice {a.trial_nice}"
    if not a.trial_idle:
        cmd += " --no-trial-idle"
    if a.dir is not None:
        cmd += f" --dir {a.dir}"
    if a.tracking_store != "dedn":
        cmd += f" --tracking-store {a.tracking_store}"
    if a.optuna_storage != "journal":
        cmd += f" --optuna-storage {a.optuna_storage}"
    if a.epoch_metrics != "key":
        cmd += f" --epoch-metrics {a.epoch_metrics}"
    if not a.reuse_actors:
        cmd += " --no-reuse-actors"
    if a.server_app != "gunicorn" or a.server_workers is not None:
        cmd += f" --server-app {a.server_app} --server-workers {workers}"
    if not a.server_wal:
        cmd += " --no-server-wal"
    print(f"({cmd})")
    lost = stored["lost_mlflow"] + stored["lost_optuna"]
    first, last = rows[0], rows[-1]
    epochs_in = max(1, stored["received"])
    driver_ms = 1000 * (last["cpu"] - first["cpu"]) / epochs_in
    server_ms = 1000 * (last["server_cpu"] - first["server_cpu"]) / epochs_in
    sink_ms = 1000 * (last["sink_cpu"] - first["sink_cpu"]) / epochs_in
    study_ms = 1000 * (last["study_cpu"] - first["study_cpu"]) / epochs_in
    print(
        f"sustained: {sustained:.0f} of {offered:.0f} member-epochs/s offered, lost {lost}, "
        f"duplicated {stored['duplicated']}, backlog at end {backlog_end:.0f}; driver {driver_ms:.2f} ms CPU per "
        f"member-epoch (its tracking process {sink_ms:.2f} ms, its study process {study_ms:.2f} ms), server {server_ms:.2f} ms CPU per member-epoch, {per_run:.1f} requests per member run"
    )


def server_requests(log: Path) -> tuple[str, float]:
    """The tracking server's requests by kind (its access log; ``/health`` left out), and per run created."""
    import re
    from collections import Counter

    kinds: Counter[str] = Counter()
    stamps: list[float] = []
    # uvicorn's lines start "2026/11/30 21:44:43 ...", gunicorn's "[30/Nov/2026:21:44:43 +0000] ..."
    pattern = re.compile(r'^(?:\[(\S+) \S+\]|(\S+ \S+)) .*"(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP')
    for line in log.read_text(errors="replace").splitlines():
        m = pattern.match(line)
        if m is None or m.group(4) == "/health":
            continue
        if m.group(1):
            stamps.append(time.mktime(time.strptime(m.group(1), "%d/%b/%Y:%H:%M:%S")))
        else:
            stamps.append(time.mktime(time.strptime(m.group(2), "%Y/%m/%d %H:%M:%S")))
        method, path = m.group(3), m.group(4)
        if "/mlflow-artifacts/" in path:
            kinds["upload" if method == "PUT" else f"artifacts {method}"] += 1
        else:
            kinds[path.rsplit("/mlflow/", 1)[-1].split("?")[0]] += 1
    total, runs = sum(kinds.values()), kinds["runs/create"]
    span = stamps[-1] - stamps[0] if stamps else 0.0
    parts = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    per_run = (total - kinds["runs/log-batch"]) / runs if runs else 0.0
    return (
        f"server requests: {total} in {span:.0f} s ({parts}); {runs} runs created, "
        f"{per_run:.1f} requests per run besides log-batch"
    ), per_run


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
