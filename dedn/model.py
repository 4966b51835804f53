"""DEDN, the Dual Expert Distillation Network (paper section 3), fused into two GEMMs per branch.

Every DAN (Dual Attention Network) over an attribute subset V_s (D_s x G) uses the four small matrices
V_s W1, V_s W2 (D_s x C) and V_s W3, V_s W4 (D_s x R). Stacking them for the coarse expert (cExp, one DAN
over all D attributes) and the fine expert (fExp, one DAN per cluster, rows put back in attribute order)
gives the score rows [V W1] and attention rows [V W2] (2D x C each) of the region branch, and [V W3],
[V W4] (2D x R) of the channel branch; each branch is then two GEMMs against the batch's features,
whatever the number of clusters Q. The per-cluster products V_q W_q come from one torch.bmm over
cluster-padded V rows (Q, Dmax, G), gathered back to attribute order with a precomputed index.

Shapes: B batch, C channels, R = H*W regions, D attributes, G semantic dim, K classes, Q clusters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.errors import DednInputError
from dedn.partitions import validate_partition

if TYPE_CHECKING:
    from dedn.config import ModelSection


@dataclass(frozen=True)
class ModelConfig:
    """Architecture switches. ``partition``: (D,) cluster ids in [0, Q) of the fine expert's DANs (any
    integer sequence is accepted and stored as a tuple of ints).

    ``low_rank_hidden``: when set, the region score weight is W1 = H1 (G x h) @ H3 (h x C), the released
    SUN layout; None keeps W1 full rank. Raises DednInputError for a bad partition, both experts off, or
    ``low_rank_hidden < 1``.
    """

    partition: tuple[int, ...]
    use_cexp: bool = True
    use_fexp: bool = True
    channel_attention: bool = True
    normalize_features: bool = True
    low_rank_hidden: int | None = None

    def __post_init__(self) -> None:
        if not (self.use_cexp or self.use_fexp):
            raise DednInputError("model", "use_cexp/use_fexp", "at least one expert must be on, got both off")
        if len(self.partition) == 0:
            raise DednInputError("model", "partition", "must give one cluster id per attribute, got none")
        ids = validate_partition(np.asarray(self.partition), len(self.partition), "model")
        object.__setattr__(self, "partition", tuple(int(i) for i in ids))  # hashable, plain ints
        if self.low_rank_hidden is not None and self.low_rank_hidden < 1:
            raise DednInputError("model", "low_rank_hidden", f"must be None or >= 1, got {self.low_rank_hidden}")

    @classmethod
    def from_section(cls, section: ModelSection, partition: Sequence[int] | np.ndarray) -> ModelConfig:
        """The architecture of a config's ``model`` section with the resolved (D,) partition."""
        return cls(
            partition=tuple(int(i) for i in partition),
            use_cexp=section.use_cexp,
            use_fexp=section.use_fexp,
            channel_attention=section.channel_attention,
            normalize_features=section.normalize_features,
            low_rank_hidden=section.low_rank_hidden,
        )

    @property
    def num_attributes(self) -> int:
        return len(self.partition)

    @property
    def num_clusters(self) -> int:
        return max(self.partition) + 1


class Branches(NamedTuple):
    """Per-expert attribute scores, each (B, D) in attribute order; None where the part is switched off."""

    cexp_r: Tensor | None  # cExp region branch O_r
    cexp_c: Tensor | None  # cExp channel branch O_c (None without channel attention)
    fexp_r: Tensor | None
    fexp_c: Tensor | None


class ExpertWeights(nn.Module):
    """The weights of one expert's S DANs, stacked: S = 1 for cExp, S = Q for fExp.

    ``v`` (D, G) holds every DAN's own trainable copy of its attribute rows, in attribute order;
    ``w1``/``w2`` (S, G, C), ``w3``/``w4`` (S, G, R); low rank: ``w1a`` (S, G, h) @ ``w1b`` (S, h, C).
    Init (released code): W1, W3 ~ N(0, 1); W2, W4 = 0. Creation order is fixed: v, w1 (w1a, w1b), w2, w3, w4.
    """

    pad_dst: Tensor  # (D,) buffers, see __init__
    pad_src: Tensor  # (S * Dmax,)

    def __init__(
        self,
        vectors: Tensor,
        groups: np.ndarray,
        channels: int,
        regions: int,
        channel_attention: bool,
        low_rank_hidden: int | None,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__()
        d, g = vectors.shape
        s = int(groups.max()) + 1
        self.num_dans = s
        self.low_rank = low_rank_hidden is not None

        def normal(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator))

        self.v = nn.Parameter(vectors.clone())
        if low_rank_hidden is not None:
            self.w1a = normal(s, g, low_rank_hidden)
            self.w1b = normal(s, low_rank_hidden, channels)
        else:
            self.w1 = normal(s, g, channels)
        self.w2 = nn.Parameter(torch.zeros(s, g, channels))
        if channel_attention:
            self.w3 = normal(s, g, regions)
            self.w4 = nn.Parameter(torch.zeros(s, g, regions))

        # Padding index: DAN q's rows go to slots q*Dmax .. q*Dmax + D_q - 1 (attribute index order).
        sizes = np.bincount(groups, minlength=s)
        self.max_rows = int(sizes.max())
        slot = np.zeros(d, dtype=np.int64)
        for q in range(s):  # init only: rank of each attribute within its cluster
            slot[groups == q] = np.arange(sizes[q])
        pad_dst = groups * self.max_rows + slot  # (D,) where attribute d sits in the padded layout
        pad_src = np.full(s * self.max_rows, d, dtype=np.int64)  # (S*Dmax,) row of v, d = the zero row
        pad_src[pad_dst] = np.arange(d)
        self.register_buffer("pad_dst", torch.from_numpy(pad_dst), persistent=False)
        self.register_buffer("pad_src", torch.from_numpy(pad_src), persistent=False)

    def padded_v(self) -> Tensor:
        """V rows in the per-DAN padded layout (S, Dmax, G); zero rows pad the smaller clusters."""
        if self.num_dans == 1:
            return self.v.unsqueeze(0)  # (1, D, G)
        v_ext = torch.cat([self.v, self.v.new_zeros(1, self.v.shape[1])])  # (D+1, G), last row zero
        return v_ext[self.pad_src].view(self.num_dans, self.max_rows, -1)  # (S, Dmax, G)

    def rows(self, v_pad: Tensor, *weights: Tensor) -> Tensor:
        """V_s W for every DAN in one bmm, back in attribute order: (S, G, X) [then (S, X, Y)] -> (D, X|Y)."""
        if self.num_dans == 1:
            out = v_pad[0]
            for w in weights:
                out = out @ w[0]
            return out  # (D, X)
        out = v_pad
        for w in weights:  # one factor, or two for the low-rank W1
            out = torch.bmm(out, w)  # (S, Dmax, X)
        return out.reshape(self.num_dans * self.max_rows, -1)[self.pad_dst]  # (D, X)

    def region_rows(self, v_pad: Tensor) -> tuple[Tensor, Tensor]:
        """(V W1, V W2), each (D, C)."""
        score = self.rows(v_pad, self.w1a, self.w1b) if self.low_rank else self.rows(v_pad, self.w1)
        return score, self.rows(v_pad, self.w2)

    def channel_rows(self, v_pad: Tensor) -> tuple[Tensor, Tensor]:
        """(V W3, V W4), each (D, R)."""
        return self.rows(v_pad, self.w3), self.rows(v_pad, self.w4)


class AttendPair(torch.autograd.Function):
    """o = sum over the last dim of s * softmax_last(l): s, l (N, B, X) of any float dtype -> o (N, B) float32.

    Softmax and the weighted sum run in float32 (also when the products that made s and l ran in bf16);
    the backward writes both gradients in one pass, in the inputs' dtypes: for p = softmax(l),
    dL/ds = g p and dL/dl = g p (s - o).
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, logits: Tensor) -> Tensor:
        p = torch.softmax(logits, dim=-1, dtype=torch.float32)
        o = (s * p).sum(-1)  # float32 by type promotion
        ctx.save_for_backward(s, p, o)
        ctx.dtypes = (s.dtype, logits.dtype)
        return o

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        s, p, o = ctx.saved_tensors
        gs = p * g.unsqueeze(-1)  # (N, B, X) float32
        gl = (s - o.unsqueeze(-1)).mul_(gs)  # a fresh tensor: safe to write in place
        return gs.to(ctx.dtypes[0]), gl.to(ctx.dtypes[1])


class DEDN(nn.Module):
    """The two experts. ``attribute_vectors`` V (D, G), ``class_attributes`` A (K, D); rows L2-normalised here.

    forward(features (B, C, H, W) or (B, C, R)) -> Branches; ``scores`` turns them into class scores.
    Raises DednInputError when shapes disagree with the config, ``channels`` or ``regions``.
    """

    class_attributes: Tensor  # (K, D) buffer, fixed

    def __init__(
        self,
        cfg: ModelConfig,
        attribute_vectors: Tensor,
        class_attributes: Tensor,
        channels: int,
        regions: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        d = cfg.num_attributes
        if attribute_vectors.ndim != 2 or attribute_vectors.shape[0] != d:
            raise DednInputError(
                "model", "attribute_vectors", f"must be (D={d}, G), got {tuple(attribute_vectors.shape)}"
            )
        if class_attributes.ndim != 2 or class_attributes.shape[1] != d:
            raise DednInputError(
                "model", "class_attributes", f"must be (K, D={d}), got {tuple(class_attributes.shape)}"
            )
        if channels < 1 or regions < 1:
            raise DednInputError("model", "channels/regions", f"must be >= 1, got {channels=} {regions=}")
        self.cfg = cfg
        self.channels = channels
        self.regions = regions
        vectors = F.normalize(attribute_vectors.detach().float(), dim=1)  # (D, G)
        self.register_buffer("class_attributes", F.normalize(class_attributes.detach().float(), dim=1))  # (K, D)
        shared = (channels, regions, cfg.channel_attention, cfg.low_rank_hidden, generator)
        whole = np.zeros(d, dtype=np.int64)
        self.cexp = ExpertWeights(vectors, whole, *shared) if cfg.use_cexp else None
        self.fexp = ExpertWeights(vectors, np.asarray(cfg.partition), *shared) if cfg.use_fexp else None

    @property
    def experts(self) -> list[ExpertWeights]:
        return [e for e in (self.cexp, self.fexp) if e is not None]

    def _flatten(self, features: Tensor) -> Tensor:
        return flatten_features(features, self.channels, self.regions, self.cfg.normalize_features, "model")

    def forward(self, features: Tensor) -> Branches:
        """features (B, C, H, W) or (B, C, R) -> Branches of (B, D) attribute scores."""
        experts = self.experts
        outs = expert_branches(self._flatten(features), experts, self.cfg.num_attributes, self.cfg.channel_attention)
        out: list[Tensor | None] = [None] * 4
        for e, (o_r, o_c) in zip(experts, outs, strict=True):
            slot = 0 if e is self.cexp else 2
            out[slot], out[slot + 1] = o_r, o_c
        return Branches(*out)

    def scores(self, branches: Branches, lambda_rc: float | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Class scores (P_ec, P_ef), each (B, K) over all classes, or None for an expert switched off.

        ``lambda_rc`` None (training): O = O_r + O_c; else O = lambda_rc O_r + (1 - lambda_rc) O_c (eq. 8).
        Without channel attention O = O_r.
        """
        a = self.class_attributes
        p_ec = class_scores(expert_output(branches.cexp_r, branches.cexp_c, lambda_rc), a)
        p_ef = class_scores(expert_output(branches.fexp_r, branches.fexp_c, lambda_rc), a)
        return p_ec, p_ef


def flatten_features(features: Tensor, channels: int, regions: int, normalize: bool, source: str) -> Tensor:
    """(B, C, H, W) or (B, C, R) features -> (B, C, R), each region's channel vector L2-normalised when
    ``normalize``. Raises DednInputError (naming ``source``) for any other shape."""
    if features.ndim == 4:
        features = features.flatten(2)  # (B, C, H*W)
    if features.ndim != 3 or features.shape[1:] != (channels, regions):
        raise DednInputError(
            source,
            "features",
            f"must be (B, C={channels}, H, W) with H*W={regions} or (B, C, R), got {tuple(features.shape)}",
        )
    return F.normalize(features, dim=1) if normalize else features


def expert_branches(
    f: Tensor, experts: list[ExpertWeights], rows: int, channel_attention: bool
) -> list[tuple[Tensor, Tensor | None]]:
    """(O_r, O_c) of each expert, (B, rows) each, from normalised features f (B, C, R).

    All experts' rows go through one score GEMM and one attention GEMM per branch. The products are
    attribute-major, (n, C) @ (C, B*R) -> (n, B, R), so the softmax and the weighted sum run over the
    contiguous last dimension. ``rows``: attribute rows per expert (D, or M*D for a population whose
    members are stacked in each expert's rows).
    """
    b, c, r = f.shape
    v_pads = [e.padded_v() for e in experts]  # (S, Dmax, G) per expert
    region = [e.region_rows(v) for e, v in zip(experts, v_pads, strict=True)]
    f_cbr = f.permute(1, 0, 2).reshape(c, b * r)  # (C, B*R)
    s_r = (torch.cat([x[0] for x in region]) @ f_cbr).view(-1, b, r)  # V W1 F: (n, B, R) scores
    l_r = (torch.cat([x[1] for x in region]) @ f_cbr).view(-1, b, r)  # V W2 F: attention logits
    o_rs = list(AttendPair.apply(s_r, l_r).T.split(rows, dim=1))  # per expert (B, rows)
    o_cs: list[Tensor | None] = [None] * len(experts)
    if channel_attention:
        chan = [e.channel_rows(v) for e, v in zip(experts, v_pads, strict=True)]
        f_rbc = f.permute(2, 0, 1).reshape(r, b * c)  # (R, B*C)
        s_c = (torch.cat([x[0] for x in chan]) @ f_rbc).view(-1, b, c)  # V W3 F^T: (n, B, C)
        l_c = (torch.cat([x[1] for x in chan]) @ f_rbc).view(-1, b, c)  # V W4 F^T
        o_cs = list(AttendPair.apply(s_c, l_c).T.split(rows, dim=1))
    return list(zip(o_rs, o_cs, strict=True))


def expert_output(o_r: Tensor | None, o_c: Tensor | None, lambda_rc: float | None = None) -> Tensor | None:
    """O from the branches: O_r + O_c (lambda_rc None), lambda_rc O_r + (1 - lambda_rc) O_c, or O_r alone."""
    if o_r is None or o_c is None:
        return o_r
    if lambda_rc is None:
        return o_r + o_c
    return lambda_rc * o_r + (1.0 - lambda_rc) * o_c


def class_scores(o: Tensor | None, class_attributes: Tensor) -> Tensor | None:
    """P = O A^T (eq. 11): o (B, D), class_attributes (K, D) -> (B, K); None passes through."""
    return None if o is None else o @ class_attributes.to(o.dtype).T


def calibration_signs(unseen_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """s (K,): +1 on unseen classes, -1 on the others (calibrated stacking)."""
    return unseen_mask.to(dtype) * 2.0 - 1.0


def mix_scores(p_ec: Tensor | None, p_ef: Tensor | None, lambda_e: float, c: float, unseen_mask: Tensor) -> Tensor:
    """GZSL scores (eq. 19 plus calibrated stacking): lambda_e P_ec + (1 - lambda_e) P_ef + c s, (B, K).

    With one expert None the other is used alone. Raises DednInputError when both are None.
    """
    if p_ec is None and p_ef is None:
        raise DednInputError("model", "scores", "need at least one expert's scores, got none")
    if p_ec is None or p_ef is None:
        p = p_ec if p_ef is None else p_ef
        assert p is not None
    else:
        p = lambda_e * p_ec + (1.0 - lambda_e) * p_ef
    return p + c * calibration_signs(unseen_mask.to(p.device), p.dtype)


__all__ = [
    "DEDN",
    "AttendPair",
    "Branches",
    "ExpertWeights",
    "ModelConfig",
    "calibration_signs",
    "class_scores",
    "expert_branches",
    "expert_output",
    "flatten_features",
    "mix_scores",
]
