"""Join a Ray cluster, or start a local one (ignoring ``RAY_ADDRESS`` and Ray's record of the last ``ray start``) that
lives as long as the command; SIGTERM acts as Ctrl-C. An address is probed and its authentication settled in seconds,
or refused in one line, before ``ray.init`` (which would retry for minutes). A cluster with token authentication (Ray
2.52+) gets this machine's token: ``ray.init`` sends it only in token mode, which ``settle_auth`` turns on if asked."""

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
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from cluster import ray_internals
from cluster.ray_internals import AUTH_LOGGER, find_cluster
from dedn.errors import DednInputError

__all__ = [
    "AUTH_MODE",
    "can_grow",
    "check_address",
    "check_local_fit",
    "local_ray_on_loopback",
    "ray_session",
    "resolve_address",
    "wait_for_a_node",
]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_FORMS = "'auto' or host:port (ray://host:port for Ray Client)"
AUTH_MODE = "RAY_AUTH_MODE"
_FIX = "put the cluster's token (`ray get-auth-token` on its head prints it) in ~/.ray/auth_token, or set RAY_AUTH_TOKEN_PATH to a file that holds it, or RAY_AUTH_TOKEN to it"


# Ray's switch for single-machine instances: off, a node takes 127.0.0.1, not this machine's network address (and
# no UDP probe of 8.8.8.8 finds that address). Read once, as ray is imported; refused by `ray start --address`.
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_set_single_machine = False
# Ray's dashboard process asks cloud metadata services (169.254.169.254, metadata.google.internal) which cloud it is
# on even with usage statistics off (ray 2.60: UsageStatsHead reads the cluster config before the switch). The
# processes a local instance starts get a proxy that refuses at once unless the user has one; loopback goes direct.
_PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
_REFUSING_PROXY = "http://127.0.0.1:9"
_LOOPBACK_HOSTS = "localhost,127.0.0.1,::1"


def local_ray_on_loopback() -> None:
    """Called before Ray is imported by a command that starts a local instance (a search without ``--address``): its
    nodes then listen and talk on 127.0.0.1. Undone once the instance runs (``_start_or_join``), so that a later
    ``ray start`` this process runs is not refused."""
    global _set_single_machine
    if "ray" not in sys.modules and _SINGLE_MACHINE not in os.environ:
        os.environ[_SINGLE_MACHINE] = "0"
        _set_single_machine = True


@contextmanager
def _local_processes_stay_home() -> Iterator[dict[str, str]]:
    """Around ``ray.init`` of a local instance: the environment its processes inherit keeps them off the network
    (``_PROXIES``); yields the workers' environment variables that give the trials the user's own settings back."""
    global _set_single_machine
    names = (*_PROXIES, "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")
    saved = {k: os.environ.get(k) for k in names}
    own = any(saved[k] for k in names if "no_" not in k.lower())
    if not own:
        os.environ.update({k: _REFUSING_PROXY for k in _PROXIES})
        os.environ["no_proxy"] = os.environ["NO_PROXY"] = _LOOPBACK_HOSTS
    try:
        yield {} if own else {k: saved[k] or "" for k in (*_PROXIES, "no_proxy", "NO_PROXY")}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if _set_single_machine:
            os.environ.pop(_SINGLE_MACHINE, None)
            _set_single_machine = False


def token_source() -> str:
    """Where Ray takes this process's token from, in its order (names, never the token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return str(Path.home() / ".ray" / "auth_token")


def settle_auth(gcs_address: str, source: str, timeout_s: float = 20.0) -> str:
    """``token`` (then ``RAY_AUTH_MODE=token`` here) or ``open``, as ``ray_internals.probe`` answers in a child process
    killed after ``timeout_s``; DednInputError (with the fix) when nothing answers or the token is missing, refused."""
    where = f"the Ray cluster at {gcs_address}"
    argv = [sys.executable, ray_internals.__file__, gcs_address, str(int(max(1.0, timeout_s - 6.0) * 1000))]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
        result, detail = str(answer["result"]), str(answer.get("detail", ""))
    except subprocess.TimeoutExpired:
        why = f"no Ray cluster answered at {gcs_address} within {timeout_s:g} s"
        raise DednInputError(source, "--address", why) from None
    except (ValueError, KeyError, IndexError):  # the probe died without its answer
        raise DednInputError(source, "--address", f"could not ask {where} whether it may be joined") from None
    rules = {
        "unreachable": f"no Ray cluster answers at {gcs_address}: {detail}",
        "missing": f"{where} uses token authentication and no token was found here: {_FIX}",
        "unreadable": f"{where} uses token authentication and {token_source()} cannot be read or is empty: {_FIX}",
        "rejected": f"{where} refused the token from {token_source()}: use the cluster's token (`ray get-auth-token` on its head prints it)",
        "disabled_here": f"{where} uses token authentication but {AUTH_MODE}={detail} is set here: unset it",
    }
    if result in rules:
        raise DednInputError(source, "--address", rules[result])
    if result == "token":
        ray_internals.set_auth_mode("token")
    return "token" if (os.environ.get(AUTH_MODE) or "").lower() == "token" else "open"


@contextmanager
def auth_mode_restored() -> Iterator[None]:
    """``RAY_AUTH_MODE`` put back after the block (``settle_auth`` and a local ``ray.init`` set it process-wide)."""
    saved = os.environ.get(AUTH_MODE)
    try:
        yield
    finally:
        if os.environ.get(AUTH_MODE) != saved:
            ray_internals.set_auth_mode(saved)


def check_address(address: str | None) -> tuple[str, int] | None:
    """(host, port) of ``--address``, None for ``auto`` or none; DednInputError when it is malformed."""
    if address is None or address == "auto":
        return None
    host, sep, port = address.removeprefix("ray://").rpartition(":")
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
    """The GCS ``host:port`` ``ray.init(address=...)`` would join (``auto`` looked up as Ray does, loopback made this
    machine's address); ``ray://`` as given. DednInputError when ``auto`` finds nothing."""
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


def _probe(address: str, source: str) -> None:
    """Fail fast, in one line, when nothing listens at host:port (ray.init would retry for minutes)."""
    if (hp := check_address(address)) is None:
        return
    try:
        socket.create_connection(hp, timeout=5.0).close()
    except OSError as e:
        why = f"no Ray cluster answers at {hp[0]}:{hp[1]} ({e.strerror or type(e).__name__})"
        raise DednInputError(source, "--address", why) from None


class _SigtermInterrupts:
    """A first SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C; once ``deferred`` it waits for
    ``uninstall()``. ``ray.init`` installs a handler that aborts without cleanup: ``install()`` again after it."""

    def __init__(self) -> None:
        self.main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if self.main else None
        self.previous: Any = signal.SIG_DFL if previous is None else previous  # None: set outside Python
        self.deferred = self.held = self.fired = False
        self.install()

    def install(self) -> None:
        if self.main and not self.fired:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self.deferred:
            self.held = True
            return
        self.fired = True
        signal.signal(signal.SIGTERM, self.previous)  # a second SIGTERM is not caught here
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    def uninstall(self, raise_held: bool) -> None:
        if self.main:
            signal.signal(signal.SIGTERM, self.previous)  # also over Ray's own handler
        if self.held and raise_held:
            raise KeyboardInterrupt("stopped by signal SIGTERM")


def check_local_fit(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Refuse, before anything starts, a trial the local instance this command would start can never hold (Ray then
    waits for the resources forever): its CPUs are this machine's, its GPUs those CUDA makes visible."""
    import torch

    for what, asked, has in (
        ("CPU", cpus_per_trial, os.cpu_count() or 1),
        ("GPU", gpus_per_trial, torch.cuda.device_count()),
    ):
        if asked > has:
            why = f"asks {asked:g} {what} per trial; this machine (the local Ray instance, no --address) has {has:g}"
            raise DednInputError("dedn search", f"--{what.lower()}s-per-trial", why)


def wait_for_a_node(cpus_per_trial: float, gpus_per_trial: float, wait_s: float, address: str) -> None:
    """On a joined cluster, before anything of the search exists: return once an alive node can hold one trial. When
    none can and the cluster autoscales (its autoscaler names node types), the autoscaler is asked for one
    (``request_resources``) and this waits up to ``wait_s`` seconds, saying so on stderr; a cluster that cannot grow
    is not waited for. Then one DednInputError naming the option, what was asked and what the largest node has."""
    import ray
    from ray.autoscaler.sdk import request_resources

    need = {"CPU": cpus_per_trial, "GPU": gpus_per_trial}

    def largest() -> tuple[bool, dict[str, float]]:
        alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        fits = any(all(r.get(k, 0.0) >= v for k, v in need.items() if v) for r in alive)
        return fits, {k: max((r.get(k, 0.0) for r in alive), default=0.0) for k in need}

    fits, has = largest()
    if fits:
        return
    unit = "GPU" if gpus_per_trial > has["GPU"] else "CPU"
    asked = need[unit]
    deadline = time.monotonic() + wait_s
    grows = can_grow()
    if wait_s > 0 and grows:
        print(
            f"waiting up to {wait_s:g} s (--resource-wait) for a node with {asked:g} {unit} for a trial: the largest "
            f"node of the cluster at {address} has {has[unit]:g} now (an autoscaling cluster may add one)",
            file=sys.stderr,
            flush=True,
        )
        request_resources(bundles=[{k: v for k, v in need.items() if v}])
        try:
            while time.monotonic() < deadline:
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
                fits, has = largest()
                if fits:
                    return
        finally:
            with suppress(Exception):
                request_resources(bundles=[])
    if not grows:
        waited = "; the cluster has no autoscaler to add one"
    else:
        waited = f", after waiting {wait_s:g} s (--resource-wait)" if wait_s > 0 else ""
    why = f"asks {asked:g} {unit} per trial; no node of the cluster at {address} has that (the largest has {has[unit]:g}){waited}"
    raise DednInputError("dedn search", f"--{unit.lower()}s-per-trial", why)


def can_grow() -> bool:
    """Whether the joined cluster may add nodes: some node type its autoscaler names is not the ``node_<id>`` of a
    node started by hand. When Ray's reports cannot be read, it may (the search then waits, as it would)."""
    try:
        types = ray_internals.node_types()
    except Exception:
        return True
    return not types or any(re.fullmatch(r"node_[0-9a-f]+", t) is None for t in types)


@contextmanager
def _quiet_ray(level: int = logging.CRITICAL) -> Iterator[None]:
    """Hold back Ray's log lines below ``level`` (its start notices; a failed join is reported in one line)."""
    levels = {lg: lg.level for lg in (logging.getLogger("ray"), logging.getLogger(AUTH_LOGGER))}
    for lg in levels:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in levels.items():
            lg.setLevel(old)


def _start_or_join(
    address: str | None, num_cpus: int | None, num_gpus: int | None, auth_timeout_s: float, init: dict[str, Any]
) -> dict[str, Any]:
    """Join ``address`` or (None) start a local instance: ``ray_session``'s info; shut down again when it fails."""
    import ray

    try:
        if address:
            target = resolve_address(address)
            _probe(target, source=address)
            auth = "open" if target.startswith("ray://") else settle_auth(target, address, auth_timeout_s)
            try:
                with _quiet_ray():
                    # Ray's own level for its "Connecting to existing Ray cluster" lines: not for the console
                    ctx = ray.init(address=target, log_to_driver=True, **{"logging_level": logging.WARNING, **init})
            except Exception as e:  # cannot join: one line, not Ray's traceback
                first = (str(e).strip().splitlines() or [""])[0][:200]
                why = f"cannot join a Ray cluster: {type(e).__name__}: {first}"
                raise DednInputError(address, "--address", why) from None
        else:  # "local": never RAY_ADDRESS nor Ray's current-cluster record
            local = {"num_cpus": num_cpus, "num_gpus": num_gpus, "logging_level": logging.WARNING, **init}
            with _quiet_ray(logging.ERROR), _local_processes_stay_home() as workers_env:
                if workers_env:
                    runtime_env = dict(local.pop("runtime_env", None) or {})
                    runtime_env["env_vars"] = {**workers_env, **runtime_env.get("env_vars", {})}
                    local["runtime_env"] = runtime_env
                ctx = ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **local)
            auth = "token" if (os.environ.get(AUTH_MODE) or "").lower() == "token" else "open"
    except BaseException:
        with suppress(Exception):
            ray.shutdown()
        raise
    return {"address": getattr(ctx, "address_info", {}).get("gcs_address"), "started": not address, "auth": auth}


@contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    auth_timeout_s: float = 20.0,
    **init: Any,
) -> Iterator[dict[str, Any]]:
    """Join ``auto`` or ``host:port`` (left running; with this machine's token if it wants one), or with None start a
    local instance (no dashboard; shut down on exit). Yields ``{"address": GCS address, "started": bool, "auth": "token"
    | "open"}``. DednInputError for a malformed or silent address (socket 5 s, GCS ``auth_timeout_s``), a bad token."""
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
                sigterm.deferred = True  # a SIGTERM now waits for Ray's shutdown, then stops the command
                ray.shutdown()
        finished = True
    finally:
        sigterm.uninstall(raise_held=finished)
