"""Zero-shot metrics: per-class mean top-1 accuracy, GZSL U/S/H and ZSL T (Xian et al. 2017), as fractions.

Inputs are 1-D class indices (numpy arrays, torch tensors or sequences); everything is computed in numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dedn.errors import DednInputError

ArrayLike = np.ndarray | torch.Tensor | Sequence[int]


def _as_index_array(x: ArrayLike | Any, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise DednInputError(
            "metrics", name, f"must be a 1-D array of integer class indices, got {arr.dtype}{arr.shape}"
        )
    return arr.astype(np.int64)


def per_class_accuracy(pred: ArrayLike, target: ArrayLike, classes: ArrayLike) -> float:
    """Mean over the ``classes`` present in ``target`` of (correct / count) on images of that class.

    Images whose target is outside ``classes`` are ignored; 0.0 when no image belongs to ``classes``.
    Raises DednInputError when pred and target differ in length or are not 1-D integer arrays.
    """
    p = _as_index_array(pred, "pred")
    t = _as_index_array(target, "target")
    c = _as_index_array(classes, "classes")
    if p.shape != t.shape:
        raise DednInputError("metrics", "pred", f"must have one prediction per target, got {p.shape} vs {t.shape}")
    keep = np.isin(t, c)
    if not keep.any():
        return 0.0
    t, correct = t[keep], (p[keep] == t[keep])
    size = int(t.max()) + 1
    count = np.bincount(t, minlength=size)  # (max class + 1,)
    hits = np.bincount(t, weights=correct, minlength=size)
    present = count > 0
    return float(np.mean(hits[present] / count[present]))


def gzsl_metrics(
    pred: ArrayLike, target: ArrayLike, seen_classes: ArrayLike, unseen_classes: ArrayLike
) -> dict[str, float]:
    """GZSL accuracies of predictions over all classes for test-seen plus test-unseen images together.

    Returns ``{"U", "S", "H"}``: S per-class mean accuracy over images of seen classes, U likewise over
    unseen classes, H = 2SU / (S + U) (0 when both are 0). Raises DednInputError as per_class_accuracy.
    """
    s = per_class_accuracy(pred, target, seen_classes)
    u = per_class_accuracy(pred, target, unseen_classes)
    h = 2 * s * u / (s + u) if s + u > 0 else 0.0
    return {"U": u, "S": s, "H": h}


def zsl_accuracy(scores: np.ndarray | torch.Tensor, target: ArrayLike, unseen_classes: ArrayLike) -> float:
    """T: per-class mean accuracy on unseen-class images of argmax over the unseen classes only.

    scores (N, K) over all classes; target (N,). Images of other classes are ignored.
    """
    sc = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    u = _as_index_array(unseen_classes, "unseen_classes")
    if sc.ndim != 2:
        raise DednInputError("metrics", "scores", f"must be (N, K), got shape {sc.shape}")
    pred = u[np.argmax(sc[:, u], axis=1)]  # (N,) class indices
    return per_class_accuracy(pred, target, u)


__all__ = ["ArrayLike", "gzsl_metrics", "per_class_accuracy", "zsl_accuracy"]
