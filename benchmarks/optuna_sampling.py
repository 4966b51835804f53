"""Optuna TPE sampling time against the number of finished trials already in the study.

The space is a search spec's (configs/search/cub.yaml by default: lr, beta, gamma loguniform; eps, lambda_rc,
lambda_e, calibration uniform; clusters categorical; kmeans_q int when clusters is kmeans), sampled with the
project's own define-by-run function (tuning.space.DefineByRun). The study is filled fast with
``study.add_trials`` of completed trials holding random values and a random objective, in three storages: in
memory, SQLite (RDBStorage on a file, as ``dedn search`` keeps its study) and a journal file (JournalStorage with
JournalFileBackend). At each size the median of ``--repeats`` calls is
timed for:
- ask + suggest: ``study.ask()`` and every suggestion of the space (TPE samples inside the suggestions);
- tell: ``study.tell(trial, value)``;
- report: one ``trial.report(value, step)``, the intermediate value Ray Tune's OptunaSearch writes per epoch;
- a population's ask (``tpe-16``, ``batch-16``): 16 configurations asked as the search's searcher asks them,
  per configuration; ``tpe-16`` as it did before (one constant-liar TPE ask each), ``batch-16`` as it does now
  (``tuning.optuna_internals.PopulationTPE`` in one batch; in a journal, the writes kept and written once).
One untimed call at each size comes first (it loads the storage's trial cache). Samplers: TPE seeded
(``TPESampler(seed=0)``, what the project uses) and TPE multivariate (``multivariate=True``). To save time the
SQLite study is filled through a connection with ``PRAGMA synchronous=OFF`` and the journal with fsync off; the
timed calls use default settings. Each size also records the disk's sync latency just before (raw SQLite commit),
since every SQLite or journal write waits for one.

    python benchmarks/optuna_sampling.py                          # sizes 0 100 500 1000 2000 4000
    python benchmarks/optuna_sampling.py --sizes 0 100 1000 --repeats 9 --storages memory
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT

SAMPLERS = ("tpe", "tpe-mv", "tpe-16", "batch-16")
POPULATION = 16
STORAGES = ("memory", "sqlite", "journal")


def distributions(spec: Any) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name, p in spec.params.items():
        if p.type == "categorical":
            out[name] = CategoricalDistribution(p.choices)
        elif p.type == "int":
            out[name] = IntDistribution(int(p.low), int(p.high), step=int(p.step) if p.step else 1, log=p.log)
        else:
            log = p.type == "loguniform" or p.log
            out[name] = FloatDistribution(p.low, p.high, log=log, step=None if log else p.step)
    return out


def random_trials(spec: Any, n: int, rng: np.random.Generator) -> list[Any]:
    """``n`` completed trials with random values in the space (conditions respected) and a random objective."""
    from optuna.distributions import CategoricalDistribution, IntDistribution
    from optuna.trial import create_trial

    dists = distributions(spec)
    out = []
    for _ in range(n):
        params: dict[str, Any] = {}
        used: dict[str, Any] = {}
        for name, p in spec.params.items():
            if p.when and any(params.get(k) != v for k, v in p.when.items()):
                continue
            d = dists[name]
            if isinstance(d, CategoricalDistribution):
                params[name] = d.choices[int(rng.integers(len(d.choices)))]
            elif isinstance(d, IntDistribution):
                params[name] = int(rng.integers(d.low, d.high + 1))
            elif d.log:
                params[name] = float(np.exp(rng.uniform(np.log(d.low), np.log(d.high))))
            else:
                params[name] = float(rng.uniform(d.low, d.high))
            used[name] = d
        out.append(create_trial(params=params, distributions=used, value=float(rng.random())))
    return out


def fast_fill_storage(url: str) -> Any:
    """An RDBStorage whose connections skip fsync (``PRAGMA synchronous=OFF``): used only to fill the study
    fast; the timed calls go through a second, default RDBStorage on the same file."""
    import optuna
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(url)

    def no_sync(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA synchronous=OFF")

    event.listen(storage.engine, "connect", no_sync)
    storage.engine.dispose()  # connections made from now on get the pragma
    return storage


def open_storages(kind: str, folder: Path) -> tuple[Any, Any]:
    """(storage to fill the study through, storage the timed calls use)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if kind == "memory":
        storage: Any = optuna.storages.InMemoryStorage()
        return storage, storage
    if kind == "sqlite":
        url = f"sqlite:///{folder / 'optuna.db'}"
        return fast_fill_storage(url), optuna.storages.RDBStorage(url)  # timed: default settings, as dedn search
    storage = JournalStorage(JournalFileBackend(str(folder / "optuna.log")))
    return storage, storage


@contextlib.contextmanager
def no_fsync(on: bool) -> Iterator[None]:
    """Make ``os.fsync`` a no-op while filling the journal study (fill speed only; timed calls sync as usual)."""
    if not on:
        yield
        return
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def commit_ms(folder: Path, n: int = 11) -> float:
    """Median ms of one tiny SQLite insert + commit in ``folder``: the disk's sync latency at that moment."""
    import sqlite3

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


def make_sampler(kind: str, seed: int) -> Any:
    import optuna

    from tuning.optuna_internals import PopulationTPE

    if kind == "tpe-16":  # the searcher before populations were batched
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if kind == "batch-16":  # the searcher now (tuning.study_searcher)
        return PopulationTPE(seed=seed, constant_liar=True)
    return optuna.samplers.TPESampler(seed=seed, multivariate=kind == "tpe-mv")


def time_population(study: Any, define: Any, repeats: int, flush: Any) -> float:
    """Median milliseconds per configuration of asking a population of ``POPULATION`` (the searcher's ask: each
    configuration suggested and given its member index; in one batch with ``PopulationTPE``, then ``flush``)."""
    import optuna

    per = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        batch = study.sampler.batch(POPULATION) if hasattr(study.sampler, "batch") else contextlib.nullcontext()
        with batch:
            trials = []
            for j in range(POPULATION):
                trial = study.ask()
                define(trial)
                trial.set_user_attr("member", j)
                trials.append(trial)
        flush()
        if i:
            per.append(1e3 * (time.perf_counter() - t0) / POPULATION)
        for trial in trials:  # finished, so the next population sees as many finished trials
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        flush()
    return statistics.median(per)


def time_calls(study: Any, define: Any, repeats: int, rng: np.random.Generator) -> dict[str, float]:
    """Median milliseconds of ask+suggest, tell and report over ``repeats`` trials (after one untimed)."""
    ask_ms, tell_ms, report_ms = [], [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        trial = study.ask()
        define(trial)
        t1 = time.perf_counter()
        trial.report(float(rng.random()), 1)
        t2 = time.perf_counter()
        study.tell(trial, float(rng.random()))
        t3 = time.perf_counter()
        if i:
            ask_ms.append(1e3 * (t1 - t0))
            report_ms.append(1e3 * (t2 - t1))
            tell_ms.append(1e3 * (t3 - t2))
    return {
        "ask": statistics.median(ask_ms),
        "tell": statistics.median(tell_ms),
        "report": statistics.median(report_ms),
    }


def main() -> None:
    """Parse the options, measure every row, print the table. Over 80 lines on purpose: a benchmark's main
    is one straight script, so each printed row sits next to the code that measured it."""
    import optuna
    from optuna.storages.journal import JournalStorage

    from tuning.space import DefineByRun, load_search_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="configs/search/cub.yaml")
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 100, 500, 1000, 2000, 4000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--storages", nargs="+", choices=list(STORAGES), default=list(STORAGES))
    ap.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS))
    ap.add_argument(
        "--dir", default=None, help="folder for the SQLite and journal files (default: a new temporary one)"
    )
    a = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*multivariate.*")  # conditional kmeans_q falls back to univariate
    spec_path = Path(a.spec) if Path(a.spec).is_absolute() else ROOT / a.spec
    spec, _, _ = load_search_spec(spec_path)
    define = DefineByRun(spec, posthoc_inference=False)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="dedn-optuna-", dir=a.dir))
    sizes = sorted(set(a.sizes))
    results: dict[tuple[str, str, int], dict[str, float]] = {}
    fill_s: dict[str, float] = {}
    probe: dict[int, float] = {}
    for storage_kind in a.storages:
        filler_storage, storage = open_storages(storage_kind, tmp)
        # One study is filled; each sampler opens it. The timed trials stay in the study (repeats + 1 per
        # sampler and size), so the real count of finished trials is a little above the filled size.
        filler = optuna.create_study(study_name="fill", storage=filler_storage, direction="maximize")
        filled, fill_s[storage_kind] = 0, 0.0
        for size in sizes:
            t0 = time.perf_counter()
            with no_fsync(storage_kind == "journal"):
                filler.add_trials(random_trials(spec, size - filled, rng))
            fill_s[storage_kind] += time.perf_counter() - t0
            filled = size
            if storage_kind != "memory":
                os.sync()  # flush the unsynced fill, so it does not slow the timed writes
                probe[size] = commit_ms(tmp)
            for kind in a.samplers:
                flush: Any = lambda: None  # noqa: E731
                timed = storage
                if kind == "batch-16" and storage_kind == "journal":  # the searcher's buffered journal
                    from tuning.optuna_storage import BufferedJournal

                    backend = BufferedJournal(str(tmp / "optuna.log"))
                    timed, flush = JournalStorage(backend), backend.flush
                study = optuna.load_study(study_name="fill", storage=timed, sampler=make_sampler(kind, spec.seed))
                done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
                if kind.endswith("-16"):
                    ask = time_population(study, define, a.repeats, flush)
                    r = {"finished": done, "ask": ask, "tell": float("nan"), "report": float("nan")}
                else:
                    r = {"finished": done, **time_calls(study, define, a.repeats, rng)}
                results[(storage_kind, kind, size)] = r
                print(
                    f"  {storage_kind} {kind}: {size} filled ({done} finished): ask+suggest {r['ask']:.1f} ms, "
                    f"tell {r['tell']:.1f} ms, report {r['report']:.1f} ms",
                    flush=True,
                )

    print(
        f"\nOptuna {optuna.__version__} TPE (seed {spec.seed}): median ms per call over {a.repeats} calls, against the "
        f"trials already finished in the study ({len(spec.params)} parameters of {spec_path.name}, 1 conditional)"
    )
    head = [f"ask {k}" for k in a.samplers] + ["tell", "report", "disk commit"]
    width = max(11, *(len(h) for h in head))
    print(f"{'finished':>8} {'storage':<8} " + " ".join(f"{h:>{width}}" for h in head))
    for size in sizes:
        for st in a.storages:
            vals = [results[(st, k, size)]["ask"] for k in a.samplers]
            single = [k for k in a.samplers if not k.endswith("-16")] or a.samplers
            vals += [results[(st, single[0], size)][c] for c in ("tell", "report")]
            cells = [f"{v:>{width}.1f}" for v in vals]
            cells.append(f"{probe[size]:>{width}.1f}" if st != "memory" else f"{'-':>{width}}")
            print(f"{size:>8} {st:<8} " + " ".join(cells))
    print(
        "ask = study.ask() + every suggestion of the space (TPE samples there); tell = study.tell(); "
        f"report = one trial.report() (tell and report with the first sampler of one configuration per ask). "
        f"tpe-16, batch-16: ms per configuration of a population of {POPULATION} asked as the searcher asks (member "
        "attribute set): tpe-16 one TPESampler(constant_liar=True) ask each, as before populations were batched; "
        "batch-16 one PopulationTPE batch, the journal buffered and written once (tuning.optuna_internals, tuning.optuna_storage)."
    )
    print(
        "sqlite: RDBStorage on a file, as dedn search; each ask commits once per suggested parameter, each tell and "
        "report at least once. journal: JournalStorage(JournalFileBackend), one fsync per write."
    )
    print(
        "disk commit = one raw SQLite insert + commit in the same folder just before: the disk's sync latency at "
        "that moment, which the sqlite and journal rows pay on every write."
    )
    extra = len(sizes) * len(a.samplers) * (a.repeats + 1)
    print(
        f"finished = trials added before timing; the timed trials stay in the study (up to {extra} more at the "
        "last size). Filling with add_trials took " + ", ".join(f"{s} {v:.1f} s" for s, v in fill_s.items()) + "."
    )
    cmd = f"python benchmarks/optuna_sampling.py --sizes {' '.join(map(str, sizes))} --repeats {a.repeats}"
    if a.storages != list(STORAGES):
        cmd += f" --storages {' '.join(a.storages)}"
    if a.samplers != list(SAMPLERS):
        cmd += f" --samplers {' '.join(a.samplers)}"
    if a.dir is not None:
        cmd += f" --dir {a.dir}"
    print(f"({cmd})")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    main()
