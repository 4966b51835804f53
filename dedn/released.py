"""Import a model file saved by the authors' released DEDN code (zjrao/DEDN) into ``DEDN``.

Released layout (state_dict keys): ``GNet.{V,H_1,H_2,H_3,H_4}`` (cExp), ``Snet{q}.{...}`` for q = 0..Q-1
(fExp, cluster q's attributes in index order), ``att`` (K x D, columns in cluster order: cluster 0's
attributes in index order, then cluster 1, ...), ``weight_ce`` (K x K identity), ``bias`` (scalar, the
calibration c) and ``mask_bias`` (1 x K: -1 seen, +1 unseen).
CUB/AWA2: H_1 = W1, H_2 = W2 (G x C); H_3 = W3, H_4 = W4 (G x R).
SUN: H_1 (G x h) @ H_3 (h x C) = W1, H_2 = W2 (G x C); H_4 = W3, H_5 = W4 (G x R).
In the released code GNet.V keeps the original attribute order (its outputs are permuted to cluster
order after the forward); ``gnet_order="cluster"`` reads a file whose GNet.V rows are in cluster order.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from dedn.errors import DednInputError
from dedn.model import DEDN, ExpertWeights, ModelConfig
from dedn.partitions import validate_partition

SOURCE = "released checkpoint"


def _get(state: Mapping[str, Tensor], key: str, shape: tuple[int, ...], source: str) -> Tensor:
    if key not in state:
        raise DednInputError(source, key, "missing from the released state dict")
    value = state[key]
    if not isinstance(value, Tensor):
        raise DednInputError(source, key, f"must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise DednInputError(source, key, f"must have shape {shape}, got {tuple(value.shape)}")
    return value.detach().float()


def _dan_weights(
    state: Mapping[str, Tensor], prefix: str, rows: int, g: int, c: int, r: int, hidden: int | None, source: str
) -> dict[str, Tensor]:
    """One released SubNet's tensors under our names (v, w1 | w1a w1b, w2, w3, w4)."""
    out = {"v": _get(state, f"{prefix}.V", (rows, g), source)}
    if hidden is None:
        out["w1"] = _get(state, f"{prefix}.H_1", (g, c), source)
        out["w2"] = _get(state, f"{prefix}.H_2", (g, c), source)
        out["w3"] = _get(state, f"{prefix}.H_3", (g, r), source)
        out["w4"] = _get(state, f"{prefix}.H_4", (g, r), source)
    else:
        out["w1a"] = _get(state, f"{prefix}.H_1", (g, hidden), source)
        out["w1b"] = _get(state, f"{prefix}.H_3", (hidden, c), source)
        out["w2"] = _get(state, f"{prefix}.H_2", (g, c), source)
        out["w3"] = _get(state, f"{prefix}.H_4", (g, r), source)
        out["w4"] = _get(state, f"{prefix}.H_5", (g, r), source)
    return out


def _shape(state: Mapping[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state or not isinstance(state[key], Tensor):
        raise DednInputError(source, key, "missing from the released state dict")
    return tuple(state[key].shape)


def load_released_state_dict(
    state: Mapping[str, Tensor],
    partition: np.ndarray | Sequence[int],
    *,
    normalize_features: bool = True,
    gnet_order: Literal["attribute", "cluster"] = "attribute",
    source: str = SOURCE,
) -> tuple[DEDN, float, Tensor]:
    """Build a DEDN holding the released weights: returns (model, calibration c, seen_mask (K,) bool).

    ``partition`` (D,) is the cluster ids the file was trained with (Snet q = cluster q). Rows stored in
    cluster order are mapped back to attribute order. Raises DednInputError for missing keys, shape
    disagreements, a cluster count that differs from the file's, a non-identity ``weight_ce`` or a
    ``mask_bias`` that is not +-1.
    """
    if gnet_order not in ("attribute", "cluster"):
        raise DednInputError(source, "gnet_order", f"must be 'attribute' or 'cluster', got {gnet_order!r}")
    k, d = _shape(state, "att", source)
    ids = validate_partition(np.asarray(partition), d, source)
    q_count = int(ids.max()) + 1
    file_q = sum(1 for key in state if key.startswith("Snet") and key.endswith(".V"))
    if file_q != q_count:
        raise DednInputError(
            source, "Snet*", f"file has {file_q} fExp subnetworks, the partition has {q_count} clusters"
        )
    g, c = _shape(state, "GNet.H_2", source)
    sun = "GNet.H_5" in state
    hidden = _shape(state, "GNet.H_1", source)[1] if sun else None
    r = _shape(state, "GNet.H_5" if sun else "GNet.H_4", source)[1]

    eye = _get(state, "weight_ce", (k, k), source)
    if not torch.equal(eye, torch.eye(k)):
        raise DednInputError(
            source, "weight_ce", "must be the K x K identity (plain cross-entropy), got another matrix"
        )
    mask_bias = _get(state, "mask_bias", (1, k), source)[0]
    if not bool(((mask_bias == 1) | (mask_bias == -1)).all()):
        raise DednInputError(source, "mask_bias", "must hold -1 (seen) or +1 (unseen) per class")
    bias = state.get("bias")
    if not isinstance(bias, Tensor) or bias.numel() != 1:
        raise DednInputError(source, "bias", "must be a scalar tensor (the calibration c)")

    order = np.argsort(ids, kind="stable")  # cluster order: order[j] = attribute at cluster-order column j
    att = _get(state, "att", (k, d), source)
    class_attributes = torch.empty_like(att)
    class_attributes[:, torch.from_numpy(order)] = att  # back to attribute order
    cexp = _dan_weights(state, "GNet", d, g, c, r, hidden, source)
    if gnet_order == "cluster":
        v = torch.empty_like(cexp["v"])
        v[torch.from_numpy(order)] = cexp["v"]
        cexp["v"] = v
    subnets = [_dan_weights(state, f"Snet{q}", int((ids == q).sum()), g, c, r, hidden, source) for q in range(q_count)]

    cfg = ModelConfig(
        partition=tuple(int(i) for i in ids), normalize_features=normalize_features, low_rank_hidden=hidden
    )
    model = DEDN(cfg, cexp["v"], class_attributes, channels=c, regions=r)
    model.class_attributes.copy_(class_attributes)  # exactly the file's rows, no renormalisation
    assert model.cexp is not None and model.fexp is not None
    _fill(model.cexp, {name: t if name == "v" else t.unsqueeze(0) for name, t in cexp.items()})
    fexp_v = torch.empty(d, g)
    for q, sub in enumerate(subnets):  # load time only; the forward has no loop over clusters
        fexp_v[torch.from_numpy(np.flatnonzero(ids == q))] = sub["v"]
    stacked = {name: torch.stack([sub[name] for sub in subnets]) for name in subnets[0] if name != "v"}
    _fill(model.fexp, {"v": fexp_v, **stacked})
    return model, float(bias.reshape(())), mask_bias < 0


def _fill(expert: ExpertWeights, tensors: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(expert, name).copy_(value)


def load_released_checkpoint(
    path: str | PathLike[str],
    partition: np.ndarray | Sequence[int],
    *,
    normalize_features: bool = True,
    gnet_order: Literal["attribute", "cluster"] = "attribute",
) -> tuple[DEDN, float, Tensor]:
    """Read a released model file (``torch.load`` with weights_only=True; a bare state dict or one under
    ``state_dict`` / ``model``) and convert it as ``load_released_state_dict``. Raises DednInputError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise DednInputError(path, "file", f"cannot be read as a torch checkpoint: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise DednInputError(path, "file", f"must hold a state dict, got {type(obj).__name__}")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    return load_released_state_dict(
        state, partition, normalize_features=normalize_features, gnet_order=gnet_order, source=str(path)
    )


__all__ = ["SOURCE", "load_released_checkpoint", "load_released_state_dict"]
