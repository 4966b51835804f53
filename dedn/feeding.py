"""Feeding the training loop: features for minibatches and the minibatch stream of an epoch.

``FeatureSource`` serves feature maps by row (on a GPU from a device-resident copy, no host copy per
step); ``epoch_batches`` is the epoch's minibatch stream, a pure function of (seed, epoch) so a resumed
run replays it exactly and population members share it.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class FeatureSource:
    """Feature maps for batches: on CPU indexed from the store's array per batch (float32); on a GPU
    copied to the device once, in bf16 (float16 stores) or float32, then indexed there."""

    def __init__(self, features: np.ndarray, device: torch.device) -> None:
        self.device = device
        self.host = features
        self.resident: torch.Tensor | None = None
        if device.type == "cuda":
            dtype = torch.bfloat16 if features.dtype == np.float16 else torch.float32
            t = torch.empty(features.shape, dtype=dtype, device=device)
            step = max(1, (256 << 20) // max(1, features[0].nbytes))
            for s in range(0, len(features), step):  # copy in slices: no full host-side float32 copy
                t[s : s + step] = torch.from_numpy(np.array(features[s : s + step])).to(device, dtype)
            self.resident = t

    def batch(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features of ``rows``: host indices, or (GPU) indices already on the device (no copy per batch)."""
        if self.resident is not None:
            return self.resident[torch.as_tensor(rows, device=self.device)]
        return torch.from_numpy(self.host[np.asarray(rows)].astype(np.float32))

    def epoch_indices(
        self, batches: list[np.ndarray], labels: torch.Tensor
    ) -> list[tuple[np.ndarray | torch.Tensor, torch.Tensor]]:
        """(rows, targets) per batch. On a GPU the epoch's row indices go to the device in one copy and the
        targets are read from ``labels`` there, so a step copies nothing from the host."""
        out: list[tuple[np.ndarray | torch.Tensor, torch.Tensor]] = []
        if self.resident is None or not batches:
            out.extend((rows, labels[torch.from_numpy(rows)]) for rows in batches)
            return out
        flat = torch.as_tensor(np.concatenate(batches), device=self.device)
        targets = labels.to(self.device)[flat]
        start = 0
        for rows in batches:
            out.append((flat[start : start + len(rows)], targets[start : start + len(rows)]))
            start += len(rows)
        return out

    def rows(self, rows: np.ndarray) -> np.ndarray | torch.Tensor:
        """A split's features for evaluation (kept on the device on a GPU)."""
        if self.resident is not None:
            return self.resident[torch.as_tensor(rows, device=self.device)].float()
        return self.host[rows]


def epoch_batches(
    rows: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    balanced: bool,
    seen_classes: np.ndarray,
) -> list[np.ndarray]:
    """Row indices of each minibatch of one epoch; a pure function of (seed, epoch), so resuming at an
    epoch replays the same stream. ``balanced``: min(#classes, B) classes, one image each (released)."""
    rng = np.random.default_rng([seed, epoch])
    n_batches = math.ceil(rows.size / batch_size)
    if not balanced:
        perm = rng.permutation(rows)
        return [perm[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    by_class = {int(k): rows[labels[rows] == k] for k in seen_classes}
    by_class = {k: v for k, v in by_class.items() if v.size}
    keys = np.array(sorted(by_class))
    out = []
    for _ in range(n_batches):
        chosen = rng.choice(keys, size=min(keys.size, batch_size), replace=False)
        out.append(np.array([rng.choice(by_class[int(k)]) for k in chosen]))
    return out


__all__ = ["FeatureSource", "epoch_batches"]
