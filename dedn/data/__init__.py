"""The Parquet feature store, its converters and the semi-synthetic benchmarks."""

from dedn.data.splits import SPLIT_GROUPS, SPLITS
from dedn.data.store import (
    AttributeTable,
    ClassTable,
    FeatureStore,
    StoreMeta,
    StoreWriter,
    open_store,
)

__all__ = [
    "SPLITS",
    "SPLIT_GROUPS",
    "AttributeTable",
    "ClassTable",
    "FeatureStore",
    "StoreMeta",
    "StoreWriter",
    "open_store",
]
