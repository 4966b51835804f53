"""``dedn search``: Ray Tune schedules DEDN trials, Optuna (TPE, seeded, SQLite) samples, ASHA stops early.

The experiment folder ``<storage>/<name>/`` holds Tune's state, every trial's checkpoints, the Optuna study
(``optuna.db`` unless ``--optuna-storage`` puts it elsewhere) and ``search.json`` (all that ``--resume`` needs)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cluster.objects import SharedStore, share_store
from dedn.checkpoints import TRIAL_STATE, read_trial_state
from dedn.data import open_store
from dedn.errors import DednInputError
from tracking.sink import RunSink
from tuning.experiment import (
    SearchOptions,
    check_experiment_name,
    checked_tracking_uri,
    experiment_dir,
    experiment_path,
    joined_or_abandoned,
    open_tracking,
)
from tuning.selection import METRIC, best_trial, run_final_test, trial_states
from tuning.space import INFERENCE_PARAMS, DefineByRun, SearchSpec, load_search_spec, trial_config

__all__ = [
    "SearchOptions",
    "SearchOutcome",
    "SearchStopped",
    "build_tuner",
    "experiment_path",
    "prepare",
    "run_search",
    "tune_settings",
]

MODE = "max"
_log = logging.getLogger(__name__)


@dataclass
class SearchOutcome:
    experiment: Path
    best_config: dict[str, Any]
    best_metrics: dict[str, Any]
    best_epoch: int
    num_trials: int
    trial_states: dict[str, int]
    errors: dict[str, str]
    test: dict[str, float] | None
    seconds: float
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    not_logged: list[str] | None = None
    population: int = 1
    phases: dict[str, float] | None = None  # seconds per phase of the command
    posthoc_inference: bool = False  # lambda_rc, lambda_e, c chosen per trial on the validation grid
    optuna_storage: str = ""  # the Optuna study's storage URL
    front: dict[str, float] | None = None  # the validation front's knee and its most U at S >= 0.5, 0.6, 0.7


def population_size(spec: SearchSpec, opts: SearchOptions) -> int:
    return int(opts.population or spec.population.size)


def _scheduler(spec: SearchSpec, epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        metric="val_objective_best",  # the trial's best so far (EpochReporter): what the search selects on, Optuna learns
        mode=MODE,
        max_t=epochs,
        grace_period=min(spec.scheduler.grace_period, epochs),
        reduction_factor=spec.scheduler.reduction_factor,
    )


def prepare(opts: SearchOptions) -> tuple[SearchSpec, dict[str, Any], str, Any]:
    """Check the spec, base config and store before Ray starts: (spec, base config, store path, store unread)."""
    from dedn.build import check_compatible

    spec, base, base_path = load_search_spec(opts.spec_path)
    store_path = opts.store or spec.store or base.get("data", {}).get("store")
    if not store_path:
        raise DednInputError(opts.spec_path, "store", "no feature store: give --store or 'store' in the spec")
    base = {**base, "data": {**base.get("data", {}), "store": str(store_path)}}
    if spec.objective is not None:  # every trial's epochs, grid points and the search select on it
        base["inference"] = {**base.get("inference", {}), "objective": spec.objective}
    cfg = trial_config(base, {}, source=str(base_path))
    store = open_store(store_path)
    check_compatible(cfg.effective(), store)
    check_space_against_store(spec, base, store, opts.spec_path)
    return spec, base, str(store_path), store


def check_space_against_store(spec: SearchSpec, base: dict[str, Any], store: Any, source: str) -> None:
    """Every cluster choice must exist in the store and k-means' Q may not exceed its attribute count."""
    from dedn.partitions import resolve_partition

    d = store.meta.num_attributes
    q = spec.params.get("model.kmeans_q")
    if q is not None and q.high is not None and q.high > d:
        raise DednInputError(
            source, "params.model.kmeans_q", f"high must be <= D={d} attributes of the store, got {q.high:g}"
        )
    clusters = spec.params.get("model.clusters")
    for choice in (clusters.choices or []) if clusters is not None else []:
        values: dict[str, Any] = {"model.clusters": choice}
        if choice == "kmeans":
            values["model.kmeans_q"] = min(2, d)
        try:
            resolve_partition(trial_config(base, values).effective(), store)
        except DednInputError as e:
            raise DednInputError(source, "params.model.clusters", f"choice {choice!r}: {e.rule}") from None


def run_search(opts: SearchOptions, resume: bool = False) -> SearchOutcome:
    """Run (or with ``resume`` continue) a search; prints nothing, returns the outcome (kept in ``best.json``).
    Raises ``SearchStopped`` when Ctrl-C or SIGTERM stopped it."""
    clock = _PhaseClock()
    exp, name, opts, spec, base, store = _prepare_experiment(opts, resume)
    # Ctrl-C stops the search (tuning.interrupt), as SIGTERM does, instead of Tune's own handler ending the trials
    # and letting the search go on to its final test
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    clock.end("prepare (spec, store)")
    try:
        return _search(opts, resume, clock, exp, name, spec, base, store)
    except KeyboardInterrupt as e:
        raise SearchStopped(exp) from e


class SearchStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the search in ``experiment``; ``--resume`` continues it."""

    def __init__(self, experiment: Path) -> None:
        super().__init__(f"stopped: dedn search --resume {experiment} continues it")
        self.experiment = experiment


def _search(
    opts: SearchOptions,
    resume: bool,
    clock: _PhaseClock,
    exp: Path,
    name: str,
    spec: SearchSpec,
    base: dict[str, Any],
    store: Any,
) -> SearchOutcome:
    from cluster.connect import ray_session, wait_for_a_node
    from tuning.interrupt import stop_saves_state
    from tuning.study_searcher import fail_unstarted

    sink: RunSink | None = None
    with joined_or_abandoned(ray_session(opts.address), exp, lambda: sink, resume):
        if opts.address is not None:  # a trial no node of the cluster can hold: nothing is made
            wait_for_a_node(opts.cpus_per_trial, opts.gpus_per_trial, opts.resource_wait_s, opts.address)
        if not resume:
            _make_folder(exp, name, opts, spec, base)
        with stop_saves_state() as check_stop:  # Ctrl-C, SIGTERM: Tune writes its state with every trial, then we stop
            sink = open_tracking(opts, exp, name, store, base, resume) if opts.track else None
            clock.end("Ray start, tracking")
            check_stop()
            shared = share_store(store)  # read once, put once; trials read the object store
            clock.end("store into the object store")
            check_stop()
            tuner = build_tuner(shared, base, opts, spec, exp, name, sink, resume and started(exp))
            check_stop()
            grid = tuner.fit()
        storage = str(opts.optuna_storage)
        fail_unstarted(storage, name)  # asked for a trial that the end came before
        clock.end("trials (Tune)")
        results = [grid[i] for i in range(len(grid))]
        states, errors = trial_states(results)
        best_config, best_metrics, best_entry = best_trial(results)
        if not best_metrics:
            raise DednInputError(exp, "trials", "no trial reported a result; see the trial errors above")
        from tuning.report import front_summary, front_table, trial_curves

        curves = trial_curves(results, base, shared.materialize(), opts.posthoc_inference)
        front = front_table(curves) if curves else None
        clock.end("validation curves and front")
        final = None
        if opts.final_test:
            resources = (opts.cpus_per_trial, opts.gpus_per_trial)
            final = run_final_test(shared, base, best_config, best_metrics, *resources, opts.posthoc_inference)
            clock.end("final retrain + test")
        not_logged = None
        if sink is not None:
            from tuning.report import report_search

            not_logged = report_search(
                sink, exp, results, shared, base, best_entry, best_metrics, final, opts.posthoc_inference, storage,
                (curves, front),
            )  # fmt: skip
            clock.end("MLflow summary and plots")
    clock.end("Ray stop")
    outcome = SearchOutcome(
        experiment=exp,
        best_config=best_config,
        best_metrics=best_metrics,
        best_epoch=int(best_metrics["epoch"]),
        num_trials=len(results),
        trial_states=states,
        errors=errors,
        test=final["test"] if final is not None else None,
        seconds=time.perf_counter() - clock.start,
        tracking_uri=opts.tracking_uri if sink else None,
        parent_run_id=sink.parent_id if sink else None,
        not_logged=not_logged,
        population=population_size(spec, opts),
        phases=clock.phases,
        posthoc_inference=opts.posthoc_inference,
        optuna_storage=opts.optuna_storage or "",
        front=front_summary(front) if front is not None else None,
    )
    (exp / "best.json").write_text(json.dumps(vars(outcome), indent=2, default=str) + "\n")
    return outcome


class _PhaseClock:
    """Seconds per phase: ``end(phase)`` closes the phase that ran since the last call."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.phases: dict[str, float] = {}

    def end(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.mark
        self.mark = now


def _prepare_experiment(
    opts: SearchOptions, resume: bool
) -> tuple[Path, str, SearchOptions, SearchSpec, dict[str, Any], Any]:
    """Everything before Ray starts: (folder, name, options in force, spec, base config, opened store); ``resume``
    takes the folder's ``search.json`` options; a new search's folder is made later (``_make_folder``)."""
    from cluster.connect import check_address, check_local_fit
    from tuning.optuna_storage import checked_storage
    from tuning.resume_state import repair_torn_copies, verify_state

    if opts.name is not None:  # the name first: a malformed one is refused before any address is tried
        check_experiment_name(opts.name, "--resume" if resume else "--name")
    check_address(opts.address)  # a malformed --address creates nothing
    name = opts.name or f"{Path(opts.spec_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp = experiment_dir(opts.storage_path, name)
    if resume:
        if not exp.exists():
            raise DednInputError(exp, "--resume", f"no such search: start it with --name {name}")
        if not (exp / "search.json").is_file():
            raise DednInputError(exp, "search.json", "not a dedn search experiment folder (nothing to resume)")
        opts = _saved_options(exp / "search.json", opts.address)
        if started(exp):
            for rel in repair_torn_copies(exp):
                _log.info("%s: finished the copy a killed driver left torn", exp / rel)
            verify_state(exp)  # what Ray will unpickle: only what this user's searches signed
            for state in sorted(exp.glob(f"*/checkpoint_*/{TRIAL_STATE}")):  # what the trials will load
                read_trial_state(state.parent, mmap=True)
    elif exp.exists():
        again = f"--resume {name} starts it" if (exp / "search.json").is_file() and not started(exp) else "use --resume"
        raise DednInputError(exp, "experiment", f"already exists: pick another --name or {again}")
    if opts.address is None:  # what a joined cluster holds is known once joined (and can grow: autoscaling)
        check_local_fit(opts.cpus_per_trial, opts.gpus_per_trial)
    spec, base, _, store = prepare(opts)
    opts = replace(opts, posthoc_inference=opts.posthoc_inference or spec.posthoc_inference)
    if opts.track:
        opts = replace(opts, tracking_uri=checked_tracking_uri(opts))
    field = "--optuna-storage" if opts.optuna_storage else "optuna_storage"
    storage = checked_storage(opts.optuna_storage or spec.optuna_storage, exp, field, not started(exp), name)
    opts = replace(opts, optuna_storage=storage)
    return exp, name, opts, spec, base, store


def _make_folder(exp: Path, name: str, opts: SearchOptions, spec: SearchSpec, base: dict[str, Any]) -> None:
    """A new search's folder, made once Ray holds a trial: it appears with its search.json, never without."""
    record = {"options": {**vars(opts), "name": name}, "spec": spec.model_dump(), "base": base}
    exp.parent.mkdir(parents=True, exist_ok=True)
    starting = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=exp.parent))
    starting.chmod(0o755)
    (starting / "search.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    starting.rename(exp)


def _saved_options(path: Path, address: str | None) -> SearchOptions:
    """The options ``search.json`` recorded (``--address`` as given now); one line for a file that is not one."""
    try:
        saved = json.loads(path.read_text())
        return SearchOptions(**{**saved["options"], "address": address})
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"not the record of a dedn search ({type(e).__name__}: {str(e)[:200]})"
        raise DednInputError(path, "options", why) from None


def started(exp: Path) -> bool:
    """Whether the search in ``exp`` got as far as Tune (``tuner.pkl``): else ``--resume`` starts it with its options."""
    return (exp / "tuner.pkl").is_file()


def _tune_environment(population: int) -> None:
    """Tune settings only its environment sets: its loggers write result.json only (CSV and TensorBoard cost the driver
    150 ms per population result); a population search lets up to 8 trials wait to start (with Tune's default, one,
    populations on 64 GPUs start one by one for minutes; single configurations keep it, for TPE's best proposals)."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if population > 1:
        os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "8")


def tune_settings(
    base: dict[str, Any], opts: SearchOptions, spec: SearchSpec, exp: Path, name: str, sink: RunSink | None
) -> tuple[Any, Any]:
    """Ray Tune's ``TuneConfig`` and ``RunConfig`` for a new search: its searcher, scheduler and callbacks."""
    from ray import tune

    from tuning.optuna_storage import default_storage
    from tuning.progress import ProgressView
    from tuning.record import LostTrials, ResultFile
    from tuning.resume_state import resume_signer
    from tuning.study_searcher import StudySearcher
    from tuning.tracking_callback import MLflowTrialLogger, trial_name

    size = population_size(spec, opts)
    _tune_environment(size)
    epochs = int(trial_config(base, {}).effective().optim.epochs)
    num_samples = -(-(opts.num_samples or spec.num_samples) // size)  # configurations, `size` per population trial
    callbacks: list[Any] = [ResultFile()]
    if sink is not None:
        uri, parent = str(sink.uri), str(sink.parent_id)
        args = (uri, name, str(sink.experiment_id), parent, spec.epoch_metrics, str(exp), epochs, sink.params)
        logger = MLflowTrialLogger(*args)
        callbacks.append(logger)
    if not opts.verbose:
        objective = trial_config(base, {}).inference.objective
        callbacks.append(ProgressView(num_samples, epochs, objective=objective))
    keep = {k for k in spec.params if not (opts.posthoc_inference and k in INFERENCE_PARAMS)}
    points = [{k: v for k, v in p.items() if k in keep} for p in spec.points_to_evaluate] or None
    storage = opts.optuna_storage or default_storage(exp)
    define = DefineByRun(spec, opts.posthoc_inference)
    searcher = StudySearcher(define, size if size > 1 else None, storage, name, spec.seed, points, METRIC, MODE, epochs)
    tune_config = tune.TuneConfig(
        search_alg=searcher,
        scheduler=_scheduler(spec, epochs),
        num_samples=num_samples,
        max_concurrent_trials=opts.max_concurrent_trials or spec.max_concurrent_trials,
        time_budget_s=opts.time_budget_s or spec.time_budget_s,
        reuse_actors=spec.reuse_actors,
        trial_name_creator=trial_name,  # trial-007 in Tune's folders and output, as its MLflow run is named
        trial_dirname_creator=trial_name,
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(exp.parent),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Tune keeps every checkpoint folder; the trainable empties old ones itself (EpochReporter).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        callbacks=[*callbacks, LostTrials(str(exp)), resume_signer(str(exp))],
        verbose=1 if opts.verbose else 0,
    )
    return tune_config, run_config


def build_tuner(
    shared: SharedStore,
    base: dict[str, Any],
    opts: SearchOptions,
    spec: SearchSpec,
    exp: Path,
    name: str,
    sink: RunSink | None,
    resume: bool,
) -> Any:
    """Ray Tune's Tuner for the search; with ``resume`` the experiment's own, restored with callbacks and searcher."""
    from ray import tune

    from tuning.resume_state import StateSigner, signing_key

    kwargs = dict(shared=shared, base=base, posthoc=opts.posthoc_inference, checkpoint_every=spec.checkpoint_every)
    fn: Any
    if population_size(spec, opts) > 1:
        from tuning.population import population_trainable as fn

        halving = spec.population.model_dump(include={"grace_period", "reduction_factor", "min_members"})
        kwargs["halving"] = halving if spec.population.halving else None
    else:
        from tuning.trainable import dedn_trainable as fn
    resources = {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(fn, **kwargs), resources)
    _tune_environment(population_size(spec, opts))
    if not opts.verbose:
        # Tune's older output engine prints nothing at verbose=0 (the newer one still prints a configuration
        # box and a TensorBoard hint); its INFO lines (state restored, state written, ...) are not for the console
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
        # a trial stopped before its first result has no result.json: Tune's results table warns of it
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if resume:
        return tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=False)
    key = signing_key()
    tune_config, run_config = tune_settings(base, opts, spec, exp, name, sink)
    tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
    StateSigner(exp, key).sign(exp, [exp / "tuner.pkl"])  # Tune wrote it as the Tuner was built
    return tuner
