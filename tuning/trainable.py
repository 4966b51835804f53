"""The Ray Tune trainable: a thin wrapper around ``dedn.train.train``.

Each epoch it reports validation metrics with a ``ray.tune.Checkpoint`` holding the model, optimiser,
history and best-so-far weights; a trial that is retried or resumed continues from the last one, so
no epoch is trained or counted twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cluster.objects import SharedStore, is_object_store_view
from dedn.train import EpochRecord, Progress, train
from tuning.space import sampled_params, trial_config

STATE, PROGRESS = "state.pt", "progress.json"


def save_trial_state(folder: str, record: EpochRecord, p: Progress) -> None:
    """Tensors go to ``state.pt`` (read back with weights_only=True), the rest to JSON."""
    torch.save(
        {"model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(), "best_model": p.best_state},
        os.path.join(folder, STATE),
    )
    with open(os.path.join(folder, PROGRESS), "w") as f:
        json.dump(
            {
                "epoch": record.epoch,
                "best_epoch": p.best_epoch,
                "partition": [int(i) for i in p.partition],
                "history": [vars(r) for r in p.history],
            },
            f,
        )


def load_trial_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    state = torch.load(Path(folder) / STATE, map_location="cpu", weights_only=True)
    progress = json.loads((Path(folder) / PROGRESS).read_text())
    return {**state, "epoch": progress["epoch"], "history": progress["history"]}


def epoch_metrics(record: EpochRecord, posthoc: bool) -> dict[str, float]:
    """What a trial reports each epoch. ``val_H`` is the metric the scheduler and Optuna see: H at the
    sampled inference point, or with ``posthoc`` at the best point of the validation grid."""
    point = record.grid_best if posthoc else record.eval
    m = {
        "epoch": record.epoch,
        "val_H": point["H"],
        "val_U": point["U"],
        "val_S": point["S"],
        "val_T": point["T"],
        "val_H_configured": record.eval["H"],
        "val_H_grid": record.grid_best["H"],
        "grid_lambda_rc": record.grid_best["lambda_rc"],
        "grid_lambda_e": record.grid_best["lambda_e"],
        "grid_c": record.grid_best["c"],
        "samples_per_s": record.samples_per_s,
        "epoch_seconds": record.seconds,
    }
    m.update({f"loss_{k}": v for k, v in record.loss.items()})
    return m


def trial_setup(
    shared: SharedStore, load_state: Callable[[str], dict[str, Any]]
) -> tuple[Any, str, bool, dict[str, Any] | None]:
    """What every trial does first: quiet per-checkpoint logging, threads = the CPUs Tune assigned, the
    store as an object-store view. Returns (store, node id, whether features are zero-copy, the state of
    the trial's last checkpoint read with ``load_state``, or None on a first start)."""
    import logging

    import ray
    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no line per saved checkpoint
    ctx = ray.get_runtime_context()
    torch.set_num_threads(max(1, int(ctx.get_assigned_resources().get("CPU", 1.0))))
    store = shared.materialize()
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_state(folder)
    return store, ctx.get_node_id(), is_object_store_view(store.features()), resume


def wants_checkpoint(epoch: int, last_epoch: int, every: int, improved: bool) -> bool:
    """Checkpoint every ``every`` epochs, at the last epoch, and whenever the best epoch improved (so the
    best weights are always persisted, whatever ``every`` is)."""
    return improved or epoch == last_epoch or epoch % every == 0


def dedn_trainable(
    config: dict[str, Any], shared: SharedStore, base: dict[str, Any], posthoc: bool, checkpoint_every: int = 1
) -> None:
    """One trial: sampled values from ``config`` over the base training config, on the shared store."""
    from ray import tune

    store, node, zero_copy, resume = trial_setup(shared, load_trial_state)
    cfg = trial_config(base, sampled_params(config))

    last_epoch = cfg.effective().optim.epochs

    def report(record: EpochRecord, p: Progress) -> None:
        metrics = {**epoch_metrics(record, posthoc), "node_id": node, "features_zero_copy": zero_copy}
        metrics["checkpointed"] = wants_checkpoint(
            record.epoch, last_epoch, checkpoint_every, p.best_epoch == record.epoch
        )
        if not metrics["checkpointed"]:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_trial_state(folder, record, p)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    train(cfg, store, "validation", on_epoch=report, resume=resume, select_on="grid" if posthoc else "configured")
