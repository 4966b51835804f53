"""The one place the project uses Ray's private names, each for something Ray offers no public way to do.

- ``find_cluster``: the GCS address ``ray.init(address="auto")`` would join (``RAY_ADDRESS``, Ray's record of the
  last cluster ``ray start`` made, a Ray instance on this machine), found without joining it:
  ``ray._private.services.canonicalize_bootstrap_address``. ``ray.init`` itself keeps retrying a recorded but dead
  cluster for up to a minute (ray-project/ray#20900), where a search must say in one line that nothing answers.
- ``set_auth_mode`` and ``probe``: whether a cluster at host:port wants Ray's token authentication, and sending the
  token when it does: ``ray._raylet``'s ``Config``, ``AuthenticationTokenLoader``, ``AuthenticationMode``,
  ``AuthenticationError``, ``get_authentication_mode`` and ``InnerGcsClient``. ``ray.init(address=host:port)``
  leaves token mode off, so a driver never sends the token ``ray start --head`` turned on for the cluster
  (ray-project/ray#64755, its review: "clients never attach that same token").
- ``AUTH_LOGGER``: the logger Ray's token set-up writes its notice to (held back while a local instance starts).

``PRIVATE_NAMES`` lists every one of them; ``tests/cluster/test_ray_internals.py`` checks them against the installed
Ray, so an upgrade that moves one fails there, loudly. Run as a script (``python ray_internals.py HOST:PORT
TIMEOUT_MS``) it prints ``probe``'s answer as one JSON line: in its own process, because Ray keeps its auth mode and
token in process-wide C++ state, logs its connection retries straight to stderr, aborts the process on an unreadable
``RAY_AUTH_TOKEN_PATH`` and does not return to Python while it waits for a silent port. Only the standard library is
imported at the top, so the script starts fast; the token itself is never printed.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

__all__ = ["AUTH_LOGGER", "PRIVATE_NAMES", "find_cluster", "probe", "set_auth_mode"]

AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
PRIVATE_NAMES = (
    ("ray._private.services", "canonicalize_bootstrap_address"),
    ("ray._raylet", "Config"),
    ("ray._raylet", "AuthenticationTokenLoader"),
    ("ray._raylet", "AuthenticationMode"),
    ("ray._raylet", "AuthenticationError"),
    ("ray._raylet", "get_authentication_mode"),
    ("ray._raylet", "InnerGcsClient"),
    ("ray._private.authentication.authentication_token_setup", None),
)


def _raylet() -> Any:
    return importlib.import_module("ray._raylet")  # its type stubs leave these names out


def find_cluster(address: str) -> str | None:
    """The GCS address ``ray.init(address=address)`` would connect to (``auto`` looked up as Ray does); None when
    ``auto`` finds nothing. Raises ConnectionError or ValueError as Ray does for an address it cannot use."""
    services: Any = importlib.import_module("ray._private.services")
    found = services.canonicalize_bootstrap_address(address)
    return None if found is None else str(found)


def set_auth_mode(value: str | None) -> None:
    """Set (or with None unset) RAY_AUTH_MODE for this process and make Ray's cached config see it, as Ray's own
    ``ray start`` does when it turns token mode on."""
    if value is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = value
    raylet = _raylet()
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def probe(address: str, timeout_ms: int) -> dict[str, Any]:
    """Whether this process may join the GCS at ``address``, and how: ``{"result": ..., "detail": ...}`` with result
    ``open`` (it answers as configured), ``token`` (it wants a token, one was found here and accepted once token mode
    was set), ``missing``, ``unreadable``, ``rejected``, ``disabled_here`` (it wants a token and none was found, the
    token file cannot be read, the token was refused, or RAY_AUTH_MODE is set to something else here) or
    ``unreachable``. Meant for a process of its own (the script)."""
    raylet = _raylet()
    loader = raylet.AuthenticationTokenLoader.instance()

    def token_found() -> dict[str, Any] | None:
        """None when a token can be loaded here; otherwise the result that says why not."""
        try:
            found = loader.has_token(ignore_auth_mode=True)
        except raylet.AuthenticationError as e:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
            return {"result": "unreadable", "detail": _first_line(e)}
        return None if found else {"result": "missing", "detail": ""}

    def answers() -> bool:
        """True when the GCS answers; False when it refuses this process's credentials."""
        try:
            raylet.InnerGcsClient.standalone(address, None, timeout_ms)
        except raylet.AuthenticationError:
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
