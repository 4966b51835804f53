"""DEDN: Dual Expert Distillation Network for generalized zero-shot learning.

The core package: model, feature store, training and evaluation. Imports torch, numpy, pyarrow and
small helpers only; search (``tuning``), cluster (``cluster``) and tracking (``tracking``) build on it.
Names below load on first use, so ``import dedn`` stays fast and does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DEDN": "dedn.model",
    "ModelConfig": "dedn.model",
    "LossConfig": "dedn.config",
    "dedn_loss": "dedn.losses",
    "mix_scores": "dedn.model",
    "margin_aware_loss": "dedn.losses",
    "pair_distance": "dedn.losses",
    "gzsl_metrics": "dedn.metrics",
    "FeatureStore": "dedn.data.store",
    "open_store": "dedn.data.store",
    "TrainConfig": "dedn.config",
    "load_config": "dedn.config",
    "train": "dedn.train",
    "fit_and_test": "dedn.train",
    "load_checkpoint": "dedn.checkpoints",
    "DednInputError": "dedn.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dedn' has no attribute {name!r}")
