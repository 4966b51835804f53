"""The search's console: one progress line, counted from Tune's trial list (resumed trials included), instead of Tune's
result tables (``--verbose``). On a terminal it is rewritten about once a second; elsewhere (a log file, CI) a line is
written whenever a trial ends and at most every ``every_s`` seconds."""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

__all__ = ["ProgressView", "progress_line"]


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress_line(trials: list[Any], total: int, last_epoch: int, elapsed: float, objective: str = "H") -> str:
    """``trials 3/8: 2 finished, 1 stopped, 0 failed, 2 running | best val H 56.2% (trial-003) | 00:42 elapsed,
    ~01:10 left`` (``objective`` names the value: H, AUSUC, U@S>=0.6); a trial the scheduler ended early counts as
    stopped."""
    from tuning.tracking_callback import run_name

    finished = stopped = failed = running = 0
    best: tuple[float, str] | None = None
    for t in trials:
        result = t.last_result or {}
        if t.status == "ERROR":
            failed += 1
        elif t.status == "TERMINATED":
            if int(result.get("epoch", 0)) < last_epoch and "members" not in t.config:
                stopped += 1
            else:
                finished += 1
        elif t.status == "RUNNING":
            running += 1
        value = result.get("val_objective_best", result.get("val_objective"))
        if isinstance(value, (int, float)) and (best is None or value > best[0]):
            best = (float(value), run_name(t, t.config.get("optuna_trial") if isinstance(t.config, dict) else None))
    ended = finished + stopped + failed
    head = f"trials {ended}/{total}: {finished} finished, {stopped} stopped, {failed} failed, {running} running"
    top = f"best val {objective} {100 * best[0]:.1f}% ({best[1]})" if best else f"best val {objective} -"
    eta = f", ~{_clock(elapsed * (total - ended) / ended)} left" if 0 < ended < total else ""
    return f"{head} | {top} | {_clock(elapsed)} elapsed{eta}"


class ProgressView(Callback):
    """Writes ``progress_line`` to stderr while Tune runs."""

    def __init__(self, total: int, last_epoch: int, every_s: float = 15.0, objective: str = "H") -> None:
        self.total, self.last_epoch, self.every_s, self.objective = total, last_epoch, every_s, objective
        self._start, self._last = time.monotonic(), float("-inf")
        self._width, self._due, self._shown = 0, False, ""

    def __getstate__(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "last_epoch": self.last_epoch,
            "every_s": self.every_s,
            "objective": self.objective,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _show(self, trials: list[Any], force: bool = False) -> None:
        live = sys.stderr.isatty()
        now = time.monotonic()
        if not force and now - self._last < (1.0 if live else self.every_s):
            return
        self._last = now
        line = progress_line(trials, self.total, self.last_epoch, now - self._start, self.objective)
        if line == self._shown and not live:
            return
        self._shown = line
        sys.stderr.write("\r" + line.ljust(self._width) if live else line + "\n")
        self._width = len(line)  # what the next line on a terminal overwrites
        sys.stderr.flush()

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        # Tune marks a trial ended after its callbacks ran: it shows (own line off a terminal) a step later
        self._show(trials, force=self._due and not sys.stderr.isatty())
        self._due = False

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._due = True

    on_trial_error = on_trial_complete

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._show(trials, force=True)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
            sys.stderr.flush()
