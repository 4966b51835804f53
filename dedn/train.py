"""Training and honest GZSL evaluation: one explicit function per phase, config and store in, metrics out.

Protocol (Xian et al. 2017; see README "Honest evaluation"):

1. ``validation`` task: train on ``train`` images (seen classes minus the validation-unseen ones), score
   ``val_seen`` + ``val_unseen`` each epoch among the seen classes (validation-unseen act as unseen),
   keep the epoch with the best validation H.
2. ``test`` task: retrain on all ``trainval`` images for the chosen number of epochs and evaluate
   ``test_seen`` + ``test_unseen`` once, among all classes. Optionally (``paper_protocol``) the test
   split is also scored every epoch of this run, only to report what the released code's protocol
   (best H and best T over epochs, each picked on test) would have printed, labelled as such.

The parts come from components that ``dedn.population`` shares: ``dedn.device`` (device, precision,
compile), ``dedn.feeding`` (features and the minibatch stream), ``dedn.build`` (model and step),
``dedn.evaluation`` (tasks, the inference grid) and ``dedn.checkpoints`` (files).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch

from dedn.build import StepFn, build_model, build_step, check_compatible
from dedn.config import SelectOn, TrainConfig
from dedn.data.store import FeatureStore
from dedn.device import compiled, resolve_device, use_bf16
from dedn.errors import DednInputError
from dedn.evaluation import evaluate, make_task, with_inference_point
from dedn.feeding import FeatureSource, epoch_batches
from dedn.partitions import resolve_partition
from dedn.records import BestEpoch, EpochCallback, EpochRecord, Progress, TrainResult, cpu_state


def train(
    cfg: TrainConfig,
    store: FeatureStore,
    task_name: str = "validation",
    *,
    epochs: int | None = None,
    on_epoch: EpochCallback | None = None,
    resume: dict[str, Any] | None = None,
    keep_epoch: int | None = None,
    eval_only_at: int | None = None,
    select_on: SelectOn = "configured",
    progress: bool = False,
    batch_seed: int | None = None,
    check_each_step: bool | None = None,
) -> TrainResult:
    """Train DEDN on one task and evaluate every epoch.

    Args:
        cfg, store: a validated config (``effective()`` is applied here) and an open feature store.
        task_name: ``validation`` (train on train, evaluate val) or ``test`` (train on trainval, evaluate test).
        epochs: defaults to ``cfg.optim.epochs``.
        on_epoch: called after each epoch with the record and a Progress (tuning reports here).
        resume: ``{"epoch", "model", "optimizer", "history"[, "best_model"]}`` from a checkpoint; training
            continues at epoch + 1 with the same minibatch stream as an uninterrupted run.
        keep_epoch: keep this epoch instead of selecting by H (the test task: the epoch chosen on validation).
        eval_only_at: evaluate only at this epoch (other records carry empty metrics): test scored once.
        select_on: ``configured`` (H at the config's inference point) or ``grid`` (best grid point's H).
        progress: a progress bar per epoch. batch_seed: the minibatch stream's seed (default ``cfg.seed``).
        check_each_step: stop at the first non-finite loss (a host sync per step); None: per step on a CPU,
            once per epoch on a GPU.
    Returns:
        TrainResult with per-epoch history and the state dict of the best epoch by evaluation H.
    Raises:
        DednInputError: an incompatible store or config, or an unknown ``select_on``, before training starts.
        FloatingPointError: the loss turned non-finite.
    """
    if select_on not in get_args(SelectOn):
        raise DednInputError("train", "select_on", f"must be one of {get_args(SelectOn)}, got {select_on!r}")
    cfg = cfg.effective()
    check_compatible(cfg, store)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    task = make_task(store, task_name)
    partition = resolve_partition(cfg, store)
    model = build_model(cfg, store, partition, device)
    o = cfg.optim
    optimizer = torch.optim.RMSprop(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    source = FeatureSource(store.features(), device)
    labels = torch.as_tensor(store.labels.astype(np.int64))
    seen_mask = torch.as_tensor(task.train_seen, device=device)
    step = compiled(build_step(model, cfg.loss, seen_mask, ~seen_mask, use_bf16(cfg, device)), cfg.compile)
    optimizer_step = compiled(optimizer.step, cfg.compile)  # RMSprop's foreach loop as one kernel set
    history, best, start = _resumed(resume, model, optimizer, select_on)
    check_each_step = device.type != "cuda" if check_each_step is None else check_each_step
    n_epochs = epochs or o.epochs
    seed = cfg.seed if batch_seed is None else batch_seed
    for epoch in range(start, n_epochs + 1):
        t0 = time.perf_counter()
        batches = epoch_batches(
            task.train_rows, store.labels, o.batch_size, seed, epoch, o.balanced, np.flatnonzero(task.train_seen)
        )
        steps = _with_bar(source.epoch_indices(batches, labels), f"{task.name} epoch {epoch}/{n_epochs}", progress)
        sums = _train_epoch(steps, source, step, optimizer.zero_grad, optimizer_step, check_each_step, epoch)
        n_seen, train_s = sum(len(b) for b in batches), time.perf_counter() - t0
        scored = evaluate(model, source, store, task, cfg)[:2] if eval_only_at in (None, epoch) else ({}, {})
        record = EpochRecord(epoch, {k: float(v) / n_seen for k, v in sums.items()}, *scored, 0.0, n_seen / train_s)
        record.seconds = time.perf_counter() - t0
        history.append(record)
        if best.improves(record, select_on) if keep_epoch is None else epoch == keep_epoch:
            best.take(record, cpu_state(model))
        if on_epoch is not None:
            on_epoch(record, Progress(model, optimizer, history, best.epoch, best.state, partition))
    return TrainResult(task.name, history, best.epoch, best.eval, best.grid, best.state, partition)


def _resumed(
    resume: dict[str, Any] | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer, select_on: str
) -> tuple[list[EpochRecord], BestEpoch, int]:
    """Load a checkpoint's state into the model and optimiser; returns its history, its best epoch so far and
    the epoch to continue at (a fresh run: [], nothing, 1)."""
    if resume is None:
        return [], BestEpoch(), 1
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    history = [EpochRecord(**r) for r in resume.get("history", [])]
    saved = resume.get("best_model", model.state_dict()) if history else {}
    best = BestEpoch.of_history(history, None, {k: v.detach().cpu().clone() for k, v in saved.items()}, select_on)
    return history, best, int(resume["epoch"]) + 1


def _with_bar(steps: Iterable[Any], desc: str, show: bool) -> Iterable[Any]:
    """``steps`` behind a progress bar when ``show``."""
    if not show:
        return steps
    from tqdm import tqdm

    return tqdm(steps, desc=desc, leave=False, unit="batch")


def _train_epoch(
    steps: Iterable[tuple[Any, torch.Tensor]],
    source: FeatureSource,
    step: StepFn,
    zero_grad: Callable[..., Any],
    optimizer_step: Callable[[], Any],
    check_each_step: bool,
    epoch: int,
) -> dict[str, torch.Tensor]:
    """One pass over the epoch's minibatches; returns each loss part summed over samples (on the device:
    no host sync per step unless ``check_each_step``). Raises FloatingPointError on a non-finite loss."""
    sums: dict[str, torch.Tensor] = {}
    diverged: torch.Tensor | None = None
    for rows, y in steps:
        loss, parts = step(source.batch(rows), y)
        if check_each_step:
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}: training diverged")
        else:  # on a GPU: no host sync per step; the flag is read at the end of the epoch
            diverged = ~torch.isfinite(loss) if diverged is None else diverged | ~torch.isfinite(loss)
        zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step()
        for k, v in parts.items():  # summed on the device: no host sync per step
            sums[k] = sums[k] + v * len(rows) if k in sums else v * len(rows)
    if diverged is not None and bool(diverged):
        raise FloatingPointError(f"loss is not finite in epoch {epoch}: training diverged")
    return sums


@dataclass
class FitResult:
    """What ``dedn train`` reports: validation selection, honest test, and the paper-protocol figures."""

    validation: TrainResult
    test: dict[str, float] | None
    test_grid_point: dict[str, float] | None
    paper_protocol: dict[str, float] | None
    final: TrainResult | None


def fit_and_test(cfg: TrainConfig, store: FeatureStore, progress: bool = False) -> FitResult:
    """Phase 1 on the validation task; phase 2 retrains on trainval for the chosen epochs, test once."""
    val = train(cfg, store, "validation", progress=progress)
    if not cfg.final_fit:
        return FitResult(val, None, None, None, None)
    eff = cfg.effective()
    # With paper_protocol, run all epochs and score test each epoch, only for the labelled comparison;
    # the honest test figure is the one at the epoch validation chose.
    n = eff.optim.epochs if cfg.paper_protocol else val.best_epoch
    final = train(
        cfg,
        store,
        "test",
        epochs=n,
        keep_epoch=val.best_epoch,
        eval_only_at=None if cfg.paper_protocol else val.best_epoch,
        progress=progress,
    )
    # The inference grid point chosen on validation, applied once to the kept test-task model.
    point = with_inference_point(cfg, val.best_grid)
    device = resolve_device(eff.device)
    model = build_model(eff, store, final.partition, device)
    model.load_state_dict(final.best_state)
    test_grid_point, _, _ = evaluate(
        model, FeatureSource(store.features(), device), store, make_task(store, "test"), point.effective()
    )
    paper = None
    if cfg.paper_protocol:
        by_h = max(final.history, key=lambda r: r.eval["H"])
        paper = {
            "U": by_h.eval["U"],
            "S": by_h.eval["S"],
            "H": by_h.eval["H"],
            "T": max(r.eval["T"] for r in final.history),
            "epoch_H": by_h.epoch,
        }
    return FitResult(val, final.best, test_grid_point, paper, final)


__all__ = ["FitResult", "fit_and_test", "train"]
