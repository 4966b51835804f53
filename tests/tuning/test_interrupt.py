"""Ctrl-C around Tune's fit (tuning.interrupt): the first signal goes to Tune's stop handler, the search stops after
fit returns, a second signal stops at once; a later search of the same process starts unstopped. Real signals sent
to this process; a stand-in for the SIGUSR1 handler ``tune.run`` installs."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from tests.helpers import ctrl_c_at_its_default
from tuning.interrupt import stop_saves_state, stopping


@pytest.fixture
def sigint_handled() -> Iterator[None]:
    with ctrl_c_at_its_default():
        yield


@pytest.mark.usefixtures("sigint_handled")
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


@pytest.mark.usefixtures("sigint_handled")
def test_a_stop_before_tune_listens_is_not_raised_into_library_code_and_stops_at_the_next_check() -> None:
    """Before ``tune.run`` installs its SIGUSR1 handler (the tracking runs opened, the store put, the experiment
    restored), a first signal raises nothing into the code that runs: such code may catch the KeyboardInterrupt and
    let the search go on. The search stops at its next check instead."""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # Tune does not listen yet
    went_on = []
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped by signal SIGINT"), stop_saves_state() as check:
            check()  # nothing yet
            try:  # library code that swallows whatever is raised into it
                os.kill(os.getpid(), signal.SIGINT)
                went_on.append("library")
            except BaseException:  # noqa: BLE001
                went_on.append("raised into the library")
            assert stopping()
            check()
            went_on.append("past the check")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert went_on == ["library"]
    assert not stopping()


def test_a_signal_ignored_since_the_start_stays_ignored() -> None:
    """A command started ignoring SIGINT (a script's background job, ``cmd &``) ignores it in its start-up, where Python
    leaves the disposition it inherited: the search does not start catching it half-way."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_saves_state() as check:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            check()
            assert not stopping()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
