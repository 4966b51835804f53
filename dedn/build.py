"""Putting a run together from a config and a store: the compatibility check, the model, the training step.

Both training loops (``dedn.train`` for one configuration, ``dedn.population`` for M stacked ones) build
their models and their step here, so a member of a population is initialised and stepped exactly as
the same configuration trained alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from dedn.config import LossConfig, TrainConfig
from dedn.data.schema import IMAGES
from dedn.data.store import FeatureStore
from dedn.errors import DednInputError
from dedn.losses import dedn_loss
from dedn.model import DEDN, Branches, ModelConfig
from dedn.partitions import resolve_partition

StepFn = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


class ScoringModel(Protocol):
    """What a training step needs of a model: DEDN (branches (B, D)) or PopulationDEDN ((B, M, D))."""

    class_attributes: Tensor

    def __call__(self, features: Tensor) -> Branches: ...

    def scores(self, branches: Branches) -> tuple[Tensor | None, Tensor | None]: ...


def check_compatible(cfg: TrainConfig, store: FeatureStore) -> None:
    """Refuse a store the config cannot train on, before any work.

    A store written before the writer checked finiteness (no ``finite: true`` in meta.json) gets one
    streaming pass over its features, row group by row group, and is refused if it holds NaN/inf."""
    for split in ("train", "val_seen", "val_unseen", "test_seen", "test_unseen"):
        if store.meta.split_counts.get(split, 0) == 0 and split != "val_seen":
            raise DednInputError(store.path / IMAGES, split, "this split is empty; dedn train needs it")
    resolve_partition(cfg, store)
    if not store.meta.finite:
        store.check_finite()


def build_model(cfg: TrainConfig, store: FeatureStore, partition: np.ndarray, device: torch.device) -> DEDN:
    """A freshly initialised DEDN for ``cfg`` on ``store`` (weights seeded by ``cfg.seed``)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    model = DEDN(
        ModelConfig.from_section(cfg.model, partition),
        torch.tensor(store.attributes.vectors),  # small; a copy, since arrays from Ray are read-only
        torch.tensor(store.classes.attributes),
        channels=store.meta.channels,
        regions=store.meta.height * store.meta.width,
        generator=gen,
    )
    return model.to(device)


def build_step(
    model: ScoringModel,
    lcfg: LossConfig,
    seen_mask: Tensor,
    unseen_mask: Tensor,
    bf16: bool,
    hyper: Mapping[str, float | Tensor] | None = None,
) -> StepFn:
    """The training step's forward and loss, (x, y) -> (loss, parts): GEMMs under bf16 autocast when
    ``bf16``, softmax-weighted sums, scores and losses in float32. For a population, ``hyper`` holds the
    members' (M,) loss weights and the loss is (M,)."""
    device_type = model.class_attributes.device.type

    def forward_loss(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            branches = model(x)
        branches = Branches(*(b.float() if b is not None else None for b in branches))
        p_ec, p_ef = model.scores(branches)
        return dedn_loss(branches, p_ec, p_ef, y, seen_mask, unseen_mask, lcfg, hyper)

    return forward_loss


__all__ = ["ScoringModel", "StepFn", "build_model", "build_step", "check_compatible"]
