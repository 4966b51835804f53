"""Connect to a Ray cluster, or start a local one that lives as long as the command."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["ray_session"]


@contextmanager
def ray_session(
    address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None, **init: Any
) -> Iterator[dict[str, Any]]:
    """``address`` ``auto`` or ``host:port`` joins a running cluster (left running afterwards); None starts a
    local instance, bound to 127.0.0.1 with no dashboard, and shuts it down on exit. Yields ray.init's info."""
    import ray

    if ray.is_initialized():
        yield {"address": ray.get_runtime_context().gcs_address, "started": False}
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ctx = ray.init(address=address, log_to_driver=True, **init)
    else:
        ctx = ray.init(
            num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1", **init
        )
    try:
        yield {"address": getattr(ctx, "address_info", {}).get("gcs_address"), "started": not address}
    finally:
        ray.shutdown()
