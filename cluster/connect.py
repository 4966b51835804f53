"""Connect to a Ray cluster, or start a local one that lives as long as the command."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dedn.errors import DednInputError

__all__ = ["check_address", "ray_session"]

_HOST = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_FORMS = "'auto' or host:port (ray://host:port for Ray Client)"


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


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line, when nothing listens at host:port (ray.init would retry for minutes)."""
    hp = check_address(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise DednInputError(address, "--address", f"no Ray cluster answers at {hp[0]}:{hp[1]} ({reason})") from None


@contextmanager
def ray_session(
    address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None, **init: Any
) -> Iterator[dict[str, Any]]:
    """``address`` ``auto`` or ``host:port`` joins a running cluster (left running afterwards); None starts a
    local instance, bound to 127.0.0.1 with no dashboard, and shuts it down on exit. Yields ray.init's info.

    A malformed address, or one where no cluster answers, is refused with one line (Ray's own log lines
    about the failure are held back)."""
    import ray

    if ray.is_initialized():
        yield {"address": ray.get_runtime_context().gcs_address, "started": False}
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        _probe(address)
        ray_logger = logging.getLogger("ray")
        level = ray_logger.level
        ray_logger.setLevel(logging.CRITICAL)
        try:
            ctx = ray.init(address=address, log_to_driver=True, **init)
        except Exception as e:  # cannot join: one line, not Ray's traceback
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise DednInputError(
                address, "--address", f"cannot join a Ray cluster: {type(e).__name__}: {first}"
            ) from None
        finally:
            ray_logger.setLevel(level)
    else:
        ctx = ray.init(
            num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1", **init
        )
    try:
        yield {"address": getattr(ctx, "address_info", {}).get("gcs_address"), "started": not address}
    finally:
        ray.shutdown()
