"""Ctrl-C and SIGTERM during a search: Tune ends its loop and writes its experiment state with every trial first.

Without this, the state ``--resume`` restores is the one Tune last wrote on its timer (every 10 s or more), and the
trials it had started since are lost to it. Tune ends its loop cleanly, and writes that state, on SIGUSR1 (its stop
signal, installed by ``tune.run``); a first SIGINT or SIGTERM calls that handler, a second one stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["stop_saves_state", "stopping"]

_STOPPING = threading.Event()
_TUNE_LINES = ("Stop signal received", "Experiment has been interrupted")  # Tune's own advice, Python's Tuner.restore


def stopping() -> bool:
    """Whether this process's search was asked to stop (its runs stay open for ``--resume``, not ended)."""
    return _STOPPING.is_set()


class _QuietTuneStop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TUNE_LINES)


@contextmanager
def stop_saves_state() -> Iterator[None]:
    """Around ``Tuner.fit``: a first SIGINT or SIGTERM ends Tune's loop (its state written), then KeyboardInterrupt
    is raised here; a second signal, or one that comes before Tune's handler is installed, raises it at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STOPPING.clear()  # this search's stop only: an earlier search of this process may have been stopped
    received: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)
        name = signal.Signals(signum).name
        if _STOPPING.is_set() or not callable(tune_stop):
            raise KeyboardInterrupt(f"stopped by signal {name}")
        _STOPPING.set()
        received.append(name)
        tune_stop(signal.SIGUSR1, frame)

    quiet = _QuietTuneStop()
    tune_log = logging.getLogger("ray.tune.tune")
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    tune_log.addFilter(quiet)
    for s in previous:
        signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        tune_log.removeFilter(quiet)
        _STOPPING.clear()  # also when a second signal cut the search short
    if received:
        raise KeyboardInterrupt(f"stopped by signal {received[0]}")
