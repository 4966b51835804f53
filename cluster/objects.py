"""A feature store served through Ray's object store: read from Parquet once by the driver, put once,
read by every trial as a zero-copy, read-only view (one copy per node, shared by its trials)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dedn.data.store import FeatureStore

__all__ = ["SharedStore", "is_object_store_view", "share_store"]


@dataclass
class SharedStore:
    """Picklable handle: the store's small tables plus an ObjectRef to its (N, C, H, W) features."""

    parts: dict[str, Any]
    features_ref: Any  # ray.ObjectRef

    def materialize(self) -> FeatureStore:
        """The store inside a trial: features are a read-only view of the node's object-store copy."""
        import ray

        return FeatureStore.from_parts(**self.parts, features=ray.get(self.features_ref))


def share_store(store: FeatureStore) -> SharedStore:
    """Put the store's features into the object store once (the driver's own copy is then released)."""
    import ray

    ref = ray.put(store.features())
    store.release_features()
    return SharedStore(store.parts(), ref)


def is_object_store_view(features: Any) -> bool:
    """True for a numpy array backed by Ray's shared memory: read-only and not owning its buffer."""
    return bool(not features.flags.writeable and not features.flags.owndata and features.base is not None)
