"""Ctrl-C and SIGTERM during a search: Tune ends its loop and writes its experiment state with every trial first.

Without this, the state ``--resume`` restores is the one Tune last wrote on its timer (every 10 s or more), and the
trials it had started since are lost to it. Tune ends its loop cleanly, and writes that state, on SIGUSR1 (its stop
signal, installed by ``tune.run``); a first SIGINT or SIGTERM calls that handler, a second one stops at once. A first
signal that comes before Tune has installed its handler (while the tracking runs are opened, the store is put into the
object store or the experiment is restored) raises nothing into that library code, which need not be ready for an
exception at any point: it is recorded, the search stops at its next ``check()`` between those steps, and
inside ``fit`` it is handed to Tune's handler as soon as that is there, by a SIGUSR1 this process sends itself. A
signal the command was started ignoring (SIGINT of a command a script started with ``&``) stays ignored
throughout, as Python leaves it before the search starts.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
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
def stop_saves_state() -> Iterator[Callable[[], None]]:
    """From the search's start-up to the end of ``Tuner.fit``: a first SIGINT or SIGTERM ends Tune's loop (its state
    written; at once, or as soon as Tune listens), then KeyboardInterrupt is raised here; a second signal raises it at
    once. Yields ``check``, which raises KeyboardInterrupt when a signal came: called between the start-up steps."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    _STOPPING.clear()  # this search's stop only: an earlier search of this process may have been stopped
    received: list[str] = []
    done = threading.Event()

    def when_tune_listens() -> None:
        while not done.wait(0.05):
            if callable(signal.getsignal(signal.SIGUSR1)):
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler runs in the main thread
                return

    def on_signal(signum: int, frame: Any) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)
        name = signal.Signals(signum).name
        if _STOPPING.is_set():
            raise KeyboardInterrupt(f"stopped by signal {name}")
        _STOPPING.set()
        received.append(name)
        if callable(tune_stop):
            tune_stop(signal.SIGUSR1, frame)
        else:
            threading.Thread(target=when_tune_listens, name="dedn-stop", daemon=True).start()

    quiet = _QuietTuneStop()
    tune_log = logging.getLogger("ray.tune.tune")
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    tune_log.addFilter(quiet)
    for s, handler in previous.items():
        if handler != signal.SIG_IGN:  # ignored since the command started (a script's ``cmd &``): stays so
            signal.signal(s, on_signal)

    def check() -> None:
        if received:
            raise KeyboardInterrupt(f"stopped by signal {received[0]}")

    try:
        yield check
    finally:
        done.set()
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        tune_log.removeFilter(quiet)
        _STOPPING.clear()  # also when a second signal cut the search short
    if received:
        raise KeyboardInterrupt(f"stopped by signal {received[0]}")
