"""The Parquet feature store, its converters and the semi-synthetic benchmarks."""

from dedn.data.schema import AttributeTable, ClassTable, StoreMeta
from dedn.data.splits import SPLIT_GROUPS, SPLITS
from dedn.data.store import FeatureStore, open_store
from dedn.data.writer import StoreWriter

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
