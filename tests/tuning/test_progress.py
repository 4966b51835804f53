"""The search's progress line, counted from Tune's trial list."""

from __future__ import annotations

from types import SimpleNamespace

from tuning.progress import progress_line


def _trial(status: str, epoch: int | None, best: float | None, number: int) -> SimpleNamespace:
    result = {} if epoch is None else {"epoch": epoch, "val_objective": (best or 0.0) / 2, "val_objective_best": best}
    return SimpleNamespace(
        status=status, last_result=result, config={"optuna_trial": number}, experiment_tag=f"{number + 1}_x=1"
    )


def test_counts_finished_stopped_failed_running_and_names_the_best() -> None:
    trials = [
        _trial("TERMINATED", 6, 0.41, 0),  # ran to its last epoch
        _trial("TERMINATED", 2, 0.62, 1),  # stopped by the scheduler at epoch 2
        _trial("ERROR", 1, 0.10, 2),
        _trial("RUNNING", 3, 0.55, 3),
        _trial("PENDING", None, None, 4),
    ]
    line = progress_line(trials, total=8, last_epoch=6, elapsed=90.0)
    head, best, clock = line.split(" | ")
    assert head == "trials 3/8: 1 finished, 1 stopped, 1 failed, 1 running"
    assert best == "best val H 62.0% (trial-001)"  # the best epoch so far, not the last one
    assert clock == "01:30 elapsed, ~02:30 left"  # 3 of 8 ended in 90 s: 5 more at 30 s each


def test_nothing_ended_yet_has_no_estimate() -> None:
    line = progress_line([_trial("RUNNING", None, None, 0)], total=4, last_epoch=6, elapsed=5.0)
    assert line == "trials 0/4: 0 finished, 0 stopped, 0 failed, 1 running | best val H - | 00:05 elapsed"
