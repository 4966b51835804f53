"""The content fingerprint of a feature store, computed the same way when writing and when verifying.

The fingerprint hashes the feature shape and dtype, the class and attribute tables, and the image
columns (features, labels, splits, ids); ``ImageHashes`` accumulates the image columns chunk by chunk so
the writer and ``FeatureStore.verify`` agree without holding all features at once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from dedn.data.schema import AttributeTable, ClassTable


def _hash_strings(h: Any, items: Sequence[str]) -> None:
    for s in items:
        b = s.encode()
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)


class ImageHashes:
    """Streaming hashes of the image columns, so writing and verifying agree chunk by chunk."""

    def __init__(self) -> None:
        self.parts = [hashlib.sha256() for _ in range(4)]

    def update(self, feats: np.ndarray, labels: np.ndarray, splits: np.ndarray, ids: Sequence[str]) -> None:
        self.parts[0].update(np.ascontiguousarray(feats).tobytes())
        self.parts[1].update(np.asarray(labels).astype("<i4").tobytes())
        self.parts[2].update(np.asarray(splits).astype(np.int8).tobytes())
        _hash_strings(self.parts[3], ids)


def content_fingerprint(
    shape: Sequence[int], dtype: str, classes: ClassTable, attributes: AttributeTable, images: ImageHashes
) -> str:
    """Content hash of a store: shape, dtype, class and attribute tables, and the image columns."""
    digest = hashlib.sha256()
    digest.update(json.dumps([list(shape), dtype]).encode())
    digest.update(_table_digest(classes, attributes))
    for part in images.parts:
        digest.update(part.digest())
    return digest.hexdigest()[:32]


def _table_digest(classes: ClassTable, attributes: AttributeTable) -> bytes:
    h = hashlib.sha256()
    _hash_strings(h, classes.names)
    h.update(classes.seen.tobytes() + classes.val_unseen.tobytes())
    h.update(np.ascontiguousarray(classes.attributes, dtype="<f4").tobytes())
    _hash_strings(h, attributes.names)
    h.update(np.ascontiguousarray(attributes.vectors, dtype="<f4").tobytes())
    for preset in sorted(attributes.presets):
        names, ids = attributes.presets[preset]
        _hash_strings(h, [preset, *names])
        h.update(ids.astype("<i2").tobytes())
    return h.digest()


__all__ = ["ImageHashes", "content_fingerprint"]
