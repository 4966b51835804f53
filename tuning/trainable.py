"""The Ray Tune trainable: a thin wrapper around ``dedn.train.train``.

Each epoch it reports validation metrics with a ``ray.tune.Checkpoint`` holding the model, optimiser,
history and best-so-far weights; a trial that is retried or resumed continues from the last one, so
no epoch is trained or counted twice.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import torch

from cluster.objects import SharedStore, is_object_store_view
from dedn.checkpoints import load_trial_state, save_trial_state
from dedn.records import EpochRecord, Progress
from dedn.train import train
from tuning.space import sampled_params, trial_config

__all__ = ["dedn_trainable", "epoch_metrics", "report_epoch", "trial_setup", "wants_checkpoint"]


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


def report_epoch(metrics: dict[str, Any], checkpoint: bool, save: Callable[[str], None]) -> None:
    """Report an epoch's metrics to Tune (``checkpointed`` says whether a checkpoint came with them); with
    ``checkpoint``, ``save(folder)`` writes the checkpoint into a temporary folder that Tune then keeps."""
    from ray import tune

    metrics["checkpointed"] = checkpoint
    if not checkpoint:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def dedn_trainable(
    config: dict[str, Any], shared: SharedStore, base: dict[str, Any], posthoc: bool, checkpoint_every: int = 1
) -> None:
    """One trial: sampled values from ``config`` over the base training config, on the shared store."""
    store, node, zero_copy, resume = trial_setup(shared, load_trial_state)
    cfg = trial_config(base, sampled_params(config))

    last_epoch = cfg.effective().optim.epochs

    def report(record: EpochRecord, p: Progress) -> None:
        metrics = {**epoch_metrics(record, posthoc), "node_id": node, "features_zero_copy": zero_copy}
        checkpoint = wants_checkpoint(record.epoch, last_epoch, checkpoint_every, p.best_epoch == record.epoch)
        report_epoch(metrics, checkpoint, lambda folder: save_trial_state(folder, record, p))

    train(cfg, store, "validation", on_epoch=report, resume=resume, select_on="grid" if posthoc else "configured")
