"""DEDN's loss (eq. 18) and its terms (eq. 7, 12, 13, 15; DAZLE's self-calibration), each a batch mean.

Shapes: B batch, K classes, N any feature width. ``seen_mask`` / ``unseen_mask`` are (K,) bool.
Scores may carry leading dimensions (a population of M models: (M, B, K)); the batch is always the
second-to-last dimension and the result keeps the leading dimensions (a scalar for (B, K) input).
Scalar hyperparameters may then be tensors of the leading shape, one value per model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dedn.config import LossConfig
from dedn.errors import DednInputError
from dedn.model import Branches, calibration_signs

MalVariant = Literal["paper", "released"]
Distance = Literal["mse", "sum", "released"]
DISTANCES: tuple[str, ...] = ("mse", "sum", "released")


def _per_model(value: float | Tensor, scores: Tensor) -> float | Tensor:
    """A hyperparameter as a float, or a tensor of the leading shape viewed to broadcast over (B, K)."""
    if isinstance(value, Tensor):
        return value.to(scores.dtype).reshape(*value.shape, 1, 1)
    return value


def margin_aware_loss(
    scores: Tensor, target: Tensor, seen_mask: Tensor, eps: float | Tensor, variant: MalVariant = "paper"
) -> Tensor:
    """Margin-aware loss (eq. 15): cross-entropy over margin-shifted scores, batch mean.

    scores (B, K), target (B,) long (seen classes), seen_mask (K,) bool. Shifted scores:
    ``paper``: z_k = P_k + eps for seen k != y, z_y = P_y - 2 eps, z_k = P_k for unseen k.
    ``released`` (SUN/AWA2 released code): as paper but z_y = P_y - eps.
    Raises DednInputError for an unknown variant.
    """
    if variant not in ("paper", "released"):
        raise DednInputError("loss", "mal_variant", f"must be 'paper' or 'released', got {variant!r}")
    e = _per_model(eps, scores)
    target_shift = -2.0 * e if variant == "paper" else -e
    is_target = F.one_hot(target, scores.shape[-1]).bool()  # (B, K)
    shift = seen_mask.to(scores.dtype) * e  # (K,) +eps on every seen class, 0 on unseen
    z = torch.where(is_target, scores + target_shift, scores + shift)  # (..., B, K)
    return cross_entropy_loss(z, target)


def cross_entropy_loss(scores: Tensor, target: Tensor) -> Tensor:
    """Plain cross-entropy over all K classes (eq. 13, the "w/o MAL" ablation). scores (..., B, K), target (B,)."""
    if scores.ndim == 2:
        return F.cross_entropy(scores, target)
    lead, (b, k) = scores.shape[:-2], scores.shape[-2:]
    per_sample = F.cross_entropy(scores.reshape(-1, k), target.repeat(int(math.prod(lead))), reduction="none")
    return per_sample.view(*lead, b).mean(-1)


def pair_distance(x: Tensor, y: Tensor, distance: Distance = "mse") -> Tensor:
    """d(x, y) of eq. 7 and 12: JSD(softmax x || softmax y) + a squared-error term, both batch means.

    x, y (..., B, N); d = x - y. The squared-error term, by ``distance``:
    ``mse`` (default; the paper's words, "Mean Squared Error"): (1/B) sum_b (1/N) ||d_b||^2.
    ``sum`` (eq. 7/12 as typeset): (1/B) sum_b ||d_b||^2, N times ``mse``.
    ``released`` (the authors' code): (1/B) sum_b sum_j |d_bj|^3 / ||d_b|| (0 where d_b = 0).
    Softmax over the last dimension, computed in float32.
    Raises DednInputError for another name (``paper`` included: it named the summed term before the
    default became the mean, so it is refused rather than silently changed).
    """
    if distance not in DISTANCES:
        hint = " ('paper' is now 'mse', the default, or 'sum', the typeset formula)" if distance == "paper" else ""
        raise DednInputError("loss", "distance", f"must be one of {', '.join(DISTANCES)}, got {distance!r}{hint}")
    log_p = F.log_softmax(x.float(), dim=-1)  # (B, N)
    log_q = F.log_softmax(y.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)  # log((p+q)/2)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)  # (..., B)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    jsd = 0.5 * (kl_pm + kl_qm).mean(-1)
    d = (x - y).float()  # (..., B, N)
    if distance == "mse":
        dist = d.pow(2).mean(-1).mean(-1)
    elif distance == "sum":
        dist = d.pow(2).sum(-1).mean(-1)
    else:
        norm = d.norm(dim=-1, keepdim=True)  # (..., B, 1)
        # |d|^3 / ||d||: where ||d|| = 0 every |d_j| is 0 too, so the term is 0.
        dist = (d.abs().pow(3) / norm.clamp_min(torch.finfo(d.dtype).tiny)).sum(-1).mean(-1)
    return jsd + dist


def self_calibration_loss(scores: Tensor, unseen_mask: Tensor, c: float | Tensor) -> Tensor:
    """DAZLE's self-calibration: -log( mean_b sum_{u unseen} softmax(P + c s)_{b,u} ), s = +1 unseen, -1 else.

    scores (..., B, K), unseen_mask (K,) bool. Computed with log-sum-exp in float32.
    """
    s = unseen_mask.to(torch.float32) * 2.0 - 1.0  # (K,)
    log_prob = F.log_softmax(scores.float() + _per_model(c, scores.float()) * s, dim=-1)  # (..., B, K)
    log_mass = torch.logsumexp(log_prob.masked_fill(~unseen_mask, float("-inf")), dim=-1)  # (..., B) log sum_u p
    # -log(mean_b exp(log_mass_b))
    return -(torch.logsumexp(log_mass, dim=-1) - math.log(scores.shape[-2]))


PER_MEMBER_LOSS = ("beta", "gamma", "eps", "lambda_cal", "calibration")


def dedn_loss(
    branches: Branches,
    p_ec: Tensor | None,
    p_ef: Tensor | None,
    target: Tensor,
    seen_mask: Tensor,
    unseen_mask: Tensor,
    cfg: LossConfig,
    hyper: Mapping[str, float | Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Training loss, eq. 18: L_cls(P_ec) + L_cls(P_ef) + beta (L_align^ec + L_align^ef) + gamma L_distill
    [+ lambda_cal (L_cal^ec + L_cal^ef)].

    One model: branches (B, D), p_ec/p_ef (B, K) from ``scores`` with lambda_rc None; the total is a scalar.
    A population of M: branches (B, M, D), p_ec/p_ef (M, B, K), and ``hyper`` gives any of beta, gamma,
    eps, lambda_cal, calibration as (M,) tensors (the rest come from ``cfg``); every term is then (M,).
    target (B,) long; masks (K,) bool. A weight given as a float adds its term when it is > 0; one given
    as a tensor always adds it (a member may weigh it 0).
    Returns the total and detached parts, keyed ``mal_ec``/``mal_ef`` (``ce_*`` when mal is off),
    ``align_ec``/``align_ef`` (channel attention on, beta on), ``distill`` (both experts, gamma on),
    ``cal`` (lambda_cal on; summed over experts, unweighted) and ``total``. Nothing is detached in the total.
    """
    w: dict[str, float | Tensor] = {k: getattr(cfg, k) for k in PER_MEMBER_LOSS}
    w.update(hyper or {})
    distance = cfg.distance_term
    some = next(p for p in (p_ec, p_ef) if p is not None)
    total = torch.zeros(some.shape[:-2], device=target.device)  # () for one model, (M,) for a population
    cls_name = "mal" if cfg.mal else "ce"
    cal: Tensor | None = None
    parts: dict[str, Tensor] = {}
    per_expert = (("ec", p_ec, branches.cexp_r, branches.cexp_c), ("ef", p_ef, branches.fexp_r, branches.fexp_c))
    for tag, p, o_r, o_c in per_expert:  # two experts, not clusters
        if p is None:
            continue
        cls = (
            margin_aware_loss(p, target, seen_mask, w["eps"], cfg.mal_variant)
            if cfg.mal
            else cross_entropy_loss(p, target)
        )
        parts[f"{cls_name}_{tag}"] = cls
        total = total + cls
        if o_r is not None and o_c is not None and _on(w["beta"]):
            if o_r.ndim == 3:  # (B, M, D) -> (M, B, D): the batch is the second-to-last dimension
                o_r, o_c = o_r.transpose(0, 1), o_c.transpose(0, 1)
            align = pair_distance(o_r, o_c, distance)
            parts[f"align_{tag}"] = align
            total = total + w["beta"] * align
        if _on(w["lambda_cal"]):
            term = self_calibration_loss(p, unseen_mask, w["calibration"])
            cal = term if cal is None else cal + term
    if p_ec is not None and p_ef is not None and _on(w["gamma"]):
        if cfg.fidelity == "released":  # released code distils the calibrated scores P + c s
            signs = calibration_signs(unseen_mask.to(p_ec.device), p_ec.dtype)  # (K,)
            shift = _per_model(w["calibration"], p_ec) * signs
            distill = pair_distance(p_ec + shift, p_ef + shift, distance)
        else:
            distill = pair_distance(p_ec, p_ef, distance)
        parts["distill"] = distill
        total = total + w["gamma"] * distill
    if cal is not None:
        parts["cal"] = cal
        total = total + w["lambda_cal"] * cal
    parts["total"] = total
    return total, {k: v.detach() for k, v in parts.items()}


def _on(weight: float | Tensor) -> bool:
    """Whether a term is added: a per-member tensor always, a float when it is > 0."""
    return isinstance(weight, Tensor) or weight > 0


__all__ = [
    "DISTANCES",
    "PER_MEMBER_LOSS",
    "Distance",
    "MalVariant",
    "cross_entropy_loss",
    "dedn_loss",
    "margin_aware_loss",
    "pair_distance",
    "self_calibration_loss",
]
