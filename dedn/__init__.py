"""DEDN: Dual Expert Distillation Network for generalized zero-shot learning.

The core package: model, feature store, training and evaluation. Imports torch, numpy, pyarrow and
small helpers only; search (``tuning``), cluster (``cluster``) and tracking (``tracking``) build on it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
