"""PNG plots logged on a search's parent run (matplotlib, Agg backend).

- ``h_per_epoch``: validation H per epoch of every trial; early-stopped trials end early, the best is bold.
- ``param_importance``: Optuna's fANOVA importance of each sampled parameter for validation H.
- ``parallel_coordinates``: every trial as a line over its (normalised) parameters, coloured by its best H.
- ``calibration``: seen (S) and unseen (U) accuracy and H of the best trial against calibration c.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["calibration", "h_per_epoch", "parallel_coordinates", "param_importance"]


def h_per_epoch(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], best: str | None) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (epochs, h) in curves.items():
        bold = name == best
        ax.plot(
            epochs,
            [100 * x for x in h],
            lw=2.5 if bold else 1.0,
            alpha=1.0 if bold else 0.6,
            label=f"best: {name}" if bold else None,
            marker="o" if bold else None,
            ms=3,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation H (%)")
    ax.set_title(f"Validation H per epoch, {len(curves)} trials (short lines: stopped early by ASHA)")
    if best:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def param_importance(importances: Mapping[str, float]) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(1, len(importances))))
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance for validation H (fANOVA, sums to 1)")
    else:
        ax.text(0.5, 0.5, "not enough finished trials for an importance estimate", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("Hyperparameter importance")
    fig.tight_layout()
    return fig


def _normalise(values: Sequence[Any]) -> tuple[list[float], list[str]]:
    """Map a column to [0, 1]: numbers linearly (log when all positive and spanning > 10x), else categories."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        nums = [float(v) for v in present]
        lo, hi = min(nums), max(nums)
        use_log = lo > 0 and hi / lo > 10
        f = (lambda x: math.log10(x)) if use_log else (lambda x: x)
        a, b = f(lo), f(hi)
        span = (b - a) or 1.0
        ticks = [f"{lo:.3g}", f"{hi:.3g}"]
        return [float("nan") if v is None else (f(float(v)) - a) / span for v in values], ticks
    cats = sorted({str(v) for v in present})
    pos = {c: i / max(1, len(cats) - 1) for i, c in enumerate(cats)}
    return [float("nan") if v is None else pos[str(v)] for v in values], cats


def parallel_coordinates(params: Sequence[Mapping[str, Any]], h: Sequence[float]) -> Figure:
    names = sorted({k for p in params for k in p})
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * (len(names) + 1)), 4.5))
    cols = {n: _normalise([p.get(n) for p in params]) for n in names}
    cmap = plt.get_cmap("viridis")
    lo, hi = (min(h), max(h)) if h else (0.0, 1.0)
    order = sorted(range(len(h)), key=lambda i: h[i])  # best drawn last, on top
    for i in order:
        ys = [cols[n][0][i] for n in names] + [(h[i] - lo) / ((hi - lo) or 1.0)]
        ax.plot(
            range(len(names) + 1),
            ys,
            color=cmap((h[i] - lo) / ((hi - lo) or 1.0)),
            alpha=0.8,
            lw=2.5 if i == order[-1] else 1.0,
        )
    ax.set_xticks(range(len(names) + 1), [*names, "val H"], rotation=20, ha="right", fontsize=8)
    ax.tick_params(axis="x", pad=14)
    ax.set_ylim(-0.05, 1.05)
    for j, n in enumerate(names):
        ticks = cols[n][1]
        ax.annotate(
            "\n".join(ticks[:4]) if len(ticks) > 2 else f"{ticks[-1]}",
            (j, 1.03),
            ha="center",
            va="bottom",
            fontsize=6,
            annotation_clip=False,
        )
        if len(ticks) == 2:
            ax.annotate(ticks[0], (j, -0.03), ha="center", va="top", fontsize=6, annotation_clip=False)
    ax.set_yticks([0, 1], ["low", "high"])
    ax.set_title(
        f"Parameters of {len(h)} trials, coloured by best validation H ({100 * lo:.1f}-{100 * hi:.1f}%)", pad=28
    )
    fig.tight_layout()
    return fig


def calibration(
    c: Sequence[float], seen: Sequence[float], unseen: Sequence[float], h: Sequence[float], chosen: float | None
) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(c, [100 * x for x in seen], label="S (seen classes)")
    ax.plot(c, [100 * x for x in unseen], label="U (unseen classes)")
    ax.plot(c, [100 * x for x in h], label="H", lw=2.5, color="black")
    if chosen is not None:
        ax.axvline(chosen, ls="--", color="gray", label=f"c used = {chosen:.2f}")
    ax.set_xlabel("calibration c (added to unseen-class scores)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Best trial: the seen/unseen trade-off against calibrated stacking")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
