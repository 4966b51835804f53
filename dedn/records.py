"""What a training run produces: one record per epoch, the run's result, and what an epoch callback sees."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from dedn.model import DEDN


def selection_value(metrics: dict[str, float]) -> float:
    """The objective's value of an evaluation (H for records made before objectives), -1 when not evaluated."""
    return metrics.get("objective", metrics.get("H", -1.0))


@dataclass
class EpochRecord:
    epoch: int
    loss: dict[str, float]
    eval: dict[str, float]  # U, S, H, T at the configured inference parameters
    grid_best: dict[str, float]  # best grid point by H: lambda_rc, lambda_e, c, U, S, H, T
    seconds: float
    samples_per_s: float

    def score(self, select_on: str) -> float:
        """The value that selects epochs (``inference.objective``, H by default): at the configured inference point,
        or the grid's best (-1 when the epoch was not evaluated)."""
        return selection_value(self.grid_best if select_on == "grid" else self.eval)


@dataclass
class BestEpoch:
    """The best epoch of a run so far: its number, its metrics at the configured point and the grid's best,
    and its weights (on the CPU)."""

    epoch: int = 0
    eval: dict[str, float] = field(default_factory=lambda: {"H": -1.0})
    grid: dict[str, float] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def score(self, select_on: str) -> float:
        """This epoch's value as ``EpochRecord.score`` measures it (-1 before any epoch)."""
        return selection_value(self.grid if select_on == "grid" else self.eval)

    def improves(self, record: EpochRecord, select_on: str) -> bool:
        """Whether ``record`` beats this epoch by the same H (``EpochRecord.score``)."""
        return record.score(select_on) > self.score(select_on)

    def take(self, record: EpochRecord, state: dict[str, torch.Tensor]) -> None:
        self.epoch, self.eval, self.grid, self.state = record.epoch, record.eval, record.grid_best, state

    @classmethod
    def of_history(
        cls, history: list[EpochRecord], best_epoch: int | None, state: dict[str, torch.Tensor], select_on: str
    ) -> BestEpoch:
        """The best epoch of a resumed run: ``best_epoch`` when given (and in the history), else the history's
        best by H; ``state`` holds its weights."""
        best = cls()
        if best_epoch is not None:
            r = next((r for r in history if r.epoch == best_epoch), None)
            best.epoch, best.state = best_epoch, state
        else:
            r = max(history, key=lambda r: r.score(select_on)) if history else None
        if r is not None:
            best.take(r, state)
        return best


@dataclass
class TrainResult:
    task: str
    history: list[EpochRecord]
    best_epoch: int
    best: dict[str, float]
    best_grid: dict[str, float]
    best_state: dict[str, torch.Tensor] = field(repr=False)
    partition: np.ndarray = field(repr=False)


@dataclass
class Progress:
    """What an epoch callback sees: the live model and optimiser, the history, the best epoch so far."""

    model: DEDN
    optimizer: torch.optim.Optimizer
    history: list[EpochRecord]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    partition: np.ndarray


EpochCallback = Callable[[EpochRecord, Progress], None]


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict (the best weights so far)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


__all__ = ["BestEpoch", "EpochCallback", "EpochRecord", "Progress", "TrainResult", "cpu_state", "selection_value"]
