"""Evaluation: which images a task scores among which classes, the branch outputs of a split, the
(lambda_rc, lambda_e, c) grid scored from them, and the one mapping of a grid point to inference settings.

lambda_rc, lambda_e and c change no weight, and class scores are linear in O_r and O_c, so a grid point
is a weighted sum of four cached (N, K) score matrices; c only decides, per image, between the best
unseen class and the best other class, so every c costs O(N).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from dedn.config import TrainConfig
from dedn.data.store import FeatureStore
from dedn.errors import DednInputError
from dedn.metrics import (
    curve_area,
    gzsl_metrics,
    objective_value,
    parse_objective,
    per_class_accuracy,
    seen_unseen_curve,
)
from dedn.model import DEDN, Branches, class_scores, expert_output, mix_scores

if TYPE_CHECKING:
    from dedn.feeding import FeatureSource


@dataclass(frozen=True)
class Task:
    """Which images train, which evaluate, and among which classes.

    ``classes`` (K',) global ids the evaluation chooses among; ``unseen`` (K',) bool within them;
    ``train_seen`` (K,) bool: classes the loss treats as seen.
    """

    name: str
    classes: np.ndarray
    unseen: np.ndarray
    train_seen: np.ndarray
    train_rows: np.ndarray
    eval_rows: np.ndarray


def make_task(store: FeatureStore, name: str) -> Task:
    seen, val_unseen = store.classes.seen, store.classes.val_unseen
    if name == "validation":
        classes = np.flatnonzero(seen)
        task = Task(
            name, classes, val_unseen[classes], seen & ~val_unseen, store.indices("train"), store.indices("val")
        )
    elif name == "test":
        task = Task(name, np.arange(seen.size), ~seen, seen.copy(), store.indices("trainval"), store.indices("test"))
    else:
        raise DednInputError("train", "task", f"must be 'validation' or 'test', got {name!r}")
    for what, rows in (("training", task.train_rows), ("evaluation", task.eval_rows)):
        if rows.size == 0:
            raise DednInputError(store.path, "split", f"the {name} task needs {what} images, the store has none")
    if not task.unseen.any():
        raise DednInputError(store.path, "val_unseen", f"the {name} task needs unseen classes, the store has none")
    return task


@torch.no_grad()
def branch_outputs(model: DEDN, features: np.ndarray | Tensor, batch_size: int) -> Branches:
    """O_r and O_c of both experts for a whole split, (N, D) each, on the model's device.

    features (N, C, H, W) or (N, C, R), numpy or torch, any float dtype (float16 is cast to float32
    one batch at a time). Raises DednInputError for batch_size < 1 or features the model refuses.
    """
    if batch_size < 1:
        raise DednInputError("inference", "batch_size", f"must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    parts: list[list[Tensor]] = [[], [], [], []]
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        x = chunk if isinstance(chunk, Tensor) else torch.from_numpy(np.array(chunk, dtype=np.float32))
        out = model(x.to(device=device, dtype=torch.float32))
        for store, o in zip(parts, out, strict=True):
            if o is not None:
                store.append(o)
    return Branches(*(torch.cat(p) if p else None for p in parts))


def _as_tensor(x: np.ndarray | Tensor | Sequence[int], device: torch.device) -> Tensor:
    return x.to(device) if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x), device=device)


@torch.no_grad()
def score_grid(
    branches: Branches,
    class_attributes: Tensor,
    unseen_mask: np.ndarray | Tensor,
    lambda_rc_grid: Sequence[float],
    lambda_e_grid: Sequence[float],
    c_grid: Sequence[float],
    targets: np.ndarray | Tensor,
    seen_classes: np.ndarray | Tensor | Sequence[int],
    unseen_classes: np.ndarray | Tensor | Sequence[int],
) -> list[dict[str, float]]:
    """U, S, H (GZSL, argmax over all K of mix_scores) and T (ZSL, argmax over unseen) for every grid point.

    branches: cached (N, D) outputs from ``branch_outputs``; class_attributes (K, D) (the model's
    L2-normalised buffer); unseen_mask (K,) bool; targets (N,) class indices of the split's images.
    Returns one dict {lambda_rc, lambda_e, c, U, S, H, T} per point, lambda_rc outermost, c innermost.
    lambda_rc has no effect without channel attention, lambda_e none with one expert.
    """
    some = next((o for o in branches if o is not None), None)
    if some is None:
        raise DednInputError("inference", "branches", "need at least one expert's outputs, got none")
    device = some.device
    a = class_attributes.to(device=device, dtype=torch.float32)
    unseen = _as_tensor(unseen_mask, device).bool()  # (K,)
    if unseen.shape != (a.shape[0],):
        raise DednInputError("inference", "unseen_mask", f"must be (K={a.shape[0]},) bool, got {tuple(unseen.shape)}")
    t = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets)
    if t.shape != (some.shape[0],):
        raise DednInputError("inference", "targets", f"must be (N={some.shape[0]},), got {t.shape}")
    unseen_idx = torch.nonzero(unseen).flatten()
    other_idx = torch.nonzero(~unseen).flatten()

    # P = (l O_r + (1 - l) O_c) A^T = l P_r + (1 - l) P_c: score each branch once.
    def base(o: Tensor | None) -> Tensor | None:
        return class_scores(o, a)  # (N, K)

    pr_ec, pc_ec, pr_ef, pc_ef = (base(o) for o in branches)
    results: list[dict[str, float]] = []
    for lambda_rc in lambda_rc_grid:
        p_ec = expert_output(pr_ec, pc_ec, float(lambda_rc))
        p_ef = expert_output(pr_ef, pc_ef, float(lambda_rc))
        for lambda_e in lambda_e_grid:
            p = mix_scores(p_ec, p_ef, float(lambda_e), 0.0, unseen)  # (N, K), no calibration yet
            best_u, arg_u = _best(p, unseen_idx)  # (N,) best unseen score and its class
            best_o, arg_o = _best(p, other_idx)
            zsl = per_class_accuracy(arg_u.cpu().numpy(), t, unseen_classes) if unseen_idx.numel() else 0.0
            for c in c_grid:
                # argmax_k (P_k + c s_k) = the better of (best unseen + c) and (best other - c);
                # a tie goes to the lower class index, as torch.argmax does.
                su, so = best_u + float(c), best_o - float(c)
                pred = torch.where(su > so, arg_u, torch.where(su < so, arg_o, torch.minimum(arg_u, arg_o)))
                m = gzsl_metrics(pred.cpu().numpy(), t, seen_classes, unseen_classes)
                results.append(
                    {"lambda_rc": float(lambda_rc), "lambda_e": float(lambda_e), "c": float(c), **m, "T": zsl}
                )
    return results


def _best(p: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Max score over the classes ``idx`` and its class index, (N,) each; -inf and a large index when empty."""
    if idx.numel() == 0:
        n = p.shape[0]
        return p.new_full((n,), float("-inf")), torch.full((n,), p.shape[1], dtype=torch.long, device=p.device)
    best, arg = p[:, idx].max(dim=1)
    return best, idx[arg]


def evaluate(
    model: DEDN, source: FeatureSource, store: FeatureStore, task: Task, cfg: TrainConfig
) -> tuple[dict[str, float], dict[str, float], list[dict[str, float]]]:
    """Metrics at the configured inference point and over the whole grid, from one forward pass."""
    model.eval()
    branches = branch_outputs(model, source.rows(task.eval_rows), cfg.eval_batch_size)
    model.train()
    return evaluate_branches(branches, model.class_attributes, store, task, cfg)


@torch.no_grad()
def pair_scores(branches: Branches, class_attributes: Tensor, unseen_mask: np.ndarray | Tensor, lambda_rc: float,
                lambda_e: float) -> np.ndarray:  # fmt: skip
    """GZSL scores (N, K) before calibration at one (lambda_rc, lambda_e): what the seen/unseen curve sweeps."""
    some = next(o for o in branches if o is not None)
    a = class_attributes.to(device=some.device, dtype=torch.float32)
    pr_ec, pc_ec, pr_ef, pc_ef = (class_scores(o, a) for o in branches)
    p_ec, p_ef = expert_output(pr_ec, pc_ec, lambda_rc), expert_output(pr_ef, pc_ef, lambda_rc)
    unseen = _as_tensor(unseen_mask, some.device).bool()
    return mix_scores(p_ec, p_ef, lambda_e, 0.0, unseen).float().cpu().numpy()


def evaluate_branches(
    branches: Branches, class_attributes: torch.Tensor, store: FeatureStore, task: Task, cfg: TrainConfig
) -> tuple[dict[str, float], dict[str, float], list[dict[str, float]]]:
    """Metrics at the configured inference point, the best grid point and the whole grid, from cached
    (N, D) branch outputs of the task's evaluation images. The first two also carry ``AUSUC`` (the area under the
    exact seen/unseen curve at their lambda_rc, lambda_e) and ``objective`` (``inference.objective``'s value). The
    best grid point is the best by the objective: for H the grid's best H; otherwise the (lambda_rc, lambda_e) of
    the best curve, at the curve's own point for U@S>=x / S@U>=x (its exact shift as c), else its best H on the grid."""
    inf = cfg.inference
    a = class_attributes[torch.as_tensor(task.classes, device=class_attributes.device)]
    local = np.searchsorted(task.classes, store.labels[task.eval_rows])
    seen_l, unseen_l = np.flatnonzero(~task.unseen), np.flatnonzero(task.unseen)
    args = (branches, a, task.unseen)
    configured = score_grid(*args, [inf.lambda_rc], [inf.lambda_e], [inf.calibration], local, seen_l, unseen_l)[0]
    grid = score_grid(*args, inf.grid_lambda_rc, inf.grid_lambda_e, inf.grid_calibration, local, seen_l, unseen_l)

    def curve(point: Mapping[str, float]) -> dict[str, np.ndarray]:
        scores = pair_scores(*args, float(point["lambda_rc"]), float(point["lambda_e"]))
        return seen_unseen_curve(scores, local, seen_l, unseen_l)

    def scored(point: dict[str, float], c: dict[str, np.ndarray]) -> dict[str, float]:
        return {**point, "AUSUC": curve_area(c), "objective": objective_value(inf.objective, c, point["H"])[0]}

    configured = scored(configured, curve(configured))
    kind, _ = parse_objective(inf.objective)
    if kind == "H":
        best = max(grid, key=lambda r: r["H"])
        return configured, scored(best, curve(best)), grid
    candidates = []
    for lrc in inf.grid_lambda_rc:
        for le in inf.grid_lambda_e:
            pair = [r for r in grid if r["lambda_rc"] == float(lrc) and r["lambda_e"] == float(le)]
            c = curve(pair[0])
            value, j = objective_value(inf.objective, c, 0.0)
            point = max(pair, key=lambda r: r["H"])
            if j >= 0:  # the curve's own point: its shift reproduces it exactly
                u, s_ = float(c["U"][j]), float(c["S"][j])
                h = 2 * s_ * u / (s_ + u) if s_ + u > 0 else 0.0
                point = {**point, "c": float(c["shift"][j]), "U": u, "S": s_, "H": h}
            candidates.append({**point, "AUSUC": curve_area(c), "objective": value})
    return configured, max(candidates, key=lambda r: r["objective"]), grid


def curve_at(
    model: DEDN, source: FeatureSource, store: FeatureStore, task: Task, cfg: TrainConfig
) -> dict[str, np.ndarray]:
    """The exact seen/unseen curve (``dedn.metrics.seen_unseen_curve``) of ``model`` on the task's evaluation images
    at the config's lambda_rc and lambda_e: every calibration's (U, S) and a shift that gives it."""
    model.eval()
    branches = branch_outputs(model, source.rows(task.eval_rows), cfg.eval_batch_size)
    model.train()
    a = model.class_attributes[torch.as_tensor(task.classes, device=model.class_attributes.device)]
    scores = pair_scores(branches, a, task.unseen, cfg.inference.lambda_rc, cfg.inference.lambda_e)
    local = np.searchsorted(task.classes, store.labels[task.eval_rows])
    return seen_unseen_curve(scores, local, np.flatnonzero(~task.unseen), np.flatnonzero(task.unseen))


def inference_point(grid: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """A grid point as ``inference`` settings {lambda_rc, lambda_e, calibration}: from an evaluation's
    {lambda_rc, lambda_e, c} (``prefix`` "") or a trial's reported metrics (``prefix`` "grid_" or
    "best_grid_"). Raises KeyError when the point is incomplete."""
    return {
        "lambda_rc": float(grid[f"{prefix}lambda_rc"]),
        "lambda_e": float(grid[f"{prefix}lambda_e"]),
        "calibration": float(grid[f"{prefix}c"]),
    }


def with_inference_point(cfg: TrainConfig, grid: Mapping[str, float], prefix: str = "") -> TrainConfig:
    """``cfg`` whose inference settings are the grid point ``grid`` (see ``inference_point``)."""
    return cfg.model_copy(update={"inference": cfg.inference.model_copy(update=inference_point(grid, prefix))})


__all__ = [
    "Task",
    "branch_outputs",
    "curve_at",
    "evaluate",
    "evaluate_branches",
    "inference_point",
    "make_task",
    "pair_scores",
    "score_grid",
    "with_inference_point",
]
