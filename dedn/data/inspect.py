"""The text summary printed by ``dedn data inspect``."""

from __future__ import annotations

import os

import numpy as np

from dedn.data.splits import SPLITS
from dedn.data.store import open_store


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def summary(path: str | os.PathLike[str], verify: bool = False) -> str:
    """Counts per split, seen/unseen classes, attributes, feature shape and dtype, size, fingerprint, presets."""
    s = open_store(path)
    m = s.meta
    seen, val_unseen = s.classes.seen, s.classes.val_unseen
    lines = [
        f"store        {s.path}",
        f"dataset      {m.name}   (format v{m.format_version})",
        f"features     C={m.channels} H={m.height} W={m.width} {m.dtype}   "
        f"({_size(m.feature_bytes)} in memory, {_size(s.disk_bytes())} on disk)",
        f"classes      {m.num_classes}: {int(seen.sum())} seen ({int(val_unseen.sum())} of them validation-unseen), "
        f"{int((~seen).sum())} unseen",
        f"attributes   D={m.num_attributes}, semantic dim G={m.semantic_dim}",
        f"fingerprint  {m.fingerprint}" + ("   (verified)" if verify and s.verify() else ""),
        "",
        f"{'split':<12} {'images':>8} {'classes':>8}",
    ]
    for i, split in enumerate(SPLITS):
        rows = s.splits == i
        lines.append(f"{split:<12} {int(rows.sum()):>8} {np.unique(s.labels[rows]).size:>8}")
    lines.append(f"{'trainval':<12} {s.indices('trainval').size:>8} {int(seen.sum()):>8}")
    lines.append("")
    if s.attributes.presets:
        lines.append("cluster presets")
        for preset, (names, ids) in s.attributes.presets.items():
            sizes = np.bincount(ids, minlength=len(names))
            lines.append(
                f"  {preset:<8} Q={len(names)}: " + ", ".join(f"{n} {z}" for n, z in zip(names, sizes, strict=True))
            )
    else:
        lines.append("cluster presets: none (use k-means or a user partition)")
    prov = m.provenance
    origin = prov.get("converter") or prov.get("generator") or "unknown"
    lines.append(f"provenance   {origin}")
    ex = prov.get("extraction")
    if ex:  # a store made from images: how its features were made
        lines.append(f"trunk        {ex.get('trunk')}, weights sha256 {ex.get('weights_sha256')}")
        lines.append(f"images       {ex.get('size')} px, features {ex.get('dtype')}; {ex.get('preprocessing')}")
    return "\n".join(lines)


__all__ = ["summary"]
