"""Ray cluster connection and features served once per node through Ray's object store."""

from cluster.connect import ray_session
from cluster.objects import SharedStore, share_store

__all__ = ["SharedStore", "ray_session", "share_store"]
