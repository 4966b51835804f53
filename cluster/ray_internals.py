"""The one place the project uses Ray's private names (``PRIVATE_NAMES``, checked against the installed Ray by
``tests/cluster/test_ray_internals.py``), each for something Ray offers no public way to do.

- ``find_cluster``: the GCS address ``auto`` means, found without joining it; ``ray.init`` retries a recorded but dead
  cluster for a minute (ray-project/ray#20900).
- ``set_auth_mode`` and ``probe`` (``ray._raylet``): whether a cluster wants token authentication, and sending the
  token: ``ray.init(address=host:port)`` leaves token mode off, so a driver never sends it (ray-project/ray#64755:
  "clients never attach that same token").
- ``AUTH_LOGGER``: the logger of Ray's token set-up notice (held back while a local instance starts).
- ``node_types``: the node types the cluster's autoscaler names, to tell a cluster that can grow from one that cannot.
  The legacy autoscaler (``ray up`` with ``RAY_UP_enable_autoscaler_v2=0``, and the monitor of every ``ray start
  --head``) writes its report only to the GCS key-value store, which ``ray status`` reads through the same private
  names; Ray has no public call for whether a cluster autoscales (ray-project/ray#37838, "Able to inspect autoscaler state/cluster config").

As a script (``python ray_internals.py HOST:PORT TIMEOUT_MS``; standard library imports only, to start fast) it prints
``probe``'s answer as one JSON line, never the token: Ray keeps auth mode and token in process-wide C++ state, logs
connection retries to stderr, aborts on an unreadable ``RAY_AUTH_TOKEN_PATH`` and hangs on a silent port."""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

__all__ = ["AUTH_LOGGER", "PRIVATE_NAMES", "find_cluster", "node_types", "probe", "set_auth_mode"]

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
    ("ray._private.ray_constants", "DEBUG_AUTOSCALING_STATUS"),
    ("ray.experimental.internal_kv", "_internal_kv_get"),
)


def find_cluster(address: str) -> str | None:
    """The GCS address ``ray.init(address)`` would join (None: ``auto`` found none), or ConnectionError/ValueError."""
    services: Any = importlib.import_module("ray._private.services")
    found = services.canonicalize_bootstrap_address(address)
    return None if found is None else str(found)


def node_types() -> set[str]:
    """On a joined cluster: the node type of every node its autoscaler reports (the legacy report and the v2 cluster
    status together). A node no autoscaler launched is named ``node_<its id>``; a cluster whose nodes all are has no
    node type it could add. Empty when neither report is there yet."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    constants: Any = importlib.import_module("ray._private.ray_constants")
    kv: Any = importlib.import_module("ray.experimental.internal_kv")
    found: set[str] = set()
    raw = kv._internal_kv_get(constants.DEBUG_AUTOSCALING_STATUS)
    if raw:
        report = json.loads(raw).get("autoscaler_report") or {}
        for key in ("active_nodes", "idle_nodes", "pending_launches"):
            found.update(report.get(key) or {})
    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    found.update(n.ray_node_type_name for n in status.active_nodes + status.idle_nodes + status.pending_nodes)
    return {t for t in found if t}


def set_auth_mode(value: str | None) -> None:
    """Set (None: unset) RAY_AUTH_MODE here and make Ray's cached config see it, as ``ray start`` does."""
    if value is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = value
    raylet: Any = importlib.import_module("ray._raylet")  # its type stubs leave these names out
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def probe(address: str, timeout_ms: int) -> dict[str, Any]:
    """``{"result", "detail"}``: may this process join the GCS at ``address``? ``open``, ``token`` (a token is wanted,
    found, accepted), or why not: ``missing``, ``unreadable``, ``rejected``, ``disabled_here``, ``unreachable``."""
    raylet: Any = importlib.import_module("ray._raylet")
    loader = raylet.AuthenticationTokenLoader.instance()

    def token_found() -> dict[str, Any] | None:  # None when a token can be loaded here, else why not
        try:
            found = loader.has_token(ignore_auth_mode=True)
        except raylet.AuthenticationError as e:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
            return {"result": "unreadable", "detail": _first_line(e)}
        return None if found else {"result": "missing", "detail": ""}

    def answers() -> bool:  # False when the GCS refuses this process's credentials
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
            set_auth_mode("token")
            if answers():
                return {"result": "token", "detail": ""}
        return {"result": "rejected", "detail": ""}
    except Exception as e:  # no GCS at the address (timed out, refused, not Ray)
        return {"result": "unreachable", "detail": _first_line(e)}


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], int(sys.argv[2]))), flush=True)
