"""ESZSL (Romera-Paredes and Torr, "An embarrassingly simple approach to zero-shot learning", ICML 2015).

Closed form on pooled features: with X (N, C) training features, Y (N, Z) in {-1, +1} (one column
per training class), S (Z, D) those classes' attribute vectors,

    W = (X^T X + gamma I_C)^-1  X^T Y S  (S^T S + lambda I_D)^-1          (C, D)

and class scores x W A^T over any class set A (K, D). GZSL prediction adds calibrated stacking c on
unseen classes. gamma, lambda and c are chosen on the validation task, never on test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dedn.data.store import FeatureStore
from dedn.metrics import gzsl_metrics, per_class_accuracy


def pool(features: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Mean over the H x W regions: (N, C, H, W) -> (N, C) float64, one batch at a time."""
    n = features.shape[0]
    out = np.empty((n, features.shape[1]), dtype=np.float64)
    for s in range(0, n, batch):
        out[s : s + batch] = features[s : s + batch].reshape(min(batch, n - s), features.shape[1], -1).mean(-1)
    return out


def eszsl_fit(x: np.ndarray, labels: np.ndarray, s: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """W (C, D) from pooled features x (N, C), labels (N,) indexing the rows of s (Z, D)."""
    y = -np.ones((x.shape[0], s.shape[0]))
    y[np.arange(x.shape[0]), labels] = 1.0
    left = np.linalg.solve(x.T @ x + gamma * np.eye(x.shape[1]), x.T @ y @ s)  # (C, D)
    return np.linalg.solve((s.T @ s + lam * np.eye(s.shape[1])).T, left.T).T  # left (S^T S + lam I)^-1


@dataclass(frozen=True)
class ESZSLResult:
    gamma: float
    lam: float
    calibration: float
    val: dict[str, float]
    test: dict[str, float]


def _evaluate(
    scores: np.ndarray, target: np.ndarray, unseen: np.ndarray, c_grid: Sequence[float]
) -> list[dict[str, float]]:
    seen_cls, unseen_cls = np.flatnonzero(~unseen), np.flatnonzero(unseen)
    t = per_class_accuracy(unseen_cls[scores[:, unseen_cls].argmax(1)], target, unseen_cls)
    out = []
    for c in c_grid:
        pred = (scores + c * np.where(unseen, 1.0, -1.0)).argmax(1)
        out.append({"c": float(c), **gzsl_metrics(pred, target, seen_cls, unseen_cls), "T": t})
    return out


def eszsl_search(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    att: np.ndarray,
    val_unseen: np.ndarray,
    train_classes: np.ndarray,
    grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
    c_grid: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
) -> tuple[float, float, float, dict[str, float]]:
    """Pick (gamma, lambda, c) by validation H. Labels are indices into ``att`` (K, D);
    ``val_unseen`` (K,) bool marks the validation task's unseen classes."""
    s = att[train_classes]
    local = np.searchsorted(train_classes, y_train)
    best: tuple[float, float, float, dict[str, float]] | None = None
    for gamma in grid:
        for lam in grid:
            w = eszsl_fit(x_train, local, s, gamma, lam)
            for r in _evaluate(x_val @ w @ att.T, y_val, val_unseen, c_grid):
                if best is None or r["H"] > best[3]["H"]:
                    best = (gamma, lam, r["c"], r)
    assert best is not None
    return best


def eszsl_gzsl(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    att: np.ndarray,
    unseen: np.ndarray,
    gamma: float,
    lam: float,
    c: float,
) -> dict[str, float]:
    """Fit on (x_tr, y_tr) with the chosen parameters and evaluate U, S, H, T on (x_te, y_te)."""
    train_classes = np.unique(y_tr)
    w = eszsl_fit(x_tr, np.searchsorted(train_classes, y_tr), att[train_classes], gamma, lam)
    return _evaluate(x_te @ w @ att.T, y_te, unseen, [c])[0]


def eszsl_protocol(store: FeatureStore) -> ESZSLResult:
    """The honest protocol for ESZSL on a store: choose (gamma, lambda, c) on the validation task,
    refit on trainval, evaluate the test task once."""
    from dedn.evaluation import make_task

    x = pool(store.features())
    att = store.classes.attributes.astype(np.float64)
    labels = store.labels
    val = make_task(store, "validation")
    local = np.searchsorted(val.classes, labels)  # valid on the validation task's rows
    gamma, lam, c, val_metrics = eszsl_search(
        x[val.train_rows],
        local[val.train_rows],
        x[val.eval_rows],
        local[val.eval_rows],
        att[val.classes],
        val.unseen,
        np.unique(local[val.train_rows]),
    )
    test = make_task(store, "test")
    test_metrics = eszsl_gzsl(
        x[test.train_rows],
        labels[test.train_rows],
        x[test.eval_rows],
        labels[test.eval_rows],
        att,
        test.unseen,
        gamma,
        lam,
        c,
    )
    return ESZSLResult(gamma, lam, c, val_metrics, test_metrics)


__all__ = ["ESZSLResult", "eszsl_fit", "eszsl_gzsl", "eszsl_protocol", "eszsl_search", "pool"]
