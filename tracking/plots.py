"""The plots logged on a search's parent run (matplotlib, Agg backend): Optuna's own plots of the study, and the best
trial's seen (S) and unseen (U) accuracy and H against calibration c."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["calibration", "front", "study_plots"]


def study_plots(study: Any) -> dict[str, Figure]:
    """Optuna's plots of the study by file name; one it cannot draw yet (too few finished trials) says so instead."""
    import optuna.visualization.matplotlib as vm

    drawn = {
        "val_H_per_epoch.png": (vm.plot_intermediate_values, {}),
        "param_importance.png": (vm.plot_param_importances, {"target_name": "validation H"}),
        "parallel_coordinates.png": (vm.plot_parallel_coordinate, {"target_name": "validation H"}),
    }
    figures = {}
    for name, (plot, kwargs) in drawn.items():
        try:
            with warnings.catch_warnings():  # Optuna's plots are "experimental"; too few trials is said on the plot
                warnings.simplefilter("ignore")
                ax = plot(study, **kwargs)
            fig = ax.get_figure(root=True)
            assert isinstance(fig, Figure)
            fig.set_size_inches(8, 5)
            fig.tight_layout()
        except (ValueError, RuntimeError) as e:  # no finished trial, a constant objective, ...
            fig, ax = plt.subplots(figsize=(8, 5))
            ax.text(0.5, 0.5, f"not drawn: {str(e).splitlines()[0][:120]}", ha="center", va="center", wrap=True)
            ax.set_axis_off()
        figures[name] = fig
    return figures


def calibration(
    c: Sequence[float],
    seen: Sequence[float],
    unseen: Sequence[float],
    h: Sequence[float],
    chosen: float | None,
    title: str = "Best trial: the seen/unseen trade-off against calibrated stacking",
) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(c, [100 * x for x in seen], label="S (seen classes)")
    ax.plot(c, [100 * x for x in unseen], label="U (unseen classes)")
    ax.plot(c, [100 * x for x in h], label="H", lw=2.5, color="black")
    if chosen is not None:
        ax.axvline(chosen, ls="--", color="gray", label=f"c used = {chosen:.2f}")
    ax.set_xlabel("calibration c (added to unseen-class scores)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def front(
    curves: Sequence[tuple[str, Sequence[float], Sequence[float]]], u: Sequence[float], s: Sequence[float]
) -> Figure:
    """The seen/unseen curves of a few trials (name, U, S) and the front over all trials (U, S) highlighted."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for name, cu, cs in curves:
        ax.plot([100 * x for x in cu], [100 * x for x in cs], lw=1.2, alpha=0.8, label=name)
    ax.plot([100 * x for x in u], [100 * x for x in s], "o-", ms=3, lw=2.5, color="black", label="front (all trials)")
    ax.set_xlabel("U: unseen-class accuracy (%)")
    ax.set_ylabel("S: seen-class accuracy (%)")
    ax.set_title("Validation seen/unseen trade-off: best trials and the front")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
