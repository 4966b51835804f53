"""The plots logged on a search's parent run (matplotlib, Agg backend).

- ``study_plots``: Optuna's own plots of the study (``optuna.visualization.matplotlib``): validation H per epoch of
  every configuration (its intermediate values; configurations stopped early end early), the parameters' importance
  for validation H, and the parallel coordinates of the parameters against it.
- ``calibration``: seen (S) and unseen (U) accuracy and H of the best trial against calibration c.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["calibration", "study_plots"]


def study_plots(study: Any) -> dict[str, Figure]:
    """``val_H_per_epoch.png``, ``param_importance.png`` and ``parallel_coordinates.png`` of an Optuna study, each
    drawn by Optuna; a plot Optuna cannot draw yet (fewer than two finished trials) says so instead."""
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
