"""Which configuration a search chose, and its one test: the best epoch over every trial (every member of a
population counts as a trial), then that configuration retrained on trainval and scored on the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.objects import SharedStore
from tuning.space import chosen_values, trial_config

__all__ = ["METRIC", "best_trial", "final_test", "run_final_test", "trial_states"]

METRIC = "val_H"  # what the search selects on: validation H at the trial's inference point


def trial_states(results: list[Any]) -> tuple[dict[str, int], dict[str, str]]:
    """How many trials ended in each state, and the last line of each failed trial's error by trial folder."""
    states: dict[str, int] = {}
    errors: dict[str, str] = {}
    for r in results:
        state = "ERROR" if r.error else "TERMINATED"
        states[state] = states.get(state, 0) + 1
        if r.error:
            errors[Path(r.path).name] = f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1]}"
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
    epochs = int(best_metrics["epoch"])
    final: dict[str, Any] = ray.get(task.remote(shared, base, best_config, epochs, best_metrics, posthoc))
    return final


def best_trial(results: list[Any]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The configuration and epoch with the highest validation H over all reported epochs of every trial
    (every member of a population trial counts as a trial): (sampled config, metrics, its Entry)."""
    from tuning.population import member_entries

    best: tuple[float, dict[str, Any], dict[str, Any], Any] = (-1.0, {}, {}, None)
    for r in results:
        for e in member_entries(r):
            df: Any = e.df
            if df is None or METRIC not in df or df[METRIC].isna().all():
                continue
            row = df.loc[df[METRIC].idxmax()]
            if float(row[METRIC]) > best[0]:
                metrics = {
                    k: (v.item() if hasattr(v, "item") else v)
                    for k, v in row.items()
                    if k.startswith(("val_", "grid_", "epoch")) and k != "val_member"
                }
                best = (float(row[METRIC]), e.config, metrics, e)
    return best[1], best[2], best[3]


def final_test(
    shared: SharedStore,
    base: dict[str, Any],
    sampled: dict[str, Any],
    epochs: int,
    best: dict[str, Any],
    posthoc: bool,
) -> dict[str, Any]:
    """Retrain the chosen configuration on trainval for the chosen epochs and score the test split once."""
    from dedn.train import train

    values = chosen_values(sampled, best, posthoc)  # with posthoc, the inference point chosen on validation
    cfg = trial_config(base, values)
    result = train(cfg, shared.materialize(), "test", epochs=epochs, keep_epoch=epochs, eval_only_at=epochs)
    return {"test": result.best, "state": result.best_state, "partition": result.partition, "config": values}
