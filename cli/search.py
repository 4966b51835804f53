"""``dedn search``: a Ray Tune + Optuna + ASHA search over DEDN hyperparameters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from dedn.errors import without_password

if TYPE_CHECKING:
    from tuning.search import SearchOutcome

__all__ = ["search"]


@click.command()
@click.option(
    "--config",
    "-c",
    "spec",
    type=click.Path(path_type=Path),
    required=True,
    help="Search spec YAML under configs/search/.",
)
@click.option("--store", default=None, help="Feature store (overrides the spec and the base config).")
@click.option("--name", default=None, help="Experiment name (default: <spec>-<date-time>).")
@click.option(
    "--storage-path",
    default="runs",
    show_default=True,
    envvar="DEDN_STORAGE_PATH",
    help="Where experiments live; shared storage (e.g. s3://bucket/dedn) on a multi-node cluster.",
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Configurations to train (overrides the spec); with --population M, in ceil(N/M) Tune trials.",
)
@click.option(
    "--population",
    type=click.IntRange(min=1),
    default=None,
    help="Train M configurations per trial as one batched model, halving members as they fall behind "
    "(overrides the spec's population.size; 1 = one configuration per trial).",
)
@click.option("--max-concurrent-trials", type=click.IntRange(min=1), default=None)
@click.option("--time-budget-s", type=click.FloatRange(min=1), default=None, help="Stop starting trials after this.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0.1), default=1.0, show_default=True)
@click.option(
    "--gpus-per-trial",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Fractions share a GPU, e.g. 0.25 for four trials per GPU.",
)
@click.option(
    "--resource-wait",
    "resource_wait_s",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="With --address on an autoscaling cluster: seconds to wait for a node that can hold a trial before "
    "stopping with one line; 0 stops at once. A cluster that cannot grow is not waited for. Nothing of the search "
    "is made meanwhile.",
)
@click.option(
    "--posthoc-inference",
    is_flag=True,
    help="Do not sample lambda_rc, lambda_e, c: sweep them per trial on validation (no training cost).",
)
@click.option(
    "--address",
    default=None,
    help="Join a running Ray cluster, e.g. one started with `ray start --head`: host:port of its head, or "
    "'auto' (RAY_ADDRESS, else the Ray cluster running on this machine). A cluster with token authentication "
    "is joined with this machine's token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN). "
    "Default: a new local Ray of this command's own, whatever RAY_ADDRESS says.",
)
@click.option(
    "--resume",
    "resume",
    default=None,
    metavar="EXPERIMENT",
    help="Continue an interrupted search (its folder, or its name under --storage-path).",
)
@click.option("--no-final-test", is_flag=True, help="Skip retraining the best configuration and testing it once.")
@click.option(
    "--tracking-uri",
    default=None,
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow store: http://host:port for a shared server, postgresql://USER@HOST[:PORT]/DATABASE for a "
    "PostgreSQL database (default: sqlite:///mlflow.db here).",
)
@click.option(
    "--optuna-storage",
    default=None,
    envvar="DEDN_OPTUNA_STORAGE",
    metavar="URL",
    help="Where the Optuna study lives: sqlite:///PATH, postgresql://USER@HOST[:PORT]/DATABASE or journal:PATH "
    "(a journal file; overrides the spec's optuna_storage; default: optuna.db in the experiment folder).",
)
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--verbose", is_flag=True, help="Ray Tune's own per-result tables instead of one progress line.")
def search(
    spec: Path,
    store: str | None,
    name: str | None,
    storage_path: str,
    num_samples: int | None,
    population: int | None,
    max_concurrent_trials: int | None,
    time_budget_s: float | None,
    cpus_per_trial: float,
    gpus_per_trial: float,
    resource_wait_s: float,
    posthoc_inference: bool,
    address: str | None,
    resume: str | None,
    no_final_test: bool,
    tracking_uri: str | None,
    optuna_storage: str | None,
    no_tracking: bool,
    verbose: bool,
) -> None:
    """Search DEDN hyperparameters: Optuna samples, ASHA stops bad trials, Ray runs them anywhere.

    Trials train on the validation task and report validation H each epoch with a checkpoint; the best
    configuration is then retrained on trainval and tested once. Features are read from Parquet once
    and served to every trial through Ray's object store.

    \b
    Examples:
      dedn search -c configs/search/tiny.yaml --store data/tiny
      dedn search -c configs/search/cub.yaml --store data/cub --address auto --gpus-per-trial 0.25
      dedn search -c configs/search/tiny.yaml --posthoc-inference --num-samples 16
      dedn search -c configs/search/cub.yaml --population 16 --gpus-per-trial 1
      dedn search -c configs/search/tiny.yaml --resume runs/tiny-20261127-101500
      dedn search -c configs/search/cub.yaml --tracking-uri http://127.0.0.1:5000
      dedn search -c configs/search/cub.yaml --tracking-uri postgresql://dedn@127.0.0.1/mlflow --optuna-storage postgresql://dedn@127.0.0.1/optuna
    """
    if address is None:  # a local instance: Ray on 127.0.0.1 (set before anything imports ray)
        from cluster.connect import local_ray_on_loopback

        local_ray_on_loopback()
    from tuning.search import SearchOptions, SearchStopped, experiment_path, run_search

    if resume is not None:
        storage_path, name = experiment_path(storage_path, resume)
    opts = SearchOptions(
        spec_path=str(spec),
        store=store,
        name=name,
        storage_path=storage_path,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        num_samples=num_samples,
        max_concurrent_trials=max_concurrent_trials,
        time_budget_s=time_budget_s,
        posthoc_inference=posthoc_inference,
        address=address,
        final_test=not no_final_test,
        tracking_uri=tracking_uri,
        track=not no_tracking,
        population=population,
        verbose=verbose,
        resource_wait_s=resource_wait_s,
        optuna_storage=optuna_storage,
    )
    try:
        out = run_search(opts, resume=resume is not None)
    except SearchStopped as e:
        if e.experiment.exists():
            click.echo(f"\nstopped: `dedn search -c {spec} --resume {e.experiment}` continues it", err=True)
        raise KeyboardInterrupt from None
    _print_outcome(out)


def _print_outcome(out: SearchOutcome) -> None:
    """The experiment, the MLflow parent run, failures, the best configuration and its scores."""
    click.echo(
        f"\nexperiment  {out.experiment.name}   {out.experiment}   "
        f"({out.num_trials} {'population ' if out.population > 1 else ''}trials: "
        + ", ".join(f"{n} {s.lower()}" for s, n in out.trial_states.items())
        + f", {out.seconds:.0f} s)"
    )
    if out.tracking_uri:
        click.echo(
            f"mlflow      {without_password(out.tracking_uri)}   parent run {out.parent_run_id}   (dedn ui to browse)"
        )
    for what in out.not_logged or []:
        click.echo(f"not logged  {what}")
    for trial, reason in out.errors.items():
        click.echo(f"failed      {trial}: {reason}")
    # optuna-dashboard opens a storage URL, or a journal file by its path
    dashboard = out.optuna_storage.removeprefix("journal:") or f"sqlite:///{out.experiment / 'optuna.db'}"
    click.echo(f"optuna      optuna-dashboard {without_password(dashboard)}")
    click.echo(f"\nbest configuration (epoch {out.best_epoch}):")
    for k, v in sorted(out.best_config.items()):
        click.echo(f"  {k:<24} {v:.4g}" if isinstance(v, float) else f"  {k:<24} {v}")
    m = out.best_metrics
    if out.posthoc_inference:
        click.echo(
            f"  {'inference (validation grid)':<24} lambda_rc={m['grid_lambda_rc']} "
            f"lambda_e={m['grid_lambda_e']} c={m['grid_c']}"
        )
    click.echo(f"\n{'(%)':<40} {'U':>6} {'S':>6} {'H':>6} {'T':>6}")
    click.echo(
        f"{'validation (selection)':<40} {100 * m['val_U']:>6.1f} {100 * m['val_S']:>6.1f} "
        f"{100 * m['val_H']:>6.1f} {100 * m['val_T']:>6.1f}"
    )
    if out.test is not None:
        t = out.test
        click.echo(
            f"{'test once (retrained on trainval)':<40} {100 * t['U']:>6.1f} {100 * t['S']:>6.1f} "
            f"{100 * t['H']:>6.1f} {100 * t['T']:>6.1f}"
        )
    auc = [f"validation {100 * m['val_AUSUC']:.1f}" if "val_AUSUC" in m else ""]
    auc += [f"test {100 * out.test['AUSUC']:.1f}" if out.test is not None and "AUSUC" in out.test else ""]
    if any(auc):
        click.echo(f"{'AUSUC (area under the S/U curve, %)':<40} " + ", ".join(a for a in auc if a))
    if out.front:
        f = out.front
        floors = [(float(k.removeprefix("front_U_at_S")), v) for k, v in f.items() if k.startswith("front_U_at_S")]
        at = ", ".join(f"S >= {100 * x:.0f}%: U {100 * v:.1f}" for x, v in floors)
        click.echo(
            f"\nvalidation front over all trials (front.parquet): knee U {100 * f['front_knee_U']:.1f} "
            f"S {100 * f['front_knee_S']:.1f}; most U at {at}"
        )
