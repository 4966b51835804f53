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


def _scores(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    sc = scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, float)
    if sc.ndim != 2:
        raise DednInputError("metrics", "scores", f"must be (N, K), got shape {sc.shape}")
    return sc


def seen_unseen_curve(
    scores: np.ndarray | torch.Tensor, target: ArrayLike, seen_classes: ArrayLike, unseen_classes: ArrayLike
) -> dict[str, np.ndarray]:
    """The exact seen/unseen curve of calibrated stacking (Chao et al. 2016): ``{"shift", "S", "U"}``, one entry per
    point, from every image sent to its best seen class (U = 0) to every image sent to its best unseen class (S = 0).

    Scores are (N, K) before calibration; calibration ``c`` adds c to unseen and subtracts it from seen scores (as
    ``dedn.model.mix_scores``), so image i goes to its best unseen class once c > (best seen - best unseen) / 2. The
    breakpoints are sorted once and per-class hits updated image by image: O(N log N), no grid (breakpoints within
    1e-9 of each other, relative to the largest, count as one). ``shift[j]`` is a
    calibration strictly inside point j's interval (between breakpoints; one below the first, one above the last),
    so predicting with it gives exactly (U[j], S[j]). Images of other classes are ignored."""
    sc = _scores(scores)
    t = _as_index_array(target, "target")
    seen, unseen = _as_index_array(seen_classes, "seen_classes"), _as_index_array(unseen_classes, "unseen_classes")
    if t.shape != (sc.shape[0],):
        raise DednInputError("metrics", "target", f"must be (N={sc.shape[0]},), got {t.shape}")
    keep = np.isin(t, seen) | np.isin(t, unseen)
    sc, t = sc[keep], t[keep]
    if not seen.size or not unseen.size or not t.size:
        raise DednInputError("metrics", "classes", "a seen/unseen curve needs seen and unseen classes and images")
    arg_s = seen[np.argmax(sc[:, seen], axis=1)]
    arg_u = unseen[np.argmax(sc[:, unseen], axis=1)]
    flip = (sc[np.arange(t.size), arg_s] - sc[np.arange(t.size), arg_u]) / 2.0  # unseen wins once c > flip
    count = np.bincount(t, minlength=sc.shape[1]).astype(float)
    is_seen = np.isin(t, seen)
    n_s, n_u = np.unique(t[is_seen]).size, np.unique(t[~is_seen]).size
    weight = 1.0 / count[t]  # one image's share of its class's accuracy
    hit_s, hit_u = (arg_s == t) * weight, (arg_u == t) * weight
    order = np.argsort(flip, kind="stable")
    delta = (hit_u - hit_s)[order]  # what sending the image to its best unseen class changes
    s_path = np.cumsum(np.where(is_seen[order], delta, 0.0))
    u_path = np.cumsum(np.where(is_seen[order], 0.0, delta))
    f = flip[order]
    # one point per breakpoint, after all its flips; breakpoints closer than rounding noise are one (scores equal on
    # paper differ in the last bits), so that a shift between two points predicts its point in floating point too
    tol = 1e-9 * max(1.0, float(np.abs(f).max()))
    last = np.flatnonzero(np.r_[np.diff(f) > tol, True])
    s0, u0 = hit_s[is_seen].sum(), hit_s[~is_seen].sum()  # every image sent to its best seen class
    S = np.r_[s0, s0 + s_path[last]] / max(n_s, 1)
    U = np.r_[u0, u0 + u_path[last]] / max(n_u, 1)
    b = f[last]
    shift = np.r_[b[0] - 1.0, (b[:-1] + b[1:]) / 2.0, b[-1] + 1.0]
    return {"shift": shift, "S": np.clip(S, 0.0, 1.0), "U": np.clip(U, 0.0, 1.0)}


def ausuc(
    scores: np.ndarray | torch.Tensor, target: ArrayLike, seen_classes: ArrayLike, unseen_classes: ArrayLike
) -> float:
    """Area under the seen/unseen curve (U on x, S on y; trapezoids) from (0, S with every image sent to its best
    seen class) to (U with every image sent to its best unseen class, 0), as ``seen_unseen_curve``."""
    return curve_area(seen_unseen_curve(scores, target, seen_classes, unseen_classes))


def curve_area(curve: dict[str, np.ndarray]) -> float:
    """The trapezoid area of a curve from ``seen_unseen_curve``."""
    u, s = curve["U"], curve["S"]
    return float(np.sum(np.diff(u) * (s[1:] + s[:-1]) / 2.0))


def best_under(curve: dict[str, np.ndarray], goal: str, floor: float) -> tuple[float, int]:
    """The most ``goal`` ("U" or "S") over the curve's points whose other accuracy is at least ``floor``, and the
    index of that point (the first of equals); (0.0, -1) when no point keeps the floor."""
    other = curve["S" if goal == "U" else "U"]
    ok = np.flatnonzero(other >= floor)
    if not ok.size:
        return 0.0, -1
    j = int(ok[np.argmax(curve[goal][ok])])
    return float(curve[goal][j]), j


OBJECTIVE_RULE = "must be H, AUSUC, U@S>=x or S@U>=x with x in [0, 1] (e.g. U@S>=0.6)"


def parse_objective(text: str) -> tuple[str, float]:
    """``H`` -> ("H", 0), ``AUSUC`` -> ("AUSUC", 0), ``U@S>=0.6`` -> ("U", 0.6) (the most U whose curve point keeps
    S >= 0.6), ``S@U>=x`` likewise. ValueError with ``OBJECTIVE_RULE`` for anything else."""
    t = text.replace(" ", "")
    if t in ("H", "AUSUC"):
        return t, 0.0
    goal, _, rest = t.partition("@")
    other, _, floor = rest.partition(">=")
    try:
        x = float(floor)
    except ValueError:
        raise ValueError(OBJECTIVE_RULE) from None
    if (goal, other) not in (("U", "S"), ("S", "U")) or not 0.0 <= x <= 1.0:
        raise ValueError(OBJECTIVE_RULE)
    return goal, x


def objective_value(objective: str, curve: dict[str, np.ndarray], h: float) -> tuple[float, int]:
    """The value of ``objective`` for the seen/unseen ``curve`` (``h``: H at the point in use, for ``H``), and the
    curve point it was read at (-1 for H and AUSUC, and when no point keeps the floor)."""
    kind, floor = parse_objective(objective)
    if kind == "H":
        return h, -1
    if kind == "AUSUC":
        return curve_area(curve), -1
    return best_under(curve, kind, floor)


__all__ = [
    "OBJECTIVE_RULE",
    "ArrayLike",
    "ausuc",
    "best_under",
    "curve_area",
    "gzsl_metrics",
    "objective_value",
    "parse_objective",
    "per_class_accuracy",
    "seen_unseen_curve",
    "zsl_accuracy",
]
