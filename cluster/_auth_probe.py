"""Asks a Ray cluster's GCS whether this machine may join it, and how: run as a script by ``cluster.auth``.

``python _auth_probe.py HOST:PORT TIMEOUT_MS`` prints one JSON line, ``{"result": ..., "detail": ...}``:

* ``open``: the GCS answered as this process is configured (no token needed, or the token mode already set
  works);
* ``token``: the GCS wants a token, one was found here (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
  ``~/.ray/auth_token``) and it was accepted once ``RAY_AUTH_MODE=token`` was set;
* ``missing``, ``unreadable``, ``rejected``, ``disabled_here``: the GCS wants a token and none was found, the
  token file cannot be read, the token was refused, or ``RAY_AUTH_MODE`` is set to something else here;
* ``unreachable``: no GCS answered (``detail`` says why).

It runs in its own process because Ray keeps its auth mode and token in process-wide C++ state, logs its
connection retries straight to stderr, aborts the process on an unreadable ``RAY_AUTH_TOKEN_PATH`` and does
not return to Python while it waits for a silent port. Only stdlib and ``ray._raylet`` are imported; the
token itself is never printed.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

__all__ = ["probe"]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def probe(address: str, timeout_ms: int) -> dict[str, Any]:
    raylet: Any = importlib.import_module("ray._raylet")  # its type stubs leave these names out
    AuthenticationError = raylet.AuthenticationError
    loader = raylet.AuthenticationTokenLoader.instance()

    def token_found() -> dict[str, Any] | None:
        """None when a token can be loaded here; otherwise the result that says why not."""
        try:
            found = loader.has_token(ignore_auth_mode=True)
        except AuthenticationError as e:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
            return {"result": "unreadable", "detail": _first_line(e)}
        return None if found else {"result": "missing", "detail": ""}

    def answers() -> bool:
        """True when the GCS answers; False when it refuses this process's credentials."""
        try:
            raylet.InnerGcsClient.standalone(address, None, timeout_ms)
        except AuthenticationError:
            return False
        return True

    if raylet.get_authentication_mode() == raylet.AuthenticationMode.TOKEN and (why := token_found()) is not None:
        return why  # Ray would abort this process, not refuse it, when connecting in token mode without one
    try:
        if answers():
            return {"result": "open", "detail": ""}
        if (why := token_found()) is not None:
            return why
        mode = os.environ.get("RAY_AUTH_MODE")
        if mode is not None and mode.lower() != "token":
            return {"result": "disabled_here", "detail": mode}
        if mode is None:  # the cluster wants a token and one is here: send it, as ray.init will
            os.environ["RAY_AUTH_MODE"] = "token"
            raylet.Config.initialize("")
            loader.reset_cache()
            if answers():
                return {"result": "token", "detail": ""}
        return {"result": "rejected", "detail": ""}
    except Exception as e:  # no GCS at the address (timed out, refused, not Ray)
        return {"result": "unreachable", "detail": _first_line(e)}


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], int(sys.argv[2]))), flush=True)
