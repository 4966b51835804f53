"""The driver's side of ``benchmarks/driver_scale.py``: counters around the real tracking callback and searcher, the
tracking process's counts, a sampler thread, the schedule of what the trials owed, and what the stores hold at the end."""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path
from typing import Any

LINE = 32  # bytes per line of a trial's emitted-epochs file: "<time> <epoch> <members>", padded


class Counters:
    """What the driver did, counted by wrappers around the real callback and searcher, and by its tracking process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0  # member-epochs given to the tracking callback
        self.written = 0  # epochs the tracking process sent to MLflow (``SinkProcess.counts``: val_H points)
        self.reported = 0  # member-epochs the searcher processed
        self.callback_s: list[tuple[float, float]] = []  # (time, seconds in the callback per Tune result)
        self.ask_s: list[tuple[float, float]] = []  # (time, seconds per configuration asked)
        self.report_s: list[tuple[float, float]] = []  # (time, seconds per Tune result in the searcher)
        self.storage_url = ""
        self.loggers: list[Any] = []  # the tracking callbacks set up in this process
        self.searchers: list[Any] = []  # the searchers that suggested in this process


def instrument(c: Counters) -> None:
    """Wrap, in this process, the tracking callback's on_trial_result and the searcher's suggest and on_trial_result,
    to count and time them (the classes stay the real ones)."""
    from tuning.population import section
    from tuning.study_searcher import StudySearcher
    from tuning.tracking_callback import MLflowTrialLogger

    on_result = MLflowTrialLogger.on_trial_result

    @functools.wraps(on_result)
    def logger_result(
        self: Any, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **kw: Any
    ) -> None:
        t0 = time.perf_counter()
        on_result(self, iteration, trials, trial, result, **kw)
        dt = time.perf_counter() - t0
        with c.lock:
            c.received += len(section(result, "members"))
            c.callback_s.append((time.time(), dt))

    suggest = StudySearcher.suggest
    waiting: list[float] = []  # since when Tune waits for the searcher's next configuration

    @functools.wraps(suggest)
    def timed_suggest(self: Any, trial_id: str) -> Any:
        # the searcher's study process asks; it answers None until it has: time from the first call to the answer
        c.storage_url = self.storage_url
        if not any(s is self for s in c.searchers):
            c.searchers.append(self)
        t0 = time.perf_counter()
        out = suggest(self, trial_id)
        if out is None:
            waiting[:] = waiting or [t0]
            return out
        with c.lock:
            c.ask_s.append((time.time(), (time.perf_counter() - (waiting or [t0])[0]) / (self.size or 1)))
        waiting.clear()
        return out

    searcher_result = StudySearcher.on_trial_result

    @functools.wraps(searcher_result)
    def timed_result(self: Any, trial_id: str, result: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        searcher_result(self, trial_id, result)
        dt = time.perf_counter() - t0
        with c.lock:
            c.reported += len(section(result, "members"))
            c.report_s.append((time.time(), dt))

    setup = MLflowTrialLogger.setup

    @functools.wraps(setup)
    def kept_setup(self: Any, *a: Any, **kw: Any) -> None:
        setup(self, *a, **kw)
        c.loggers.append(self)

    MLflowTrialLogger.setup = kept_setup  # type: ignore[method-assign]
    MLflowTrialLogger.on_trial_result = logger_result  # type: ignore[method-assign]
    StudySearcher.suggest = timed_suggest  # type: ignore[method-assign]
    StudySearcher.on_trial_result = timed_result  # type: ignore[method-assign]


def schedule(emitted: Path, now: float, epoch_s: float, last_epoch: int, starts: dict[str, float]) -> tuple[int, int]:
    """(member-epochs due by ``now`` on the running trials' schedules, member-epochs emitted), from the files the
    trials write. A trial's schedule ends at its last emitted epoch once it stopped (no line for 2 epochs)."""
    due = done = 0
    for f in emitted.glob("*.txt"):
        size = f.stat().st_size
        lines = size // LINE
        if lines == 0:
            continue
        if f.name not in starts:
            with open(f, "rb") as fh:
                head = fh.read(LINE).split()
            starts[f.name] = float(head[0])
            starts[f.name + "/m"] = float(head[2])
        members = int(starts[f.name + "/m"])
        n = lines - 1
        on_time = min(last_epoch, int((now - starts[f.name]) / epoch_s))
        if on_time > n + 2:  # stopped by the scheduler or the budget: due no more than it sent
            with open(f, "rb") as fh:
                fh.seek((lines - 1) * LINE)
                last_line = fh.read(LINE).split()
            on_time = n if now - float(last_line[0]) > 2 * epoch_s else on_time
        due += max(on_time, n) * members
        done += n * members
    return due, done


def _ray_worker(cmdline: list[str]) -> bool:
    """Whether a process is one of Ray's worker processes: ``default_worker.py`` as it starts, then the title Ray gives
    it (``ray::IDLE``, ``ray::ImplicitFunc.train``; its agents are ``ray::...Agent``)."""
    head = " ".join(cmdline[:3])
    return "default_worker.py" in head or (head.startswith("ray::") and not head.split()[0].endswith("Agent"))


class Sampler(threading.Thread):
    """Once a second: offered, emitted, received, written, reported, driver CPU and memory, the CPU of the driver's
    tracking and study processes, of Ray's processes and of the server, and the machine's busy CPU seconds."""

    def __init__(self, c: Counters, emitted: Path, epoch_s: float, last_epoch: int, server_pids: list[int]) -> None:
        super().__init__(daemon=True)
        import psutil

        self.c, self.emitted, self.epoch_s, self.last_epoch = c, emitted, epoch_s, last_epoch
        self.me = psutil.Process()
        self.server_pids = server_pids  # the tracking server's processes and, for PostgreSQL, the database's
        self.server_seen: dict[int, float] = {}  # pid -> its CPU seconds when last seen (a process that ended keeps it)
        self.sink_seen: dict[int, float] = {}  # the same for the tracking callback's process
        self.study_seen: dict[int, float] = {}  # the same for the searcher's study process
        self.ray_seen: dict[int, float] = {}  # the same for Ray's processes: its daemons and worker processes
        self.workers_seen: set[int] = set()  # Ray's worker processes seen (one per trial actor Ray started)
        self.rows: list[dict[str, float]] = []
        self.starts: dict[str, float] = {}
        self.stop = threading.Event()
        self.t_end = float("inf")  # the time budget's end: nothing is due after it

    def cpu(self, procs: list[Any]) -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:
                pass
        return total

    def server_cpu(self) -> float:
        """CPU seconds of the server's process trees, each process counted as it was last seen (children come and go:
        a PostgreSQL backend per connection)."""
        import psutil

        for pid in self.server_pids:
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    t = p.cpu_times()
                    self.server_seen[p.pid] = t.user + t.system + t.children_user + t.children_system
                except psutil.Error:
                    continue
        return sum(self.server_seen.values())

    def sink(self) -> tuple[int, float]:
        """(epochs written, CPU seconds) of the tracking callback's process (``tracking.sink.SinkProcess``)."""
        import psutil

        written = 0
        for logger in list(self.c.loggers):
            if logger.sink is None:
                continue
            written += logger.sink.counts()[1]
            try:
                t = psutil.Process(logger.sink.process.pid).cpu_times()
                self.sink_seen[logger.sink.process.pid] = t.user + t.system
            except psutil.Error:
                pass
        return written, sum(self.sink_seen.values())

    def study(self) -> float:
        """CPU seconds of the searcher's study process (``tuning.study_searcher.Study``)."""
        import psutil

        for searcher in list(self.c.searchers):
            pid = searcher.process.process.pid
            try:
                t = psutil.Process(pid).cpu_times()
                self.study_seen[pid] = t.user + t.system
            except psutil.Error:
                pass
        return sum(self.study_seen.values())

    def ray_cpu(self) -> float:
        """CPU seconds of the driver's other descendants: Ray's daemons (GCS, raylet, its agents) and its worker
        processes, which run the trials that stand in for the GPU nodes (the server, the sink and the study left out)."""
        import psutil

        mine = {*self.server_seen, *self.sink_seen, *self.study_seen}
        for p in self.me.children(recursive=True):
            if p.pid in mine:
                continue
            try:
                t = p.cpu_times()
                if p.pid not in self.ray_seen and _ray_worker(p.cmdline()):
                    self.workers_seen.add(p.pid)
                self.ray_seen[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        return sum(self.ray_seen.values())

    def sample(self) -> dict[str, float]:
        import psutil

        now = time.time()
        times = psutil.cpu_times()
        # the machine's busy CPU seconds, all cores (not idle, not waiting for a disk, not stolen by its host)
        busy = times.user + times.system + sum(getattr(times, k, 0.0) for k in ("nice", "irq", "softirq"))
        due, done = schedule(self.emitted, min(now, self.t_end), self.epoch_s, self.last_epoch, self.starts)
        written, sink_cpu = self.sink()
        with self.c.lock:
            self.c.written = max(self.c.written, written)
            received, written, reported = self.c.received, self.c.written, self.c.reported
        return {
            "t": now,
            "due": due,
            "emitted": done,
            "received": received,
            "written": written,
            "reported": reported,
            "cpu": self.cpu([self.me]),
            "server_cpu": self.server_cpu(),
            "sink_cpu": sink_cpu,
            "study_cpu": self.study(),
            "ray_cpu": self.ray_cpu(),
            "busy": busy,
            "rss": self.me.memory_info().rss / 2**20,
        }

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.rows.append(self.sample())


def stored_epochs(exp: Path, db_url: str, storage_url: str) -> dict[str, Any]:
    """Compare the epochs the driver received with what MLflow (its database, ``db_url``: sqlite:/// or postgresql://)
    and Optuna hold, per member run (run key: MLflow's tag and Optuna's user attribute ``dedn.trial_id``)."""
    import optuna
    import sqlalchemy

    from tuning.population import member_key, section

    received: set[tuple[str, int]] = set()
    for f in exp.glob("*/result.json"):
        for line in f.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                for j, m in section(row, "members").items():
                    received.add((member_key(row["trial_id"], int(j)), int(m["epoch"])))
    engine = sqlalchemy.create_engine(db_url)
    with engine.connect() as con:
        keys = dict(con.execute(sqlalchemy.text("SELECT run_uuid, value FROM tags WHERE key = 'dedn.trial_id'")).all())
        rows = con.execute(
            sqlalchemy.text("SELECT run_uuid, step, COUNT(*) FROM metrics WHERE key = 'val_H' GROUP BY run_uuid, step")
        ).all()
    engine.dispose()
    in_mlflow: dict[tuple[str, int], int] = {}
    for run_id, step, n in rows:
        if run_id in keys:
            in_mlflow[(keys[run_id], int(step))] = int(n)
    in_optuna: set[tuple[str, int]] = set()
    if storage_url:
        from tuning.optuna_storage import open_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(storage_url)
        for name in optuna.get_all_study_names(storage):
            study = optuna.load_study(study_name=name, storage=storage)
            for t in study.get_trials(deepcopy=False):
                for step in t.intermediate_values:
                    in_optuna.add((str(t.user_attrs.get("dedn.trial_id")), int(step)))
    return {
        "received": len(received),
        "mlflow": len(in_mlflow),
        "lost_mlflow": len(received - set(in_mlflow)),
        "duplicated": sum(n - 1 for n in in_mlflow.values()),
        "optuna": len(in_optuna),
        "lost_optuna": len(received - in_optuna),
    }


def phases(
    rows: list[dict[str, float]], t0: float, t_end: float, warmup: float, window: float
) -> list[tuple[str, float, float]]:
    out = [("warmup", t0, min(t0 + warmup, t_end))]
    t = t0 + warmup
    while t < t_end - 1e-6:
        out.append((f"{t - t0:.0f}-{min(t + window, t_end) - t0:.0f} s", t, min(t + window, t_end)))
        t += window
    if rows and rows[-1]["t"] > t_end + 0.5:
        out.append(("drain", t_end, rows[-1]["t"]))
    return out


def at(rows: list[dict[str, float]], t: float) -> dict[str, float]:
    """The last sample taken at or before ``t`` (the first one if none)."""
    best = rows[0]
    for r in rows:
        if r["t"] <= t + 1e-6:
            best = r
    return best


def median_ms(pairs: list[tuple[float, float]], lo: float, hi: float) -> str:
    vals = sorted(dt for t, dt in pairs if lo <= t < hi)
    if not vals:
        return "-"
    return f"{1000 * vals[len(vals) // 2]:.1f}/{1000 * vals[min(len(vals) - 1, int(len(vals) * 0.99))]:.0f}"
