"""A straightforward DEDN written directly from the paper's equations, the reference for the fused model.

One module per DAN with its own parameters, a Python loop over experts and clusters, eq. 10's
concatenation put back in attribute order, and losses with explicit loops and formulas.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dedn.model import DEDN


def softmax(x: Tensor, dim: int) -> Tensor:
    e = torch.exp(x - x.max(dim=dim, keepdim=True).values)
    return e / e.sum(dim=dim, keepdim=True)


class NaiveDAN(nn.Module):
    """One DAN over D_s attributes: eq. 1-6."""

    def __init__(self, v: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None, w4: Tensor | None) -> None:
        super().__init__()
        self.v = nn.Parameter(v.detach().clone())  # (D_s, G)
        self.w1 = nn.Parameter(w1.detach().clone())  # (G, C)
        self.w2 = nn.Parameter(w2.detach().clone())
        self.w3 = None if w3 is None else nn.Parameter(w3.detach().clone())  # (G, R)
        self.w4 = None if w4 is None else nn.Parameter(w4.detach().clone())

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor | None]:
        """f (B, C, R) -> O_r (B, D_s), O_c (B, D_s) or None."""
        o_r, o_c = [], []
        for fb in f:  # one image at a time, (C, R)
            s_r = self.v @ self.w1 @ fb  # eq. 1, (D_s, R)
            a_r = softmax(self.v @ self.w2 @ fb, dim=1)  # eq. 2, over regions
            o_r.append((s_r * a_r).sum(1))  # eq. 3
            if self.w3 is not None and self.w4 is not None:
                ft = fb.T  # (R, C)
                s_c = self.v @ self.w3 @ ft  # eq. 4, (D_s, C)
                a_c = softmax(self.v @ self.w4 @ ft, dim=1)  # eq. 5, over channels
                o_c.append((s_c * a_c).sum(1))  # eq. 6
        return torch.stack(o_r), (torch.stack(o_c) if o_c else None)


class NaiveDEDN(nn.Module):
    """Per-subnetwork DEDN holding copies of a fused model's weights (low-rank W1 is multiplied out)."""

    att: Tensor

    def __init__(self, fused: DEDN) -> None:
        super().__init__()
        cfg = fused.cfg
        self.normalize = cfg.normalize_features
        ids = np.asarray(cfg.partition)
        self.groups = [np.flatnonzero(ids == q) for q in range(cfg.num_clusters)]
        self.register_buffer("att", fused.class_attributes.detach().clone())  # (K, D)

        def dan(expert: Any, i: int, rows: np.ndarray) -> NaiveDAN:
            w1 = expert.w1a[i] @ expert.w1b[i] if cfg.low_rank_hidden else expert.w1[i]
            w3 = expert.w3[i] if cfg.channel_attention else None
            w4 = expert.w4[i] if cfg.channel_attention else None
            return NaiveDAN(expert.v[torch.from_numpy(rows)], w1, expert.w2[i], w3, w4)

        d = cfg.num_attributes
        self.cexp = dan(fused.cexp, 0, np.arange(d)) if fused.cexp is not None else None
        fexp = fused.fexp
        self.fexp = nn.ModuleList([dan(fexp, q, g) for q, g in enumerate(self.groups)]) if fexp is not None else None

    def forward(self, features: Tensor) -> dict[str, Tensor | None]:
        f = features.flatten(2) if features.ndim == 4 else features  # (B, C, R)
        if self.normalize:
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out: dict[str, Tensor | None] = {"cexp_r": None, "cexp_c": None, "fexp_r": None, "fexp_c": None}
        if self.cexp is not None:
            out["cexp_r"], out["cexp_c"] = self.cexp(f)
        if self.fexp is not None:
            rs, cs = [], []
            for sub in self.fexp:
                o_r, o_c = sub(f)
                rs.append(o_r)
                cs.append(o_c)
            order = np.concatenate(self.groups)  # eq. 10 concatenates in cluster order
            back = torch.from_numpy(np.argsort(order))  # column of each attribute in the concatenation
            out["fexp_r"] = torch.cat(rs, dim=1)[:, back]
            out["fexp_c"] = None if cs[0] is None else torch.cat(cs, dim=1)[:, back]
        return out

    def scores(self, out: dict[str, Tensor | None], lambda_rc: float | None = None) -> dict[str, Tensor | None]:
        res: dict[str, Tensor | None] = {}
        for tag in ("cexp", "fexp"):
            o_r, o_c = out[f"{tag}_r"], out[f"{tag}_c"]
            if o_r is None:
                res[tag] = None
                continue
            if o_c is None:
                o = o_r
            elif lambda_rc is None:
                o = o_r + o_c
            else:
                o = lambda_rc * o_r + (1 - lambda_rc) * o_c
            res[tag] = o @ self.att.T  # eq. 11
        return res


def naive_mal(scores: Tensor, target: Tensor, seen: Tensor, eps: float, variant: str = "paper") -> Tensor:
    total = scores.new_zeros(())
    for b in range(scores.shape[0]):
        y = int(target[b])
        z = []
        for k in range(scores.shape[1]):
            if k == y:
                z.append(scores[b, k] - (2 * eps if variant == "paper" else eps))
            elif bool(seen[k]):
                z.append(scores[b, k] + eps)
            else:
                z.append(scores[b, k])
        zs = torch.stack(z)
        total = total - torch.log(torch.exp(zs[y]) / torch.exp(zs).sum())
    return total / scores.shape[0]


def naive_ce(scores: Tensor, target: Tensor) -> Tensor:
    total = scores.new_zeros(())
    for b in range(scores.shape[0]):
        total = total - torch.log(torch.exp(scores[b, int(target[b])]) / torch.exp(scores[b]).sum())
    return total / scores.shape[0]


def naive_distance(x: Tensor, y: Tensor, distance: str = "mse") -> Tensor:
    """JSD plus the squared-error term, one sample and one element at a time."""
    total = x.new_zeros(())
    for b in range(x.shape[0]):
        p, q = softmax(x[b], 0), softmax(y[b], 0)
        m = (p + q) / 2
        jsd = 0.5 * ((p * torch.log(p / m)).sum() + (q * torch.log(q / m)).sum())
        n = x.shape[1]
        squares = x.new_zeros(())
        for j in range(n):
            squares = squares + (x[b, j] - y[b, j]) ** 2
        if distance == "mse":
            dist = squares / n
        elif distance == "sum":
            dist = squares
        else:
            norm = torch.sqrt(squares)
            cubes = x.new_zeros(())
            for j in range(n):
                cubes = cubes + (x[b, j] - y[b, j]).abs() ** 3
            dist = cubes / norm if float(norm.detach()) > 0 else x.new_zeros(())
        total = total + jsd + dist
    return total / x.shape[0]


def naive_cal(scores: Tensor, unseen: Tensor, c: float) -> Tensor:
    s = torch.tensor([1.0 if bool(u) else -1.0 for u in unseen])
    masses = []
    for b in range(scores.shape[0]):
        prob = softmax(scores[b] + c * s, 0)
        masses.append(torch.stack([prob[k] for k in range(len(unseen)) if bool(unseen[k])]).sum())
    return -torch.log(torch.stack(masses).mean())


def naive_total(
    out: dict[str, Tensor | None],
    p: dict[str, Tensor | None],
    target: Tensor,
    seen: Tensor,
    unseen: Tensor,
    *,
    mal: bool = True,
    beta: float = 0.001,
    gamma: float = 0.1,
    eps: float = 1.0,
    fidelity: str = "paper",
    distance: str | None = None,
    mal_variant: str = "paper",
    lambda_cal: float = 0.0,
    calibration: float = 1.0,
) -> Tensor:
    """Eq. 18 (plus the released extras) term by term."""
    distance = distance or ("released" if fidelity == "released" else "mse")
    total = torch.zeros(())
    for tag in ("cexp", "fexp"):
        pt = p[tag]
        if pt is None:
            continue
        total = total + (naive_mal(pt, target, seen, eps, mal_variant) if mal else naive_ce(pt, target))
        o_r, o_c = out[f"{tag}_r"], out[f"{tag}_c"]
        if o_r is not None and o_c is not None:
            total = total + beta * naive_distance(o_r, o_c, distance)
        if lambda_cal > 0:
            total = total + lambda_cal * naive_cal(pt, unseen, calibration)
    p_ec, p_ef = p["cexp"], p["fexp"]
    if p_ec is not None and p_ef is not None:
        if fidelity == "released":
            s = torch.tensor([1.0 if bool(u) else -1.0 for u in unseen]) * calibration
            total = total + gamma * naive_distance(p_ec + s, p_ef + s, distance)
        else:
            total = total + gamma * naive_distance(p_ec, p_ef, distance)
    return total
