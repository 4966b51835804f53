"""Ray cluster connection and features served once per node through Ray's object store."""

import os

# Ray reports usage statistics unless told not to: not from this project, unless the user sets it to 1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from cluster.connect import ray_session  # noqa: E402
from cluster.objects import SharedStore, share_store  # noqa: E402

__all__ = ["SharedStore", "ray_session", "share_store"]
