"""The batched model of a population: M single-configuration DEDN models stacked into one, and an RMSprop
with per-member learning rate, momentum and weight decay.

Every member keeps its own weights, attribute partition and seed; the fused matrices of all members are
stacked, so each branch is still one GEMM: (C, B*R) against (2 E M D, C) rows for the region branch.
Members enter and leave by ``subset`` (successive halving cuts them out of the matrices and the
optimiser state). Shapes: M members, B batch, D attributes, K classes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dedn.errors import DednInputError
from dedn.model import DEDN, Branches, ExpertWeights, class_scores, expert_branches, flatten_features


class PopulationDEDN(nn.Module):
    """M single-configuration DEDN models stacked: each expert is one ``ExpertWeights`` over M*D rows.

    cExp: M DANs of D rows (DAN m = member m). fExp: one DAN per (member, cluster), member-major, padded
    to the largest cluster of any member. ``v`` rows are member-major: rows m*D .. m*D + D - 1 are member
    m's attribute rows. forward(features (B, C, H, W)) -> Branches of (B, M, D).
    """

    class_attributes: Tensor  # (K, D) buffer, shared by all members

    def __init__(self, models: list[DEDN]) -> None:
        super().__init__()
        if not models:
            raise DednInputError("population", "members", "a population needs at least one member, got none")
        first = models[0]
        for m in models[1:]:
            if (m.channels, m.regions) != (first.channels, first.regions) or any(
                getattr(m.cfg, k) != getattr(first.cfg, k)
                for k in ("use_cexp", "use_fexp", "channel_attention", "normalize_features", "low_rank_hidden")
            ):
                raise DednInputError("population", "model", "every member must share the architecture switches")
        self.cfg = first.cfg  # switches only; partitions are per member
        self.partitions = [np.asarray(m.cfg.partition) for m in models]
        self.num_members = len(models)
        self.num_attributes = first.cfg.num_attributes
        self.channels, self.regions = first.channels, first.regions
        self.register_buffer("class_attributes", first.class_attributes.clone())
        d = self.num_attributes
        shared = (first.channels, first.regions, first.cfg.channel_attention, first.cfg.low_rank_hidden, None)
        placeholder = torch.zeros(len(models) * d, 1)  # v is overwritten below; only its row count matters here
        self.cexp: ExpertWeights | None = None
        self.fexp: ExpertWeights | None = None
        with torch.no_grad():
            if first.cexp is not None:
                groups = np.repeat(np.arange(len(models)), d)
                self.cexp = _stacked(placeholder, groups, shared, [m.cexp for m in models])
            if first.fexp is not None:
                offsets = np.cumsum([0] + [int(p.max()) + 1 for p in self.partitions[:-1]])
                groups = np.concatenate([p + o for p, o in zip(self.partitions, offsets, strict=True)])
                self.fexp = _stacked(placeholder, groups, shared, [m.fexp for m in models])

    @property
    def experts(self) -> list[ExpertWeights]:
        return [e for e in (self.cexp, self.fexp) if e is not None]

    def forward(self, features: Tensor) -> Branches:
        """features (B, C, H, W) or (B, C, R) -> Branches of (B, M, D): every member's O_r and O_c."""
        f = flatten_features(features, self.channels, self.regions, self.cfg.normalize_features, "population")
        m, d = self.num_members, self.num_attributes
        outs = expert_branches(f, self.experts, m * d, self.cfg.channel_attention)
        out: list[Tensor | None] = [None] * 4
        for e, (o_r, o_c) in zip(self.experts, outs, strict=True):
            slot = 0 if e is self.cexp else 2
            out[slot] = o_r.view(-1, m, d)
            out[slot + 1] = None if o_c is None else o_c.view(-1, m, d)
        return Branches(*out)

    def scores(self, branches: Branches) -> tuple[Tensor | None, Tensor | None]:
        """Training class scores (P_ec, P_ef), each (M, B, K): O = O_r + O_c, P = O A^T."""
        a = self.class_attributes

        def p(o_r: Tensor | None, o_c: Tensor | None) -> Tensor | None:
            o = o_r if o_r is None or o_c is None else o_r + o_c
            s = class_scores(o, a)  # (B, M, K)
            return None if s is None else s.transpose(0, 1)

        return p(branches.cexp_r, branches.cexp_c), p(branches.fexp_r, branches.fexp_c)

    # -- members in and out ----------------------------------------------------------------------
    def dan_members(self, expert: ExpertWeights) -> np.ndarray:
        """(S,) member of each DAN of ``expert``."""
        if expert is self.cexp:
            return np.arange(self.num_members)
        return np.concatenate([np.full(int(p.max()) + 1, j) for j, p in enumerate(self.partitions)])

    def member_of(self) -> dict[str, Tensor]:
        """For every parameter, (dim 0,) the member each slice along dim 0 belongs to."""
        out: dict[str, Tensor] = {}
        for prefix, e in (("cexp", self.cexp), ("fexp", self.fexp)):
            if e is None:
                continue
            dans = torch.as_tensor(self.dan_members(e))
            for name, p in e.named_parameters():
                if name == "v":
                    out[f"{prefix}.v"] = torch.arange(self.num_members).repeat_interleave(self.num_attributes)
                else:
                    assert p.shape[0] == dans.numel()
                    out[f"{prefix}.{name}"] = dans
        return out

    def subset(self, keep: list[int]) -> tuple[PopulationDEDN, dict[str, Tensor]]:
        """A population of the members ``keep`` (in that order), sharing nothing with this one, and for
        each parameter the dim-0 index that selects the kept slices (to cut optimiser state alike)."""
        owners = self.member_of()
        index: dict[str, Tensor] = {}
        for name, own in owners.items():
            index[name] = torch.cat([torch.nonzero(own == j).flatten() for j in keep])
        models = [self.member_model(j) for j in keep]
        return PopulationDEDN(models).to(self.class_attributes.device), index

    def member_state(self, j: int) -> dict[str, Tensor]:
        """Member j's weights as a single-configuration ``DEDN`` state dict (on the CPU, detached)."""
        owners = self.member_of()
        state: dict[str, Tensor] = {"class_attributes": self.class_attributes.detach().cpu().clone()}
        for name, p in self.named_parameters():
            rows = torch.nonzero(owners[name] == j).flatten()
            value = p.detach()[rows.to(p.device)].cpu().clone()
            if name.endswith(".v"):
                value = value.view(self.num_attributes, -1)
            state[name] = value
        return state

    def member_model(self, j: int) -> DEDN:
        """Member j as a stand-alone ``DEDN`` (CPU)."""
        cfg = replace(self.cfg, partition=tuple(int(i) for i in self.partitions[j]))
        g = self.cexp.v.shape[1] if self.cexp is not None else self.experts[0].v.shape[1]
        model = DEDN(
            cfg,
            torch.ones(self.num_attributes, g),
            torch.ones_like(self.class_attributes).cpu(),
            channels=self.channels,
            regions=self.regions,
        )
        model.load_state_dict(self.member_state(j))
        return model


def _stacked(
    placeholder: Tensor, groups: np.ndarray, shared: tuple[Any, ...], parts: list[ExpertWeights | None]
) -> ExpertWeights:
    """One ExpertWeights whose DANs are every member's DANs, in member order, weights copied from ``parts``."""
    ew = ExpertWeights(placeholder, groups, *shared)
    for name, p in ew.named_parameters():
        value = torch.cat([getattr(x, name).detach().cpu() for x in parts if x is not None])
        p.data = value.clone()
    return ew


class PopulationRMSprop:
    """RMSprop (torch.optim.RMSprop's update, not centred) with a learning rate, momentum and weight decay
    per member: each parameter's slices along dim 0 take their member's values."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        member_of: dict[str, Tensor],
        lr: list[float],
        momentum: list[float],
        weight_decay: list[float],
        alpha: float = 0.99,
        eps: float = 1e-8,
    ) -> None:
        self.params, self.alpha, self.eps = params, alpha, eps
        self.hyper = {"lr": list(lr), "momentum": list(momentum), "weight_decay": list(weight_decay)}
        self.member_of = member_of
        self.state: dict[str, dict[str, Tensor]] = {
            k: {"square_avg": torch.zeros_like(p), "momentum_buffer": torch.zeros_like(p)} for k, p in params.items()
        }
        self._scales: dict[str, dict[str, Tensor]] = {}

    def _scale(self, name: str, hyper: str) -> Tensor:
        cache = self._scales.setdefault(name, {})
        if hyper not in cache:
            p = self.params[name]
            values = torch.tensor(self.hyper[hyper], dtype=p.dtype, device=p.device)
            cache[hyper] = values[self.member_of[name].to(p.device)].view(-1, *([1] * (p.ndim - 1)))
        return cache[hyper]

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for name, p in self.params.items():
            if p.grad is None:
                continue
            grad = p.grad + self._scale(name, "weight_decay") * p
            st = self.state[name]
            st["square_avg"].mul_(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
            avg = st["square_avg"].sqrt().add_(self.eps)
            st["momentum_buffer"].mul_(self._scale(name, "momentum")).addcdiv_(grad, avg)
            p.sub_(self._scale(name, "lr") * st["momentum_buffer"])

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "hyper": self.hyper}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for name, st in saved["state"].items():
            for k, v in st.items():
                self.state[name][k].copy_(v)

    def subset(
        self, params: dict[str, nn.Parameter], member_of: dict[str, Tensor], index: dict[str, Tensor], keep: list[int]
    ) -> PopulationRMSprop:
        """The optimiser of the population ``keep`` (see ``PopulationDEDN.subset``), its state carried over."""
        new = PopulationRMSprop(
            params,
            member_of,
            [self.hyper["lr"][j] for j in keep],
            [self.hyper["momentum"][j] for j in keep],
            [self.hyper["weight_decay"][j] for j in keep],
            self.alpha,
            self.eps,
        )
        for name, st in self.state.items():
            idx = index[name].to(st["square_avg"].device)
            for k, v in st.items():
                new.state[name][k] = v[idx].clone()
        return new


__all__ = ["PopulationDEDN", "PopulationRMSprop"]
