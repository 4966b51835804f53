"""A process beside the driver: ``python -m MODULE FD``, fed through a socketpair, so that a library's client (MLflow's,
Optuna's) takes neither CPU nor the interpreter's lock from Tune's event loop.

The process is started with SIGINT and SIGTERM blocked and ignores them (the driver ends it, after what it queued),
and exits at once when the driver's end of the pipe closes (a killed driver). Messages are made in the order sent;
``ask`` returns a future for the reply, replies come back in order. Its first message (the settings) goes on the
pipe, not the command line, which any user can read (a database URI may carry a password).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Beside", "serve"]

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Beside:
    """The driver's end of a process running ``serve`` (``module``'s ``__main__``), its first message ``first``."""

    def __init__(self, module: str, first: Any) -> None:
        self.module = module
        ours, theirs = socket.socketpair()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # until it ignores them: a Ctrl-C cannot end it
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, str(theirs.fileno())], pass_fds=[theirs.fileno()]
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            theirs.close()
        self.conn = Connection(ours.detach())
        self.lock = threading.RLock()  # one sender at a time
        self.reading = threading.Lock()  # one reader at a time
        self.waiting: deque[Future[Any]] = deque()  # replies not yet read, in the order asked
        self.ended: str | None = None  # why no more messages are made
        self.tell(first)

    def _send(self, reply: bool, message: tuple[Any, ...]) -> Future[Any] | None:
        with self.lock:
            future: Future[Any] | None = Future() if reply else None
            if self.ended is None:
                try:
                    self.conn.send((reply, *message))
                    if future is not None:
                        self.waiting.append(future)
                    return future
                except OSError:
                    self._end()
            if future is not None:
                future.set_exception(RuntimeError(self.ended))
            return future

    def tell(self, *message: Any) -> None:
        """Send ``message`` (a name and its arguments); nothing comes back."""
        self._send(False, message)

    def ask(self, *message: Any) -> Future[Any]:
        """Send ``message``; its reply (or the error it raised there) is the future's, read by ``read``."""
        future = self._send(True, message)
        assert future is not None
        return future

    def read(self, until: Future[Any] | None = None) -> None:
        """Read the replies that came back (``until`` None), or until ``until``'s."""
        with self.reading:
            while self.waiting and (until is None or not until.done()):
                try:
                    if until is None and not self.conn.poll():
                        return
                    ok, value = self.conn.recv()
                except (EOFError, OSError):
                    with self.lock:
                        self._end()
                    return
                future = self.waiting.popleft()
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def result(self, future: Future[Any]) -> Any:
        """``future``'s reply, waited for."""
        self.read(future)
        return future.result()

    def _end(self) -> None:
        if self.ended is None:
            code = self.process.poll()
            how = "its pipe closed" if code is None else f"it ended with exit code {code}"
            self.ended = f"the process beside the driver (pid {self.process.pid}, {self.module}): {how}"
        while self.waiting:
            self.waiting.popleft().set_exception(RuntimeError(self.ended))

    def close(self, timeout_s: float = 60.0) -> None:
        """Close the pipe (the process ends once it has made what it was sent) and wait for it."""
        with self.lock:
            self._end()
            self.conn.close()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()


def serve(fd: int, start: Callable[[Any], Callable[[str, tuple[Any, ...]], Any]]) -> None:
    """The process's loop: ``start(first message)`` gives the handler of each message (name, arguments) that follows,
    made in order; the handler's ``idle()``, if it has one, runs whenever no message waits. Exits when the driver's end of the pipe closes: what it
    did not make is lost with the driver, and the record has it."""
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    conn = Connection(fd)
    try:
        _, first = conn.recv()
        handle = start(first)
        idle = getattr(handle, "idle", lambda: None)
        while True:
            if not conn.poll():
                idle()
            reply, name, *args = conn.recv()
            try:
                value, ok = handle(name, tuple(args)), True
            except Exception as e:  # one call that fails must not end the others
                value, ok = e, False
                if not reply:
                    print(f"dedn: {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if reply:
                try:
                    conn.send((ok, value))
                except (EOFError, OSError):
                    raise
                except Exception:  # an error that does not pickle
                    conn.send((False, RuntimeError(f"{name}: {type(value).__name__}: {value}")))
    except (EOFError, OSError):
        sys.exit(0)
