"""Inference with cached branch outputs: one forward pass per split, then any (lambda_rc, lambda_e, c) grid.

lambda_rc, lambda_e and c change no weight, and class scores are linear in O_r and O_c, so a grid point
is a weighted sum of four cached (N, K) score matrices; c only decides, per image, between the best
unseen class and the best other class, so every c costs O(N).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dedn.errors import DednInputError
from dedn.metrics import gzsl_metrics, per_class_accuracy
from dedn.model import DEDN, Branches, class_scores, expert_output, mix_scores


@torch.no_grad()
def branch_outputs(model: DEDN, features: np.ndarray | Tensor, batch_size: int) -> Branches:
    """O_r and O_c of both experts for a whole split, (N, D) each, on the model's device.

    features (N, C, H, W) or (N, C, R), numpy or torch, any float dtype (float16 is cast to float32
    one batch at a time). Raises DednInputError for batch_size < 1 or features the model refuses.
    """
    if batch_size < 1:
        raise DednInputError("inference", "batch_size", f"must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    parts: list[list[Tensor]] = [[], [], [], []]
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        x = chunk if isinstance(chunk, Tensor) else torch.from_numpy(np.array(chunk, dtype=np.float32))
        out = model(x.to(device=device, dtype=torch.float32))
        for store, o in zip(parts, out, strict=True):
            if o is not None:
                store.append(o)
    return Branches(*(torch.cat(p) if p else None for p in parts))


def _as_tensor(x: np.ndarray | Tensor | Sequence[int], device: torch.device) -> Tensor:
    return x.to(device) if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x), device=device)


@torch.no_grad()
def score_grid(
    branches: Branches,
    class_attributes: Tensor,
    unseen_mask: np.ndarray | Tensor,
    lambda_rc_grid: Sequence[float],
    lambda_e_grid: Sequence[float],
    c_grid: Sequence[float],
    targets: np.ndarray | Tensor,
    seen_classes: np.ndarray | Tensor | Sequence[int],
    unseen_classes: np.ndarray | Tensor | Sequence[int],
) -> list[dict[str, float]]:
    """U, S, H (GZSL, argmax over all K of mix_scores) and T (ZSL, argmax over unseen) for every grid point.

    branches: cached (N, D) outputs from ``branch_outputs``; class_attributes (K, D) (the model's
    L2-normalised buffer); unseen_mask (K,) bool; targets (N,) class indices of the split's images.
    Returns one dict {lambda_rc, lambda_e, c, U, S, H, T} per point, lambda_rc outermost, c innermost.
    lambda_rc has no effect without channel attention, lambda_e none with one expert.
    """
    some = next((o for o in branches if o is not None), None)
    if some is None:
        raise DednInputError("inference", "branches", "need at least one expert's outputs, got none")
    device = some.device
    a = class_attributes.to(device=device, dtype=torch.float32)
    unseen = _as_tensor(unseen_mask, device).bool()  # (K,)
    if unseen.shape != (a.shape[0],):
        raise DednInputError("inference", "unseen_mask", f"must be (K={a.shape[0]},) bool, got {tuple(unseen.shape)}")
    t = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets)
    if t.shape != (some.shape[0],):
        raise DednInputError("inference", "targets", f"must be (N={some.shape[0]},), got {t.shape}")
    unseen_idx = torch.nonzero(unseen).flatten()
    other_idx = torch.nonzero(~unseen).flatten()

    # P = (l O_r + (1 - l) O_c) A^T = l P_r + (1 - l) P_c: score each branch once.
    def base(o: Tensor | None) -> Tensor | None:
        return class_scores(o, a)  # (N, K)

    pr_ec, pc_ec, pr_ef, pc_ef = (base(o) for o in branches)
    results: list[dict[str, float]] = []
    for lambda_rc in lambda_rc_grid:
        p_ec = expert_output(pr_ec, pc_ec, float(lambda_rc))
        p_ef = expert_output(pr_ef, pc_ef, float(lambda_rc))
        for lambda_e in lambda_e_grid:
            p = mix_scores(p_ec, p_ef, float(lambda_e), 0.0, unseen)  # (N, K), no calibration yet
            best_u, arg_u = _best(p, unseen_idx)  # (N,) best unseen score and its class
            best_o, arg_o = _best(p, other_idx)
            zsl = per_class_accuracy(arg_u.cpu().numpy(), t, unseen_classes) if unseen_idx.numel() else 0.0
            for c in c_grid:
                # argmax_k (P_k + c s_k) = the better of (best unseen + c) and (best other - c);
                # a tie goes to the lower class index, as torch.argmax does.
                su, so = best_u + float(c), best_o - float(c)
                pred = torch.where(su > so, arg_u, torch.where(su < so, arg_o, torch.minimum(arg_u, arg_o)))
                m = gzsl_metrics(pred.cpu().numpy(), t, seen_classes, unseen_classes)
                results.append(
                    {"lambda_rc": float(lambda_rc), "lambda_e": float(lambda_e), "c": float(c), **m, "T": zsl}
                )
    return results


def _best(p: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Max score over the classes ``idx`` and its class index, (N,) each; -inf and a large index when empty."""
    if idx.numel() == 0:
        n = p.shape[0]
        return p.new_full((n,), float("-inf")), torch.full((n,), p.shape[1], dtype=torch.long, device=p.device)
    best, arg = p[:, idx].max(dim=1)
    return best, idx[arg]
