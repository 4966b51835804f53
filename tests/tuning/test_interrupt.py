"""Ctrl-C around Tune's fit (tuning.interrupt): the first signal goes to Tune's stop handler, the search stops after
fit returns, a second signal stops at once; a later search of the same process starts unstopped. Real signals sent
to this process; a stand-in for the SIGUSR1 handler ``tune.run`` installs."""

from __future__ import annotations

import os
import signal

import pytest

from tuning.interrupt import stop_saves_state, stopping


def test_each_search_has_its_own_stop() -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        for search in (1, 2):  # the second search of this process: its first Ctrl-C is a first one again
            with pytest.raises(KeyboardInterrupt, match="stopped by signal SIGINT"), stop_saves_state():
                assert not stopping()
                os.kill(os.getpid(), signal.SIGINT)  # Tune's handler is told; fit goes on to its end
                assert stopping() and len(calls) == search
            assert not stopping()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), stop_saves_state():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the second: at once, not through Tune
        assert len(calls) == 3 and not stopping()  # cut short: this process is not left stopped
    finally:
        signal.signal(signal.SIGUSR1, previous)
