"""Token authentication for joining a Ray cluster: find out whether the cluster wants a token and, if it does
and this machine has one, have this process send it, so a cluster started with ``ray start`` is joined
without the user setting ``RAY_AUTH_MODE``.

Ray (2.52 and later) checks a bearer token on every GCS call when a cluster runs with ``RAY_AUTH_MODE=token``;
``ray start --head`` turns it on by itself when ``~/.ray/auth_token`` exists. A driver sends its token only in
token mode, which ``ray.init`` turns on for a local instance or ``address="auto"``, never for ``host:port``.
The token is looked up, highest priority first, in ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names,
and ``~/.ray/auth_token``; ``ray get-auth-token`` prints it on a machine that has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster import ray_internals
from dedn.errors import DednInputError

__all__ = ["AUTH_MODE", "auth_mode_restored", "settle_auth", "token_source"]

AUTH_MODE = "RAY_AUTH_MODE"
_PROBE = Path(ray_internals.__file__)  # run as a script: ray_internals.probe in a process of its own
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
    argv = [sys.executable, str(_PROBE), gcs_address, str(int(max(1.0, timeout_s - 6.0) * 1000))]
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
