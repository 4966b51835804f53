"""Connect to a Ray cluster, or start a local one that lives as long as the command.

Without an address a command always starts, and owns, a local Ray instance (Ray's ``address="local"``):
``RAY_ADDRESS`` and Ray's record of the last cluster ``ray start`` made (``/tmp/ray/ray_current_cluster``,
stale once that cluster is gone) are ignored. With an address the cluster is found, asked whether it
answers and which authentication it wants, within seconds and in one line when it cannot be joined, before
``ray.init`` (which would retry an address for minutes) runs. SIGTERM stops a session like Ctrl-C does.

A cluster with token authentication (Ray 2.52 and later; ``ray start --head`` turns it on when ``~/.ray/auth_token``
exists) is joined with this machine's token, looked up as Ray does (``RAY_AUTH_TOKEN``, the file
``RAY_AUTH_TOKEN_PATH`` names, ``~/.ray/auth_token``): a driver sends its token only in token mode, which ``ray.init``
turns on for a local instance or ``auto``, never for ``host:port``, so ``settle_auth`` asks the cluster first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

from cluster import ray_internals
from cluster.ray_internals import AUTH_LOGGER, find_cluster
from dedn.errors import DednInputError

__all__ = ["AUTH_MODE", "auth_mode_restored", "check_address", "ray_session", "resolve_address", "settle_auth"]

_HOST = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_FORMS = "'auto' or host:port (ray://host:port for Ray Client)"


AUTH_MODE = "RAY_AUTH_MODE"
_FIX = (
    "put the cluster's token (`ray get-auth-token` on its head prints it) in ~/.ray/auth_token, "
    "or set RAY_AUTH_TOKEN_PATH to a file that holds it, or RAY_AUTH_TOKEN to it"
)


def token_source() -> str:
    """Where Ray takes this process's token from, in its order (names, never the token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return str(Path.home() / ".ray" / "auth_token")


def _probe_auth(gcs_address: str, source: str, timeout_s: float) -> str:
    """Run ``cluster/ray_internals.py`` (``probe``) against ``gcs_address`` in a child process with this process's
    environment, killed after ``timeout_s``; its result, or DednInputError in one line."""
    where = f"the Ray cluster at {gcs_address}"
    argv = [sys.executable, ray_internals.__file__, gcs_address, str(int(max(1.0, timeout_s - 6.0) * 1000))]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
        result, detail = str(answer["result"]), str(answer.get("detail", ""))
    except subprocess.TimeoutExpired:
        raise DednInputError(
            source, "--address", f"no Ray cluster answered at {gcs_address} within {timeout_s:g} s"
        ) from None
    except (ValueError, KeyError, IndexError):  # the probe died without its answer
        raise DednInputError(source, "--address", f"could not ask {where} whether it may be joined") from None
    rules = {
        "unreachable": f"no Ray cluster answers at {gcs_address}: {detail}",
        "missing": f"{where} uses token authentication and no token was found here: {_FIX}",
        "unreadable": f"{where} uses token authentication and {token_source()} cannot be read or is empty: {_FIX}",
        "rejected": f"{where} refused the token from {token_source()}: use the cluster's token "
        "(`ray get-auth-token` on its head prints it)",
        "disabled_here": f"{where} uses token authentication but {AUTH_MODE}={detail} is set here: unset it",
    }
    if result in rules:
        raise DednInputError(source, "--address", rules[result])
    return result


def settle_auth(gcs_address: str, source: str, timeout_s: float = 20.0) -> str:
    """Ask the cluster at ``gcs_address`` whether it may be joined from here, and how. When it uses token
    authentication and this machine has a token, ``RAY_AUTH_MODE=token`` is set in this process (restore it
    with ``auth_mode_restored``). Returns ``token`` or ``open`` (no token needed, or the mode already set here
    works).

    Raises DednInputError, one line naming ``source`` and field ``--address``, with the fix, when no cluster
    answers within ``timeout_s``, or the cluster wants a token that is missing, unreadable or refused here."""
    result = _probe_auth(gcs_address, source, timeout_s)
    if result == "token":
        ray_internals.set_auth_mode("token")
    return "token" if (os.environ.get(AUTH_MODE) or "").lower() == "token" else "open"


@contextmanager
def auth_mode_restored() -> Iterator[None]:
    """``RAY_AUTH_MODE`` as it was before the block, after it (``settle_auth``, and ``ray.init`` of a local
    instance, turn token mode on for the whole process)."""
    saved = os.environ.get(AUTH_MODE)
    try:
        yield
    finally:
        if os.environ.get(AUTH_MODE) != saved:
            ray_internals.set_auth_mode(saved)


def check_address(address: str | None) -> tuple[str, int] | None:
    """Refuse a malformed ``--address`` before anything is created. Returns (host, port), or None for
    ``auto`` / no address."""
    if address is None or address == "auto":
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # [IPv6]:port
        host = host[1:-1]
        valid_host = ":" in host and all(re.fullmatch(r"[0-9A-Fa-f.]*", p) for p in host.split(":"))
    else:
        valid_host = bool(_HOST.match(host))
    if not sep or not valid_host:
        raise DednInputError(address, "--address", f"not a Ray address: give {_FORMS}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise DednInputError(address, "--address", f"port {port!r} is not a number from 1 to 65535: give {_FORMS}")
    return host, int(port)


def resolve_address(address: str) -> str:
    """The ``host:port`` of the cluster's GCS that ``ray.init(address=...)`` would connect to: ``auto`` is
    looked up as Ray does (``RAY_ADDRESS``, then Ray's current-cluster record, then a Ray instance running on
    this machine), and a loopback host becomes this machine's address, as Ray advertises its nodes. A
    ``ray://`` (Ray Client) address is returned as given. Raises DednInputError when ``auto`` finds nothing."""
    if address.startswith("ray://"):
        return address
    try:
        found = find_cluster(address)
    except (ConnectionError, ValueError) as e:  # auto: no cluster recorded or running here
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DednInputError(address, "--address", f"no Ray cluster found: {first}") from None
    if found is None:
        raise DednInputError(address, "--address", f"no Ray cluster found: give {_FORMS}")
    check_address(found)  # an auto lookup (RAY_ADDRESS, the record) may hold anything
    return found


def _probe(address: str, timeout_s: float = 5.0, source: str | None = None) -> None:
    """Fail fast, with one line, when nothing listens at host:port (ray.init would retry for minutes)."""
    hp = check_address(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise DednInputError(
            source or address, "--address", f"no Ray cluster answers at {hp[0]}:{hp[1]} ({reason})"
        ) from None


class _SigtermInterrupts:
    """While installed (main thread only), the first SIGTERM raises KeyboardInterrupt in the main thread, as
    Ctrl-C does, so ``with`` blocks and ``finally`` clauses clean up; a second one acts as SIGTERM did before.
    After ``defer()`` (while cleaning up) a SIGTERM is held and raised by ``uninstall()``.

    ``ray.init`` installs Ray's own C++ handler for SIGTERM (it logs the signal and aborts the process, with
    no cleanup), so ``install()`` is called again once Ray is up."""

    def __init__(self) -> None:
        self.main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if self.main else None
        self.previous: Any = signal.SIG_DFL if previous is None else previous  # None: set outside Python
        self.deferred = self.held = self.fired = False
        self.install()

    def install(self) -> None:
        if self.main and not self.fired:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.deferred:
            self.held = True
            return
        self.fired = True
        signal.signal(signal.SIGTERM, self.previous)  # a second SIGTERM is not caught here
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    def defer(self) -> None:
        self.deferred = True

    def uninstall(self, raise_held: bool) -> None:
        if not self.main:
            return
        signal.signal(signal.SIGTERM, self.previous)  # also over Ray's own handler
        if self.held and raise_held:
            raise KeyboardInterrupt("stopped by signal SIGTERM")


@contextmanager
def _quiet_ray(level: int = logging.CRITICAL) -> Iterator[None]:
    """Ray's own log lines below ``level`` are held back while Ray starts or joins: a failed connection is
    reported in one line; a local start says nothing ("Started a local Ray instance", the notice that
    token authentication is on: it is, and a local instance needs nothing from the user for it)."""
    loggers = [logging.getLogger("ray"), logging.getLogger(AUTH_LOGGER)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels, strict=True):
            lg.setLevel(old)


def _join(address: str, source: str, init: dict[str, Any]) -> Any:
    """``ray.init`` for the cluster at ``address`` (found, answering, auth settled); one line if it fails."""
    import ray

    try:
        with _quiet_ray():
            return ray.init(address=address, log_to_driver=True, **init)
    except Exception as e:  # cannot join: one line, not Ray's traceback
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DednInputError(source, "--address", f"cannot join a Ray cluster: {type(e).__name__}: {first}") from None


def _start_or_join(
    address: str | None, num_cpus: int | None, num_gpus: int | None, auth_timeout_s: float, init: dict[str, Any]
) -> dict[str, Any]:
    """Join the cluster at ``address``, or with None start a local instance; returns ``ray_session``'s info.
    Whatever a ``ray.init`` that fails or is interrupted half-way started is shut down again."""
    import ray

    try:
        if address:
            target = resolve_address(address)
            _probe(target, source=address)
            auth = "open" if target.startswith("ray://") else settle_auth(target, address, auth_timeout_s)
            ctx = _join(target, address, init)
        else:  # "local": never RAY_ADDRESS nor Ray's current-cluster record
            with _quiet_ray(logging.ERROR):
                ctx = ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    **{"logging_level": logging.WARNING, **init},
                )
            auth = "token" if (os.environ.get(AUTH_MODE) or "").lower() == "token" else "open"
    except BaseException:
        with suppress(Exception):
            ray.shutdown()
        raise
    gcs = getattr(ctx, "address_info", {}).get("gcs_address")
    return {"address": gcs, "started": not address, "auth": auth}


@contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    auth_timeout_s: float = 20.0,
    **init: Any,
) -> Iterator[dict[str, Any]]:
    """``address`` ``auto`` or ``host:port`` joins a running cluster (left running afterwards), with the
    token authentication it uses when this machine has its token; None starts a local instance of its own
    (never another cluster), with no dashboard and token authentication on (Ray's default for a local
    instance; Ray advertises it on this machine's address even though 127.0.0.1 is asked for), and shuts
    it down on exit. Yields
    ``{"address": the GCS address, "started": whether this session started Ray, "auth": "token" when this
    process sends a token, else "open"}``.

    A malformed address, one where no cluster answers (socket within 5 s, GCS within ``auth_timeout_s``), or
    a cluster whose token is missing or wrong here is refused with one line (DednInputError). For the
    session's duration SIGTERM raises KeyboardInterrupt in the main thread (connecting included), so callers
    clean up as on Ctrl-C; this process's Ray is shut down on the way out, ``RAY_AUTH_MODE`` restored."""
    import ray

    if ray.is_initialized():
        yield {"address": ray.get_runtime_context().gcs_address, "started": False, "auth": None}
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    sigterm = _SigtermInterrupts()
    finished = False
    try:
        with auth_mode_restored():
            info = _start_or_join(address, num_cpus, num_gpus, auth_timeout_s, init)
            sigterm.install()  # over the handler ray.init installed
            try:
                yield info
            finally:
                sigterm.defer()  # a SIGTERM now waits for Ray's shutdown, then stops the command
                ray.shutdown()
        finished = True
    finally:
        sigterm.uninstall(raise_held=finished)
