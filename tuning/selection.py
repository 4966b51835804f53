"""Which configuration a search chose, and its one test: the best epoch over every trial (every member of a
population counts as a trial), then that configuration retrained on trainval and scored on the test split."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.objects import SharedStore
from tuning.population import configurations, member_key
from tuning.record import configuration_records, reports
from tuning.space import chosen_values, trial_config

__all__ = ["METRIC", "Entry", "best_trial", "final_test", "run_final_test", "trial_states"]

METRIC = "val_objective"  # what the search selects on: the spec's objective (H, AUSUC, U@S>=x) at the inference point


def trial_states(results: list[Any]) -> tuple[dict[str, int], dict[str, str]]:
    """How many trials ended in each state, and the last line of each failed trial's error by trial folder."""
    states = dict(Counter("ERROR" if r.error else "TERMINATED" for r in results))
    failed = [r for r in results if r.error]
    errors = {Path(r.path).name: f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1]}" for r in failed}
    return states, errors


def run_final_test(
    shared: SharedStore,
    base: dict[str, Any],
    best_config: dict[str, Any],
    best_metrics: dict[str, Any],
    cpus: float,
    gpus: float,
    posthoc: bool,
) -> dict[str, Any]:
    """``final_test`` as a Ray task with a trial's resources (on a cluster it may run on any node)."""
    import ray

    task = ray.remote(final_test).options(num_cpus=cpus, num_gpus=gpus)
    return ray.get(task.remote(shared, base, best_config, int(best_metrics["epoch"]), best_metrics, posthoc))


@dataclass(frozen=True)
class Entry:
    """One trained configuration of a search: a single trial, or one member of a population trial."""

    key: str  # its run key (``tuning.population.member_key``): the tag of its MLflow run
    config: dict[str, Any]  # its sampled dotted values
    member: int | None
    result: Any  # Tune's Result of the trial


def best_trial(results: list[Any]) -> tuple[dict[str, Any], dict[str, Any], Entry | None]:
    """The configuration and epoch with the highest validation H over every report of every trial in the record
    (every member of a population trial counts as a trial): (sampled config, that epoch's metrics, its Entry)."""
    best: tuple[float, dict[str, Any], Entry] | None = None
    for r in results:
        all_reports = reports(Path(r.path) / "result.json")
        trial_id = str((r.metrics or {}).get("trial_id") or Path(r.path).name)
        for j, values in configurations(r.config):
            for _, record in configuration_records(all_reports, j):
                if METRIC in record and (best is None or float(record[METRIC]) > best[0]):
                    best = (float(record[METRIC]), record, Entry(member_key(trial_id, j), values, j, r))
    if best is None:
        return {}, {}, None
    metrics = {k: v for k, v in best[1].items() if k.startswith(("val_", "grid_", "epoch")) and k != "val_member"}
    return best[2].config, metrics, best[2]


def final_test(
    shared: SharedStore, base: dict[str, Any], sampled: dict[str, Any], epochs: int, best: dict[str, Any], posthoc: bool
) -> dict[str, Any]:
    """Retrain the chosen configuration on trainval for the chosen epochs and score the test split once; with the
    retrained model's exact seen/unseen curve on test (``curve``: shift, U, S)."""
    import torch

    from dedn.build import build_model
    from dedn.evaluation import curve_at, make_task
    from dedn.feeding import FeatureSource
    from dedn.train import train

    values = chosen_values(sampled, best, posthoc)  # with posthoc, the inference point chosen on validation
    cfg = trial_config(base, values)
    store = shared.materialize()
    result = train(cfg, store, "test", epochs=epochs, keep_epoch=epochs, eval_only_at=epochs)
    eff, cpu = cfg.effective().model_copy(update={"device": "cpu"}), torch.device("cpu")
    model = build_model(eff, store, result.partition, cpu)
    model.load_state_dict(result.best_state)
    curve = curve_at(model, FeatureSource(store.features(), cpu), store, make_task(store, "test"), eff)
    return {
        "test": result.best,
        "state": result.best_state,
        "partition": result.partition,
        "config": values,
        "curve": {k: v.tolist() for k, v in curve.items()},
    }
